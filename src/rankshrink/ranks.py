"""Rank estimates that need no data: EVBMF, energy thresholds and break-even caps.

Everything here is pure maths on tensors (and on layer *geometry* dicts, for the
break-even cap); no ``nn.Module`` is touched and no model is evaluated.

* :func:`evbmf` -- empirical variational Bayesian matrix factorization (Nakajima,
  Sugiyama, Babacan and Tomioka, "Global analytic solution of fully-observed
  variational Bayesian matrix factorization", JMLR 14, 2013; the noise-variance
  estimator and the exact EVB threshold follow Nakajima et al., "Condition for
  perfect dimensionality recovery by variational Bayesian PCA", JMLR 16, 2015).
  For ``Y = B Aᵀ + E`` with i.i.d. Gaussian noise of unknown variance σ², it
  estimates σ² by minimising the free energy and keeps the singular components
  above the EVB threshold ``γ_EVB = σ √(M (1 + τ)(1 + α/τ))``, where ``α = L/M``
  (``L ≤ M``) and ``τ`` is the zero of ``log(τ+1) + α log(τ/α + 1) − τ``. The
  number of kept components is the rank estimate.
* :func:`energy_rank` -- the smallest rank keeping a fraction ``p`` of Σσ².
* :func:`estimate_rank` / :func:`layer_estimates` -- those estimates for one
  factorization method of a layer (each method says which matrices it factorizes,
  see :mod:`rankshrink.methods`), floored at 1 and capped at the break-even rank
  (the largest rank whose factorization is still cheaper than the dense layer).
* :func:`rank_grid` -- the ranks a search tries: all small ones, then geometric steps.

Differences from the seeds' ``EVBMF``/``est_rank``: the threshold uses the exact
``τ`` (the seeds use the bound ``2.5129 √α``, exact only for square matrices),
the free energy is minimised over a log grid and then refined (a bounded local
search can stop in the wrong basin), wide matrices are transposed instead of
silently mis-sized, an empty estimate becomes rank 1 instead of an empty array,
and no rounding up to multiples of 8 pushes the rank past the break-even point.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch

from .errors import ConfigError

__all__ = [
    "EVBMFResult", "RankEstimate", "evbmf", "evbmf_rank", "evb_tau", "energy_rank",
    "unfold", "conv_evbmf_ranks", "channel_mode_estimates", "rank_grid", "estimate_rank", "layer_estimates",
]

ESTIMATORS = ("evbmf", "energy")


# --------------------------------------------------------------------------- EVBMF

@dataclass(frozen=True)
class EVBMFResult:
    """What :func:`evbmf` found for one matrix.

    ``rank``: components above the threshold (0 when everything looks like noise;
    :func:`evbmf_rank` floors it at 1). ``sigma2``: the noise variance (estimated or
    given). ``threshold``: the singular-value threshold ``γ_EVB``. ``singular``: all
    singular values, descending. ``shrunk``: the EVB estimates of the kept
    components' singular values (each below its observed value).
    """

    rank: int
    sigma2: float
    threshold: float
    singular: torch.Tensor
    shrunk: torch.Tensor


def evb_tau(alpha: float) -> float:
    """The zero ``τ`` of ``log(τ+1) + α·log(τ/α + 1) − τ`` for ``0 < α ≤ 1``.

    The function is positive just above 0 and decreasing past its maximum, with its
    unique positive zero in ``(√α, 2.5129·√α]``, found here by bisection to
    machine precision (``τ ≈ 2.5129`` for a square matrix).
    """
    if not 0 < alpha <= 1:
        raise ConfigError(f"alpha = L/M must lie in (0, 1], got {alpha!r}.")

    def f(tau: float) -> float:
        return math.log1p(tau) + alpha * math.log1p(tau / alpha) - tau

    lo, hi = math.sqrt(alpha) * 0.5, 3.0 * math.sqrt(alpha) + 1.0
    while f(hi) > 0:  # never for alpha <= 1, but keep the bracket honest
        hi *= 2.0
    while f(lo) <= 0:
        lo *= 0.5
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if f(mid) > 0:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-15 * hi:
            break
    return 0.5 * (lo + hi)


def _tau_of_x(x: torch.Tensor, alpha: float) -> torch.Tensor:
    """Inverse of ``x = (1+τ)(1+α/τ)`` on the branch ``τ ≥ √α``."""
    b = x - (1.0 + alpha)
    return 0.5 * (b + torch.sqrt(torch.clamp(b * b - 4.0 * alpha, min=0.0)))


def _free_energy(sigma2: float, gamma2: torch.Tensor, L: int, M: int, alpha: float,
                 x_threshold: float) -> float:
    """The EVB free energy (up to constants and a factor 1/L) as a function of σ²."""
    x = gamma2 / (M * sigma2)
    value = x - torch.log(x)                     # ψ0 for every component
    above = x > x_threshold
    if bool(above.any()):
        xa = x[above]
        tau = _tau_of_x(xa, alpha)
        psi1 = torch.log1p(tau) + alpha * torch.log1p(tau / alpha) - tau
        value = value.clone()
        value[above] = value[above] + psi1       # ψ = ψ0 + ψ1 above the threshold
    return float(value.sum())


def _golden_min(fn, lo: float, hi: float, iterations: int = 80) -> float:
    """Minimum of a unimodal ``fn`` on [lo, hi] (in log space) by golden-section search."""
    a, b = math.log(lo), math.log(hi)
    ratio = (math.sqrt(5.0) - 1.0) / 2.0
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = fn(math.exp(c)), fn(math.exp(d))
    for _ in range(iterations):
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = fn(math.exp(c))
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = fn(math.exp(d))
        if b - a < 1e-12:
            break
    return math.exp(0.5 * (a + b))


def evbmf(matrix: torch.Tensor, sigma2: float | None = None) -> EVBMFResult:
    """Empirical VB matrix factorization of ``matrix`` (the analytic solution).

    ``sigma2``: the noise variance if known; by default it is estimated by
    minimising the free energy over the range where the minimiser provably lies
    (a 120-point log grid, then golden-section refinement around the best point).
    Wide matrices are transposed (the theory assumes ``L ≤ M``). Runs in float64.
    """
    if not isinstance(matrix, torch.Tensor) or matrix.dim() != 2:
        raise ConfigError(f"EVBMF needs a 2-D matrix, got {getattr(matrix, 'shape', type(matrix).__name__)}.")
    if matrix.numel() == 0:
        raise ConfigError("EVBMF needs a non-empty matrix.")
    if not torch.isfinite(matrix).all():
        raise ConfigError("matrix contains NaN or Inf values; no rank can be estimated.")
    Y = matrix.detach().to("cpu", torch.float64)
    if Y.shape[0] > Y.shape[1]:
        Y = Y.T
    L, M = Y.shape
    gamma = torch.linalg.svdvals(Y)
    gamma2 = gamma * gamma
    alpha = L / M
    tau = evb_tau(alpha)
    x_threshold = (1.0 + tau) * (1.0 + alpha / tau)
    total = float(gamma2.sum())
    empty = gamma[:0]
    if total == 0.0:
        return EVBMFResult(0, 0.0, 0.0, gamma, empty)
    if L == 1:
        # One row: there is no spectrum to separate signal from noise; keep it.
        return EVBMFResult(1, 0.0, 0.0, gamma, gamma.clone())

    if sigma2 is None:
        upper = total / (L * M)
        # The estimate of the signal rank can never exceed ξ = ⌈L/(1+α)⌉ − 1, which
        # bounds σ² from below (Nakajima et al. 2015, Theorem 6).
        xi = max(0, min(L - 1, math.ceil(L / (1.0 + alpha)) - 1))
        lower = max(float(gamma2[xi]) / (M * x_threshold), float(gamma2[xi:].mean()) / M)
        lower = max(lower, upper * 1e-12)
        if not lower < upper:
            lower = upper * 1e-6

        def energy(s2: float) -> float:
            return _free_energy(s2, gamma2, L, M, alpha, x_threshold)

        grid = torch.logspace(math.log10(lower), math.log10(upper), 120, dtype=torch.float64)
        values = [energy(float(s2)) for s2 in grid]
        best = min(range(len(values)), key=values.__getitem__)
        a = float(grid[max(best - 1, 0)])
        b = float(grid[min(best + 1, len(grid) - 1)])
        sigma2 = _golden_min(energy, a, b) if a < b else float(grid[best])
        if energy(sigma2) > values[best]:
            sigma2 = float(grid[best])
    elif not (isinstance(sigma2, (int, float)) and sigma2 > 0 and math.isfinite(sigma2)):
        raise ConfigError(f"sigma2 must be a positive finite number, got {sigma2!r}.")

    threshold = math.sqrt(M * sigma2 * x_threshold)
    keep = gamma > threshold
    rank = int(keep.sum())
    g = gamma[keep]
    ratio = (L + M) * sigma2 / (g * g)
    disc = torch.clamp((1.0 - ratio) ** 2 - 4.0 * L * M * sigma2 ** 2 / g ** 4, min=0.0)
    shrunk = 0.5 * g * (1.0 - ratio + torch.sqrt(disc))
    return EVBMFResult(rank, float(sigma2), threshold, gamma, shrunk)


def evbmf_rank(matrix: torch.Tensor, sigma2: float | None = None) -> int:
    """The EVBMF rank of ``matrix``, floored at 1."""
    return max(1, evbmf(matrix, sigma2).rank)


# --------------------------------------------------------------------------- energy

def energy_rank(singular: torch.Tensor, keep: float = 0.9) -> int:
    """Smallest rank whose top singular values keep at least ``keep`` of Σσ² (at least 1)."""
    if not (isinstance(keep, (int, float)) and 0 < keep <= 1):
        raise ConfigError(f"energy fraction must lie in (0, 1], got {keep!r}.")
    s2 = singular.detach().to(torch.float64).flatten() ** 2
    if s2.numel() == 0:
        raise ConfigError("energy_rank needs at least one singular value.")
    total = float(s2.sum())
    if total == 0.0:
        return 1
    kept = torch.cumsum(torch.sort(s2, descending=True).values, 0) / total
    # Tolerate round-off so keep=1.0 means "all non-zero energy".
    rank = int((kept < keep - 1e-12).sum()) + 1
    return max(1, min(rank, s2.numel()))


# --------------------------------------------------------------------------- kernels

def unfold(tensor: torch.Tensor, mode: int) -> torch.Tensor:
    """Mode-``mode`` unfolding: ``tensor.shape[mode]`` rows, all other modes as columns."""
    if not 0 <= mode < tensor.dim():
        raise ConfigError(f"mode {mode} is out of range for a {tensor.dim()}-D tensor.")
    return torch.movedim(tensor, mode, 0).reshape(tensor.shape[mode], -1)


def conv_evbmf_ranks(kernel: torch.Tensor) -> tuple[int, int]:
    """EVBMF ranks of a conv kernel's output-channel (mode-0) and input-channel (mode-1) unfoldings."""
    if kernel.dim() not in (3, 4):
        raise ConfigError(f"expected a conv kernel (T, S, k[, k]), got shape {tuple(kernel.shape)}.")
    return evbmf_rank(unfold(kernel, 0)), evbmf_rank(unfold(kernel, 1))


