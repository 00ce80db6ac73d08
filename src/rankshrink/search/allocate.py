"""Whole-network allocation: one knob sets every layer's rank and method.

Searching L ranks jointly is an L-dimensional problem; it is turned into a
one-dimensional one. Every layer has a frontier of candidates (method × rank, see
:mod:`~rankshrink.search.space`) with an exact cost and a distortion (how far the
network's outputs move when only that layer is replaced). Treating distortions as
additive (they are, to first order, for small independent perturbations: KL
divergences of small logit perturbations add like variances), the cheapest model
for a given total distortion is found by a Lagrangian relaxation: on each layer's
lower convex hull of (cost, distortion), every unit of cost saved costs some
distortion (a slope). Sorting all layers' hull steps by slope gives one *path*
from the original model (position 0) to every layer at its cheapest candidate
(position K): position k applies the k cheapest-per-distortion steps. Cost falls and
predicted distortion rises along the path, so the knob is a position on it.

* Tolerance mode bisects the position with real evaluations of the combined model
  (the largest position whose drop is within δ), then spends any evaluations left
  (of at most ``max_global``) on single extra steps that still pass. Before that,
  with ``sensitivity='probe'``, each layer gets its own one-layer bisection on its
  frontier (at most ``⌈log2 r_max⌉ + 1`` evaluations): candidates cheaper than the
  layer's own smallest passing one are dropped (if one layer alone breaks δ, so
  does any model containing it), a layer whose best candidate already fails stays
  dense, and each layer's distortion is rescaled by the distortion at which it
  crossed δ (the measured per-layer sensitivity), so the path trades layers by
  measured accuracy cost rather than by raw output distortion.
* Budget mode walks the path to the first position within the budget, then fills
  the remaining slack greedily with the upgrades that remove the most distortion
  per unit of cost that still fit. The cost is exact by formula, so the result is
  never over the budget; the greedy fill lands it just under.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError
from ..plan import Plan
from .config import MAX_GLOBAL_EVALUATIONS
from .single import bisection_steps, passes_within, run_in_lockstep, smallest_passing
from .space import Candidate, CostModel, LayerSpace, make_candidate, neighbour_rank

__all__ = ["Allocation", "lower_hull", "build_path", "plan_of", "tolerance_allocation", "budget_allocation",
           "minimum_cost", "MAX_GLOBAL_EVALUATIONS"]

_BIG = 1e30


def plan_of(choices: dict[str, Candidate]) -> Plan:
    """The plan for the factorized (non-dense) choices."""
    return Plan.from_mapping({name: cand.config for name, cand in choices.items() if cand.config is not None})


def _d(c: Candidate) -> float:
    return c.distortion if math.isfinite(c.distortion) else _BIG


def lower_hull(front: list[Candidate], kind: str) -> list[int]:
    """Indices into ``front`` (ascending cost) of its lower convex hull in (cost, distortion)."""
    hull: list[int] = []
    for i, c in enumerate(front):
        while len(hull) >= 2:
            a, b = front[hull[-2]], front[hull[-1]]
            x1, y1, x2, y2, x3, y3 = a.cost(kind), _d(a), b.cost(kind), _d(b), c.cost(kind), _d(c)
            if (x2 - x1) * (y3 - y1) - (y2 - y1) * (x3 - x1) <= 0:
                hull.pop()
            else:
                break
        hull.append(i)
    return hull


def build_path(fronts: list[list[Candidate]], hulls: list[list[int]], kind: str,
               weights: list[float]) -> list[tuple[int, int]]:
    """The merged hull steps, cheapest distortion per cost saved first: (layer, new frontier index)."""
    steps = []
    for li, (front, hull) in enumerate(zip(fronts, hulls)):
        for j in range(len(hull) - 1, 0, -1):
            here, there = front[hull[j]], front[hull[j - 1]]
            saved = here.cost(kind) - there.cost(kind)
            added = (_d(there) - _d(here)) * weights[li]
            slope = added / saved if saved > 0 else _BIG
            steps.append((slope, li, -j, hull[j - 1]))
    steps.sort()
    return [(li, to) for _, li, _, to in steps]


def minimum_cost(spaces: list[LayerSpace], cost_model: CostModel, kind: str) -> int:
    """The smallest reachable cost: every layer at its cheapest candidate (never below rank 1)."""
    choices = {s.name: min([s.dense, *s.candidates], key=lambda c: c.cost(kind)) for s in spaces}
    return cost_model.total(choices, {s.name: s for s in spaces})[kind]


@dataclass
class Allocation:
    choices: dict[str, Candidate]
    value: float | None
    monotone: bool = True
    notes: list[str] = field(default_factory=list)
    probes: dict[str, Any] = field(default_factory=dict)
    path_length: int = 0
    position: int = 0

    @property
    def plan(self) -> Plan:
        return plan_of(self.choices)


def _subsample(items: list, n_max: int) -> list:
    """At most ``n_max`` items spread evenly, always keeping the first and the last."""
    if len(items) <= n_max or n_max < 2:
        return list(items) if len(items) <= max(n_max, 1) else [items[-1]]
    picks = sorted({round(i * (len(items) - 1) / (n_max - 1)) for i in range(n_max)})
    return [items[i] for i in picks]


def _estimate_guess(space: LayerSpace, probe: list[Candidate], kind: str) -> int | None:
    """Index in ``probe`` nearest (in cost) to the cheapest data-free EVBMF estimate, if any."""
    from ..cost import factorized_cost
    from ..methods import get_method

    costs = []
    for method, est in space.estimates.items():
        try:
            rank = get_method(method).normalize_rank(space.geometry, est.rank)
            cost = factorized_cost(space.geometry, method, rank, space.input_size)
        except Exception:
            continue
        value = {"params": cost.params, "macs": cost.macs * space.calls,
                 "bytes": cost.params * space.element_size}[kind]
        costs.append(value)
    if not costs or not probe:
        return None
    target = min(costs)
    return min(range(len(probe)), key=lambda i: (abs(probe[i].cost(kind) - target), i))


def _state_choices(fronts, state, spaces) -> dict[str, Candidate]:
    return {s.name: fronts[li][state[li]] for li, s in enumerate(spaces)}


def _probe_layers(ev, spaces: list[LayerSpace], fronts: list[list[Candidate]], ok, kind: str,
                  probes: dict[str, Any], notes: list[str]) -> tuple[list[float], bool]:
    """One-layer bisections: trim each layer's frontier and measure its sensitivity.

    Candidates cheaper than a layer's own smallest passing one are dropped from
    ``fronts`` (in place); a layer whose best candidate fails stays dense. Returns each
    layer's distortion weight (1 / the distortion at which it alone reaches the
    tolerance) and whether every bisection saw monotone values.
    """
    weights = [1.0] * len(spaces)
    monotone = True
    # Every layer's bisection advances one step per round; a round's evaluations are independent and run
    # together on the worker pool (search/parallel.py). Each bisection sees the values it would alone.
    subsampled = [_subsample(front[:-1], space.r_max) for space, front in zip(spaces, fronts)]
    active = [li for li, probe in enumerate(subsampled) if probe]
    searches = [bisection_steps(len(subsampled[li]), ok, guess=_estimate_guess(spaces[li], subsampled[li], kind))
                for li in active]

    def evaluate_round(requests: list[tuple[int, int]]) -> list[float]:
        plans = [(spaces[active[s]].name, plan_of({spaces[active[s]].name: subsampled[active[s]][i]}))
                 for s, i in requests]
        ev.prefetch([plan for _, plan in plans])
        return [ev(plan, f"probe {name}") for name, plan in plans]

    results = dict(zip(active, run_in_lockstep(searches, evaluate_round)))
    for li, space in enumerate(spaces):
        front = fronts[li]
        probe = subsampled[li]
        if not probe:
            probes[space.name] = {"evaluated": {}, "threshold": None}
            continue
        found = results[li]
        monotone = monotone and found.monotone
        probes[space.name] = {"evaluated": {probe[i].label(): v for i, v in sorted(found.values.items())},
                              "threshold": None if found.index is None else probe[found.index].label()}
        if found.index is None:
            fronts[li] = [space.dense]
            notes.append(f"{space.name}: stays dense (even its best factorization breaks the tolerance alone)")
            continue
        passing = probe[found.index]
        fronts[li] = [c for c in front if c.cost(kind) >= passing.cost(kind)]
        failing = probe[found.index - 1] if found.index - 1 in found.values else None
        d_pass = max(passing.distortion, 1e-12)
        if failing is not None and math.isfinite(failing.distortion):
            scale = math.sqrt(d_pass * max(failing.distortion, d_pass))
        else:
            scale = 2.0 * d_pass  # passes at its cheapest candidate: tolerates at least this much
        # Distortion in units of "the distortion at which this layer alone reaches δ".
        weights[li] = 1.0 / scale
    return weights, monotone


def tolerance_allocation(session, spaces: list[LayerSpace], cost_model: CostModel, *, baseline: float,
                         tolerance: float, kind: str, sensitivity: str = "probe",
                         max_global: int = MAX_GLOBAL_EVALUATIONS) -> Allocation:
    """The cheapest allocation (in ``kind``) whose metric drop stays within ``tolerance``."""
    ev = session.evaluator
    ok = passes_within(baseline, tolerance)
    fronts = [s.frontier(kind) for s in spaces]
    weights = [1.0] * len(spaces)
    notes: list[str] = []
    monotone = True
    probes: dict[str, Any] = {}

    if sensitivity == "probe":
        weights, monotone = _probe_layers(ev, spaces, fronts, ok, kind, probes, notes)

    hulls = [lower_hull(f, kind) for f in fronts]
    path = build_path(fronts, hulls, kind, weights)
    start = [len(f) - 1 for f in fronts]
    states = [list(start)]
    for li, to in path:
        state = list(states[-1])
        state[li] = to
        states.append(state)
    positions = _subsample(list(range(len(states))), 2 ** max_global)
    n = len(positions)
    # Weakest first: index i <-> path position positions[n - 1 - i]; the top (position 0, the
    # original model) passes by definition and is answered from memory.
    guess = None
    if sensitivity == "probe" and len(positions) > 2:
        predicted = []
        for k in positions:
            state = states[k]
            predicted.append(sum(_d(fronts[li][state[li]]) * weights[li] for li in range(len(spaces))))
        fits = [i for i, p in enumerate(predicted) if p <= 1.0]
        if fits:
            guess = n - 1 - fits[-1]

    def evaluate_position(i: int) -> float:
        k = positions[n - 1 - i]
        if k == 0:
            return baseline
        return ev(plan_of(_state_choices(fronts, states[k], spaces)), "global")

    used_before = ev.requested
    found = smallest_passing(n, evaluate_position, ok, guess=guess)
    monotone = monotone and found.monotone
    best_i = found.index if found.index is not None else n - 1
    best_k = positions[n - 1 - best_i]
    state = list(states[best_k])
    value = found.values.get(best_i, baseline)
    used = ev.requested - used_before

    # Spend what is left on single extra steps from the answer, most promising first: the next
    # cheaper frontier candidate of a layer, or the same method one rank lower (finer than the grid).
    choices = _state_choices(fronts, state, spaces)
    failed: set[str] = set()
    if best_k + 1 < len(states):
        failed.add(plan_of(_state_choices(fronts, states[best_k + 1], spaces)).key())
    remaining = max_global - used
    while remaining > 0:
        options = []
        for li, space in enumerate(spaces):
            here = choices[space.name]
            floor = fronts[li][0].cost(kind)
            steps = []
            cheaper = [c for c in fronts[li] if c.cost(kind) < here.cost(kind)]
            if cheaper:
                steps.append(cheaper[-1])
            if here.method is not None:
                rank = neighbour_rank(space.geometry, here.method, here.rank, -1)
                if rank is not None:
                    fine = make_candidate(session, space, here.method, rank)
                    if floor <= fine.cost(kind) < here.cost(kind):
                        steps.append(fine)
            for cand in steps:
                trial = dict(choices)
                trial[space.name] = cand
                key = plan_of(trial).key()
                if key in failed:
                    continue
                saved = here.cost(kind) - cand.cost(kind)
                slope = (_d(cand) - _d(here)) * weights[li] / saved
                options.append((slope, li, key, trial))
        if not options:
            break
        options.sort(key=lambda o: (o[0], o[1]))
        _, _, key, trial = options[0]
        v = ev(plan_of(trial), "refine")
        remaining -= 1
        if ok(v):
            choices, value = trial, v
        else:
            failed.add(key)
    if not monotone:
        notes.append("the metric was not monotone along the evaluated ranks/positions (accuracy is not exactly "
                     "monotone in rank); the answer keeps the tolerance, a slightly smaller one may exist")
    return Allocation(choices, value, monotone, notes, probes, len(path), best_k)


def budget_allocation(session, spaces: list[LayerSpace], cost_model: CostModel, *, target: int,
                      kind: str, weights: list[float] | None = None) -> Allocation:
    """The allocation with the least predicted distortion whose exact ``kind`` cost is ≤ ``target``."""
    by_name = {s.name: s for s in spaces}
    fronts = [s.frontier(kind) for s in spaces]
    weights = weights or [1.0] * len(spaces)
    lowest = minimum_cost(spaces, cost_model, kind)
    if target < lowest:
        raise ConfigError(f"the budget {target:,} {kind} is below the minimum reachable, {lowest:,} {kind} (every "
                          "factorizable layer at rank 1 with its cheapest method, plus the layers that are not "
                          "factorized); raise the budget.")
    hulls = [lower_hull(f, kind) for f in fronts]
    path = build_path(fronts, hulls, kind, weights)
    state = [len(f) - 1 for f in fronts]

    def total(st) -> int:
        return cost_model.total(_state_choices(fronts, st, spaces), by_name)[kind]

    position = 0
    for li, to in path:
        if total(state) <= target:
            break
        state[li] = to
        position += 1
    if total(state) > target:  # cannot happen: the path ends at every layer's cheapest point
        state = [0] * len(fronts)
    choices = _state_choices(fronts, state, spaces)
    current = total(state)
    choices, current = fill_budget(session, spaces, fronts, choices, current, target, kind, weights)
    notes = []
    if current < 0.98 * target:
        notes.append(f"the allocation uses {current / target:.1%} of the budget: the candidates' cost steps are "
                     "too coarse to get closer")
    return Allocation(choices, None, True, notes, {}, len(path), position)


def _pool(session, space: LayerSpace, front: list[Candidate], here: Candidate, kind: str,
          reach: int = 2) -> list[Candidate]:
    """Where one layer can move: its frontier plus the current method a few ranks up or down."""
    pool = {id(c): c for c in front}
    if here.method is not None:
        for step in [s for k in range(1, reach + 1) for s in (k, -k)]:
            rank = neighbour_rank(space.geometry, here.method, here.rank, step)
            if rank is not None:
                cand = make_candidate(session, space, here.method, rank)
                if cand.cost(kind) < space.dense.cost(kind):
                    pool[id(cand)] = cand
    pool.pop(id(here), None)
    return list(pool.values())


def fill_budget(session, spaces: list[LayerSpace], fronts: list[list[Candidate]], choices: dict[str, Candidate],
                current: int, target: int, kind: str, weights: list[float],
                max_moves: int = 500) -> tuple[dict[str, Candidate], int]:
    """Use the slack under ``target`` by local moves, never going over it.

    In order of preference, repeatedly: (1) the single upgrade removing the most weighted
    distortion per unit of cost that fits; (2) a swap (one layer up, another down) that
    lowers the total weighted distortion and fits; (3) while less than 98% of the budget
    is used, the upgrade that fits with the smallest distortion change (spending slack
    that the proxy cannot tell apart from nothing).
    """
    choices = dict(choices)
    index = {s.name: li for li, s in enumerate(spaces)}
    for _ in range(max_moves):
        slack = target - current
        pools = {s.name: _pool(session, s, fronts[index[s.name]], choices[s.name], kind) for s in spaces}
        best_up = None
        burn = None
        for s in spaces:
            here, w = choices[s.name], weights[index[s.name]]
            for cand in pools[s.name]:
                added = cand.cost(kind) - here.cost(kind)
                if added <= 0 or added > slack:
                    continue
                delta = (_d(cand) - _d(here)) * w
                if delta < 0 and (best_up is None or (-delta / added, added) > best_up[0]):
                    best_up = ((-delta / added, added), s.name, cand, added)
                if burn is None or (delta, -added) < burn[0]:
                    burn = ((delta, -added), s.name, cand, added)
        if best_up is not None:
            _, name, cand, added = best_up
            choices[name] = cand
            current += added
            continue
        best_swap = None
        for a in spaces:
            here_a, wa = choices[a.name], weights[index[a.name]]
            ups = [c for c in pools[a.name] if c.cost(kind) > here_a.cost(kind) and _d(c) < _d(here_a)]
            if not ups:
                continue
            for b in spaces:
                if b is a:
                    continue
                here_b, wb = choices[b.name], weights[index[b.name]]
                downs = sorted((c for c in pools[b.name] if c.cost(kind) < here_b.cost(kind)),
                               key=lambda c: -c.cost(kind))[:3]  # the nearest few steps down
                for up in ups:
                    for down in downs:
                        change = (up.cost(kind) - here_a.cost(kind)) + (down.cost(kind) - here_b.cost(kind))
                        if change <= 0 or change > slack:
                            continue
                        delta = (_d(up) - _d(here_a)) * wa + (_d(down) - _d(here_b)) * wb
                        if delta < 0 and (best_swap is None or (delta, -change) < best_swap[0]):
                            best_swap = ((delta, -change), a.name, up, b.name, down, change)
        if best_swap is not None:
            _, na, up, nb, down, change = best_swap
            choices[na], choices[nb] = up, down
            current += change
            continue
        if current < 0.98 * target and burn is not None:
            _, name, cand, added = burn
            choices[name] = cand
            current += added
            continue
        break
    return choices, current


def polish_budget(session, spaces: list[LayerSpace], allocation: Allocation, cost_model: CostModel, *,
                  target: int, kind: str, weights: list[float] | None = None,
                  max_evaluations: int = MAX_GLOBAL_EVALUATIONS) -> Allocation:
    """Spend a few real evaluations on neighbours of a budget allocation; keep strict improvements.

    The proxy picks the allocation; the metric then gets the last word among its close
    neighbours that also fit the budget (and stay within 2% under it): one layer one step
    up while another goes one step down, or one layer switching to another candidate of
    similar cost (another method). Neighbours are tried in order of predicted harm; the
    first that beats the current value on validation is taken and the search restarts from
    it. At most ``max_evaluations`` evaluations in all (the allocation's own included).
    """
    ev = session.evaluator
    by_name = {s.name: s for s in spaces}
    weights = weights or [1.0] * len(spaces)
    index = {s.name: li for li, s in enumerate(spaces)}
    fronts = [s.frontier(kind) for s in spaces]
    choices = dict(allocation.choices)
    value = ev(plan_of(choices), "final")
    used = 1
    tried = {plan_of(choices).key()}
    floor = 0.98 * target

    def total(ch) -> int:
        return cost_model.total(ch, by_name)[kind]

    def steps(space: LayerSpace, here: Candidate) -> tuple[list[Candidate], list[Candidate]]:
        pool = _pool(session, space, fronts[index[space.name]], here, kind, reach=1)
        ups = sorted((c for c in pool if c.cost(kind) > here.cost(kind)), key=lambda c: c.cost(kind))[:2]
        downs = sorted((c for c in pool if c.cost(kind) < here.cost(kind)), key=lambda c: -c.cost(kind))[:2]
        return ups, downs

    while used < max_evaluations:
        neighbours = []
        moves = {s.name: steps(s, choices[s.name]) for s in spaces}
        for a in spaces:
            ups, _ = moves[a.name]
            for up in ups:
                for b in spaces:
                    if b is a:
                        continue
                    for down in moves[b.name][1]:
                        trial = dict(choices)
                        trial[a.name], trial[b.name] = up, down
                        neighbours.append(trial)
            # Same layer, another candidate of similar cost (typically another method).
            here = choices[a.name]
            for cand in fronts[index[a.name]]:
                if cand is not here and abs(cand.cost(kind) - here.cost(kind)) <= 0.02 * target:
                    trial = dict(choices)
                    trial[a.name] = cand
                    neighbours.append(trial)
        scored = []
        for trial in neighbours:
            cost = total(trial)
            key = plan_of(trial).key()
            if not floor <= cost <= target or key in tried:
                continue
            harm = sum((_d(trial[s.name]) - _d(choices[s.name])) * weights[index[s.name]] for s in spaces)
            scored.append((harm, -cost, key, trial))
        if not scored:
            break
        scored.sort(key=lambda t: (t[0], t[1]))
        improved = False
        for position, (_, _, key, trial) in enumerate(scored):
            if used >= max_evaluations:
                break
            if ev.parallelism > 1 and position % ev.parallelism == 0:  # the next few, on the worker pool
                ahead = scored[position:position + min(ev.parallelism, max_evaluations - used)]
                ev.prefetch([plan_of(t) for *_, t in ahead])
            tried.add(key)
            v = ev(plan_of(trial), "polish")
            used += 1
            if v > value + 1e-12:
                choices, value, improved = trial, v, True
                break
        if not improved:
            break
    return Allocation(choices, value, allocation.monotone, allocation.notes, allocation.probes,
                      allocation.path_length, allocation.position)
