"""The last step of a latency-aware search: measure what would ship, and never ship it slower.

Candidate latencies are measured layer by layer, but a whole model is not the sum of its layers
(ONNX Runtime's blocked layouts and the reorders around factors; ``benchmarks/results/latency.md``),
so every mode ends by measuring whole plans against the original, interleaved
(:meth:`SearchLatency.measure`), and acting on the measurement:

* **tolerance mode** (any ``minimize``): the plans within the tolerance are measured cheapest
  first (with ``minimize='latency'``, the few predicted fastest together, and the measured
  fastest wins); the first faster than the original at every batch size (:data:`FASTER`) is returned. If none
  is, the original is kept and a note says so.
* **MAC / parameter / byte budgets**: the answer is measured; if it is slower, each of its
  factorized layers is measured alone inside the model, those slower there are never picked
  again and the budget allocation is redone; then lower targets within the budget are tried
  (one that scores more than :data:`LOWER_TARGET_LOSS` below the whole budget's plan is not returned).
  If nothing within the budget measures faster, the search stops with the numbers (a budget is
  never exceeded), unless ``allow_slower``.
* **latency budgets**: the allocation's target (in predicted latency cost) is corrected from
  whole-model measurements until the measured latency is within the budget and no more than 5%
  under it (:data:`_LANDED`; a secant step on measured ratios, at most :data:`MAX_STEPS` plans;
  otherwise the slowest plan within it), then the metric polishes it and the polished plan is
  measured again.
"""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError, UnreachableLatencyError
from .allocate import Allocation, budget_allocation, minimum_cost, plan_of, polish_budget
from .latency import FASTER, UNITS, PlanTiming, SearchLatency

__all__ = ["finish_tolerance", "finish_budget", "latency_budget", "MAX_STEPS", "latency_target", "LOWER_TARGET_LOSS"]

MAX_STEPS = 6           # whole-plan measurements a latency budget's correction may take
_TOLERANCE_PLANS = 6    # plans within the tolerance measured at most, in groups of _GROUP
_GROUP = 3
_AIM = 0.97             # a latency budget aims this far under its target, for the measurement noise
_LANDED = 0.95          # ... and stops correcting once a plan measures between this fraction of it and the target
# Budget mode: a plan at a lower target, returned because the whole budget's plan measured slower, may score
# at most this much below that plan (one accuracy point). Measured: MNIST-MLP --max-macs 0.5 fell back to
# 55% of the budget, an SVD rank-3 plan 0.206 below the original, and shipped it.
LOWER_TARGET_LOSS = 0.01


def _batches_text(latency: SearchLatency) -> str:
    return ", ".join(str(b) for b in latency.batches)


def _build(session, choices: dict[str, Any]):
    return session.factorizer.build(plan_of(choices))


def _record(latency: SearchLatency, spaces, choices: dict[str, Any], timing: PlanTiming | None) -> None:
    latency.final = timing
    # The prediction is of float32 times: no int8 measurement checks it.
    latency.predicted = latency.predicted_ratios(spaces, choices) if timing is not None and not latency.int8 else {}


