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

* Tolerance mode returns the cheapest of *every* whole-model plan it evaluated whose
  drop is within δ (on validation; with a confidence, the upper end of the drop's
  bootstrap interval), wherever the plan came from. Its evaluations (at most
  ``L·(⌈log2 r_max⌉ + 1) + max_global`` after the original's) go to: the bisection of the
  position (the largest position whose drop is within δ); budget-mode runs under the
  best cost found (the allocations budget mode would make at a grid of targets, then
  budget mode's polish at the nearest one, so tolerance mode does not lose to a budget
  run there); and a local search around the best (one layer one step down, or one down
  and another up, cheaper in all). With ``sensitivity='probe'`` each layer first gets
  its own one-layer bisection on its frontier (at most ``⌈log2 r_max⌉ + 1``
  evaluations): candidates cheaper than the layer's own smallest passing one are
  dropped from the path, a layer whose best candidate already fails stays dense, and
  each layer's distortion is rescaled by the distortion at which it crossed δ (the
  measured per-layer sensitivity). The default (``'auto'``) skips the probes and gives
  their evaluations to whole-model plans: on validation sets of a few hundred samples
  one-layer thresholds are within an image or two of noise, and whole-model plans
  found cheaper answers on the digits and CIFAR CNNs. ``monotone`` says whether every
  pair of evaluated plans where one keeps at least as much of every layer agreed with
  "more rank, no less accurate".
* Budget mode walks the path to the first position within the budget, then fills
  the remaining slack greedily with the upgrades that remove the most distortion
  per unit of cost that still fit. The cost is exact by formula, so the result is
  never over the budget; the greedy fill lands it just under.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

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
    # Tolerance mode: every evaluated plan within the tolerance, cheapest first (the answer is the first).
    passing: list[dict[str, Candidate]] = field(default_factory=list)

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
        if kind == "latency":  # not a formula: the probes start from the middle
            return None
        value = {"params": cost.params, "macs": cost.macs * space.calls,
                 "bytes": cost.params * space.element_size}[kind]
        costs.append(value)
    if not costs or not probe:
        return None
    target = min(costs)
    return min(range(len(probe)), key=lambda i: (abs(probe[i].cost(kind) - target), i))


def _state_choices(fronts, state, spaces) -> dict[str, Candidate]:
    return {s.name: fronts[li][state[li]] for li, s in enumerate(spaces)}


def _probe_layers(measured: "_Measured", spaces: list[LayerSpace], fronts: list[list[Candidate]], ok, kind: str,
                  probes: dict[str, Any], notes: list[str]) -> list[float]:
    """One-layer bisections: trim each layer's frontier and measure its sensitivity.

    Candidates cheaper than a layer's own smallest passing one are dropped from
    ``fronts`` (in place); a layer whose best candidate fails stays dense. Returns each
    layer's distortion weight (1 / the distortion at which it alone reaches the
    tolerance). Every probe is a whole-model plan (one layer factorized) and a candidate
    answer of the tolerance search.
    """
    weights = [1.0] * len(spaces)
    # Every layer's bisection advances one step per round; a round's evaluations are independent and run
    # together on the worker pool (search/parallel.py). Each bisection sees the values it would alone.
    subsampled = [_subsample(front[:-1], space.r_max) for space, front in zip(spaces, fronts)]
    active = [li for li, probe in enumerate(subsampled) if probe]
    searches = [bisection_steps(len(subsampled[li]), ok, guess=_estimate_guess(spaces[li], subsampled[li], kind))
                for li in active]

    def evaluate_round(requests: list[tuple[int, int]]) -> list[float]:
        choices = [(spaces[active[s]].name, {spaces[active[s]].name: subsampled[active[s]][i]}) for s, i in requests]
        measured.ev.prefetch([plan_of(measured.full(c)) for _, c in choices])
        return [measured.evaluate(c, f"probe {name}") for name, c in choices]

    results = dict(zip(active, run_in_lockstep(searches, evaluate_round)))
    for li, space in enumerate(spaces):
        front = fronts[li]
        probe = subsampled[li]
        if not probe:
            probes[space.name] = {"evaluated": {}, "threshold": None}
            continue
        found = results[li]
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
    return weights


