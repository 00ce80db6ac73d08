"""Activation-optimal factorizations: keep ``W′X`` close to ``WX``, not ``W′`` to ``W``.

Pure tensor maths: weights and input statistics in, factor weights out.

The problem
-----------
For a layer ``y = W x`` (a Linear, or a convolution seen as ``W`` acting on im2col
patches) and calibration inputs ``X`` (one vector per column), find the rank-``r``
``W′`` minimising ``‖(W − W′)X‖_F``. With ``C = X Xᵀ = Σ x xᵀ`` this is
``tr((W − W′) C (W − W′)ᵀ) = ‖(W − W′)L‖_F²`` for any factor ``C = L Lᵀ``.

Closed form (SVD methods)
-------------------------
Let ``M = W L`` (the *whitened* weight) with SVD ``M = U Σ Vᵀ``. The best rank-``r``
approximation of ``M`` is ``U_r U_rᵀ M`` (Eckart–Young), so

    W′ = U_r (U_rᵀ W)       and     ‖(W − W′)X‖_F² = Σ_{i>r} σ_i(M)².

"Un-whitening" is done by this projection, never by inverting ``L``: the solution is
exact and stable even when ``C`` is singular (fewer samples than dimensions, dead
inputs) or badly conditioned. ``L = Q Λ^{1/2}`` comes from the eigendecomposition of
``C`` in float64; eigenvalues at rounding level (or below zero) are set to zero. ``damping``
adds ``λ·I`` with ``λ = damping · tr(C)/d`` to ``C``: it blends the activation
objective with the plain weight objective (``damping → ∞`` gives the plain SVD) and
guards against over-fitting a small calibration set.

Bias correction
---------------
With a bias the affine optimum also corrects the mean shift: fitting on the centred
statistics ``Σ (x − μ)(x − μ)ᵀ`` and setting ``b′ = b + (W − W′)μ`` minimises
``‖(W − W′)X + (b − b′)1ᵀ‖_F`` over both ``W′`` and ``b′`` (see :func:`bias_shift`).

Which statistics each method uses
---------------------------------
* ``svd`` (Linear) and ``weight`` (conv): the full input/patch second moment,
  ``d = in_features`` or ``d = S·kh·kw``. Exact closed form as above.
* ``spatial`` (Conv2d): the same full patch statistics. The kernel is a
  ``(S·kh) × (T·kw)`` matrix whose rank is limited; with the *vertical*-patch
  moment ``C_v = Σ_j C[(s,i,j),(s′,i′,j)]`` (derived from the full one, exact when
  horizontally adjacent columns are uncorrelated) it is a left-weighted low-rank
  problem solved in closed form, ``K′ = K V_r V_rᵀ`` with ``V_r`` the top right
  singular vectors of ``L_vᵀ K``. The horizontal factor is then re-fitted by exact
  least squares on the full patch moment, which never increases the true error.
* ``tucker2`` and ``cp``: only the input-channel moment ``C_s`` (``S × S``; derived
  from the full moment by summing its diagonal ``kh·kw`` blocks, or collected alone,
  which is ``kh·kw`` times cheaper). The kernel's input mode is whitened,
  ``K̃ = K ×_in L_sᵀ``, decomposed with the ordinary Tucker-2/CP, and the first
  (1×1) factor is un-whitened with ``L_s⁻¹``. That needs an inverse, so ``C_s`` is
  always damped by at least ``MIN_INVERSE_DAMPING`` (relative).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ..errors import ConfigError
from .conv import (
    CPFactors,
    SpatialFactors,
    Tucker2Factors,
    WeightFactors,
    _check_kernel,
    _check_rank,
    cp,
    spatial_full_rank,
    tucker2,
    weight_full_rank,
)
from .stats import MIN_INVERSE_DAMPING, Whitening, check_damping, check_moment, whitening
from .svd import _check_matrix_and_rank, choose_svd_method, truncated_svd

__all__ = [
    "gram_activation_svd", "gram_singular_values", "GRAM_MIN_DIM",
    "ActivationSVD", "whitened_singular_values", "diagonal_activation_svd", "tail_errors",
    "activation_svd", "activation_low_rank_factors", "activation_weight_svd", "activation_spatial_svd",
    "activation_tucker2", "activation_cp", "activation_error", "relative_activation_error",
    "optimal_activation_error", "bias_shift", "vertical_moment",
]


# --------------------------------------------------------------------------- SVD (Linear, weight)

class ActivationSVD(NamedTuple):
    """``matrix ≈ left @ right``, minimising ``‖(matrix − left@right) L‖_F``.

    ``singular`` holds the whitened singular values computed (all of them with the
    exact method, the top ``rank`` with the randomized one); ``total`` is
    ``‖matrix·L‖_F²``, so the optimum error is ``sqrt(total − Σ singular[:rank]²)``.
    """

    left: torch.Tensor
    right: torch.Tensor
    singular: torch.Tensor
    total: float

    def error(self) -> float:
        r = self.left.shape[1]
        kept = float((self.singular[:r].to(torch.float64) ** 2).sum())
        if self.singular.numel() > r:
            return float((self.singular[r:].to(torch.float64) ** 2).sum()) ** 0.5
        return max(self.total - kept, 0.0) ** 0.5


def _whitened(matrix: torch.Tensor, moment: torch.Tensor | Whitening, damping: float) -> torch.Tensor:
    w = moment if isinstance(moment, Whitening) else whitening(
        check_moment(moment, matrix.shape[1]), damping)
    if w.Q.shape[0] != matrix.shape[1]:
        raise ConfigError(f"input statistics are {w.Q.shape[0]}-dimensional but the weight expects "
                          f"{matrix.shape[1]}-dimensional inputs.")
    return matrix.detach().to(torch.float64) @ w.L


def whitened_singular_values(matrix: torch.Tensor, moment: torch.Tensor | Whitening,
                             damping: float = 0.0) -> torch.Tensor:
    """Singular values of ``matrix·L``: their tail beyond ``r`` is the best rank-``r`` activation error."""
    return torch.linalg.svdvals(_whitened(matrix, moment, damping))


def _balance(U_r: torch.Tensor, right: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rescale rank-one terms so column i of left and row i of right have equal norms."""
    norms = right.norm(dim=1)
    scale = torch.where(norms > 0, norms.sqrt(), torch.ones_like(norms))
    return U_r * scale, right / scale[:, None]