def channel_mode_estimates(kernel: torch.Tensor, keep: float = 0.9) -> tuple[tuple[int, int], tuple[int, int]]:
    """(EVBMF, energy) rank pairs of a conv kernel's output- and input-channel unfoldings."""
    if kernel.dim() not in (3, 4):
        raise ConfigError(f"expected a conv kernel (T, S, k[, k]), got shape {tuple(kernel.shape)}.")
    modes = [unfold(kernel, 0), unfold(kernel, 1)]
    ev = (evbmf_rank(modes[0]), evbmf_rank(modes[1]))
    en = (energy_rank(torch.linalg.svdvals(modes[0].detach().double()), keep),
          energy_rank(torch.linalg.svdvals(modes[1].detach().double()), keep))
    return ev, en


def rank_grid(top: int, *, dense_up_to: int = 16, ratio: float = 1.1) -> list[int]:
    """1..min(top, dense_up_to), then ranks growing by ``ratio``, always ending at ``top``."""
    if top < 1:
        return []
    ranks = list(range(1, min(top, dense_up_to) + 1))
    r = ranks[-1]
    while r < top:
        r = min(top, max(r + 1, int(math.ceil(r * ratio))))
        ranks.append(r)
    return ranks


# --------------------------------------------------------------------------- per method

@dataclass(frozen=True)
class RankEstimate:
    """Data-free rank estimates for one layer and method.

    ``evbmf`` and ``energy`` are the raw estimates (tucker2: ``(R_out, R_in)``);
    ``break_even`` the cap (None when not given); ``rank`` the chosen estimator's
    value after flooring at 1 and capping at the break-even rank. ``capped`` says
    the cap lowered it. ``dense_is_cheaper`` is True when even rank 1 is not
    cheaper than the dense layer (break-even 0): the estimate is then 1, and the
    caller should keep the layer dense.
    """

    method: str
    evbmf: Any
    energy: Any
    break_even: int | None
    rank: Any
    estimator: str
    capped: bool
    dense_is_cheaper: bool

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("evbmf", "energy", "rank"):
            if isinstance(data[key], tuple):
                data[key] = list(data[key])
        return data