class _Measured:
    """Every whole-model plan a tolerance search evaluated: its choices, exact cost and decision value.

    The answer is the cheapest of these within the tolerance, wherever it came from (a
    one-layer probe, the path, a budget walk or the local search).
    """

    def __init__(self, session, spaces: list[LayerSpace], cost_model: CostModel, kind: str, ok):
        self.ev = session.evaluator
        self.spaces = spaces
        self.by_name = {s.name: s for s in spaces}
        self.cost_model = cost_model
        self.kind = kind
        self.ok = ok
        self.plans: dict[str, tuple[dict[str, Candidate], int, float]] = {}

    def full(self, choices: dict[str, Candidate]) -> dict[str, Candidate]:
        return {s.name: choices.get(s.name, s.dense) for s in self.spaces}

    def cost(self, choices: dict[str, Candidate]) -> int:
        return self.cost_model.total(choices, self.by_name)[self.kind]

    def evaluate(self, choices: dict[str, Candidate], phase: str) -> float:
        choices = self.full(choices)
        plan = plan_of(choices)
        value = self.ev.decision(plan, phase)
        self.plans.setdefault(plan.key(), (choices, self.cost(choices), value))
        return value

    def known(self, choices: dict[str, Candidate]) -> bool:
        return plan_of(choices).key() in self.plans

    def passes(self, choices: dict[str, Candidate]) -> bool | None:
        found = self.plans.get(plan_of(choices).key())
        return None if found is None else self.ok(found[2])

    def best(self) -> tuple[dict[str, Candidate], int, float] | None:
        """The cheapest passing plan measured so far (ties: the higher decision value)."""
        passing = self.passing()
        return passing[0] if passing else None

    def passing(self) -> list[tuple[dict[str, Candidate], int, float]]:
        """Every passing plan measured so far, cheapest first (ties: the higher decision value)."""
        return sorted((p for p in self.plans.values() if self.ok(p[2])), key=lambda p: (p[1], -p[2]))