def activation_svd(matrix: torch.Tensor, moment: torch.Tensor | Whitening, rank: int, *,
                   damping: float = 0.0, method: str = "auto", **svd_options) -> ActivationSVD:
    """Best rank-``rank`` ``left @ right ≈ matrix`` in the activation norm ``‖(·)L‖_F``, ``C = L Lᵀ``.

    ``moment`` is ``C = Σ x xᵀ`` (d × d, d = matrix columns) or a precomputed
    :class:`Whitening`. ``method`` picks the SVD of the whitened matrix like
    :func:`~rankshrink.decompose.truncated_svd`. Factors come back in the input's dtype
    (computation in float64).
    """
    _check_matrix_and_rank(matrix, rank)
    dtype = matrix.dtype
    W = matrix.detach().to(torch.float64)
    M = _whitened(W, moment, damping)
    total = float((M ** 2).sum())
    if method == "auto":
        method = choose_svd_method(tuple(M.shape), rank)
    if method == "exact":
        U, S, _ = torch.linalg.svd(M, full_matrices=False)
        U_r = U[:, :rank]
    elif method == "randomized":
        U_r, S, _ = truncated_svd(M, rank, method="randomized", **svd_options)
    else:
        raise ConfigError(f"unknown SVD method {method!r}; use 'auto', 'exact' or 'randomized'.")
    left, right = _balance(U_r, U_r.T @ W)  # W′ = U_r U_rᵀ W: projection, no inverse of L
    return ActivationSVD(left.to(dtype), right.to(dtype), S, total)


