"""One layer, tolerance mode: the smallest rank whose accuracy drop stays within δ.

The seeds' "indirect optimization problem" (Part I): ``min r`` subject to
``metric(original) − metric(compressed) ≤ δ``, over ``1 ≤ r ≤ r_max`` with ``r_max``
the break-even rank (above it the factorization is no smaller than the layer).

The endpoint properties make it a search, not a scan: rank 1 is the worst rank and
the break-even rank the best one. So the break-even rank is evaluated first: if even
it breaks the tolerance, no rank does and the layer stays dense. Otherwise the
answer lies in ``[1, r_max]`` and bisection finds it with ``⌈log2 r_max⌉`` more
evaluations (plus one for the original model: at most ``⌈log2 r_max⌉ + 2``). The
first probe is the data-free EVBMF estimate when it is inside the window that keeps
that bound. The answer is always a rank that was evaluated and passed, with the
rank below it evaluated and failing ("re-verified" without extra cost). Accuracy is
not exactly monotone in rank, so the result says whether the evaluated points were
monotone; when they were not, a smaller passing rank may exist (brute force finds
the same rank or, in the tests, one a little lower).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from torch import nn

from ..cost import break_even_rank
from ..errors import ConfigError, LayerError
from ..factorized import layer_geometry, methods_for, unsupported_reason
from ..plan import Plan
from ..surgery import get_layer
from .evaluate import EvaluationRecord, thread_policy
from .session import Session

__all__ = ["Bisection", "smallest_passing", "passes_within", "LayerSearchResult", "smallest_rank",
           "brute_force_rank", "DEFAULT_METHOD"]

# Default method per layer type for the one-layer search.
DEFAULT_METHOD = {"Linear": "svd", "Conv2d": "tucker2", "Conv1d": "tucker2"}
# Accuracy differences are sums of 1/n steps; do not let float rounding flip a decision.
_EPS = 1e-9


def passes_within(baseline: float, tolerance: float) -> Callable[[float], bool]:
    """``value -> baseline − value ≤ tolerance`` (with a 1e-9 allowance for rounding)."""
    return lambda value: baseline - value <= tolerance + _EPS


@dataclass
class Bisection:
    """Result of :func:`smallest_passing`: the answer index and every evaluated point."""

    index: int | None
    values: dict[int, float]
    monotone: bool

    @property
    def evaluations(self) -> int:
        return len(self.values)


def _is_monotone(values: dict[int, float]) -> bool:
    ordered = [values[i] for i in sorted(values)]
    return all(b >= a - _EPS for a, b in zip(ordered, ordered[1:]))


def smallest_passing(n: int, evaluate: Callable[[int], float], passes: Callable[[float], bool], *,
                     guess: int | None = None, budget: int | None = None) -> Bisection:
    """Smallest index in ``0..n-1`` (weakest to strongest) whose value passes.

    Index ``n-1`` is evaluated first; if it fails the answer is None. Then bisection
    between a virtual failing index −1 and ``n-1`` finds the boundary with at most
    ``⌈log2 n⌉`` more evaluations (``budget``, the total allowed, may grant more, which
    only widens the window for the guided probe). ``guess`` is probed first, clamped
    to the window that keeps the bound. The returned index was evaluated and passed,
    and the index below it (if any) was evaluated and failed.
    """
    if n < 0:
        raise ConfigError(f"n must be non-negative, got {n}.")
    values: dict[int, float] = {}
    if n == 0:
        return Bisection(None, values, True)
    top = n - 1
    values[top] = evaluate(top)
    if not passes(values[top]):
        return Bisection(None, values, True)
    lo, hi = -1, top
    left = math.ceil(math.log2(n)) if n > 1 else 0
    if budget is not None:
        left = max(left, budget - 1)
    first = True
    while hi - lo > 1 and left > 0:
        half = 2 ** (left - 1)
        low_bound, high_bound = max(lo + 1, hi - half), min(hi - 1, lo + half)
        target = guess if (first and guess is not None) else (lo + hi) // 2
        probe = min(max(target, low_bound), high_bound)
        first = False
        values[probe] = evaluate(probe)
        left -= 1
        if passes(values[probe]):
            hi = probe
        else:
            lo = probe
    return Bisection(hi, values, _is_monotone(values))


@dataclass
class LayerSearchResult:
    """The one-layer answer. ``rank`` None means no rank up to break-even keeps the tolerance."""

    layer: str
    method: str
    rank: Any
    break_even: int
    baseline: float
    value: float | None
    tolerance: float
    evaluations: int
    evaluations_cached: int
    monotone: bool
    estimate: Any
    records: list[EvaluationRecord] = field(default_factory=list)
    values: dict[int, float] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def drop(self) -> float | None:
        return None if self.value is None else self.baseline - self.value

    @property
    def plan(self) -> Plan:
        return Plan() if self.rank is None else Plan.from_mapping({self.layer: (self.method, self.rank)})

    @property
    def requested(self) -> int:
        return self.evaluations + self.evaluations_cached

    def to_dict(self) -> dict[str, Any]:
        return {"layer": self.layer, "method": self.method, "rank": self.rank, "break_even": self.break_even,
                "baseline": self.baseline, "value": self.value, "drop": self.drop, "tolerance": self.tolerance,
                "evaluations": self.evaluations, "evaluations_cached": self.evaluations_cached,
                "monotone": self.monotone, "estimate": self.estimate,
                "values": {str(k): v for k, v in sorted(self.values.items())},
                "records": [r.to_dict() for r in self.records], "seconds": self.seconds}


def _check_tolerance(tolerance: Any) -> float:
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not math.isfinite(tolerance):
        raise ConfigError(f"tolerance must be a number in [0, 1), got {tolerance!r}.")
    if not 0 <= tolerance < 1:
        raise ConfigError(f"tolerance must lie in [0, 1) (0.01 = one accuracy point), got {tolerance}.")
    return float(tolerance)


def _layer_setup(model: nn.Module, layer: str, method: str | None, rank_objective: str):
    module = get_layer(model, layer)
    reason = unsupported_reason(module)
    if reason is not None:
        raise LayerError(f"layer '{layer}' cannot be factorized: {reason}.")
    geometry = layer_geometry(module)
    method = method or DEFAULT_METHOD[geometry["type"]]
    if method not in methods_for(geometry):
        raise LayerError(f"layer '{layer}': method '{method}' does not apply to {geometry['type']}; use one of "
                         f"{', '.join(methods_for(geometry))}.")
    return module, geometry, method


def _input_size(session: Session, layer: str):
    from ..cost import count

    return count(session.model, session.example_input).layer(layer).input_size


def smallest_rank(model: nn.Module, layer: str, data: Any = None, *, threads: int | None = None,
                  **kwargs) -> LayerSearchResult:
    """The smallest rank of one layer whose metric drop stays within ``tolerance``.

    Only ``layer`` is factorized (with ``method``; default 'svd' for Linear, 'tucker2'
    for convolutions); ranks run from 1 to the break-even rank for ``rank_objective``
    ('params' or 'macs'). ``guess``: 'evbmf' (the data-free estimate is probed first),
    an int rank, or None (plain bisection). Uses at most ``⌈log2 r_max⌉ + 2``
    evaluations, the original model's included. See :func:`rankshrink.search.plan` for
    ``data``, ``metric``, ``objective``, ``cache`` and ``threads``.
    """
    with thread_policy(model, threads):
        return _smallest_rank(model, layer, data, **kwargs)


def _smallest_rank(model: nn.Module, layer: str, data: Any = None, *, tolerance: float,
                  method: str | None = None, metric: Any = "accuracy", rank_objective: str = "params",
                  guess: str | int | None = "evbmf", objective: str = "auto", cache: Any = True,
                  progress: bool = False, seed: int = 0, factorize_options: dict | None = None,
                  apply_fn=None, session: Session | None = None) -> LayerSearchResult:
    tolerance = _check_tolerance(tolerance)
    start = time.perf_counter()
    module, geometry, method = _layer_setup(model, layer, method, rank_objective)
    session = session or Session(model, data, metric=metric, objective=objective, cache=cache,
                                 progress=progress, seed=seed, factorize_options=factorize_options,
                                 apply_fn=apply_fn)
    input_size = _input_size(session, layer) if rank_objective == "macs" else None
    r_max = break_even_rank(geometry, method, input_size, objective=rank_objective)
    estimate = None
    if guess == "evbmf":
        from ..ranks import estimate_rank

        estimate = estimate_rank(module.weight.detach(), method, cap=max(r_max, 1))
        estimate = max(estimate) if isinstance(estimate, tuple) else estimate
    elif isinstance(guess, int) and not isinstance(guess, bool):
        estimate = guess
    elif guess is not None:
        raise ConfigError(f"guess must be 'evbmf', an integer rank or None, got {guess!r}.")
    evaluator = session.start(total=math.ceil(math.log2(max(r_max, 1))) + 2 if r_max else 1,
                              desc=f"rank search {layer}")
    try:
        baseline = evaluator(Plan(), "baseline")
        evaluator.baseline = baseline
        if r_max < 1:
            return LayerSearchResult(layer, method, None, r_max, baseline, None, tolerance, evaluator.evaluations,
                                     evaluator.cached, True, estimate, list(evaluator.records), {},
                                     time.perf_counter() - start)

        def evaluate(index: int) -> float:
            rank = index + 1
            return evaluator(Plan.from_mapping({layer: (method, rank)}), f"rank {rank}")

        found = smallest_passing(r_max, evaluate, passes_within(baseline, tolerance),
                                 guess=None if estimate is None else int(estimate) - 1)
    finally:
        evaluator.close()
    rank = None if found.index is None else found.index + 1
    values = {i + 1: v for i, v in found.values.items()}
    return LayerSearchResult(layer, method, rank, r_max, baseline, None if rank is None else values[rank],
                             tolerance, evaluator.evaluations, evaluator.cached, found.monotone, estimate,
                             list(evaluator.records), values, time.perf_counter() - start)


def brute_force_rank(model: nn.Module, layer: str, data: Any = None, *, threads: int | None = None,
                     **kwargs) -> LayerSearchResult:
    """The reference answer: evaluate every rank 1..r_max and return the smallest passing one."""
    with thread_policy(model, threads):
        return _brute_force_rank(model, layer, data, **kwargs)


def _brute_force_rank(model: nn.Module, layer: str, data: Any = None, *, tolerance: float,
                     method: str | None = None, metric: Any = "accuracy", rank_objective: str = "params",
                     objective: str = "auto", cache: Any = False, progress: bool = False, seed: int = 0,
                     session: Session | None = None) -> LayerSearchResult:
    tolerance = _check_tolerance(tolerance)
    start = time.perf_counter()
    module, geometry, method = _layer_setup(model, layer, method, rank_objective)
    session = session or Session(model, data, metric=metric, objective=objective, cache=cache,
                                 progress=progress, seed=seed)
    input_size = _input_size(session, layer) if rank_objective == "macs" else None
    r_max = break_even_rank(geometry, method, input_size, objective=rank_objective)
    evaluator = session.start(total=r_max + 1, desc=f"brute force {layer}")
    try:
        baseline = evaluator(Plan(), "baseline")
        evaluator.baseline = baseline
        values = {r: evaluator(Plan.from_mapping({layer: (method, r)}), f"rank {r}") for r in range(1, r_max + 1)}
    finally:
        evaluator.close()
    ok = passes_within(baseline, tolerance)
    rank = next((r for r in range(1, r_max + 1) if ok(values[r])), None)
    return LayerSearchResult(layer, method, rank, r_max, baseline, None if rank is None else values[rank],
                             tolerance, evaluator.evaluations, evaluator.cached, _is_monotone(values), None,
                             list(evaluator.records), values, time.perf_counter() - start)
