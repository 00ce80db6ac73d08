"""Truncated SVD of a matrix: exact, or randomized for large matrices.

Pure tensor maths: tensors in, factors out. Computation runs in float64 unless the
matrix is large enough that float32 is the sensible trade (randomized path).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..errors import ConfigError

# Randomized SVD pays off once the matrix is large and the rank small relative to it;
# below these sizes LAPACK's exact SVD is fast enough and exact.
RANDOMIZED_MIN_DIM = 1024
RANDOMIZED_MAX_RANK_FRACTION = 0.25
DEFAULT_OVERSAMPLE = 10
DEFAULT_POWER_ITERS = 4


class SVDResult(NamedTuple):
    """``matrix ≈ U @ diag(S) @ Vh`` with U (m, r), S (r,), Vh (r, n)."""

    U: torch.Tensor
    S: torch.Tensor
    Vh: torch.Tensor


def _check_matrix_and_rank(matrix: torch.Tensor, rank: int) -> None:
    if matrix.dim() != 2:
        raise ConfigError(f"expected a 2-D matrix, got shape {tuple(matrix.shape)}.")
    if not torch.isfinite(matrix).all():
        raise ConfigError("matrix contains NaN or Inf values; it cannot be factorized.")
    full = min(matrix.shape)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= full:
        raise ConfigError(f"rank must be an integer in 1..{full} for a {tuple(matrix.shape)} matrix, got {rank!r}.")


def choose_svd_method(shape: tuple[int, ...], rank: int) -> str:
    """'randomized' for large matrices at small relative rank, else 'exact'."""
    small = min(shape)
    if small >= RANDOMIZED_MIN_DIM and rank + DEFAULT_OVERSAMPLE <= RANDOMIZED_MAX_RANK_FRACTION * small:
        return "randomized"
    return "exact"


def truncated_svd(matrix: torch.Tensor, rank: int, *, method: str = "auto",
                  oversample: int = DEFAULT_OVERSAMPLE, power_iters: int = DEFAULT_POWER_ITERS,
                  seed: int = 0) -> SVDResult:
    """Best rank-``rank`` approximation of ``matrix`` (Eckart-Young), as SVD factors.

    ``method``: 'exact' (LAPACK), 'randomized' (Halko et al. range finder with
    ``oversample`` extra columns and ``power_iters`` subspace iterations), or 'auto'
    (randomized only for large matrices at small relative rank). The randomized path
    is deterministic for a given ``seed`` and does not touch the global RNG.
    Results are in the input's dtype.
    """
    _check_matrix_and_rank(matrix, rank)
    if method == "auto":
        method = choose_svd_method(tuple(matrix.shape), rank)
    dtype = matrix.dtype
    if method == "exact":
        work = matrix.detach().to(torch.float64)
        U, S, Vh = torch.linalg.svd(work, full_matrices=False)
        U, S, Vh = U[:, :rank], S[:rank], Vh[:rank]
    elif method == "randomized":
        U, S, Vh = _randomized_svd(matrix.detach(), rank, oversample, power_iters, seed)
    else:
        raise ConfigError(f"unknown SVD method {method!r}; use 'auto', 'exact' or 'randomized'.")
    return SVDResult(U.to(dtype), S.to(dtype), Vh.to(dtype))


def _randomized_svd(matrix: torch.Tensor, rank: int, oversample: int, power_iters: int,
                    seed: int) -> SVDResult:
    # Work in at least float32; float64 inputs stay float64.
    work = matrix.to(torch.promote_types(matrix.dtype, torch.float32))
    m, n = work.shape
    transpose = m < n  # sketch the smaller side so Q is tall and thin
    if transpose:
        work = work.T
        m, n = n, m
    width = min(rank + oversample, n)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    omega = torch.randn(n, width, generator=generator, dtype=work.dtype).to(work.device)
    Q, _ = torch.linalg.qr(work @ omega)
    for _ in range(power_iters):
        # Re-orthonormalise between products so small singular directions survive.
        Z, _ = torch.linalg.qr(work.T @ Q)
        Q, _ = torch.linalg.qr(work @ Z)
    B = Q.T @ work
    Ub, S, Vh = torch.linalg.svd(B, full_matrices=False)
    U = Q @ Ub
    U, S, Vh = U[:, :rank], S[:rank], Vh[:rank]
    if transpose:
        U, Vh = Vh.T, U.T
    return SVDResult(U, S, Vh)


def low_rank_factors(matrix: torch.Tensor, rank: int, **svd_options) -> tuple[torch.Tensor, torch.Tensor]:
    """``matrix ≈ left @ right`` with left (m, r), right (r, n).

    The singular values are split evenly (√S on each side) so both factors have
    comparable scale, which keeps later fine-tuning well conditioned.
    """
    U, S, Vh = truncated_svd(matrix, rank, **svd_options)
    root = S.sqrt()
    return U * root, root[:, None] * Vh


def singular_values(matrix: torch.Tensor) -> torch.Tensor:
    """All singular values, descending, computed in float64."""
    return torch.linalg.svdvals(matrix.detach().to(torch.float64))


def tail_energy(singular: torch.Tensor, rank: int) -> float:
    """Squared Frobenius error of the best rank-``rank`` approximation: Σ_{i>r} σ_i²."""
    return float((singular[rank:].to(torch.float64) ** 2).sum())


def energy_kept(singular: torch.Tensor, rank: int) -> float:
    """Fraction of Σσ² kept by the top ``rank`` singular values (1.0 for a zero matrix)."""
    total = float((singular.to(torch.float64) ** 2).sum())
    if total == 0.0:
        return 1.0
    return 1.0 - tail_energy(singular, rank) / total