def diagonal_activation_svd(matrix: torch.Tensor, diagonal: torch.Tensor, rank: int) -> ActivationSVD:
    """:func:`activation_svd` for inputs whose second moment is diagonal, ``C = diag(diagonal)``.

    The case of an Embedding: its inputs are one-hot vectors, ``C = diag(lookup counts)``, so
    ``L = diag(√counts)`` and the whitened matrix is ``matrix`` with column ``v`` scaled by
    ``√counts[v]``. Columns with a zero weight drop out of the fit (the projection ``U_r U_rᵀ``
    still maps them). The left singular vectors come from the (m × m) Gram matrix of the
    weighted columns when m is the smaller side -- O(m²·n), never an n × n matrix (an
    embedding has n = vocabulary size).
    """
    _check_matrix_and_rank(matrix, rank)
    weights = diagonal.detach().to(torch.float64).reshape(-1)
    if weights.numel() != matrix.shape[1]:
        raise ConfigError(f"the diagonal statistics have {weights.numel()} entries but the matrix has "
                          f"{matrix.shape[1]} columns.")
    if not torch.isfinite(weights).all() or bool((weights < 0).any()):
        raise ConfigError("the diagonal statistics must be finite and non-negative.")
    dtype = matrix.dtype
    W = matrix.detach().to(torch.float64)
    keep = weights > 0
    M = W[:, keep] * weights[keep].sqrt()
    if M.shape[1] == 0:
        raise ConfigError("the diagonal statistics are all zero (no input was ever seen).")
    if M.shape[0] <= M.shape[1]:
        eigenvalues, U = torch.linalg.eigh(M @ M.T)
        order = torch.argsort(eigenvalues, descending=True)
        U, S = U[:, order], eigenvalues[order].clamp(min=0).sqrt()
    else:
        U, S, _ = torch.linalg.svd(M, full_matrices=False)
    U_r = U[:, :rank]
    if U_r.shape[1] < rank:  # fewer weighted columns than the rank: complete the basis from the matrix itself
        U_r = torch.linalg.qr(torch.cat([U_r, W], dim=1)).Q[:, :rank]
    left, right = _balance(U_r, U_r.T @ W)
    return ActivationSVD(left.to(dtype), right.to(dtype), S, float((S ** 2).sum()))


def tail_errors(singular: torch.Tensor, full_rank: int) -> torch.Tensor:
    """``Σ_{i>r} σ_i²`` for every rank ``r = 0..full_rank`` (float64): the best rank-r (activation) error.

    With the singular values of the whitened weight ``W·L`` these are the data-aware output errors
    ``‖(W − W′_r)X‖²_F`` of the optimal rank-r factorization, for every rank at once.
    """
    squares = singular.detach().to(torch.float64).reshape(-1) ** 2
    kept = torch.cat([squares.new_zeros(1), torch.cumsum(squares, 0)])
    if kept.numel() < full_rank + 1:  # ranks beyond the singular values given keep everything
        kept = torch.cat([kept, kept[-1:].expand(full_rank + 1 - kept.numel())])
    return (squares.sum() - kept[:full_rank + 1]).clamp(min=0)


# From this many rows or columns on, :func:`gram_activation_svd` replaces the whitening of the larger side.
GRAM_MIN_DIM = 1024


# The last layer's Gram spectrum: the search asks for one layer's error curve and then its probe
# factorizations at two ranks, one after another (keyed by the weight's storage and version and the moment's
# trace and sum and the weight's content sums, so another weight or other statistics never match).
_LAST_SPECTRUM: list[tuple[tuple, tuple]] = []


def _gram_spectrum(matrix: torch.Tensor, moment: torch.Tensor, damping: float) -> tuple:
    """(singular values of ``W·L`` descending, their left vectors or None, ``W·L`` or None, right vectors or None).

    ``(W L)(W L)ᵀ = W (C + λI) Wᵀ``: when W has fewer rows than columns its (out × out) eigendecomposition
    gives the whitened spectrum and left vectors without factoring the (in × in) moment -- the costly
    eigendecomposition for a BERT feed-forward output layer (3072 inputs). Otherwise ``L`` of the smaller
    (in × in) moment is formed and ``(W L)ᵀ(W L)``'s eigendecomposition gives the right vectors.
    """
    C = check_moment(moment, matrix.shape[1]).to(torch.float64)
    # The content sums guard against a freed copy's memory reused by another weight of the same shape.
    flat = matrix.detach().reshape(-1).to(torch.float64)
    key = (matrix.data_ptr(), matrix._version, tuple(matrix.shape), matrix.dtype, float(flat.sum()),
           float((flat * torch.arange(1, flat.numel() + 1, dtype=torch.float64)).sum()),
           float(torch.diagonal(C).sum()), float(C.sum()), float(damping))
    if _LAST_SPECTRUM and _LAST_SPECTRUM[0][0] == key:
        return _LAST_SPECTRUM[0][1]
    W = matrix.detach().to(torch.float64)
    C = (C + C.T).mul_(0.5)  # in place: one d×d temporary, not two (75 MB each for a 3072-wide moment)
    d = C.shape[0]
    lam = check_damping(damping) * float(torch.diagonal(C).sum()) / d if d else 0.0
    found: tuple
    if W.shape[0] <= W.shape[1]:
        gram = W @ C @ W.T
        if lam:
            gram = gram + lam * (W @ W.T)
        values, vectors = torch.linalg.eigh(0.5 * (gram + gram.T))
        found = (values.flip(0).clamp(min=0).sqrt(), vectors.flip(1), None, None)
    else:
        M = W @ whitening(C, damping).L
        values, V = torch.linalg.eigh(M.T @ M)
        found = (values.flip(0).clamp(min=0).sqrt(), None, M, V.flip(1))
    _LAST_SPECTRUM[:] = [(key, found)]
    return found