def _dominates(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether plan ``a`` keeps at least as much of every layer as plan ``b`` (JSON plan entries).

    Dense (absent) keeps everything; two factorizations compare only with the same method,
    fit and options, rank by rank.
    """
    for name, entry_b in b.items():
        entry_a = a.get(name)
        if entry_a is None:
            continue
        if {k: v for k, v in entry_a.items() if k != "rank"} != {k: v for k, v in entry_b.items() if k != "rank"}:
            return False
        ra, rb = entry_a.get("rank"), entry_b.get("rank")
        ra = list(ra) if isinstance(ra, (list, tuple)) else [ra]
        rb = list(rb) if isinstance(rb, (list, tuple)) else [rb]
        if len(ra) != len(rb) or any(x < y for x, y in zip(ra, rb)):
            return False
    return all(name in b for name in a)  # a layer factorized in a but dense in b keeps less


def measured_monotone(records) -> bool:
    """Whether every measured pair agrees with "more rank is at least as accurate".

    For every two evaluated plans where one keeps at least as much of every layer as the
    other (:func:`_dominates`; the original model keeps all), the metric of the larger
    one must be at least the smaller one's.
    """
    from .single import _EPS

    entries = [(r.plan, r.value) for r in records]
    for i, (plan_a, value_a) in enumerate(entries):
        for plan_b, value_b in entries[i + 1:]:
            if plan_a == plan_b:
                continue
            if _dominates(plan_a, plan_b) and value_a < value_b - _EPS:
                return False
            if _dominates(plan_b, plan_a) and value_b < value_a - _EPS:
                return False
    return True


def _step_down(session, space: LayerSpace, front: list[Candidate], here: Candidate, kind: str) -> list[Candidate]:
    """One step cheaper for one layer: the next cheaper frontier candidate, else the same method one rank lower.

    (Single ranks near a layer's top save too little to be worth an evaluation when the
    frontier has a real step.)
    """
    cheaper = [c for c in front if c.cost(kind) < here.cost(kind)]
    if cheaper:
        return [cheaper[-1]]
    steps: list[Candidate] = []
    if here.method is not None:
        rank = neighbour_rank(space.geometry, here.method, here.rank, -1)
        if rank is not None:
            fine = make_candidate(session, space, here.method, rank)
            if front[0].cost(kind) <= fine.cost(kind) < here.cost(kind):
                steps.append(fine)
    return steps


def _step_up(session, space: LayerSpace, front: list[Candidate], here: Candidate, kind: str) -> list[Candidate]:
    """One step costlier for one layer: the next costlier frontier candidate, and the same method one rank higher."""
    steps = []
    dearer = [c for c in front if c.cost(kind) > here.cost(kind)]
    if dearer:
        steps.append(dearer[0])
    if here.method is not None:
        rank = neighbour_rank(space.geometry, here.method, here.rank, +1)
        if rank is not None:
            fine = make_candidate(session, space, here.method, rank)
            if here.cost(kind) < fine.cost(kind) < space.dense.cost(kind):
                steps.append(fine)
    return steps


def _local_search(session, measured: _Measured, fronts: list[list[Candidate]], weights: list[float],
                  kind: str, budget: int) -> None:
    """Spend up to ``budget`` evaluations on plans around the cheapest passing one; keep what passes.

    Moves from the current answer: one layer one step down, or one layer one step down and
    another one step up, whenever the pair is cheaper in all. Moves are tried in order of
    predicted harm per unit of cost saved (the weighted distortion proxy); a passing move
    becomes the new centre.
    """
    ev = session.evaluator
    spaces = measured.spaces
    stop = ev.requested + budget
    while ev.requested < stop:
        best = measured.best()
        if best is None:
            return
        centre, centre_cost, _ = best
        downs = {s.name: _step_down(session, s, fronts[li], centre[s.name], kind) for li, s in enumerate(spaces)}
        ups = {s.name: _step_up(session, s, fronts[li], centre[s.name], kind) for li, s in enumerate(spaces)}
        options = []
        for li, a in enumerate(spaces):
            here_a = centre[a.name]
            for down in downs[a.name]:
                harm_a = (_d(down) - _d(here_a)) * weights[li]
                moves = [({a.name: down}, harm_a)]
                for lj, b in enumerate(spaces):
                    if lj == li:
                        continue
                    for up in ups[b.name]:
                        moves.append(({a.name: down, b.name: up},
                                      harm_a + (_d(up) - _d(centre[b.name])) * weights[lj]))
                for change, harm in moves:
                    trial = dict(centre)
                    trial.update(change)
                    if measured.known(trial):
                        continue
                    saved = centre_cost - measured.cost(trial)
                    if saved <= 0:
                        continue
                    options.append((harm / saved, -saved, li, trial))
        if not options:
            return
        options.sort(key=lambda o: (o[0], o[1], o[2]))
        for _, _, _, trial in options:
            if ev.requested >= stop:
                return
            before = ev.requested
            value = measured.evaluate(trial, "local")
            if measured.ok(value):
                break  # a new centre: recompute the moves around it
            if ev.requested == before:  # answered from memory (cannot happen: unknown plans only)
                continue
        else:
            return


# Budget-mode allocations a tolerance search evaluates: targets on a geometric grid from the
# cheapest reachable cost up to just under the best plan found so far.
WALK_TARGETS = 24
# Evaluations budget mode's polish may spend at the nearest target under the best plan.
WALK_POLISH = 4


def _budget_walks(session, measured: _Measured, spaces: list[LayerSpace], cost_model: CostModel, kind: str,
                  below: int, budget: int) -> None:
    """Budget-mode runs under the best cost found so far (``below``), within ``budget`` evaluations.

    Budget mode walks the proxy path of the full frontiers, fills the slack and polishes on
    real evaluations; its answer at some target can be cheaper than the tolerance path's and
    still keep the tolerance. So its allocations at (a subsample of) :data:`WALK_TARGETS`
    targets are evaluated from the top down, one evaluation each, every one of them (accuracy
    is far from monotone in the target: a lower target's allocation can pass where a higher
    one fails); then budget mode's polish runs at the nearest target under the best plan,
    stopping at the first plan within the tolerance.
    """
    ev = session.evaluator
    lowest = minimum_cost(spaces, cost_model, kind)
    if budget < 1 or below <= lowest:
        return
    targets = sorted({int(lowest * (below / lowest) ** (i / WALK_TARGETS)) for i in range(WALK_TARGETS)})
    targets = [t for t in targets if lowest <= t < below]
    stop = ev.requested + budget
    polish = min(WALK_POLISH, budget // 3)
    picks = _subsample(list(range(len(targets))), max(1, budget - polish))
    allocations: dict[int, Allocation] = {}

    def allocation(i: int) -> Allocation:
        if i not in allocations:
            allocations[i] = budget_allocation(session, spaces, cost_model, target=targets[i], kind=kind)
        return allocations[i]

    for i in reversed(picks):
        if ev.requested >= stop:
            return
        measured.evaluate(allocation(i).choices, "budget walk")
    best = measured.best()
    under = [i for i in picks if best is None or targets[i] < best[1]]
    if under and ev.requested < stop:
        i = under[-1]
        polish_budget(session, spaces, allocation(i), cost_model, target=targets[i], kind=kind,
                      max_evaluations=stop - ev.requested, evaluate=measured.evaluate, stop=measured.ok,
                      phase="budget walk")


def tolerance_allocation(session, spaces: list[LayerSpace], cost_model: CostModel, *, baseline: float,
                         tolerance: float, kind: str, sensitivity: str = "auto",
                         max_global: int = MAX_GLOBAL_EVALUATIONS, probe_allowance: int = 0) -> Allocation:
    """The cheapest allocation (in ``kind``) whose metric drop stays within ``tolerance``.

    The answer is the cheapest of every whole-model plan evaluated that keeps the tolerance,
    wherever it came from: the one-layer probes (``sensitivity='probe'``), the bisection of
    the allocation path, the budget-mode runs under the best found (:func:`_budget_walks`) or
    the local search around the best (:func:`_local_search`). The whole-model phases share
    ``max_global`` evaluations plus the ``probe_allowance`` (what per-layer probes may use)
    less what the probes used: with ``sensitivity='auto'`` there are no probes and the whole
    allowance goes to whole-model plans; with ``'proxy'`` the allowance is 0.
    """
    ev = session.evaluator
    ok = passes_within(baseline, tolerance)
    measured = _Measured(session, spaces, cost_model, kind, ok)
    fronts = [s.frontier(kind) for s in spaces]
    weights = [1.0] * len(spaces)
    notes: list[str] = []
    probes: dict[str, Any] = {}

    start = ev.requested
    if sensitivity == "probe":
        weights = _probe_layers(measured, spaces, fronts, ok, kind, probes, notes)
    left = max_global + max(0, probe_allowance - (ev.requested - start))

    hulls = [lower_hull(f, kind) for f in fronts]
    path = build_path(fronts, hulls, kind, weights)
    first = [len(f) - 1 for f in fronts]
    states = [list(first)]
    for li, to in path:
        state = list(states[-1])
        state[li] = to
        states.append(state)
    # The path's bisection gets a third of the evaluations (at most 6); the budget walks and
    # the local search share the rest.
    path_evaluations = max(1, min(6, left // 3))
    positions = _subsample(list(range(len(states))), 2 ** path_evaluations)
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
        return measured.evaluate(_state_choices(fronts, states[k], spaces), "global")

    before = ev.requested
    found = smallest_passing(n, evaluate_position, ok, guess=guess, budget=path_evaluations + 1)
    best_i = found.index if found.index is not None else n - 1
    best_k = positions[n - 1 - best_i]
    left -= ev.requested - before

    best = measured.best()
    walks = left - min(left // 4, 4)  # keep a few evaluations for the local search
    if best is not None and walks > 0:
        before = ev.requested
        _budget_walks(session, measured, spaces, cost_model, kind, best[1], walks)
        left -= ev.requested - before
    if left > 0:
        # The probes' trimming assumed that a layer failing alone fails in every model; accuracy is
        # not that monotone, so the local search may step below it, on the full frontiers.
        _local_search(session, measured, [s.frontier(kind) for s in spaces], weights, kind, left)

    best = measured.best()
    if best is None:
        choices, value = measured.full({}), baseline
    else:
        choices = best[0]
        value = ev.value_of(plan_of(choices))
        value = baseline if value is None else value
    monotone = measured_monotone(ev.records)
    if not monotone:
        notes.append("the metric was not monotone in rank over the evaluated plans (accuracy is not exactly "
                     "monotone in rank); the answer is the cheapest evaluated plan within the tolerance, a "
                     "slightly smaller one may exist")
    return Allocation(choices, value, monotone, notes, probes, len(path), best_k,
                      passing=[p[0] for p in measured.passing()])


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
                  max_evaluations: int = MAX_GLOBAL_EVALUATIONS,
                  evaluate: Callable[[dict[str, Candidate], str], float] | None = None,
                  stop: Callable[[float], bool] | None = None, phase: str = "final") -> Allocation:
    """Spend a few real evaluations on neighbours of a budget allocation; keep strict improvements.

    The proxy picks the allocation; the metric then gets the last word among its close
    neighbours that also fit the budget (and stay within 2% under it): one layer one step
    up while another goes one step down, or one layer switching to another candidate of
    similar cost (another method). Neighbours are tried in order of predicted harm; the
    first that beats the current value on validation is taken and the search restarts from
    it. At most ``max_evaluations`` evaluations in all (the allocation's own included).
    ``evaluate(choices, phase)`` replaces the plain metric (the tolerance search passes its
    own, which records every plan); ``stop(value)`` ends the polish at the first value it
    accepts (the tolerance search stops at the first plan within the tolerance).
    """
    ev = session.evaluator
    if evaluate is None:
        def evaluate(ch: dict[str, Candidate], phase: str) -> float:
            return ev(plan_of(ch), phase)
    by_name = {s.name: s for s in spaces}
    weights = weights or [1.0] * len(spaces)
    index = {s.name: li for li, s in enumerate(spaces)}
    fronts = [s.frontier(kind) for s in spaces]
    choices = dict(allocation.choices)
    start = ev.requested
    value = evaluate(choices, phase)
    used = max(1, ev.requested - start)
    names = [s.name for s in spaces]

    def key_of(ch: dict[str, Candidate]) -> tuple:
        # A plan's identity, cheaply: thousands of neighbours are scored per round on a 75-layer model,
        # where Plan.key()'s JSON would take most of the search's time.
        return tuple((ch[n].method, ch[n].rank) for n in names)

    tried = {key_of(choices)}
    floor = 0.98 * target

    def steps(space: LayerSpace, here: Candidate) -> tuple[list[Candidate], list[Candidate]]:
        pool = _pool(session, space, fronts[index[space.name]], here, kind, reach=1)
        ups = sorted((c for c in pool if c.cost(kind) > here.cost(kind)), key=lambda c: c.cost(kind))[:2]
        downs = sorted((c for c in pool if c.cost(kind) < here.cost(kind)), key=lambda c: -c.cost(kind))[:2]
        return ups, downs

    while used < max_evaluations and not (stop is not None and stop(value)):
        current = cost_model.total(choices, by_name)[kind]
        neighbours: list[dict[str, Candidate]] = []  # each the layers it changes
        moves = {s.name: steps(s, choices[s.name]) for s in spaces}
        for a in spaces:
            ups, _ = moves[a.name]
            for up in ups:
                for b in spaces:
                    if b is not a:
                        neighbours.extend({a.name: up, b.name: down} for down in moves[b.name][1])
            # Same layer, another candidate of similar cost (typically another method).
            here = choices[a.name]
            neighbours.extend({a.name: cand} for cand in fronts[index[a.name]]
                              if cand is not here and abs(cand.cost(kind) - here.cost(kind)) <= 0.02 * target)
        scored = []
        for changes in neighbours:
            # Costs are additive over layers: only the changed ones move the total.
            cost = current + sum(c.cost(kind) - choices[n].cost(kind) for n, c in changes.items())
            if not floor <= cost <= target:
                continue
            trial = {**choices, **changes}
            key = key_of(trial)
            if key in tried:
                continue
            harm = sum((_d(c) - _d(choices[n])) * weights[index[n]] for n, c in changes.items())
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
            v = evaluate(trial, "polish" if phase == "final" else f"{phase} polish")
            used += 1
            if v > value + 1e-12:
                choices, value, improved = trial, v, True
                break
            if stop is not None and stop(v):  # cannot happen: a passing value beats a failing one
                choices, value = trial, v
                break
        if not improved:
            break
    return Allocation(choices, value, allocation.monotone, allocation.notes, allocation.probes,
                      allocation.path_length, allocation.position)
