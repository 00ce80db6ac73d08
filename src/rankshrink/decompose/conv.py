"""Factorizations of convolution kernels into sequences of smaller kernels.

A kernel has shape (T, S, kh, kw) for Conv2d or (T, S, k) for Conv1d, where T is
the number of output channels and S of input channels. Each function returns the
weights of the factor convolutions in PyTorch layout, first factor first; the
layer builders in :mod:`rankshrink.factorized` turn them into ``nn.Conv`` layers.
Tucker-2 and CP use TensorLy (numpy backend, float64); SVD-based ones use torch.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from typing import NamedTuple

import numpy as np
import torch

from ..errors import ConfigError
from .svd import low_rank_factors


class SpatialFactors(NamedTuple):
    vertical: torch.Tensor    # (R, S, kh, 1)
    horizontal: torch.Tensor  # (T, R, 1, kw)


class WeightFactors(NamedTuple):
    spatial: torch.Tensor     # (R, S, *k): the full-size kernel, R filters
    pointwise: torch.Tensor   # (T, R, 1[, 1])


class Tucker2Factors(NamedTuple):
    first: torch.Tensor       # (R_in, S, 1[, 1])
    core: torch.Tensor        # (R_out, R_in, *k)
    last: torch.Tensor        # (T, R_out, 1[, 1])


class CPFactors(NamedTuple):
    first: torch.Tensor       # (R, S, 1[, 1])
    depthwise: tuple          # Conv2d: ((R, 1, kh, 1), (R, 1, 1, kw)); Conv1d: ((R, 1, k),)
    last: torch.Tensor        # (T, R, 1[, 1])


def _check_kernel(kernel: torch.Tensor) -> None:
    if kernel.dim() not in (3, 4):
        raise ConfigError("expected a Conv1d (T, S, k) or Conv2d (T, S, kh, kw) kernel, got shape "
                          f"{tuple(kernel.shape)}.")
    if not torch.isfinite(kernel).all():
        raise ConfigError("kernel contains NaN or Inf values; it cannot be factorized.")


def _check_rank(rank, full: int, method: str, shape) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= full:
        raise ConfigError(f"{method} rank must be an integer in 1..{full} for kernel shape {tuple(shape)}, got "
                          f"{rank!r}.")


def spatial_full_rank(shape) -> int:
    T, S, kh, kw = shape
    return min(S * kh, T * kw)


def weight_full_rank(shape) -> int:
    return min(shape[0], math.prod(shape[1:]))


def cp_max_rank(shape) -> int:
    """Upper bound on the CP rank of a tensor: the smallest product of all but one mode."""
    total = math.prod(shape)
    return min(total // d for d in shape)


def tucker2_ranks(shape, rank) -> tuple[int, int]:
    """Normalise a Tucker-2 rank: an int r means (min(r, T), min(r, S))."""
    T, S = shape[0], shape[1]
    if isinstance(rank, (tuple, list)) and len(rank) == 2 and all(
            isinstance(r, int) and not isinstance(r, bool) for r in rank):
        r_out, r_in = int(rank[0]), int(rank[1])
        if not (1 <= r_out <= T and 1 <= r_in <= S):
            raise ConfigError(f"tucker2 ranks (R_out, R_in) must lie in 1..{T} and 1..{S} for kernel shape "
                              f"{tuple(shape)}, got {tuple(rank)}.")
        return r_out, r_in
    if isinstance(rank, int) and not isinstance(rank, bool):
        if not 1 <= rank <= max(T, S):
            raise ConfigError(f"tucker2 rank must be an integer in 1..{max(T, S)} (or a pair (R_out, R_in)) for "
                              f"kernel shape {tuple(shape)}, got {rank}.")
        return min(rank, T), min(rank, S)
    raise ConfigError(f"tucker2 rank must be an int or a pair (R_out, R_in), got {rank!r}.")


def spatial_svd(kernel: torch.Tensor, rank: int, **svd_options) -> SpatialFactors:
    """Separate a Conv2d kernel into a (kh×1) conv S→R then a (1×kw) conv R→T.

    K[t,s,i,j] ≈ Σ_r V[r,s,i]·H[t,r,j], from the SVD of K arranged as a
    (S·kh) × (T·kw) matrix. Full rank reproduces K exactly.
    """
    _check_kernel(kernel)
    if kernel.dim() != 4:
        raise ConfigError("spatial SVD needs a Conv2d kernel (T, S, kh, kw); use 'weight' or 'tucker2' for Conv1d.")
    T, S, kh, kw = kernel.shape
    _check_rank(rank, spatial_full_rank(kernel.shape), "spatial SVD", kernel.shape)
    matrix = kernel.permute(1, 2, 0, 3).reshape(S * kh, T * kw)
    left, right = low_rank_factors(matrix, rank, **svd_options)      # (S·kh, R), (R, T·kw)
    vertical = left.T.reshape(rank, S, kh, 1)
    horizontal = right.reshape(rank, T, kw).permute(1, 0, 2).reshape(T, rank, 1, kw)
    return SpatialFactors(vertical.contiguous(), horizontal.contiguous())


def weight_svd(kernel: torch.Tensor, rank: int, **svd_options) -> WeightFactors:
    """Rank-R SVD of the kernel as a T × (S·k…) matrix: a k-sized conv S→R, then 1×1 R→T."""
    _check_kernel(kernel)
    T = kernel.shape[0]
    _check_rank(rank, weight_full_rank(kernel.shape), "weight SVD", kernel.shape)
    left, right = low_rank_factors(kernel.reshape(T, -1), rank, **svd_options)
    ones = (1,) * (kernel.dim() - 2)
    spatial = right.reshape(rank, *kernel.shape[1:])
    pointwise = left.reshape(T, rank, *ones)
    return WeightFactors(spatial.contiguous(), pointwise.contiguous())


def _to_numpy64(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().to("cpu", torch.float64).numpy()


def _from_numpy(array: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array)).to(device=like.device, dtype=like.dtype)


def tucker2(kernel: torch.Tensor, rank, *, n_iter_max: int = 100, tol: float = 1e-6,
            seed: int = 0) -> Tucker2Factors:
    """Tucker-2 on the channel modes: 1×1 S→R_in, k-sized core R_in→R_out, 1×1 R_out→T.

    HOOI from an HOSVD start (TensorLy ``partial_tucker``). At full ranks (T, S)
    the factors are orthonormal bases and the kernel is reproduced exactly.
    """
    _check_kernel(kernel)
    r_out, r_in = tucker2_ranks(kernel.shape, rank)
    import tensorly as tl
    from tensorly.decomposition import partial_tucker

    # A rank above a mode's unfolding rank makes TensorLy warn and complete the basis: expected.
    with tl.backend_context("numpy"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Trying to compute SVD with n_eigenvecs")
        (core, factors), _ = partial_tucker(_to_numpy64(kernel), rank=[r_out, r_in], modes=[0, 1],
                                            n_iter_max=n_iter_max, tol=tol, init="svd",
                                            random_state=seed)
    out_basis, in_basis = factors  # (T, R_out), (S, R_in)
    ones = (1,) * (kernel.dim() - 2)
    first = _from_numpy(in_basis.T, kernel).reshape(r_in, kernel.shape[1], *ones)
    last = _from_numpy(out_basis, kernel).reshape(kernel.shape[0], r_out, *ones)
    return Tucker2Factors(first, _from_numpy(core, kernel), last)


def cp(kernel: torch.Tensor, rank: int, *, method: str = "auto", n_iter_max: int = 100,
       refine_iters: int = 25, tol: float = 1e-7, seed: int = 0) -> CPFactors:
    """CP (CANDECOMP/PARAFAC) of a conv kernel as 1×1 → depthwise (k×1) → depthwise (1×k) → 1×1.

    ``method='compressed'`` first projects the two channel modes onto their leading
    HOSVD subspaces (at most R wide), runs ALS on that small core (up to ``n_iter_max``
    sweeps), lifts the factors back and refines with up to ``refine_iters`` ALS sweeps
    on the full kernel: the same model, far less work when R is below the channel
    counts, and sweeps that never form a Khatri-Rao product. ``'als'`` is plain TensorLy
    ``parafac`` on the full kernel. ``'auto'`` compresses whenever it shrinks a mode.
    Each rank-one term's scale is spread evenly over the factors.
    """
    _check_kernel(kernel)
    _check_rank(rank, cp_max_rank(kernel.shape), "CP", kernel.shape)
    T, S = kernel.shape[:2]
    if method == "auto":
        method = "compressed" if rank < max(T, S) else "als"
    tensor = _to_numpy64(kernel)
    if method == "als":
        import tensorly as tl
        from tensorly.decomposition import parafac

        # TensorLy warns when an SVD init is wider than a mode and pads it randomly: expected here.
        with tl.backend_context("numpy"), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Trying to compute SVD with n_eigenvecs")
            weights, factors = parafac(tensor, rank, n_iter_max=n_iter_max, init="svd", tol=tol,
                                       random_state=seed, linesearch=False)
    elif method == "compressed":
        weights, factors = np.ones(rank), [f.numpy() for f in _cp_compressed(
            torch.from_numpy(tensor), rank, n_iter_max, refine_iters, tol, seed)]
    else:
        raise ConfigError(f"unknown CP method {method!r}; use 'auto', 'als' or 'compressed'.")
    factors = _balance_cp(np.asarray(weights), [np.asarray(f) for f in factors])
    out_f, in_f, *spatial = factors
    ones = (1,) * (kernel.dim() - 2)
    first = _from_numpy(in_f.T, kernel).reshape(rank, S, *ones)
    last = _from_numpy(out_f, kernel).reshape(T, rank, *ones)
    depthwise: tuple[torch.Tensor, ...]
    if kernel.dim() == 4:
        kh, kw = kernel.shape[2:]
        depthwise = (_from_numpy(spatial[0].T, kernel).reshape(rank, 1, kh, 1),
                     _from_numpy(spatial[1].T, kernel).reshape(rank, 1, 1, kw))
    else:
        depthwise = (_from_numpy(spatial[0].T, kernel).reshape(rank, 1, kernel.shape[2]),)
    return CPFactors(first, depthwise, last)


def _leading_subspace(tensor: torch.Tensor, mode: int, width: int) -> torch.Tensor:
    """The ``width`` leading left singular vectors of the mode-``mode`` unfolding.

    From the eigenvectors of the unfolding's Gram matrix (dim × dim): an unfolding of a
    conv kernel is short and very wide, where this is much faster than an SVD.
    """
    dim = tensor.shape[mode]
    unfolded = tensor.movedim(mode, 0).reshape(dim, -1)
    _, vectors = torch.linalg.eigh(unfolded @ unfolded.T)
    return vectors.flip(1)[:, :min(width, dim)]


def _cp_svd_init(tensor: torch.Tensor, rank: int, generator: torch.Generator) -> list[torch.Tensor]:
    """Leading left singular vectors of each unfolding, padded with Gaussian columns past its rank."""
    factors = []
    for mode, dim in enumerate(tensor.shape):
        u = _leading_subspace(tensor, mode, rank)
        if u.shape[1] < rank:
            extra = torch.randn(dim, rank - u.shape[1], generator=generator, dtype=tensor.dtype)
            u = torch.cat([u, extra], dim=1)
        factors.append(u)
    return factors


def _cp_compressed(tensor: torch.Tensor, rank: int, n_iter_max: int, refine_iters: int, tol: float,
                   seed: int) -> list[torch.Tensor]:
    """CP of a float64 kernel: ALS on its channel-compressed core, lifted, then refined on the kernel."""
    bases = [_leading_subspace(tensor, mode, rank) for mode in (0, 1)]
    core = torch.einsum("ts...,ta,sb->ab...", tensor, bases[0], bases[1])
    generator = torch.Generator().manual_seed(seed)
    small = _cp_als(core, _cp_svd_init(core, rank, generator), n_iter_max, tol)
    lifted = [bases[0] @ small[0], bases[1] @ small[1], *small[2:]]
    return _cp_als(tensor, lifted, refine_iters, tol)


def _solve_gram(gram: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """``rhs @ gram⁻¹`` for a symmetric PSD ``gram``: Cholesky, pseudo-inverse if singular."""
    chol, info = torch.linalg.cholesky_ex(gram)
    if int(info) == 0:
        return torch.cholesky_solve(rhs.T, chol).T
    return rhs @ torch.linalg.pinv(gram, hermitian=True)


def _cp_als(tensor: torch.Tensor, factors: list[torch.Tensor], sweeps: int, tol: float) -> list[torch.Tensor]:
    """Up to ``sweeps`` CP-ALS sweeps on a dense float64 tensor, starting from ``factors``.

    The MTTKRP contracts the tensor with one factor at a time instead of forming the
    Khatri-Rao product of all other factors (TensorLy's way), so a sweep costs about
    N·|X|·R multiply-adds and little memory. Stops early once the relative error
    improves by less than ``tol`` in a sweep. Term scales stay in the factors.
    """
    if sweeps <= 0:
        return [f.clone() for f in factors]
    with _few_threads_if_small(tensor.numel() * factors[0].shape[1]):
        return _cp_als_sweeps(tensor, factors, sweeps, tol)


# Below this much work (tensor elements × rank) a sweep's parallel regions cost more than
# they save: one intra-op thread is faster, by far on a busy machine.
SMALL_CP_WORK = 1 << 22


@contextlib.contextmanager
def _few_threads_if_small(work: int):
    before = torch.get_num_threads()
    if work >= SMALL_CP_WORK or before == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _cp_als_sweeps(tensor: torch.Tensor, factors: list[torch.Tensor], sweeps: int, tol: float) -> list[torch.Tensor]:
    order = tensor.dim()
    letters = "abcdefgh"[:order]
    norm = float(tensor.norm()) or 1.0
    factors = [f.clone() for f in factors]
    grams = [f.T @ f for f in factors]
    previous = None
    for _ in range(sweeps):
        for mode in range(order):
            others = [m for m in range(order) if m != mode]
            spec = f"{letters}," + ",".join(f"{letters[m]}z" for m in others) + f"->{letters[mode]}z"
            mttkrp = torch.einsum(spec, tensor, *[factors[m] for m in others])
            gram = torch.ones_like(grams[0])
            for m in others:
                gram = gram * grams[m]
            factors[mode] = _solve_gram(gram, mttkrp)
            grams[mode] = factors[mode].T @ factors[mode]
        # ‖X − X̂‖² = ‖X‖² − 2⟨X, X̂⟩ + ‖X̂‖², all from quantities of the last update.
        squared = norm ** 2 - 2 * float((mttkrp * factors[-1]).sum()) + float((gram * grams[-1]).sum())
        error = math.sqrt(max(squared, 0.0)) / norm
        if previous is not None and abs(previous - error) < tol:
            break
        previous = error
    return factors


def _balance_cp(weights: np.ndarray, factors: list[np.ndarray]) -> list[np.ndarray]:
    """Give every factor column the same norm: the N-th root of the term's total scale."""
    norms = [np.linalg.norm(f, axis=0) for f in factors]
    scale = np.abs(weights) * np.prod(norms, axis=0)
    share = scale ** (1.0 / len(factors))
    balanced = []
    for index, (factor, norm) in enumerate(zip(factors, norms)):
        safe = np.where(norm > 0, norm, 1.0)
        column = factor / safe * share
        if index == 0:
            column = column * np.sign(weights)  # keep the sign of negative weights
        balanced.append(column)
    return balanced


def reconstruct_spatial(f: SpatialFactors) -> torch.Tensor:
    T, R, _, kw = f.horizontal.shape
    _, S, kh, _ = f.vertical.shape
    return torch.einsum("rsi,trj->tsij", f.vertical[..., 0], f.horizontal[:, :, 0, :])


def reconstruct_weight(f: WeightFactors) -> torch.Tensor:
    R = f.spatial.shape[0]
    T = f.pointwise.shape[0]
    return (f.pointwise.reshape(T, R) @ f.spatial.reshape(R, -1)).reshape(T, *f.spatial.shape[1:])


def reconstruct_tucker2(f: Tucker2Factors) -> torch.Tensor:
    T, r_out = f.last.shape[:2]
    r_in, S = f.first.shape[:2]
    return torch.einsum("to,oi...,is->ts...", f.last.reshape(T, r_out), f.core, f.first.reshape(r_in, S))


def reconstruct_cp(f: CPFactors) -> torch.Tensor:
    T, R = f.last.shape[:2]
    S = f.first.shape[1]
    A, B = f.last.reshape(T, R), f.first.reshape(R, S)
    if len(f.depthwise) == 2:
        C = f.depthwise[0].reshape(R, -1)
        D = f.depthwise[1].reshape(R, -1)
        return torch.einsum("tr,rs,ri,rj->tsij", A, B, C, D)
    C = f.depthwise[0].reshape(R, -1)
    return torch.einsum("tr,rs,ri->tsi", A, B, C)