def gram_activation_svd(matrix: torch.Tensor, moment: torch.Tensor, rank: int, *,
                        damping: float = 0.0) -> ActivationSVD:
    """:func:`activation_svd` through the Gram matrix of the smaller side (see :func:`_gram_spectrum`).

    The same factors in exact arithmetic; squaring the matrix costs precision only in directions whose
    singular values are below ~1e-8 of the largest, which a truncation drops anyway. For large layers
    (``GRAM_MIN_DIM``), where it is several times faster than the whitening eigendecomposition plus an SVD.
    """
    _check_matrix_and_rank(matrix, rank)
    dtype = matrix.dtype
    W = matrix.detach().to(torch.float64)
    singular, left_vectors, M, right_vectors = _gram_spectrum(matrix, moment, damping)
    if left_vectors is not None:
        U_r = left_vectors[:, :rank]
    else:
        s_r = singular[:rank]
        keep = s_r > s_r.max().clamp(min=1e-300) * 1e-12
        U_r = torch.where(keep, M @ right_vectors[:, :rank] / torch.where(keep, s_r, torch.ones_like(s_r)),
                          torch.zeros_like(M[:, :rank]))
    left, right = _balance(U_r, U_r.T @ W)  # W′ = U_r U_rᵀ W, as activation_svd
    return ActivationSVD(left.to(dtype), right.to(dtype), singular, float((singular ** 2).sum()))


def gram_singular_values(matrix: torch.Tensor, moment: torch.Tensor, damping: float = 0.0) -> torch.Tensor:
    """Singular values of ``W·L`` through the smaller Gram matrix (:func:`gram_activation_svd`)."""
    return _gram_spectrum(matrix, moment, damping)[0]


def activation_low_rank_factors(matrix: torch.Tensor, moment, rank: int, *, damping: float = 0.0,
                                **svd_options) -> tuple[torch.Tensor, torch.Tensor]:
    """Like :func:`~rankshrink.decompose.low_rank_factors` but activation-optimal."""
    result = activation_svd(matrix, moment, rank, damping=damping, **svd_options)
    return result.left, result.right


def activation_weight_svd(kernel: torch.Tensor, moment, rank: int, *, damping: float = 0.0,
                          **svd_options) -> WeightFactors:
    """Activation-optimal 'weight' SVD of a conv kernel; ``moment`` is the (S·Πk)² patch moment."""
    _check_kernel(kernel)
    T = kernel.shape[0]
    _check_rank(rank, weight_full_rank(kernel.shape), "weight SVD", kernel.shape)
    left, right = activation_low_rank_factors(kernel.reshape(T, -1), moment, rank, damping=damping,
                                              **svd_options)
    ones = (1,) * (kernel.dim() - 2)
    return WeightFactors(right.reshape(rank, *kernel.shape[1:]).contiguous(),
                         left.reshape(T, rank, *ones).contiguous())


# --------------------------------------------------------------------------- spatial

def vertical_moment(moment: torch.Tensor, kernel_shape) -> torch.Tensor:
    """``C_v[(s,i),(s′,i′)] = Σ_j C[(s,i,j),(s′,i′,j)]`` from the full (S·kh·kw)² patch moment."""
    _, S, kh, kw = kernel_shape
    return moment.reshape(S, kh, kw, S, kh, kw).diagonal(dim1=2, dim2=5).sum(dim=-1).reshape(S * kh, S * kh)