def finish_tolerance(session, spaces, allocation: Allocation, *, kind: str, baseline: float,
                     allow_slower: bool) -> Allocation:
    """The plan within the tolerance to return: the cheapest (``minimize='latency'``: the measured fastest of
    the few predicted fastest) measured faster than the original at every batch size; else the original."""
    latency: SearchLatency = session.latency
    ev = session.evaluator
    if not allocation.choices or all(c.method is None for c in allocation.choices.values()):
        _record(latency, spaces, {}, None)
        return allocation
    passing = [c for c in (allocation.passing or [allocation.choices]) if any(x.method for x in c.values())]
    if kind == "latency":
        passing.sort(key=lambda c: sum(x.latency for x in c.values()))
    first = passing[0]
    slower: list[tuple[dict, PlanTiming]] = []
    group = passing[:_GROUP] if kind == "latency" else [first]
    rest = [c for c in passing[:_TOLERANCE_PLANS] if c not in group]
    while group:
        timings = latency.measure([_build(session, c) for c in group])
        faster = [(c, t) for c, t in zip(group, timings) if t.faster()]
        if allow_slower and not faster and group[0] is first:
            _record(latency, spaces, first, timings[0])
            latency.notes.append(f"the plan measured {timings[0].describe()} the original's time; kept "
                                 "(allow_slower)")
            return allocation
        if faster:
            choices, timing = (min(faster, key=lambda ct: sum(ct[1].ratios.values())) if kind == "latency"
                               else faster[0])
            _record(latency, spaces, choices, timing)
            if choices is not first:
                shown = "; ".join(t.describe() for _, t in slower[:2])
                latency.notes.append(
                    "the cheapest plan within the tolerance " + (f"measured slower than the original ({shown}); "
                                                                 if slower else "was not the measured fastest; ")
                    + f"returned the {'measured fastest' if kind == 'latency' else 'next cheapest faster'} plan "
                    f"within the tolerance ({timing.describe()})")
                value = ev.value_of(plan_of(choices))
                return Allocation(choices, allocation.value if value is None else value, allocation.monotone,
                                  list(allocation.notes), allocation.probes, allocation.path_length,
                                  allocation.position, passing=allocation.passing)
            return allocation
        slower += list(zip(group, timings))
        group, rest = rest[:_GROUP], rest[_GROUP:]
    shown = slower[0][1].describe()
    latency.notes.append(f"no plan within the tolerance measured faster (at most {FASTER:g}x the time) than "
                         f"{latency.versus()} at batch size(s) "
                         f"{_batches_text(latency)} ({len(slower)} measured; the cheapest ran {shown} the "
                         "original's time); kept the original model")
    _record(latency, spaces, {}, None)
    return Allocation({s.name: s.dense for s in spaces}, baseline, allocation.monotone,
                      list(allocation.notes), allocation.probes, allocation.path_length, 0,
                      passing=allocation.passing)


def finish_budget(session, spaces, cost_model, allocation: Allocation, *, kind: str, target: int,
                  max_evaluations: int, allow_slower: bool) -> Allocation:
    """A MAC/parameter/byte budget's answer, measured; replaced by one that is faster (see the module doc)."""
    latency: SearchLatency = session.latency
    if all(c.method is None for c in allocation.choices.values()):
        _record(latency, spaces, {}, None)
        return allocation
    by_name = {s.name: s for s in spaces}
    measured_before = latency.measured_plans
    timing = latency.measure([_build(session, allocation.choices)])[0]
    first = (allocation, timing)
    if timing.faster() or allow_slower:
        _record(latency, spaces, allocation.choices, timing)
        if not timing.faster():
            latency.notes.append(f"the plan measured {timing.describe()} the original's time; kept (allow_slower)")
        return allocation
    # 1. Layers slower inside the model than dense (though faster alone) are never picked again.
    for _ in range(2):
        slow = []
        for name, cand in allocation.choices.items():
            if cand.method is None:
                continue
            ratios = latency.in_context(name, cand.method, cand.rank)
            if any(r >= 1.0 for r in ratios.values()):
                slow.append((name, cand))
        if not slow:
            break
        for name, cand in slow:
            latency.forget(by_name[name], cand)
        try:
            allocation = budget_allocation(session, spaces, cost_model, target=target, kind=kind)
        except ConfigError:
            break  # the budget needs the candidates just dropped
        shipped = _replacement(session, spaces, cost_model, allocation, kind=kind, target=target,
                               max_evaluations=max_evaluations)
        if shipped is not None:
            return _ship(latency, spaces, *shipped, note=f"{len(slow)} layer(s) measured slower inside the model "
                         f"than dense were left out ({', '.join(n for n, _ in slow)})")
    # 2. Lower targets within the budget: fewer MACs are usually faster too, but less accurate: one that
    # scores more than LOWER_TARGET_LOSS below the whole budget's plan is not returned (lower ones lose more).
    lowest = minimum_cost(spaces, cost_model, kind)
    too_lossy = ""
    for fraction in (0.85, 0.7, 0.55):
        lower = int(target * fraction)
        if lower < lowest:
            break
        allocation = budget_allocation(session, spaces, cost_model, target=lower, kind=kind)
        shipped = _replacement(session, spaces, cost_model, allocation, kind=kind, target=lower,
                               max_evaluations=max_evaluations)
        if shipped is None:
            continue
        loss = _loss(first[0].value, shipped[0].value)
        if loss > LOWER_TARGET_LOSS:
            too_lossy = (f"; the faster plan found, at {fraction:.0%} of the budget ({shipped[1].describe()}), "
                         f"scored {loss:.3g} below it on validation (more than the {LOWER_TARGET_LOSS:g} a lower "
                         "target may lose)")
            break
        return _ship(latency, spaces, *shipped, note=f"the plan using the whole budget measured "
                     f"{first[1].describe()} the original's time; returned one at {fraction:.0%} of the budget, which "
                     f"measured faster and scored {loss:.3g} below it on validation")
    measured = latency.measured_plans - measured_before
    raise ConfigError(f"no plan within the {kind} budget measured faster (at most {FASTER:g}x the time) than "
                      f"{latency.versus()} at batch size(s) "
                      f"{_batches_text(latency)}: the best allocation ran {first[1].describe()} the original's time "
                      f"({measured} plan(s) measured, lower targets and layers left out included){too_lossy}. Raise "
                      "the budget, use a latency budget (--max-latency 0.8), or pass --allow-slower to ship it "
                      "anyway.")


