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
from typing import Any, Callable, Generator

from torch import nn

from ..cost import break_even_rank
from ..errors import ConfigError, LayerError
from ..factorized import layer_geometry, unsupported_reason
from ..layers import get_layer
from ..methods import default_method, get_method
from ..plan import Plan
from .config import SearchConfig, check_tolerance
from .evaluate import EvaluationRecord, thread_policy
from .session import Session

__all__ = ["Bisection", "smallest_passing", "bisection_steps", "run_in_lockstep", "passes_within", "LayerSearchResult",
           "smallest_rank",
           "brute_force_rank"]
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
    steps = bisection_steps(n, passes, guess=guess, budget=budget)
    try:
        index = next(steps)
        while True:
            index = steps.send(evaluate(index))
    except StopIteration as stop:
        return stop.value


def bisection_steps(n: int, passes: Callable[[float], bool], *, guess: int | None = None,
                    budget: int | None = None) -> Generator[int, float, Bisection]:
    """:func:`smallest_passing` as a generator: it yields each index to evaluate, is sent its value, and
    returns the :class:`Bisection`. Several bisections can so advance in lockstep, each round's
    evaluations running together (:func:`run_in_lockstep`)."""
    if n < 0:
        raise ConfigError(f"n must be non-negative, got {n}.")
    values: dict[int, float] = {}
    if n == 0:
        return Bisection(None, values, True)
    top = n - 1
    values[top] = yield top
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
        values[probe] = yield probe
        left -= 1
        if passes(values[probe]):
            hi = probe
        else:
            lo = probe
    return Bisection(hi, values, _is_monotone(values))


def run_in_lockstep(searches: list[Generator[int, float, Bisection]],
                    evaluate_round: Callable[[list[tuple[int, int]]], list[float]]) -> list[Bisection]:
    """Advance every bisection one step per round; ``evaluate_round([(search, index), ...])`` evaluates a
    round's requests together (in parallel on workers) and returns their values in order. Each bisection
    sees exactly the values it would alone, so the results do not depend on how a round is evaluated."""
    results: list[Bisection | None] = [None] * len(searches)
    pending: dict[int, int] = {}
    for i, steps in enumerate(searches):
        try:
            pending[i] = next(steps)
        except StopIteration as stop:
            results[i] = stop.value
    while pending:
        requests = list(pending.items())
        values = evaluate_round(requests)
        pending = {}
        for (i, _), value in zip(requests, values):
            try:
                pending[i] = searches[i].send(value)
            except StopIteration as stop:
                results[i] = stop.value
    return [r for r in results if r is not None]


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

    config: Any = None  # the plan entry of the answer (None when the layer stays dense)

    @property
    def plan(self) -> Plan:
        return Plan() if self.config is None else Plan.from_mapping({self.layer: self.config})

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


def _layer_setup(model: nn.Module, layer: str, method: str | None, rank_objective: str):
    module = get_layer(model, layer)
    reason = unsupported_reason(module)
    if reason is not None:
        raise LayerError(f"layer '{layer}' cannot be factorized: {reason}.")
    geometry = layer_geometry(module)
    method = method or default_method(geometry["type"])
    get_method(method).check_layer(geometry, f"layer '{layer}'")
    return module, geometry, method


def _input_size(session: Session, layer: str):
    from ..cost import count

    return count(session.model, session.example_input).layer(layer).input_size


def smallest_rank(model: nn.Module, layer: str, data: Any = None, *, threads: int | None = None,
                  **kwargs) -> LayerSearchResult:
    """The smallest rank of one layer whose metric drop stays within ``tolerance``.

    Only ``layer`` is factorized (with ``method``; default: the method registered as the
    default for the layer's type, see :func:`rankshrink.methods.default_method`); ranks run
    from 1 to the break-even rank for ``rank_objective``
    ('params' or 'macs'). ``guess``: 'evbmf' (the data-free estimate is probed first),
    an int rank, or None (plain bisection). Uses at most ``⌈log2 r_max⌉ + 2``
    evaluations, the original model's included. See :class:`~rankshrink.search.config.SearchConfig`
    for ``metric``, ``fit``, ``cache``, ``seed`` and ``threads``.
    """
    with thread_policy(model, threads):
        return _smallest_rank(model, layer, data, **kwargs)


def _smallest_rank(model: nn.Module, layer: str, data: Any = None, *, tolerance: float,
                  method: str | None = None, rank_objective: str = "params",
                  guess: str | int | None = "evbmf", apply_fn=None, session: Session | None = None,
                  **options: Any) -> LayerSearchResult:
    tolerance = check_tolerance(tolerance)
    start = time.perf_counter()
    module, geometry, method = _layer_setup(model, layer, method, rank_objective)
    session = session or Session(model, data, SearchConfig(progress=False).replace(**options), apply_fn=apply_fn)
    input_size = _input_size(session, layer) if rank_objective == "macs" else None
    r_max = break_even_rank(geometry, method, input_size, by=rank_objective)
    config = session.factorizer.config
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
            # With a confidence, the tolerance applies to the upper end of the drop's interval.
            return evaluator.decision(Plan.from_mapping({layer: config(method, rank)}), f"rank {rank}")

        found = smallest_passing(r_max, evaluate, passes_within(baseline, tolerance),
                                 guess=None if estimate is None else int(estimate) - 1)
    finally:
        evaluator.close()
    rank = None if found.index is None else found.index + 1
    values = {}
    for i, v in found.values.items():
        measured = evaluator.value_of(Plan.from_mapping({layer: config(method, i + 1)}))
        values[i + 1] = v if measured is None else measured
    return LayerSearchResult(layer, method, rank, r_max, baseline, None if rank is None else values[rank],
                             tolerance, evaluator.evaluations, evaluator.cached, found.monotone, estimate,
                             list(evaluator.records), values, time.perf_counter() - start,
                             None if rank is None else config(method, rank))


def brute_force_rank(model: nn.Module, layer: str, data: Any = None, *, threads: int | None = None,
                     **kwargs) -> LayerSearchResult:
    """The reference answer: evaluate every rank 1..r_max and return the smallest passing one."""
    with thread_policy(model, threads):
        return _brute_force_rank(model, layer, data, **kwargs)


def _brute_force_rank(model: nn.Module, layer: str, data: Any = None, *, tolerance: float,
                     method: str | None = None, rank_objective: str = "params",
                     session: Session | None = None, **options: Any) -> LayerSearchResult:
    tolerance = check_tolerance(tolerance)
    start = time.perf_counter()
    module, geometry, method = _layer_setup(model, layer, method, rank_objective)
    options.setdefault("cache", False)
    session = session or Session(model, data, SearchConfig(progress=False).replace(**options))
    input_size = _input_size(session, layer) if rank_objective == "macs" else None
    r_max = break_even_rank(geometry, method, input_size, by=rank_objective)
    evaluator = session.start(total=r_max + 1, desc=f"brute force {layer}")
    try:
        baseline = evaluator(Plan(), "baseline")
        evaluator.baseline = baseline
        config = session.factorizer.config
        values = {r: evaluator(Plan.from_mapping({layer: config(method, r)}), f"rank {r}")
                  for r in range(1, r_max + 1)}
    finally:
        evaluator.close()
    ok = passes_within(baseline, tolerance)
    rank = next((r for r in range(1, r_max + 1) if ok(values[r])), None)
    return LayerSearchResult(layer, method, rank, r_max, baseline, None if rank is None else values[rank],
                             tolerance, evaluator.evaluations, evaluator.cached, _is_monotone(values), None,
                             list(evaluator.records), values, time.perf_counter() - start,
                             None if rank is None else config(method, rank))