def _raw_estimates(weight: torch.Tensor, method: str, keep: float) -> tuple[Any, Any]:
    from .methods import get_method

    return get_method(method).rank_estimates(weight, keep)


def _cap(rank: Any, cap: int | None) -> tuple[Any, bool]:
    """Floor at 1, then cap at ``cap`` (pairs: shrink both in proportion)."""
    if isinstance(rank, tuple):
        r_out, r_in = (max(1, int(r)) for r in rank)
        if cap is None or max(r_out, r_in) <= max(cap, 1):
            return (r_out, r_in), False
        scale = max(cap, 1) / max(r_out, r_in)
        return (max(1, int(r_out * scale)), max(1, int(r_in * scale))), True
    rank = max(1, int(rank))
    if cap is not None and rank > max(cap, 1):
        return max(cap, 1), True
    return rank, False


def estimate_rank(weight: torch.Tensor, method: str, *, estimator: str = "evbmf",
                  keep: float = 0.9, cap: int | None = None) -> Any:
    """A data-free rank for factorizing ``weight`` with ``method``.

    ``estimator``: 'evbmf' (on the matrix the method factorizes; tucker2 gets the
    pair of mode-0/mode-1 ranks, cp the larger of the two) or 'energy' (keep the
    fraction ``keep`` of Σσ²). The result is at least 1 and, with ``cap`` (the
    break-even rank), at most ``max(cap, 1)``.
    """
    if estimator not in ESTIMATORS:
        raise ConfigError(f"unknown rank estimator {estimator!r}; use one of {', '.join(ESTIMATORS)}.")
    ev, en = _raw_estimates(weight, method, keep)
    return _cap(ev if estimator == "evbmf" else en, cap)[0]