def _loss(reference: float | None, value: float | None) -> float:
    """How far ``value`` scores below ``reference`` (0 when either is unknown or it scores higher)."""
    return 0.0 if reference is None or value is None else max(0.0, reference - value)


def _ship(latency: SearchLatency, spaces, chosen: Allocation, timing: PlanTiming, *, note: str) -> Allocation:
    latency.notes.append(note)
    _record(latency, spaces, chosen.choices, timing)
    return chosen


def _replacement(session, spaces, cost_model, allocation: Allocation, *, kind: str, target: int,
                 max_evaluations: int) -> tuple[Allocation, PlanTiming] | None:
    """Budget mode's replacement plan, measured: if faster, polished (:func:`_polished`); None when slower."""
    if not session.latency.measure([_build(session, allocation.choices)])[0].faster():
        return None
    return _polished(session, spaces, cost_model, allocation, kind=kind, target=target,
                     max_evaluations=max_evaluations)


def _polished(session, spaces, cost_model, allocation: Allocation, *, kind: str, target: int,
              max_evaluations: int) -> tuple[Allocation, PlanTiming] | None:
    """Budget mode's polish of a replacement plan (which measured faster), or the plan unpolished, with its
    timing and metric value; None when neither measures faster now: what is returned is faster on its last
    measurement, never only on an earlier one (a MobileNet int8 plan measured faster once, then 1.09x, and had
    been returned)."""
    latency: SearchLatency = session.latency
    polished = polish_budget(session, spaces, allocation, cost_model, target=target, kind=kind,
                             max_evaluations=max(2, max_evaluations // 2))
    chosen, timing = polished, latency.measure([_build(session, polished.choices)])[0]
    if not timing.faster():
        if polished.choices == allocation.choices:
            return None  # the same plan, measured again: faster once, not now
        chosen = allocation
        timing = latency.measure([_build(session, allocation.choices)])[0]
        if not timing.faster():
            return None
        if chosen.value is None:
            chosen.value = session.evaluator(plan_of(chosen.choices), "final")
    return chosen, timing


def latency_target(latency: SearchLatency, budget) -> tuple[float, tuple[int, ...]]:
    """A latency budget as (ratio of the original's time, the batch sizes it constrains)."""
    if budget.unit == "ms":
        batch = latency.batches[0]
        return budget.value / latency.original_ms(batch), (batch,)
    return float(budget.value), latency.batches


def latency_budget(session, spaces, cost_model, *, budget, max_evaluations: int, allow_slower: bool) -> Allocation:
    """The best plan whose *measured* latency is within ``budget`` (see the module doc)."""
    latency: SearchLatency = session.latency
    ratio, constrained = latency_target(latency, budget)
    lowest = minimum_cost(spaces, cost_model, "latency")
    points: list[tuple[int, float, Allocation, PlanTiming]] = []

    def measure_at(units: int) -> tuple[Allocation, PlanTiming]:
        allocation = budget_allocation(session, spaces, cost_model, target=max(units, lowest), kind="latency")
        # A target that moved too little to change the allocation gives the plan already measured: not timed again.
        same = next((p for p in points if p[2].choices == allocation.choices), None)
        timing = same[3] if same is not None else latency.measure([_build(session, allocation.choices)])[0]
        points.append((units, timing.worst(constrained), allocation, timing))
        return allocation, timing

    if ratio >= 1.0:
        return Allocation({s.name: s.dense for s in spaces}, None,
                          notes=["the original model is already within the latency budget"])
    aim = ratio * _AIM
    units = max(lowest, int(UNITS * aim))
    for _ in range(MAX_STEPS):
        _, timing = measure_at(units)
        within = [p for p in points if p[1] <= ratio]
        if within and max(p[1] for p in within) >= ratio * _LANDED:
            break
        if units <= lowest and points[-1][1] > ratio:
            break  # the fastest plan the candidates allow is over the budget
        units = _next_target(points, aim, lowest)
        if any(p[0] == units for p in points):
            break
    within = [p for p in points if p[1] <= ratio]
    if not within:
        fastest = min(points, key=lambda p: p[1])
        if fastest[0] > lowest:
            measure_at(lowest)
            fastest = points[-1]
        if fastest[1] > ratio:
            b = constrained[0]
            reachable = (f"{fastest[3].plan_ms[b] * 1.02:.4g}ms" if budget.unit == "ms"
                         else f"{fastest[1] * 1.02:.2f}")
            raise UnreachableLatencyError(
                f"the latency budget ({_budget_text(budget, ratio, latency)}) is below what any plan reaches: the "
                f"fastest plan found measured {fastest[3].describe()} the time of {latency.versus()} "
                f"({fastest[3].plan_ms[b]:.4g} ms vs {fastest[3].original_ms[b]:.4g} ms at batch {b}). Raise "
                f"--max-latency to at least {reachable}.", fastest[3].ratios)
        within = [fastest]
    units, _, allocation, timing = max(within, key=lambda p: (p[1], p[0]))
    polished = polish_budget(session, spaces, allocation, cost_model, target=units if units >= lowest else lowest,
                             kind="latency", max_evaluations=max_evaluations)
    if polished.choices != allocation.choices:
        polished_timing = latency.measure([_build(session, polished.choices)])[0]
        if polished_timing.worst(constrained) <= ratio:
            allocation, timing = polished, polished_timing
        else:
            allocation.value = session.evaluator(plan_of(allocation.choices), "final")
    else:
        allocation = polished
    if allocation.value is None:
        allocation.value = session.evaluator(plan_of(allocation.choices), "final")
    latency.notes.append(f"latency budget {_budget_text(budget, ratio, latency)}: measured "
                         f"{timing.describe()} ({len({id(p[3]) for p in points})} allocation(s) measured)")
    _record(latency, spaces, allocation.choices, timing)
    return allocation


def _budget_text(budget, ratio: float, latency: SearchLatency) -> str:
    if budget.unit == "ms":
        return f"{budget.value:g} ms at batch {latency.batches[0]}, {ratio:.2f}x the original"
    return f"{ratio:.2f}x the original at batch size(s) {_batches_text(latency)}"


def _next_target(points: list, aim: float, lowest: int) -> int:
    """The next target (latency units) from the measured (target, worst ratio) points: a secant step towards
    ``aim`` between the nearest points on both sides, or a proportional step from one side."""
    below = [p for p in points if p[1] <= aim]
    above = [p for p in points if p[1] > aim]
    if below and above:
        lo = max(below, key=lambda p: p[1])
        hi = min(above, key=lambda p: p[1])
        if hi[1] != lo[1]:
            units = lo[0] + (hi[0] - lo[0]) * (aim - lo[1]) / (hi[1] - lo[1])
        else:
            units = (lo[0] + hi[0]) / 2
        return max(lowest, int(min(max(units, min(lo[0], hi[0])), max(lo[0], hi[0]))))
    last = points[-1]
    # The saving measured is (1 - ratio) for a predicted saving of (1 - target): scale the predicted saving.
    predicted_saving = 1.0 - last[0] / UNITS
    measured_saving = 1.0 - last[1]
    if measured_saving <= 1e-3:
        wanted = predicted_saving * 2 + (1.0 - aim)
    else:
        wanted = predicted_saving * (1.0 - aim) / measured_saving
    return max(lowest, min(UNITS - 1, int(UNITS * (1.0 - wanted))))
