"""The candidates of every layer: methods × ranks, with exact costs and a proxy error.

For each factorizable layer the candidates are every applicable method at a grid
of ranks from 1 up to its break-even rank (all small ranks, then steps of about
10%; each method sets its own grid, slow-to-fit ones coarser). Each candidate's parameters,
bytes and MACs come from the cost formulas (no weights needed); its *distortion*
is how far the network's outputs move on training inputs when only that layer is
replaced (:class:`~rankshrink.search.evaluate.Distortion`), or, without data, the
relative weight error. The dense layer is a candidate too (cost of the original,
distortion 0), so a layer that no factorization beats stays dense.

The *frontier* of a layer keeps, over all methods, the candidates that no cheaper
candidate beats in distortion: it is where the per-layer method choice happens,
at every cost level.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..cost import break_even_rank, count, dense_cost, factorized_cost
from ..errors import ConfigError, LayerError, PlanError
from ..factorized import layer_weight
from ..methods import MethodConfig, get_method, method_names, methods_for
from ..plan import Plan
from ..ranks import rank_grid
from ..surgery import validate_plan
from .config import COST_KINDS
from .evaluate import SINGLE_THREAD_MAX_WEIGHTS, single_threaded, weight_distortion
from .session import Session

__all__ = ["Candidate", "LayerSpace", "CostModel", "build_spaces", "make_candidate", "neighbour_rank", "rank_grid",
           "COST_KINDS", "plan_costs"]

# Probe blocks factorized and measured together (enough to keep a worker pool busy, few enough to bound memory).
PROBE_BATCH = 32


@dataclass(frozen=True)
class Candidate:
    """One way to build a layer: ``method`` None is the dense original."""

    layer: str
    method: str | None
    rank: Any
    params: int
    macs: int
    bytes: int
    distortion: float
    config: MethodConfig | None = field(default=None, compare=False)  # the plan entry (None when dense)
    latency: int = 0  # predicted latency cost (rankshrink.search.latency units) when latency is measured

    @property
    def dense(self) -> bool:
        return self.method is None

    def cost(self, kind: str) -> int:
        return getattr(self, kind)

    def label(self) -> str:
        if self.method is None:
            return "dense"
        rank = "x".join(str(r) for r in self.rank) if isinstance(self.rank, tuple) else str(self.rank)
        return f"{self.method}:{rank}"


@dataclass
class LayerSpace:
    name: str
    type: str
    geometry: dict[str, Any]
    input_size: tuple[int, ...]
    calls: int
    element_size: int
    dense: Candidate
    candidates: list[Candidate]
    break_even: dict[str, int]
    # The data-free EVBMF rank estimates by method, computed on first use (only the tolerance search's first
    # probes use them: for a BERT-base budget search they were a tenth of its time, unused).
    _estimates: dict[str, Any] | None = field(default=None, repr=False, compare=False)
    estimate_objective: str = field(default="params", repr=False)
    methods: tuple[str, ...] = field(default=(), repr=False)
    module: Any = field(default=None, repr=False, compare=False)
    known: dict[str, float] = field(default_factory=dict, repr=False)   # cached proxies: "method:rank" -> value
    fresh: bool = field(default=False, repr=False)                       # computed proxies not yet cached
    # With latency measured: the (method, rank)s measured faster than the dense layer (None: no filter), and
    # each one's predicted latency cost and time ratio per batch size.
    allowed: set | None = field(default=None, repr=False)
    latency_costs: dict = field(default_factory=dict, repr=False)
    latency_ratios: dict = field(default_factory=dict, repr=False)
    # Closed-form error curves by method (search/closed_form.py): their candidates need no forward pass.
    curves: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def estimates(self) -> dict[str, Any]:
        if self._estimates is None:
            from ..ranks import layer_estimates

            try:
                weight = layer_weight(self.module)
                with single_threaded(weight.numel() <= SINGLE_THREAD_MAX_WEIGHTS):
                    self._estimates = layer_estimates(weight.detach(), self.geometry, input_size=self.input_size,
                                                      by=self.estimate_objective, methods=self.methods)
            except Exception:  # estimates only guide the first probe
                self._estimates = {}
        return self._estimates

    def not_costlier(self, cost) -> bool:
        """Whether a factorization of ``cost`` (one call) has no more params or MACs than the dense layer. A
        lookup (an Embedding: no MACs) always gains a few MACs when factorized; only its parameters decide."""
        more_macs = self.dense.macs > 0 and cost.macs * self.calls > self.dense.macs
        return cost.params <= self.dense.params and not more_macs

    def latency_of(self, method: str | None, rank) -> int:
        """The predicted latency cost of a candidate (the dense layer's for ``method`` None; 0 unmeasured)."""
        key = None if method is None else (method, tuple(rank) if isinstance(rank, list) else rank)
        return int(self.latency_costs.get(key, 0))

    def proxies(self) -> dict[str, float]:
        found = {f"{c.method}:{c.rank}": c.distortion for c in self.candidates if c.method not in self.curves}
        for method, curve in self.curves.items():  # a curve's candidates follow from its probes
            for rank, value in curve.probes.items():
                found[f"probe:{method}:{rank}"] = value
        return found

    def find(self, method: str, rank) -> Candidate | None:
        for cand in self.candidates:
            if cand.method == method and cand.rank == rank:
                return cand
        return None

    @property
    def r_max(self) -> int:
        """The largest break-even rank over this layer's methods (at least 1)."""
        return max([1, *self.break_even.values()])

    def frontier(self, kind: str) -> list[Candidate]:
        """Candidates (dense last) by rising cost, each strictly less distorted than all cheaper ones."""
        order: dict[str | None, int] = {m: i for i, m in enumerate(method_names())}  # the dense candidate's is None
        pool = [c for c in self.candidates if c.cost(kind) < self.dense.cost(kind)] + [self.dense]
        pool.sort(key=lambda c: (c.cost(kind), c.distortion, order.get(c.method, 9), str(c.rank)))
        front: list[Candidate] = []
        for cand in pool:
            if not front or cand.distortion < front[-1].distortion:
                front.append(cand)
        if front[-1] is not self.dense:  # the dense layer (distortion 0) always closes the frontier
            front.append(self.dense)
        return front


class CostModel:
    """Exact costs of the whole model for any choice of per-layer candidates.

    total = original − (replaced layers' dense cost) + (their candidates' cost); the
    parameters and bytes of layers that are never factorized stay in the total.
    """

    def __init__(self, model: nn.Module, example_input: torch.Tensor):
        self.model_cost = count(model, example_input)
        self.original = {"params": self.model_cost.params, "macs": self.model_cost.macs,
                         "bytes": self.model_cost.bytes}  # plus "latency" when the search measures it

    def total(self, choices: dict[str, Candidate], spaces: dict[str, "LayerSpace"]) -> dict[str, int]:
        result = dict(self.original)
        for name, cand in choices.items():
            dense = spaces[name].dense
            for kind in result:
                result[kind] += cand.cost(kind) - dense.cost(kind)
        return result


def _dtype_size(module: nn.Module) -> int:
    return layer_weight(module).element_size()


def make_candidate(session: Session, space: LayerSpace, method: str, rank) -> Candidate:
    """Cost (by formula) and distortion (factorize + one proxy pass, or the proxy cache) of one candidate.

    A factorization with more parameters or more MACs than the dense layer is never a candidate:
    the dense candidate is returned instead (nothing is factorized for it). A lookup table (an
    Embedding, which has no MACs) is judged by its parameters alone.
    """
    found = space.find(method, rank)
    if found is not None:
        return found
    if space.allowed is not None and (method, rank) not in space.allowed:
        return space.dense  # not measured faster than the dense layer (latency is measured)
    cost = factorized_cost(space.geometry, method, rank, space.input_size)
    if not space.not_costlier(cost):
        return space.dense
    config = session.factorizer.config(method, rank)
    label = f"{method}:{rank}"
    curve = space.curves.get(method)
    if curve is not None and curve.probed:  # closed form: no factorization, no forward pass
        cand = Candidate(space.name, method, rank, cost.params, cost.macs * space.calls,
                         cost.params * space.element_size, curve.distortion(rank), config,
                         space.latency_of(method, rank))
        space.candidates.append(cand)
        return cand
    if label in space.known:
        cand = Candidate(space.name, method, rank, cost.params, cost.macs * space.calls,
                         cost.params * space.element_size, float(space.known[label]), config,
                         space.latency_of(method, rank))
        space.candidates.append(cand)
        return cand
    space.fresh = True
    start = time.perf_counter()
    block = session.factorizer.block(space.name, method, rank)
    session.timings["factorize"] += time.perf_counter() - start
    start = time.perf_counter()
    if session.distortion is not None:
        distortion = session.distortion.with_replacements({space.module: block})
    else:
        distortion = weight_distortion(space.module, block)
    session.timings["proxy"] += time.perf_counter() - start
    cand = Candidate(space.name, method, rank, cost.params, cost.macs * space.calls,
                     cost.params * space.element_size, distortion, config, space.latency_of(method, rank))
    space.candidates.append(cand)
    return cand


def neighbour_rank(geometry: dict[str, Any], method: str, rank, step: int):
    """``rank`` moved by ``step`` (as the method defines a step), or None when out of range."""
    return get_method(method).neighbour(geometry, rank, step)


def _unfactorizable(model: nn.Module | None, row) -> str | None:
    """Why a factorizable-type row can never be factorized (tied weights), or None."""
    if model is None:
        return None
    from ..layers import tied_parameters

    tied = tied_parameters(model, model.get_submodule(row.name))
    return f"shares its weight with {', '.join(tied)} (tied weights)" if tied else None


def minimum_reachable(cost_model: CostModel, *, kind: str, layers: list[str] | None = None,
                      methods: list[str] | None = None, model: nn.Module | None = None) -> int:
    """The smallest ``kind`` cost any plan can reach, by formula only (no factorization).

    Every factorizable layer at rank 1 of its cheapest method (if that is cheaper than
    the layer), plus everything that is not factorized (tied layers of ``model`` included).
    """
    return minimum_breakdown(cost_model, kind=kind, layers=layers, methods=methods, model=model)["total"]


def minimum_breakdown(cost_model: CostModel, *, kind: str, layers: list[str] | None = None,
                      methods: list[str] | None = None, model: nn.Module | None = None,
                      unreached: dict[str, str] | None = None) -> dict[str, Any]:
    """The smallest reachable ``kind`` cost and how it splits.

    ``total``; ``factorizable`` (the layers that can shrink, at rank 1); ``factorizable_dense`` (the
    same layers' dense cost: what a budget relative to the factorizable layers is a ratio of);
    ``fixed``: a list of (what, cost, names) for what cannot shrink -- tied layers, layers left out by
    ``layers`` or ``methods``, layers whose output does not reach the model's output (``unreached``),
    grouped/depthwise convolutions, other layer types, ops measured without a formula, and the rest
    (norm layers, buffers ...).
    """
    cap_objective = "macs" if kind == "macs" else "params"
    total = cost_model.original[kind]
    rows = [row for row in cost_model.model_cost.layers if row.method is None]
    factorizable_min = factorizable_dense = 0
    fixed: dict[str, list] = {}

    def add(what: str, value: int, name: str) -> None:
        entry = fixed.setdefault(what, [0, []])
        entry[0] += value
        entry[1].append(name)

    tied_seen: set[int] = set()
    for row in rows:
        allowed = [m for m in methods_for(row.geometry) if not methods or m in methods]
        dense = dense_cost(row.geometry, row.input_size)
        esize = row.bytes // max(row.params, 1) if row.params else 4
        value = {"params": dense.params, "macs": dense.macs * row.calls, "bytes": dense.params * esize}
        tied = _unfactorizable(model, row)
        if tied is not None:
            weight = layer_weight(model.get_submodule(row.name)) if model is not None else None
            shared_once = weight is not None and id(weight) in tied_seen and kind != "macs"
            if weight is not None:
                tied_seen.add(id(weight))
            add("tied weights", 0 if shared_once else value[kind], row.name)
            continue
        if layers is not None and row.name not in layers:
            add("layers left out by --layers/--exclude", value[kind], row.name)
            continue
        if unreached and row.name in unreached:
            add("layers whose output does not reach the model's output", value[kind], row.name)
            continue
        if not allowed:
            add(f"layers no method in --methods applies to ({row.type})", value[kind], row.name)
            continue
        best = value[kind]
        for method in allowed:
            if break_even_rank(row.geometry, method, row.input_size, by=cap_objective) < 1:
                continue
            cost = factorized_cost(row.geometry, method, get_method(method).normalize_rank(row.geometry, 1),
                                   row.input_size)
            best = min(best, {"params": cost.params, "macs": cost.macs * row.calls,
                              "bytes": cost.params * esize}[kind])
        if best < value[kind]:
            factorizable_dense += value[kind]
        factorizable_min += best
        total += best - value[kind]
    for other in cost_model.model_cost.others:
        grouped = "Conv" in other.type and "groups" in other.reason
        what = "grouped/depthwise convolutions" if grouped else f"{other.type} layers"
        add(what, {"params": other.params, "macs": other.macs, "bytes": other.bytes}[kind], other.name)
    if kind == "macs":
        for measured in cost_model.model_cost.not_counted:
            add("ops without a formula (measured)", measured.macs, measured.name or "(model)")
    named = sum(value for value, _ in fixed.values())
    rest = total - factorizable_min - named
    if rest > 0:
        add("other parameters and buffers (norm layers, biases, embeddings' neighbours ...)" if kind != "macs"
            else "other ops", rest, "")
    return {"total": total, "factorizable": factorizable_min, "factorizable_dense": factorizable_dense,
            "fixed": [(what, value, [n for n in names if n]) for what, (value, names) in fixed.items() if value]}


def _reason(name: str, message: str) -> str:
    """The part of a validation message that says why (without the layer's name and the advice)."""
    text = message.replace(f"layer '{name}' ", "").strip()
    return text.split(";")[0].rstrip(".")


def build_spaces(session: Session, cost_model: CostModel, *, kind: str, layers: list[str] | None = None,
                 methods: list[str] | None = None, progress: bool = False) -> list[LayerSpace]:
    """Candidates for every factorizable layer (or those named in ``layers``), in model order."""
    if kind not in COST_KINDS:
        raise ConfigError(f"cost kind must be one of {', '.join(COST_KINDS)}, got {kind!r}.")
    cap_objective = "params" if kind in ("params", "bytes") else "macs"
    latency = getattr(session, "latency", None)  # a rankshrink.search.latency.SearchLatency, or None
    model = session.model
    rows = [row for row in cost_model.model_cost.layers if row.method is None]
    known = {row.name for row in rows}
    if layers is not None:
        missing = [name for name in layers if name not in known]
        if missing:
            raise PlanError(f"layer(s) {', '.join(repr(n) for n in missing)} are not factorizable layers reached by "
                            f"the model's forward pass; factorizable: {', '.join(sorted(known)) or 'none'}.")
        rows = [row for row in rows if row.name in set(layers)]
    wanted = tuple(methods) if methods else None
    if wanted:
        unknown = [m for m in wanted if m not in method_names()]
        if unknown:
            raise ConfigError(f"unknown method(s) {', '.join(unknown)}; known methods are "
                              f"{', '.join(method_names())}.")
    work = []
    for row in rows:
        if row.name in session.unreached:  # its output never reaches the model's output: nothing to trade
            session.kept_dense[row.name] = session.unreached[row.name]
            continue
        allowed = [m for m in methods_for(row.geometry) if wanted is None or m in wanted]
        if not allowed:
            session.kept_dense[row.name] = f"no method in {', '.join(wanted or ())} applies to {row.type}"
            continue
        module = model.get_submodule(row.name)
        try:  # tied or shared-in-a-way-surgery-refuses layers are left alone, with the reason
            validate_plan(model, Plan.from_mapping({row.name: session.factorizer.config(allowed[0], 1)}))
        except (PlanError, LayerError) as exc:
            session.kept_dense[row.name] = _reason(row.name, str(exc))
            continue
        work.append((row, module, allowed))

    bar = None
    # Each method of each layer is one step; with latency measured, timing its ranks is one step more.
    total = sum(len(allowed) for _, _, allowed in work) * (2 if latency is not None else 1)
    if progress and total:
        import sys

        from tqdm.auto import tqdm
        bar = tqdm(total=total, desc="candidates", unit="method", file=sys.stderr, leave=False, dynamic_ncols=True)
    try:
        spaces = []
        grids: dict[tuple[str, str], list[Any]] = {}
        for row, module, allowed in work:
            esize = _dtype_size(module)
            dense_c = dense_cost(row.geometry, row.input_size)
            dense_latency = latency.dense_cost(row.name) if latency is not None else 0
            dense = Candidate(row.name, None, None, dense_c.params, dense_c.macs * row.calls,
                              dense_c.params * esize, 0.0, latency=dense_latency)
            space = LayerSpace(row.name, row.type, row.geometry, tuple(row.input_size), row.calls, esize, dense,
                               [], {}, module=module, estimate_objective=cap_objective, methods=tuple(allowed))
            if latency is not None:
                space.allowed = set()
                space.latency_costs[None] = dense_latency
            proxy_key = session.proxy_key(row.name)
            cached = session.cache.get_json("proxies", proxy_key) if proxy_key else None
            if isinstance(cached, dict):
                space.known = {k: v for k, v in cached.items() if isinstance(v, (int, float))}
            for method in allowed:
                impl = get_method(method)
                be = break_even_rank(row.geometry, method, row.input_size, by=cap_objective)
                space.break_even[method] = be
                ranks = impl.rank_grid(row.geometry, impl.search_max_rank(row.geometry, be))
                if latency is not None:  # measured: only ranks faster than the layer, rounded where faster
                    ranks = latency.candidate_ranks(space, method, ranks)
                    if bar is not None:
                        bar.update(1)
                grids[(row.name, method)] = ranks
            spaces.append((space, row, module, allowed))
        if session.closed_form:
            _closed_form_curves(session, [(space, allowed) for space, _, _, allowed in spaces], grids, progress)

        done = []
        for space, row, _module, allowed in spaces:
            proxy_key = session.proxy_key(row.name)
            for method in allowed:
                for rank in grids[(row.name, method)]:
                    make_candidate(session, space, method, rank)
                if bar is not None:
                    bar.update(1)
            if space.fresh and proxy_key:
                session.cache.put_json("proxies", proxy_key, space.proxies())
                space.fresh = False
            done.append(space)
    finally:
        if bar is not None:
            bar.close()
    return done


def _closed_form_curves(session: Session, spaces: list[tuple[LayerSpace, list[str]]],
                        grids: dict[tuple[str, str], list[Any]], progress: bool) -> None:
    """Each layer's closed-form error curve for every method that has one, and its sensitivity probe.

    A sensitivity found in the proxy cache is reused; the others are measured together, one probe per
    layer and method (:mod:`~rankshrink.search.closed_form`), on the worker pool, ``PROBE_BATCH`` probe
    blocks at a time (all of a BERT-base's at once held 0.2 GiB of blocks).
    """
    from .closed_form import error_curve, probe_ranks

    probes: list[tuple[Any, int, LayerSpace, nn.Module]] = []

    def measure() -> None:
        start = time.perf_counter()
        values = session.probe_distortions([(space.name, block) for _, _, space, block in probes],
                                           progress=progress)
        session.timings["proxy"] += time.perf_counter() - start
        for (curve, rank, space, block), value in zip(probes, values):
            curve.probes[rank] = float(value)
            space.fresh = True
            session.factorizer.release(space.name, block)
        probes.clear()

    for space, allowed in spaces:
        for method in allowed:
            ranks = probe_ranks(grids[(space.name, method)])
            if not ranks:
                continue
            with single_threaded(layer_weight(space.module).numel() <= SINGLE_THREAD_MAX_WEIGHTS):
                curve = error_curve(session, space.name, space.module, method)
            if curve is None:
                continue
            curve.probe_ranks = ranks
            space.curves[method] = curve
            for rank in ranks:
                known = space.known.get(f"probe:{method}:{rank}")
                if isinstance(known, (int, float)):
                    curve.probes[rank] = float(known)
                    continue
                start = time.perf_counter()
                block = session.factorizer.block(space.name, method, rank)
                session.timings["factorize"] += time.perf_counter() - start
                probes.append((curve, rank, space, block))
        if space.curves:  # the whitening of this layer is not needed again until the final factors
            stats = session.calibration.get(space.name) if session.calibration is not None else None
            if stats is not None:
                stats.clear_cache()
        if len(probes) >= PROBE_BATCH:
            measure()
    if probes:
        measure()


def plan_costs(plan: Plan, spaces: list[LayerSpace], cost_model: CostModel) -> dict[str, int]:
    """Exact params, bytes and MACs of the whole model compressed by ``plan`` (by formula, nothing built).

    Every layer of the plan must be one of ``spaces``; its cost is counted as a candidate's
    is (:func:`make_candidate`).
    """
    by_name = {s.name: s for s in spaces}
    result = dict(cost_model.original)
    for name, entry in plan.items():
        space = by_name[name]
        cost = factorized_cost(space.geometry, entry.method, entry.rank, space.input_size)
        result["params"] += cost.params - space.dense.params
        result["macs"] += cost.macs * space.calls - space.dense.macs
        result["bytes"] += cost.params * space.element_size - space.dense.bytes
        if "latency" in result:
            result["latency"] += space.latency_of(entry.method, entry.rank) - space.dense.latency
    return result