def activation_spatial_svd(kernel: torch.Tensor, moment: torch.Tensor, rank: int, *,
                           damping: float = 0.0, refit: bool = True, **svd_options) -> SpatialFactors:
    """Data-aware spatial SVD (kh×1 conv S→R, then 1×kw conv R→T) from the full patch moment.

    Closed form under the vertical-patch moment (see the module notes), then, with
    ``refit``, the horizontal factor is re-solved by exact least squares on the full
    patch moment, which can only lower the true activation error.
    """
    _check_kernel(kernel)
    if kernel.dim() != 4:
        raise ConfigError("spatial SVD needs a Conv2d kernel (T, S, kh, kw); use 'weight' or 'tucker2' for Conv1d.")
    T, S, kh, kw = kernel.shape
    _check_rank(rank, spatial_full_rank(kernel.shape), "spatial SVD", kernel.shape)
    dtype = kernel.dtype
    K = kernel.detach().to(torch.float64)
    full = check_moment(moment, S * kh * kw, "patch statistics")
    damping = check_damping(damping)
    if damping:
        full = full + damping * float(full.diagonal().sum()) / full.shape[0] * torch.eye(full.shape[0],
                                                                                         dtype=full.dtype)
    Mk = K.permute(1, 2, 0, 3).reshape(S * kh, T * kw)
    Lv = whitening(vertical_moment(full, kernel.shape), 0.0).L          # (S·kh, S·kh)
    N = Lv.T @ Mk                                                       # left-whitened kernel
    V_r = truncated_svd(N, rank, **svd_options).Vh.T                                                   # (T·kw, R)
    vertical, horizontal = Mk @ V_r, V_r.T                              # K′ = K V_r V_rᵀ
    if refit:
        horizontal = _refit_horizontal(K, full, vertical, rank)
    # Balance the two factors per rank-one term.
    v_norm = vertical.norm(dim=0)
    h_norm = horizontal.norm(dim=1)
    ok = (v_norm > 0) & (h_norm > 0)
    scale = torch.where(ok, (h_norm / torch.where(ok, v_norm, torch.ones_like(v_norm))).sqrt(), torch.ones_like(v_norm))
    vertical, horizontal = vertical * scale, horizontal / scale[:, None]
    v = vertical.T.reshape(rank, S, kh, 1)
    h = horizontal.reshape(rank, T, kw).permute(1, 0, 2).reshape(T, rank, 1, kw)
    return SpatialFactors(v.to(dtype).contiguous(), h.to(dtype).contiguous())


