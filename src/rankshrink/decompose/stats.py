"""Streaming input statistics of one layer and their whitening factors; pure tensor maths.

A layer ``y = W x`` (a Linear, or a convolution acting on im2col patches) sees input
vectors ``x``; :class:`InputStats` keeps their count, mean and centred scatter in float64,
merged batch by batch. :func:`whitening` factors a second moment ``C = L Lᵀ`` through its
eigendecomposition, which is what the activation-optimal solvers in
:mod:`~rankshrink.decompose.activation` work with. :func:`statistics_of_kind` hands a
solver the kind it needs (full patch statistics, or the per-channel ones derived from them).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from ..errors import ConfigError

__all__ = ["InputStats", "DiagonalStats", "Whitening", "whitening", "pack_symmetric", "unpack_symmetric",
           "statistics_of_kind", "patch_moment_to_channel",
           "KINDS",
           "MIN_INVERSE_DAMPING", "DEFAULT_DAMPING", "check_damping", "check_moment"]


# Relative ridge always added before an inverse of a whitening factor is formed
# (Tucker-2/CP un-whitening). The SVD methods need no inverse and use ``damping`` as given.
MIN_INVERSE_DAMPING = 1e-4
# Default relative ridge for the SVD methods: none. Their solution W′ = U_r U_rᵀ W needs no
# inverse, and in directions the calibration set never excites it keeps the projected
# weights rather than anything arbitrary; on the digits CNN damping up to 0.1 changed
# neither activation error (< 0.01%) nor accuracy. Raise it to lean towards plain SVD.
DEFAULT_DAMPING = 0.0

KINDS = ("full", "channel")
# Statistics at least this wide keep only the upper triangle of their symmetric scatter (still float64):
# a BERT-base calibration holds twelve 3072-wide and 36 768-wide ones, 1.0 GiB full and half that packed.
PACK_MIN_DIM = 512
# Statistics of one-hot inputs (an Embedding's lookups): the second moment is diagonal, the token counts.
DIAGONAL = "diagonal"


# --------------------------------------------------------------------------- statistics

class _DerivedCache:
    """What a statistics object derives from its moments (whitening factors, channel statistics), cached
    until the moments change; a search bounds how much of it stays (see ``Factorizer``)."""

    _cache: dict

    def cache_nbytes(self) -> int:
        """Bytes held by the cached derived tensors."""
        total = 0
        for value in self._cache.values():
            if isinstance(value, (InputStats, DiagonalStats)):
                total += value.nbytes() + value.cache_nbytes()
            else:
                total += sum(t.numel() * t.element_size() for t in value if isinstance(t, torch.Tensor))
        return total

    def clear_cache(self) -> None:
        """Drop what was derived (recomputed, identically, when asked for again)."""
        self._cache.clear()


@dataclass
class InputStats(_DerivedCache):
    """Streaming moments of one layer's input vectors, in float64.

    ``kind='full'``: the vectors are the layer's whole inputs (Linear: ``in_features``;
    conv: im2col patches of length ``S·Πk``). ``kind='channel'``: the vectors are the
    ``S``-long channel vectors at every position of every patch (``Πk`` per patch);
    ``patch_mean`` then still holds the mean of the full patches (for bias correction).

    ``count`` vectors were summarised: ``mean`` is their mean and ``scatter`` their
    centred scatter ``Σ (x − mean)(x − mean)ᵀ`` (merged batch by batch with Chan's
    update, so the centred form stays accurate). ``samples`` counts calibration
    samples whose forward pass reached the layer. From ``PACK_MIN_DIM`` dimensions on,
    ``scatter`` is stored packed (its upper triangle, row by row, see :func:`pack_symmetric`);
    :meth:`moment` and :meth:`second_moment` always give the full matrix.
    """

    kind: str
    dim: int
    count: int = 0
    samples: int = 0
    mean: torch.Tensor | None = None
    scatter: torch.Tensor | None = None
    kernel_size: tuple[int, ...] | None = None
    patch_count: int = 0
    patch_mean: torch.Tensor | None = None
    pack: bool = True  # False: a transient summary, kept full however wide (packing it would be wasted work)
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ConfigError(f"statistics kind must be one of {KINDS}, got {self.kind!r}.")
        if self.mean is None:
            self.mean = torch.zeros(self.dim, dtype=torch.float64)
        if self.scatter is None:
            self.scatter = (torch.zeros(self.dim * (self.dim + 1) // 2, dtype=torch.float64)
                            if self.packed_storage else torch.zeros(self.dim, self.dim, dtype=torch.float64))
        elif self.packed_storage and self.scatter.dim() == 2:
            self.scatter = pack_symmetric(self.scatter)
        if self.kind == "channel" and self.patch_mean is None and self.kernel_size is not None:
            self.patch_mean = torch.zeros(self.dim * math.prod(self.kernel_size), dtype=torch.float64)

    @property
    def packed_storage(self) -> bool:
        return self.pack and self.dim >= PACK_MIN_DIM

    def _moments(self) -> tuple[torch.Tensor, torch.Tensor]:
        # __post_init__ fills both; the fields are Optional only so the constructor can default them
        assert self.mean is not None and self.scatter is not None
        scatter = self.scatter
        return self.mean, unpack_symmetric(scatter, self.dim) if scatter.dim() == 1 else scatter

    def _patch_mean(self) -> torch.Tensor:
        assert self.patch_mean is not None, "patch_mean is unknown (channel statistics without kernel_size)"
        return self.patch_mean

    # -- accumulation
    @staticmethod
    def batch_moments(rows: torch.Tensor) -> tuple[int, torch.Tensor, torch.Tensor]:
        """(n, mean, centred scatter) of ``rows`` (n, dim) in float64: what :meth:`merge` adds."""
        rows = rows.detach().to(torch.float64)
        batch_mean = rows.mean(dim=0)
        centred = rows - batch_mean
        return rows.shape[0], batch_mean, centred.T @ centred

    def update(self, rows: torch.Tensor) -> None:
        """Add ``rows`` (n, dim) to the statistics (Chan et al.'s pairwise merge)."""
        if rows.shape[0] == 0:
            return
        self.merge(*self.batch_moments(rows))

    def merge(self, n: int, batch_mean: torch.Tensor, batch_scatter: torch.Tensor) -> None:
        """Add a batch summarised by :meth:`batch_moments` (layers fed the same tensor share one summary)."""
        if n == 0:
            return
        assert self.mean is not None and self.scatter is not None
        mean, stored = self.mean, self.scatter
        if mean.device != batch_mean.device:
            mean, stored = mean.to(batch_mean.device), stored.to(batch_mean.device)
        total = self.count + n
        delta = batch_mean - mean
        self.mean = mean + delta * (n / total)
        added = batch_scatter + torch.outer(delta, delta) * (self.count * n / total)
        self.scatter = stored + (pack_symmetric(added) if stored.dim() == 1 else added)
        self.count = total
        self._cache.clear()

    def update_patch_mean(self, patches: torch.Tensor) -> None:
        """Channel kind: also track the mean of the full patches (n, S·Πk)."""
        patches = patches.detach().to(torch.float64)
        n = patches.shape[0]
        if n == 0:
            return
        patch_mean = self._patch_mean()
        if patch_mean.device != patches.device:
            patch_mean = patch_mean.to(patches.device)
        total = self.patch_count + n
        self.patch_mean = patch_mean + (patches.mean(dim=0) - patch_mean) * (n / total)
        self.patch_count = total

    # -- views
    def second_moment(self) -> torch.Tensor:
        """``C = Σ x xᵀ`` over all summarised vectors."""
        mean, scatter = self._moments()
        return scatter + self.count * torch.outer(mean, mean)

    def moment(self, centered: bool) -> torch.Tensor:
        return self._moments()[1] if centered else self.second_moment()

    def input_mean(self) -> torch.Tensor:
        """Mean of the layer's full input vector (patch mean for convolutions)."""
        assert self.mean is not None
        return self.mean if self.kind == "full" else self._patch_mean()

    def to_channel(self) -> "InputStats":
        """Channel statistics derived from full patch statistics (sum of the ``Πk`` diagonal blocks)."""
        if self.kind == "channel":
            return self
        if self.kernel_size is None:
            raise ConfigError("channel statistics need a convolution's patch statistics (kernel_size is unknown).")
        key = ("channel",)
        if key not in self._cache:
            k = math.prod(self.kernel_size)
            S = self.dim // k
            assert self.mean is not None
            full_mean = self.mean
            second = self.second_moment().reshape(S, k, S, k).diagonal(dim1=1, dim2=3).sum(dim=-1)
            mean = full_mean.reshape(S, k).mean(dim=1)
            count = self.count * k
            scatter = second - count * torch.outer(mean, mean)
            self._cache[key] = InputStats("channel", S, count=count, samples=self.samples, mean=mean,
                                          scatter=scatter, kernel_size=self.kernel_size,
                                          patch_count=self.count, patch_mean=full_mean.clone())
        return self._cache[key]

    def whitening(self, centered: bool, damping: float) -> "Whitening":
        """The (cached) whitening factor of :meth:`moment`."""
        key = ("whitening", bool(centered), float(damping))
        if key not in self._cache:
            self._cache[key] = whitening(self.moment(centered), damping)
        return self._cache[key]

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor the statistics hold, as stored, by name (what files and fingerprints store):
        ``scatter``, or ``scatter_upper`` when it is packed."""
        assert self.mean is not None and self.scatter is not None
        found = {"mean": self.mean, "scatter_upper" if self.scatter.dim() == 1 else "scatter": self.scatter}
        if self.patch_mean is not None:
            found["patch_mean"] = self.patch_mean
        return found

    def to_cpu(self) -> None:
        """Move every tensor to the CPU (where the factorization runs)."""
        assert self.mean is not None and self.scatter is not None
        self.mean, self.scatter = self.mean.cpu(), self.scatter.cpu()
        if self.patch_mean is not None:
            self.patch_mean = self.patch_mean.cpu()
        self._cache.clear()

    def nbytes(self) -> int:
        assert self.mean is not None and self.scatter is not None
        return self.scatter.numel() * 8 + self.mean.numel() * 8


@dataclass
class DiagonalStats(_DerivedCache):
    """Statistics of one-hot input vectors (an ``nn.Embedding``'s lookups), streamed in float64.

    An Embedding computes ``Wᵀ·e_v`` for the one-hot vector ``e_v`` of each index ``v``, so the
    second moment of its inputs is diagonal: ``counts[v]``, how often index ``v`` was looked up.
    Only that diagonal is kept (O(V), never a V×V matrix). ``count`` lookups were summarised;
    ``samples`` counts calibration samples whose forward pass reached the layer.
    """

    dim: int
    count: int = 0
    samples: int = 0
    counts: torch.Tensor | None = None
    kind: str = DIAGONAL
    kernel_size: tuple[int, ...] | None = None
    patch_count: int = 0
    patch_mean: torch.Tensor | None = None
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.counts is None:
            self.counts = torch.zeros(self.dim, dtype=torch.float64)

    def _counts(self) -> torch.Tensor:
        assert self.counts is not None  # set in __post_init__
        return self.counts

    def update_indices(self, indices: torch.Tensor) -> None:
        """Count the looked-up ``indices`` (any shape, integers in ``0..dim-1``)."""
        flat = indices.detach().reshape(-1).long()
        if flat.numel() == 0:
            return
        if int(flat.min()) < 0 or int(flat.max()) >= self.dim:
            raise ConfigError(f"embedding indices must lie in 0..{self.dim - 1}, got {int(flat.min())}.."
                              f"{int(flat.max())}.")
        counts = self._counts()
        if counts.device != flat.device:
            counts = counts.to(flat.device)
        self.counts = counts + torch.bincount(flat, minlength=self.dim).to(torch.float64)
        self.count += int(flat.numel())
        self._cache.clear()

    @property
    def mean(self) -> torch.Tensor:
        """Mean one-hot vector: the lookup frequencies."""
        return self._counts() / max(self.count, 1)

    @property
    def scatter(self) -> None:
        return None  # there is no full matrix; see diagonal()

    def diagonal(self, damping: float = 0.0) -> torch.Tensor:
        """``diag(C) + λ`` with ``λ = damping · tr(C)/V`` (the counts, ridge-damped)."""
        counts = self._counts().to(torch.float64)
        damping = check_damping(damping)
        return counts + damping * float(counts.sum()) / max(self.dim, 1) if damping else counts

    def input_mean(self) -> torch.Tensor:
        return self.mean

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"counts": self._counts()}

    def nbytes(self) -> int:
        return self._counts().numel() * 8


@functools.lru_cache(maxsize=4)
def _upper_mask(n: int, device: str) -> torch.Tensor:
    return torch.ones(n, n, dtype=torch.bool, device=device).triu()


def pack_symmetric(matrix: torch.Tensor) -> torch.Tensor:
    """The upper triangle of a symmetric (n, n) matrix, row by row: n(n+1)/2 values (:func:`unpack_symmetric`)."""
    return matrix.masked_select(_upper_mask(matrix.shape[0], str(matrix.device)))


def unpack_symmetric(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The full symmetric (n, n) matrix of :func:`pack_symmetric`'s ``packed`` upper triangle."""
    if packed.numel() != n * (n + 1) // 2:
        raise ConfigError(f"a packed symmetric {n}×{n} matrix has {n * (n + 1) // 2} values, got {packed.numel()}.")
    mask = _upper_mask(n, str(packed.device))
    full = torch.zeros(n, n, dtype=packed.dtype, device=packed.device)
    full.masked_scatter_(mask, packed)
    full.T.masked_scatter_(mask, packed)  # the lower triangle (the transposed view's upper one); the diagonal twice
    return full


class Whitening(NamedTuple):
    """``C + λI = L Lᵀ`` with ``L = Q·diag(root)``; ``root = sqrt(max(Λ, 0) + λ)``."""

    Q: torch.Tensor
    root: torch.Tensor
    damping_abs: float

    @property
    def L(self) -> torch.Tensor:
        return self.Q * self.root

    def inverse(self) -> torch.Tensor:
        """``L⁻¹ = diag(1/root)·Qᵀ`` (only valid when every root is > 0)."""
        return (self.Q / self.root).T


def check_moment(moment: torch.Tensor, dim: int, what: str = "input statistics") -> torch.Tensor:
    if moment.dim() != 2 or moment.shape[0] != moment.shape[1]:
        raise ConfigError(f"{what} must be a square (d, d) matrix, got shape {tuple(moment.shape)}.")
    if moment.shape[0] != dim:
        raise ConfigError(f"{what} are {moment.shape[0]}-dimensional but the weight expects "
                          f"{dim}-dimensional inputs; they were collected for another layer or method.")
    if not torch.isfinite(moment).all():
        raise ConfigError(f"{what} contain NaN or Inf values; recalibrate with finite data.")
    return moment.to(torch.float64)


def check_damping(damping: float) -> float:
    if (isinstance(damping, bool) or not isinstance(damping, (int, float))
            or not (damping >= 0 and math.isfinite(damping))):
        raise ConfigError(f"damping must be a finite number >= 0, got {damping!r}.")
    return float(damping)


def whitening(moment: torch.Tensor, damping: float = 0.0) -> Whitening:
    """Factor ``C + λI`` (λ = ``damping``·tr(C)/d) as ``L Lᵀ`` via an eigendecomposition in float64."""
    damping = check_damping(damping)
    moment = moment.to(torch.float64)
    moment = 0.5 * (moment + moment.T)
    eigenvalues, Q = torch.linalg.eigh(moment)
    d = moment.shape[0]
    # Eigenvalues at rounding level (|λ| ≤ d·ε·λ_max) are zero: without this their square
    # roots (√ε-sized, not ε-sized) would leak into the whitened matrix.
    floor = d * torch.finfo(torch.float64).eps * float(eigenvalues.abs().max()) if d else 0.0
    eigenvalues = torch.where(eigenvalues > floor, eigenvalues, torch.zeros_like(eigenvalues))
    scale = float(eigenvalues.sum()) / d if d else 0.0
    lam = damping * scale
    return Whitening(Q, (eigenvalues + lam).sqrt(), lam)


def patch_moment_to_channel(moment: torch.Tensor, kernel_size) -> torch.Tensor:
    """Channel moment ``Σ_k C[(s,k),(s′,k)]`` (S × S) from a full (S·Πk)² patch moment."""
    k = math.prod(kernel_size)
    S = moment.shape[0] // k
    return moment.reshape(S, k, S, k).diagonal(dim1=1, dim2=3).sum(dim=-1)



def statistics_of_kind(stats: InputStats, kind: str, weight_shape, *, layer: str = "layer",
                       method: str = "this method") -> InputStats:
    """The ``kind`` ('full' or 'channel') of statistics from ``stats``, checked against the weight.

    Channel statistics are derived from full ones (never the other way round).
    """
    weight_shape = tuple(weight_shape)
    if kind == DIAGONAL or isinstance(stats, DiagonalStats):
        if kind != DIAGONAL or not isinstance(stats, DiagonalStats):
            raise ConfigError(f"{layer}: method '{method}' needs {kind} statistics but the layer has "
                              f"{stats.kind} ones; recalibrate on this model.")
        if stats.dim != weight_shape[0]:
            raise ConfigError(f"{layer}: the lookup counts cover {stats.dim} indices but the embedding has "
                              f"{weight_shape[0]} rows; recalibrate on this model.")
        return stats
    kernel = tuple(weight_shape[2:])
    if kernel and stats.kernel_size is not None and tuple(stats.kernel_size) != kernel:
        raise ConfigError(f"{layer}: the statistics were collected for kernel size {tuple(stats.kernel_size)} "
                          f"but the weight has kernel size {kernel}; recalibrate on this model.")
    if kind == "full":
        if stats.kind != "full":
            raise ConfigError(f"{layer}: method '{method}' needs the full input (patch) statistics but only "
                              "channel statistics were collected; recalibrate with layers=None (full statistics "
                              "for every layer).")
        expected = math.prod(weight_shape[1:])
        if stats.dim != expected:
            raise ConfigError(f"{layer}: the statistics are {stats.dim}-dimensional but the weight of shape "
                              f"{weight_shape} expects {expected}-dimensional inputs; recalibrate on this model.")
        return stats
    if not kernel:
        raise ConfigError(f"{layer}: method '{method}' needs a convolution kernel.")
    channel = stats.to_channel()
    if channel.dim != weight_shape[1]:
        raise ConfigError(f"{layer}: the channel statistics have {channel.dim} channels but the kernel has "
                          f"{weight_shape[1]} input channels; recalibrate on this model.")
    return channel