def layer_estimates(weight: torch.Tensor, geometry: dict[str, Any], *, input_size=None,
                    by: str = "params", estimator: str = "evbmf", keep: float = 0.9,
                    methods: tuple[str, ...] | None = None) -> dict[str, RankEstimate]:
    """Rank estimates for every applicable method of one layer, capped at break-even.

    ``geometry`` is :func:`rankshrink.factorized.layer_geometry` of the layer;
    ``by`` ('params' or 'macs', the latter needs ``input_size``) sets which
    cost the break-even cap compares.
    """
    from .cost import break_even_rank
    from .methods import methods_for

    if estimator not in ESTIMATORS:
        raise ConfigError(f"unknown rank estimator {estimator!r}; use one of {', '.join(ESTIMATORS)}.")
    allowed = methods_for(geometry)
    chosen = tuple(methods) if methods else allowed
    unknown = [m for m in chosen if m not in allowed]
    if unknown:
        raise ConfigError(f"method(s) {', '.join(unknown)} do not apply to {geometry['type']}; "
                          f"use {', '.join(allowed)}.")
    result = {}
    for method in chosen:
        cap = break_even_rank(geometry, method, input_size, by=by)
        ev, en = _raw_estimates(weight, method, keep)
        rank, capped = _cap(ev if estimator == "evbmf" else en, cap)
        result[method] = RankEstimate(method, ev, en, cap, rank, estimator, capped, cap < 1)
    return result