def _least_squares_map(K_flat: torch.Tensor, full: torch.Tensor, G: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``Y = K C G (GᵀCG)⁻¹``: the exact minimiser of ``‖(K − Y Gᵀ)X‖_F`` for a fixed ``G``.

    ``G`` (d × q) maps an intermediate q-vector to patch space (the factors before the
    one being solved for). Returns ``Y`` (T × q) and the intermediate moment ``GᵀCG``.
    """
    CG = full @ G
    A = G.T @ CG
    ridge = 1e-12 * float(A.diagonal().abs().max().clamp(min=1e-300))
    A = A + ridge * torch.eye(A.shape[0], dtype=A.dtype)
    Y = torch.linalg.solve(A, (K_flat @ CG).T).T
    return Y, A


def _refit_horizontal(K: torch.Tensor, full: torch.Tensor, vertical: torch.Tensor, rank: int) -> torch.Tensor:
    """Exact least-squares horizontal factor (R, T·kw) for a fixed vertical one (S·kh, R)."""
    T, S, kh, kw = K.shape
    V = vertical.T.reshape(rank, S, kh)
    # G maps the intermediate (r, j) to patch space (s, i, j).
    G = torch.einsum("rsi,jk->sijrk", V, torch.eye(kw, dtype=K.dtype)).reshape(S * kh * kw, rank * kw)
    H, _ = _least_squares_map(K.reshape(T, -1), full, G)               # (T, R·kw)
    return H.reshape(T, rank, kw).permute(1, 0, 2).reshape(rank, T * kw)


# --------------------------------------------------------------------------- Tucker-2 / CP

def patch_moment_to_channel(moment: torch.Tensor, kernel_size) -> torch.Tensor:
    """Channel moment ``Σ_k C[(s,k),(s′,k)]`` (S × S) from a full (S·Πk)² patch moment."""
    k = math.prod(kernel_size)
    S = moment.shape[0] // k
    return moment.reshape(S, k, S, k).diagonal(dim1=1, dim2=3).sum(dim=-1)


def _channel_whitening(kernel: torch.Tensor, moment, damping: float) -> Whitening:
    S = kernel.shape[1]
    if isinstance(moment, Whitening):
        w = moment
    else:
        w = whitening(check_moment(moment, S, "channel statistics"), max(check_damping(damping), MIN_INVERSE_DAMPING))
    if w.Q.shape[0] != S:
        raise ConfigError(f"channel statistics are {w.Q.shape[0]}-dimensional but the kernel has {S} input channels.")
    if not bool((w.root > 0).all()):
        w = Whitening(w.Q, w.root.clamp(min=float(w.root.max()) * 1e-8 + 1e-300), w.damping_abs)
    return w


def _whiten_input_mode(kernel: torch.Tensor, w: Whitening) -> torch.Tensor:
    return torch.einsum("ts...,sk->tk...", kernel.detach().to(torch.float64), w.L)


def _unwhiten_first(first: torch.Tensor, w: Whitening) -> torch.Tensor:
    rows = first.reshape(first.shape[0], first.shape[1]).to(torch.float64) @ w.inverse()
    return rows.reshape(first.shape)


def _full_moment(kernel: torch.Tensor, full_moment: torch.Tensor | None, damping: float) -> torch.Tensor | None:
    if full_moment is None:
        return None
    full = check_moment(full_moment, math.prod(kernel.shape[1:]), "patch statistics")
    if damping:
        full = full + damping * float(full.diagonal().sum()) / full.shape[0] * torch.eye(full.shape[0],
                                                                                         dtype=full.dtype)
    return full


def activation_tucker2(kernel: torch.Tensor, moment, rank, *, damping: float = 0.0,
                       full_moment: torch.Tensor | None = None, **tucker_options) -> Tucker2Factors:
    """Tucker-2 of the input-whitened kernel; the first 1×1 factor is un-whitened (``moment``: S × S).

    With ``full_moment`` (the (S·Πk)² patch moment) the core and last factor are then
    re-fitted jointly and exactly for the fixed first factor: ``Y = K C G (GᵀCG)⁻¹``
    followed by the activation-optimal rank-``R_out`` SVD of ``Y`` under ``GᵀCG``.
    """
    _check_kernel(kernel)
    w = _channel_whitening(kernel, moment, damping)
    f = tucker2(_whiten_input_mode(kernel, w), rank, **tucker_options)
    dtype = kernel.dtype
    first, core, last = _unwhiten_first(f.first, w), f.core.to(torch.float64), f.last.to(torch.float64)
    full = _full_moment(kernel, full_moment, damping)
    r_out, r_in = core.shape[:2]
    T, S = kernel.shape[:2]
    k = math.prod(kernel.shape[2:])
    if full is not None and r_out <= r_in * k:
        F = first.reshape(r_in, S)
        G = torch.einsum("as,pq->spaq", F, torch.eye(k, dtype=F.dtype)).reshape(S * k, r_in * k)
        Y, D = _least_squares_map(kernel.detach().to(torch.float64).reshape(T, -1), full, G)
        result = activation_svd(Y, D, r_out, method="exact")
        last = result.left.reshape(last.shape)
        core = result.right.reshape(core.shape)
    # Like the plain Tucker-2: unit-norm first rows and last columns, the core carries the
    # scale (un-whitening leaves the first factor tiny and the core huge otherwise).
    row_norms = first.reshape(r_in, -1).norm(dim=1)
    row_norms = torch.where(row_norms > 0, row_norms, torch.ones_like(row_norms))
    first = first / row_norms.reshape(-1, *([1] * (first.dim() - 1)))
    core = core * row_norms.reshape(1, -1, *([1] * (core.dim() - 2)))
    col_norms = last.reshape(last.shape[0], r_out).norm(dim=0)
    col_norms = torch.where(col_norms > 0, col_norms, torch.ones_like(col_norms))
    last = last / col_norms.reshape(1, -1, *([1] * (last.dim() - 2)))
    core = core * col_norms.reshape(-1, *([1] * (core.dim() - 1)))
    return Tucker2Factors(first.to(dtype).contiguous(), core.to(dtype).contiguous(), last.to(dtype).contiguous())


CP_ALS_MAX_UNKNOWNS = 1536  # rank × (largest mode) above which the full-moment ALS sweeps are skipped


def _cp_rows(modes: list[torch.Tensor]) -> torch.Tensor:
    """(R, S·Πk): row r is the rank-one input filter F_r ⊗ V_r ⊗ H_r."""
    rows = modes[0]
    for factor in modes[1:]:
        rows = (rows[:, :, None] * factor[:, None, :]).reshape(rows.shape[0], -1)
    return rows


def _cp_last(K: torch.Tensor, full: torch.Tensor, modes: list[torch.Tensor]) -> torch.Tensor:
    A, _ = _least_squares_map(K, full, _cp_rows(modes).T)
    return A


def _cp_mode_update(K: torch.Tensor, full: torch.Tensor, A: torch.Tensor, modes: list[torch.Tensor],
                    index: int, dims) -> torch.Tensor:
    """Exact least-squares update of one input-side CP factor (all others fixed) under the full moment."""
    R = A.shape[1]
    n = len(dims)
    order = [index] + [m for m in range(n) if m != index]
    others = [modes[m] for m in order[1:]]
    U = others[0]
    for factor in others[1:]:
        U = (U[:, :, None] * factor[:, None, :]).reshape(R, -1)          # (R, q)
    size = dims[index]
    q = U.shape[1]
    C = full.reshape(*dims, *dims).permute(*order, *[n + m for m in order]).reshape(size, q, size, q)
    P = (A.T @ K @ full).reshape(R, *dims).permute(0, *[1 + m for m in order]).reshape(R, size, q)
    G = A.T @ A
    CU = torch.einsum("apbq,vq->apbv", C, U)                               # (size, q, size, R)
    Q = torch.einsum("rp,apbv->ravb", U, CU)                               # (R, size, R, size)
    system = (G[:, None, :, None] * Q).reshape(R * size, R * size)
    rhs = torch.einsum("rap,rp->ra", P, U).reshape(-1)
    ridge = 1e-12 * float(system.diagonal().abs().max().clamp(min=1e-300))
    solution = torch.linalg.solve(system + ridge * torch.eye(R * size, dtype=system.dtype), rhs)
    return solution.reshape(R, size)


def _balance_cp_terms(modes: list[torch.Tensor], A: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Give every factor of each rank-one term the same norm (their geometric mean).

    Whitening leaves the first factor tiny and the rest huge (scale √count); balanced
    factors keep gradient-based fine-tuning well conditioned. The product is unchanged.
    """
    norms = [m.norm(dim=1) for m in modes] + [A.norm(dim=0)]
    stacked = torch.stack(norms)                                  # (F, R)
    alive = (stacked > 0).all(dim=0)
    safe = torch.where(stacked > 0, stacked, torch.ones_like(stacked))
    target = safe.log().mean(dim=0).exp()
    scale = torch.where(alive, target, torch.ones_like(target)) / torch.where(alive[None], safe, torch.ones_like(safe))
    modes = [m * scale[i][:, None] for i, m in enumerate(modes)]
    return modes, A * scale[-1][None, :]


def activation_cp(kernel: torch.Tensor, moment, rank: int, *, damping: float = 0.0,
                  full_moment: torch.Tensor | None = None, als_iters: int = 5, **cp_options) -> CPFactors:
    """CP of the input-whitened kernel; the first 1×1 factor is un-whitened (``moment``: S × S).

    With ``full_moment`` (the (S·Πk)² patch moment) two starts — this one and the plain
    CP — each get the last (1×1) factor re-fitted by exact least squares, then
    ``als_iters`` sweeps of alternating exact least squares over every factor on the
    true activation objective (each update can only lower it; skipped when rank ×
    largest mode exceeds ``CP_ALS_MAX_UNKNOWNS``); the start with the lower error wins.
    """
    _check_kernel(kernel)
    w = _channel_whitening(kernel, moment, damping)
    f = cp(_whiten_input_mode(kernel, w), rank, **cp_options)
    dtype = kernel.dtype
    first, last = _unwhiten_first(f.first, w), f.last.to(torch.float64)
    depthwise = tuple(d.to(torch.float64) for d in f.depthwise)
    full = _full_moment(kernel, full_moment, damping)
    if full is not None:
        T, S = kernel.shape[:2]
        K = kernel.detach().to(torch.float64).reshape(T, -1)
        # Two starts, the data-aware one and the plain CP, each refined on the true
        # activation objective; the better one wins, so this never loses to plain CP.
        plain = cp(kernel.detach().to(torch.float64), rank, **cp_options)
        best = None
        for start in ((first, depthwise), (plain.first.to(torch.float64), plain.depthwise)):
            modes = [start[0].reshape(rank, S)] + [d.to(torch.float64).reshape(rank, -1) for d in start[1]]
            A = _cp_last(K, full, modes)
            if rank * max(m.shape[1] for m in modes) <= CP_ALS_MAX_UNKNOWNS:
                for _ in range(als_iters):
                    for index in range(len(modes)):
                        modes[index] = _cp_mode_update(K, full, A, modes, index, kernel.shape[1:])
                    A = _cp_last(K, full, modes)
            E = K - A @ _cp_rows(modes)
            error = float(((E @ full) * E).sum())
            if best is None or error < best[0]:
                best = (error, modes, A)
        assert best is not None  # the loop above always runs
        _, modes, A = best
    else:
        modes = [first.reshape(rank, -1)] + [d.reshape(rank, -1) for d in depthwise]
        A = last.reshape(last.shape[0], rank)
    modes, A = _balance_cp_terms(modes, A)
    first = modes[0].reshape(first.shape)
    depthwise = tuple(m.reshape(d.shape) for m, d in zip(modes[1:], depthwise))
    last = A.reshape(last.shape)
    return CPFactors(first.to(dtype).contiguous(), tuple(d.to(dtype).contiguous() for d in depthwise),
                     last.to(dtype).contiguous())


# --------------------------------------------------------------------------- errors, bias

def _as_matrix(weight: torch.Tensor) -> torch.Tensor:
    return weight.detach().to(torch.float64).reshape(weight.shape[0], -1)


def activation_error(weight: torch.Tensor, approx: torch.Tensor, moment: torch.Tensor) -> float:
    """``‖(W − W′)X‖_F = sqrt(tr(E C Eᵀ))`` for the full moment ``C``.

    For a conv kernel with an ``S × S`` channel moment the error is the sum over
    kernel positions (the channel approximation).
    """
    E = weight.detach().to(torch.float64) - approx.detach().to(torch.float64)
    moment = moment.to(torch.float64)
    if weight.dim() > 2 and moment.shape[0] == weight.shape[1] and moment.shape[0] != math.prod(weight.shape[1:]):
        Ek = E.reshape(E.shape[0], E.shape[1], -1)
        value = torch.einsum("tsk,su,tuk->", Ek, moment, Ek)
    else:
        Em = E.reshape(E.shape[0], -1)
        if moment.shape[0] != Em.shape[1]:
            raise ConfigError(f"statistics are {moment.shape[0]}-dimensional but the weight expects {Em.shape[1]}.")
        value = ((Em @ moment) * Em).sum()
    return float(value.clamp(min=0.0)) ** 0.5


def relative_activation_error(weight: torch.Tensor, approx: torch.Tensor, moment: torch.Tensor) -> float:
    """``‖(W − W′)X‖_F / ‖WX‖_F`` (0 when the layer's output is zero on the data)."""
    reference = activation_error(weight, torch.zeros_like(weight), moment)
    return activation_error(weight, approx, moment) / reference if reference > 0 else 0.0


def optimal_activation_error(singular: torch.Tensor, rank: int) -> float:
    """``sqrt(Σ_{i>r} σ_i²)`` of the whitened singular values: the best achievable error at ``rank``."""
    return float((singular[rank:].to(torch.float64) ** 2).sum()) ** 0.5


def bias_shift(weight: torch.Tensor, approx: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """``(W − W′)μ``: add it to the bias so the factorized layer keeps the mean output."""
    E = _as_matrix(weight) - _as_matrix(approx)
    if mean.numel() != E.shape[1]:
        raise ConfigError(f"input mean has {mean.numel()} entries but the weight expects {E.shape[1]}.")
    return E @ mean.to(torch.float64)
