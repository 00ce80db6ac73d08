"""``rankshrink.compress``: choose every layer's method, rank and fit for a model.

Two modes, one call::

    result = compress(model, splits, tolerance=0.01)          # smallest model within 1 point
    result = compress(model, splits, budget={"macs": 0.3})     # best model within 30% of the MACs
    result.model                                              # the compressed model
    result.plan.save("plan.json")                             # reproduces it with rankshrink.apply

See :mod:`rankshrink.search.allocate` for the algorithm, :mod:`rankshrink.search.single`
for the one-layer search and :class:`~rankshrink.search.config.SearchConfig` for the options.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
from torch import nn

from ..errors import ConfigError
from ..plan import Plan
from .allocate import budget_allocation, minimum_cost, plan_of, polish_budget, tolerance_allocation
from .bootstrap import drop_interval
from .config import MAX_GLOBAL_EVALUATIONS, Budget, SearchConfig, check_tolerance
from .evaluate import EvaluationRecord, SearchInterrupted, thread_policy
from .session import Session, as_search_data
from .space import CostModel, build_spaces, minimum_breakdown, plan_costs

__all__ = ["compress", "CompressResult", "evaluation_bound"]


def evaluation_bound(r_max: int, layers: int) -> int:
    """The promised worst case for a tolerance search: ``L·(⌈log2 r_max⌉ + 2) + 10``."""
    return layers * (math.ceil(math.log2(max(r_max, 1))) + 2) + MAX_GLOBAL_EVALUATIONS


@dataclass
class CompressResult:
    """What :func:`compress` found, and how: ``.model``, ``.plan`` and ``.summary()``.

    ``value``/``baseline``: the metric of the compressed/original model on the
    validation split; ``test``: test-split accuracy of both (reports only) when the
    data has a test split. ``evaluations`` ran this time, ``evaluations_cached``
    came from the cache. ``records`` lists every evaluation in order, each with its
    plan's exact costs. ``drop_ci``: the paired bootstrap interval (at ``confidence``,
    0.95 by default) of the drop on ``validation`` (the search metric) and ``test``
    (accuracy), each ``[low, high]`` or None where it cannot be computed.
    """

    plan: Plan
    mode: str
    metric: str
    baseline: float
    value: float
    tolerance: float | None
    budget: dict[str, Any] | None
    minimize: str
    original: dict[str, int]
    compressed: dict[str, int]
    layers: list[dict[str, Any]]
    evaluations: int
    evaluations_cached: int
    records: list[EvaluationRecord]
    monotone: bool
    notes: list[str]
    seconds: float
    timings: dict[str, float]
    r_max: int
    fit: str
    seed: int
    probes: dict[str, Any] = field(default_factory=dict)
    test: dict[str, float | None] | None = None
    report: dict[str, dict[str, float | None]] = field(default_factory=dict)
    drop_ci: dict[str, list[float] | None] = field(default_factory=dict)
    confidence: float | None = None
    latency: dict[str, Any] | None = None  # what the latency measurements found (SearchLatency.summary)
    _session: Any = field(default=None, repr=False, compare=False)
    _model: Any = field(default=None, repr=False, compare=False)

    @property
    def drop(self) -> float:
        return self.baseline - self.value

    @property
    def requested(self) -> int:
        return self.evaluations + self.evaluations_cached

    def ratio(self, kind: str) -> float:
        """compressed / original cost."""
        return self.compressed[kind] / self.original[kind] if self.original[kind] else 1.0

    @property
    def model(self) -> nn.Module:
        """The compressed model (a new module, built once; the original is untouched)."""
        if self._model is None:
            if self._session is None:
                raise ConfigError("this result was loaded without its model; use rankshrink.apply(model, "
                                  "result.plan, data=...).")
            self._model = self._session.factorizer.build(self.plan, share=False)
        return self._model

    def compressed_model(self) -> nn.Module:
        """A fresh copy of the compressed model."""
        import copy

        return copy.deepcopy(self.model)

    def summary(self) -> dict[str, Any]:
        """The JSON-friendly report ``rankshrink compress`` writes as summary.json.

        ``original``/``compressed`` hold ``accuracy`` (validation split, where the
        tolerance is enforced), ``test_accuracy`` (test split, reported only),
        ``metric`` (the search metric on validation), ``params``, ``macs``, ``bytes``.
        """
        def side(which: str, costs: dict[str, int], metric_value: float) -> dict[str, Any]:
            info = {"accuracy": self.report.get(which, {}).get("accuracy"),
                    "test_accuracy": self.report.get(which, {}).get("test_accuracy"),
                    "metric": metric_value, "params": costs["params"], "macs": costs["macs"],
                    "bytes": costs["bytes"]}
            if which == "compressed":
                for kind in ("params", "macs", "bytes"):
                    info[f"{kind}_ratio"] = self.ratio(kind)
            return info

        return {"format": "rankshrink-compress-summary", "version": 2, "mode": self.mode, "metric": self.metric,
                "tolerance": self.tolerance, "budget": self.budget, "minimize": self.minimize,
                "original": side("original", self.original, self.baseline),
                "compressed": side("compressed", self.compressed, self.value),
                "drop": self.drop, "drop_ci": self.drop_ci, "confidence": self.confidence,
                "evaluations": self.evaluations, "evaluations_cached": self.evaluations_cached,
                "seed": self.seed, "fit": self.fit, "monotone": self.monotone, "notes": self.notes,
                "layers": [{k: layer.get(k) for k in ("name", "type", "method", "rank", "params", "macs", "bytes",
                                                      "dense_params", "dense_macs", "reason")}
                           for layer in self.layers],
                "search_seconds": round(self.seconds, 3), "timings": self.timings,
                "records": [r.to_dict() for r in self.records],
                **({"latency_search": self.latency} if self.latency is not None else {})}

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "metric": self.metric, "baseline": self.baseline, "value": self.value,
                "drop": self.drop, "drop_ci": self.drop_ci, "confidence": self.confidence,
                "tolerance": self.tolerance, "budget": self.budget, "minimize": self.minimize,
                "original": self.original, "compressed": self.compressed, "layers": self.layers,
                "plan": self.plan.to_dict(), "evaluations": self.evaluations,
                "evaluations_cached": self.evaluations_cached, "monotone": self.monotone, "notes": self.notes,
                "seconds": self.seconds, "timings": self.timings, "r_max": self.r_max, "fit": self.fit,
                "seed": self.seed, "test": self.test, "probes": self.probes, "latency": self.latency,
                "records": [r.to_dict() for r in self.records]}


def compress(model: nn.Module, data: Any = None, *, tolerance: float | None = None, budget: Any = None,
             config: SearchConfig | None = None, apply_fn: Callable[[nn.Module, Plan], nn.Module] | None = None,
             calibration=None, example_input=None, **options: Any) -> CompressResult:
    """Choose a method, rank and fit for every factorizable layer of ``model``.

    Exactly one of:

    * ``tolerance`` (in [0, 1), e.g. 0.01 = one accuracy point): the cheapest model, in
      ``minimize`` ('macs', 'params', 'bytes' or 'latency', measured), whose validation metric is at most
      ``tolerance`` below the original's (with ``confidence=0.95``: whose drop's 95%
      bootstrap interval stays below it): the cheapest of every model it evaluated
      that does. Evaluations: at most ``L·(⌈log2 r_max⌉ + 2) + 10`` for L layers.
    * ``budget`` (``{"macs": 0.3}``, ``{"params": 120000}``, ``{"bytes": 256000}``; a
      value ≤ 1 is a ratio of the original): the best predicted model whose exact cost
      is within the budget, never over it and normally within 2% under it. A latency
      budget (``{"latency": 0.6}``: 0.6 of the original's time at every batch size;
      ``{"latency_ms": 2.0}``: 2 ms at the first batch size) is met as measured on ONNX
      Runtime (:mod:`rankshrink.search.ship`).

    ``latency=True`` (the CLI's default; implied by ``minimize='latency'`` and latency
    budgets) measures candidates and plans on ONNX Runtime: nothing measured slower than
    the dense layer or the original model is picked (:mod:`rankshrink.search.latency`).

    ``data``: a :class:`rankshrink.data.Splits` (the metric runs on ``val``;
    calibration and the distortion proxy use ``train``; ``test`` is only reported),
    or one data set used for everything. ``config`` (a :class:`SearchConfig`) holds the
    options; its fields can be passed as keywords too (``metric=``, ``methods=``,
    ``fit=``, ``cache=``, ``seed=`` ...), overriding the config's. ``apply_fn(model,
    plan) -> model`` replaces the factorization step; ``calibration`` (from
    :func:`rankshrink.calibrate`) replaces the search's own; ``example_input`` (one batch)
    sizes the cost model when there is no data. A rerun, or a resumed interrupted run,
    repeats no finished evaluation (the cache); Ctrl-C raises :class:`SearchInterrupted`.
    """
    config = (config or SearchConfig()).replace(**options)
    if config.device is not None:
        from ..devices import on_device

        model = on_device(model, config.device)  # a copy on the device; the caller's model stays where it is
    with thread_policy(model, config.threads):
        return _compress(model, data, tolerance=tolerance, budget=budget, config=config, apply_fn=apply_fn,
                         calibration=calibration, example_input=example_input)


def _compress(model: nn.Module, data: Any, *, tolerance: float | None, budget: Any, config: SearchConfig,
              apply_fn, calibration, example_input) -> CompressResult:
    start = time.perf_counter()
    mode, kind, tolerance, budget = _search_mode(tolerance, budget, config)
    sensitivity = config.sensitivity
    if sensitivity == "auto" and mode == "budget":
        sensitivity = "proxy"
    use_latency = config.latency or kind == "latency"
    file_budget = mode == "budget" and kind == "bytes" and config.file_bytes is not None
    if file_budget and budget.of != "model":
        raise ConfigError("a bytes budget relative to the factorizable layers counts parameter bytes, not the "
                          "shipped file's: drop --budget-of / -of-factorizable, or pass --no-export.")
    methods = list(config.methods) if config.methods is not None else None
    progress = config.progress
    seed = config.seed
    max_global_evaluations = config.max_global_evaluations

    data = as_search_data(data) if data is not None else None
    user_model = model
    model, folds = _fold_batchnorm(model, data, config, example_input, apply_fn)
    session = Session(model, data, config, apply_fn=apply_fn, example_input=example_input, calibration=calibration)
    cost_model = CostModel(model, session.example_input)
    # Ratios and relative budgets are of the user's model (before any BatchNorm fold).
    original = dict(cost_model.original) if not folds else dict(CostModel(user_model, session.example_input).original)
    layers = _selected_layers(cost_model, config)
    from ..reachability import unreached_layers

    session.unreached = unreached_layers(model, session.example_input,
                                         [row.name for row in cost_model.model_cost.layers if row.method is None])
    target: int | None = None  # set in budget mode only
    breakdown: dict[str, Any] = {}
    if mode == "budget" and kind != "latency" and not file_budget:  # fail fast, before any factorization
        target, breakdown = _budget_target(budget, cost_model, original, layers=layers, methods=methods, model=model,
                                           unreached=session.unreached)
    try:
        spaces: list = []  # the candidates, built once the baseline passed the sanity check
        file_target: int | None = None  # a bytes budget counted in shipped-file bytes (config.file_bytes)
        evaluator = session.start(total=None,  # the total is known once the candidates are
                                  costs=lambda plan: plan_costs(plan, spaces, cost_model))
        try:
            baseline = evaluator(Plan(), "baseline")
            evaluator.baseline = baseline
            session.check_baseline(baseline)  # a model at chance on this data: stop before searching
            if use_latency:
                target = _start_latency(model, session, config, budget if mode == "budget" else None, cost_model,
                                        original, target)
            spaces[:] = build_spaces(session, cost_model, kind=kind, layers=layers, methods=methods,
                                     progress=progress)
            latency = session.latency
            if latency is not None and spaces and all(not s.candidates for s in spaces):
                latency.notes.append("measured on ONNX Runtime, no candidate of any layer ran faster than its "
                                     f"dense layer ({sum(map(len, latency.dropped.values()))} measured slower): the "
                                     "model stays as it is; pass --ignore-latency (latency=False) to search by "
                                     "formula alone")
            if target is not None and spaces and kind != "latency":  # budget mode
                lowest = minimum_cost(spaces, cost_model, kind)
                if target < lowest:
                    breakdown = minimum_breakdown(cost_model, kind=kind, layers=layers, methods=methods, model=model,
                                                  unreached=session.unreached)
                    breakdown["total"] = lowest
                    raise ConfigError(_below_minimum(kind, target, breakdown, original,
                                                     dropped=session.latency.dropped if session.latency else None))
            r_max = max([1, *(s.r_max for s in spaces)])
            total = evaluation_bound(r_max, len(spaces)) if mode == "tolerance" else 2
            # What one-layer probes may use at most; the whole-model phases get what they leave ('auto'
            # runs no probes and gives all of it to whole-model plans, 'proxy' none).
            probe_allowance = len(spaces) * (math.ceil(math.log2(r_max)) + 1) if sensitivity != "proxy" else 0
            evaluator.set_phase_total(total if sensitivity != "proxy" else MAX_GLOBAL_EVALUATIONS + 1)
            if not spaces:
                from .allocate import Allocation
                allocation = Allocation({}, baseline, notes=["no factorizable layer to compress"])
            elif mode == "tolerance":
                assert tolerance is not None
                allocation = tolerance_allocation(session, spaces, cost_model, baseline=baseline,
                                                  tolerance=tolerance, kind=kind, sensitivity=sensitivity,
                                                  max_global=max_global_evaluations,
                                                  probe_allowance=probe_allowance)
                if session.latency is not None:
                    from .ship import finish_tolerance

                    allocation = finish_tolerance(session, spaces, allocation, kind=kind, baseline=baseline,
                                                  allow_slower=config.allow_slower)
            else:
                target, file_target, allocation = _budget_mode(session, spaces, cost_model, budget=budget,
                                                               target=target, baseline=baseline, original=original,
                                                               user_model=user_model, config=config)
        finally:
            evaluator.close()
            session.close()
    except KeyboardInterrupt:
        raise SearchInterrupted("search interrupted; finished evaluations are cached and a rerun resumes from "
                                "them.") from None

    by_name = {s.name: s for s in spaces}
    choices = {name: c for name, c in allocation.choices.items()}
    compressed = cost_model.total(choices, by_name)
    layers_out = []
    for space in spaces:
        cand = choices.get(space.name, space.dense)
        layers_out.append({"name": space.name, "type": space.type, "method": cand.method or "dense",
                           "rank": list(cand.rank) if isinstance(cand.rank, tuple) else cand.rank,
                           "params": cand.params, "macs": cand.macs, "bytes": cand.bytes,
                           "dense_params": space.dense.params, "dense_macs": space.dense.macs,
                           "distortion": cand.distortion, "break_even": dict(space.break_even), "reason": None})
    layers_out += _kept_dense(session, cost_model, by_name, layers)
    position = {name: index for index, (name, _) in enumerate(model.named_modules())}
    layers_out.sort(key=lambda row: position.get(row["name"], len(position)))  # model order, ops last
    final_plan = plan_of(choices)
    if folds:
        final_plan = final_plan.with_folds(folds)
    if final_plan.activation_layers:
        final_plan.calibration = session.plan_calibration
    value = allocation.value if allocation.value is not None else baseline
    final_plan.metadata.update({"mode": mode, "metric": session.metric.name, "baseline": baseline, "value": value,
                                "fit": session.fit, "seed": seed})
    if apply_fn is not None:
        final_plan.metadata["apply_fn"] = (f"{getattr(apply_fn, '__module__', '')}."
                                           f"{getattr(apply_fn, '__qualname__', '')}")
    if mode == "tolerance":
        final_plan.metadata["tolerance"] = tolerance
    else:
        final_plan.metadata["budget"] = {"kind": budget.kind, "value": budget.value, "target": target,
                                         **({"unit": budget.unit} if budget.unit else {}),
                                         **({"file_bytes": file_target} if file_target is not None else {})}
        if budget.of != "model":
            final_plan.metadata["budget"].update(of=budget.of, factorizable=breakdown.get("factorizable_dense"))
    test = None
    report: dict[str, dict[str, float | None]] = {}
    level = config.confidence or 0.95
    drop_ci: dict[str, list[float] | None] = {"validation": None, "test": None}
    if session.metric.per_sample and evaluator.predictions_of(plan_of(choices)) is not None:
        drop_ci["validation"] = list(evaluator.interval(plan_of(choices), level))
    if config.report_test:
        small = session.factorizer.build(final_plan)
        is_accuracy = session.metric.key == "accuracy" and session.metric.dataset is session.data.val
        tested = _test_predictions(session, model, small)
        report = {"original": {"accuracy": baseline if is_accuracy else _maybe(session.val_accuracy, model),
                               "test_accuracy": None if tested is None else tested[0]},
                  "compressed": {"accuracy": value if is_accuracy else _maybe(session.val_accuracy, small),
                                 "test_accuracy": None if tested is None else tested[1]}}
        if tested is not None:
            drop_ci["test"] = list(drop_interval(tested[2], tested[3], tested[4], confidence=level, seed=seed))
        if session.data.test is not None:
            test = {"original": report["original"]["test_accuracy"],
                    "compressed": report["compressed"]["test_accuracy"]}
    notes = list(allocation.notes)
    if session.latency is not None:
        notes += session.latency.notes
    if mode == "budget" and target and compressed[kind] > target and kind != "latency":  # must never happen
        raise ConfigError(f"internal error: the allocation costs {compressed[kind]} {kind}, over the budget {target}.")
    session.timings["evaluate"] = sum(r.seconds for r in evaluator.records)
    if folds:
        notes.append(f"folded {len(folds)} BatchNorm layer(s) into the layer before each: "
                     + ", ".join(f"{bn} into {layer}" for layer, bn in folds))
    return CompressResult(
        plan=final_plan, mode=mode, metric=session.metric.name, baseline=baseline, value=value,
        tolerance=tolerance,
        budget=None if budget is None else _budget_record(budget, target, compressed[kind], file_target, session,
                                                          choices, breakdown.get("factorizable_dense")),
        minimize=kind, original=original, compressed=compressed, layers=layers_out,
        evaluations=evaluator.evaluations, evaluations_cached=evaluator.cached, records=list(evaluator.records),
        monotone=allocation.monotone, notes=notes, seconds=time.perf_counter() - start,
        timings={k: round(v, 4) for k, v in session.timings.items()}, r_max=r_max, fit=session.fit,
        seed=seed, probes=allocation.probes, test=test, report=report, drop_ci=drop_ci,
        confidence=config.confidence,
        latency=session.latency.summary() if session.latency is not None else None, _session=session)


def _budget_mode(session: Session, spaces: list, cost_model: CostModel, *, budget: Budget, target: int | None,
                 baseline: float, original: dict[str, int], user_model: nn.Module, config: SearchConfig):
    """Budget mode's allocation: (the target in the kind's cost, the shipped-file target or None, the allocation)."""
    from .allocate import Allocation

    kind, file_target = budget.kind, None
    if kind == "latency":
        from .ship import latency_budget

        allocation = latency_budget(session, spaces, cost_model, budget=budget,
                                    max_evaluations=config.max_global_evaluations, allow_slower=config.allow_slower)
        return target, None, allocation
    if kind == "bytes" and config.file_bytes is not None:
        target, file_target, allocation = _file_bytes_allocation(
            session, spaces, cost_model, budget=budget, original_model=user_model, file_bytes=config.file_bytes,
            max_evaluations=config.max_global_evaluations)
    elif target is None or original[kind] <= target:
        allocation = Allocation({}, baseline, notes=["the original model is already within the budget"])
    else:
        allocation = budget_allocation(session, spaces, cost_model, target=target, kind=kind)
        allocation = polish_budget(session, spaces, allocation, cost_model, target=target, kind=kind,
                                   max_evaluations=config.max_global_evaluations)
    if session.latency is not None and allocation.choices:
        from .ship import finish_budget

        assert target is not None
        allocation = finish_budget(session, spaces, cost_model, allocation, kind=kind, target=target,
                                   max_evaluations=config.max_global_evaluations, allow_slower=config.allow_slower)
    return target, file_target, allocation


def _start_latency(model: nn.Module, session: Session, config: SearchConfig, budget: Budget | None,
                   cost_model: CostModel, original: dict[str, int], target: int | None) -> int | None:
    """Start the search's latency measurements (``session.latency``, the model timed once); latency costs join
    the cost model. Returns the budget target (a latency budget's in latency units)."""
    from .latency import UNITS, SearchLatency

    latency = SearchLatency.create(model, session.example_input, batches=tuple(config.batches),
                                   threads=config.latency_threads, multiple=config.rank_multiple,
                                   int8=config.latency_int8)
    session.latency = latency
    cost_model.original["latency"] = original["latency"] = UNITS
    if budget is not None and budget.kind == "latency":
        from .ship import latency_target

        if budget.unit == "ms":
            latency.use_batches(latency.batches[:1])  # an absolute time is a time at the first batch size
        return int(UNITS * latency_target(latency, budget)[0])
    return target


def _search_mode(tolerance: Any, budget: Any, config: SearchConfig) -> tuple[str, str, Any, Any]:
    """(mode, the cost kind it minimizes or budgets, the checked tolerance, the parsed Budget)."""
    if (tolerance is None) == (budget is None):
        raise ConfigError("give exactly one of tolerance= (largest allowed metric drop) or budget= "
                          "({'macs'|'params'|'bytes'|'latency': value}).")
    if tolerance is not None:
        return "tolerance", config.minimize, check_tolerance(tolerance), None
    budget = Budget.parse(budget)
    return "budget", budget.kind, None, budget


def _budget_target(budget: Budget, cost_model: CostModel, original: dict[str, int], *, layers, methods, model,
                   unreached) -> tuple[int, dict[str, Any]]:
    """A MAC/param/byte budget in its kind's units, refused at once when below what the layers can reach."""
    breakdown = minimum_breakdown(cost_model, kind=budget.kind, layers=layers, methods=methods, model=model,
                                  unreached=unreached)
    target = budget.absolute(original, breakdown["factorizable_dense"])
    if target < breakdown["total"]:
        raise ConfigError(_below_minimum(budget.kind, target, breakdown, original))
    return target, breakdown


def _budget_record(budget: Budget, target: int | None, cost: int, file_target: int | None, session: Session,
                   choices: dict, factorizable: int | None) -> dict[str, Any]:
    record: dict[str, Any] = {"kind": budget.kind, "value": budget.value, "target": target,
                              "used": cost / target if target else None, "of": budget.of,
                              "factorizable": factorizable}
    if budget.unit:
        record["unit"] = budget.unit
    latency = session.latency
    if budget.kind == "latency" and latency is not None and latency.final is not None:
        from .ship import latency_target

        ratio, batches = latency_target(latency, budget)
        measured = latency.final.worst(batches)
        record.update(target_ratio=ratio, measured_ratio=measured, used=measured / ratio)
    if file_target is not None and session.config.file_bytes is not None:
        size = session.config.file_bytes(session.factorizer.build(plan_of(choices)))
        record.update(file_target=file_target, file_bytes=size, used=size / file_target)
    return record


def _file_bytes_allocation(session: Session, spaces: list, cost_model: CostModel, *, budget: Budget,
                           original_model: nn.Module, file_bytes, max_evaluations: int):
    """A bytes budget counted in the bytes of the file that will be shipped (``file_bytes(model)``): the
    allocation's target in parameter bytes is corrected until the file fits. Returns (the target in parameter
    bytes, the target in file bytes, the allocation)."""
    original_file = int(file_bytes(original_model))
    file_target = int(budget.value * original_file) if budget.relative else int(budget.value)
    if original_file <= file_target:
        from .allocate import Allocation

        return cost_model.original["bytes"], file_target, Allocation(
            {}, None, notes=[f"the original model's file ({original_file:,} bytes) is already within the budget"])
    lowest = minimum_cost(spaces, cost_model, "bytes")
    units = max(lowest, int(file_target * cost_model.original["bytes"] / original_file))
    fits: list[tuple[int, Any, int]] = []
    sizes: list[tuple[int, int]] = []
    for _ in range(6):
        allocation = budget_allocation(session, spaces, cost_model, target=units, kind="bytes")
        size = int(file_bytes(session.factorizer.build(plan_of(allocation.choices))))
        sizes.append((units, size))
        if size <= file_target:
            fits.append((units, allocation, size))
            if size >= 0.97 * file_target:
                break
            grown = int(units * file_target / size * 0.995)
            if grown <= units or any(u == grown for u, _ in sizes):
                break
            units = grown
        else:
            if units <= lowest:
                break
            units = max(lowest, int(units * file_target / size * 0.99))
    if not fits:
        smallest = min(size for _, size in sizes)
        raise ConfigError(f"the bytes budget {file_target:,} (of the shipped file) is below the smallest file "
                          f"reachable, {smallest:,} bytes (every factorizable layer at its cheapest candidate; the "
                          f"original's file is {original_file:,} bytes)." + (
                              _dropped_text(session.latency.dropped)
                              if session.latency is not None and session.latency.dropped else " Raise the budget."))
    units, allocation, size = max(fits, key=lambda f: f[2])
    polished = polish_budget(session, spaces, allocation, cost_model, target=units, kind="bytes",
                             max_evaluations=max_evaluations)
    if polished.choices != allocation.choices and \
            int(file_bytes(session.factorizer.build(plan_of(polished.choices)))) > file_target:
        assert session.evaluator is not None
        allocation.value = session.evaluator(plan_of(allocation.choices), "final")
        return units, file_target, allocation
    return units, file_target, polished


def _test_predictions(session: Session, original: nn.Module, compressed: nn.Module):
    """Test accuracy of both models, the accuracy statistic and both models' test predictions (or None)."""
    from ..errors import DataError
    from ..metrics import predictions
    from .bootstrap import accuracy_statistic
    from .metrics import dataset_labels

    if session.data.test is None:
        return None
    try:
        labels = dataset_labels(session.data.test)
        mine = predictions(original, session.data.test).numpy()
        theirs = predictions(compressed, session.data.test).numpy()
    except DataError:
        return None
    statistic = accuracy_statistic(labels)
    whole = np.arange(labels.size)[None, :]
    return (float(statistic(mine, whole)[0]), float(statistic(theirs, whole)[0]), statistic, mine, theirs)


def _fold_batchnorm(model: nn.Module, data: Any, config: SearchConfig, example_input: Any,
                    apply_fn) -> tuple[nn.Module, list[tuple[str, str]]]:
    """The model to search (BatchNorm folded when asked and possible) and the folds made."""
    if not config.fold_bn or apply_fn is not None:
        return model, []
    from ..layers import batchnorm_folds
    from ..surgery import fold_batchnorm, folding_preserves_outputs

    folds = batchnorm_folds(model)
    if not folds:
        return model, []
    folded = fold_batchnorm(model, folds)
    probe = example_input
    if probe is None and data is not None:
        from ..data import Splits, as_dataset, first_batch

        try:
            source = data.val if isinstance(data, Splits) else as_dataset(data)
            probe = first_batch(source, 64)[0]
        except Exception:  # the Session reports unusable data with the full message
            probe = None
    if probe is not None and not folding_preserves_outputs(model, folded, probe):
        import warnings

        warnings.warn("folding BatchNorm changed the model's outputs (its forward does not use the layers as "
                      "traced); the BatchNorm layers are kept. Pass fold_bn=False (CLI --no-fold-bn) to silence "
                      "this.", UserWarning, stacklevel=4)
        return model, []
    return folded, folds


def _selected_layers(cost_model: CostModel, config: SearchConfig) -> list[str] | None:
    """The layers the search may compress: ``config.layers`` / ``config.exclude`` patterns resolved, or None (all)."""
    if config.layers is None and config.exclude is None:
        return None
    from ..layers import select_layers

    names = [row.name for row in cost_model.model_cost.layers if row.method is None]
    return select_layers(names, config.layers, config.exclude)


def _kept_dense(session: Session, cost_model: CostModel, spaces: dict, layers: list[str] | None) -> list[dict]:
    """Rows for the layers with weights the search did not consider, with the reason each stays dense."""
    rows: list[dict[str, Any]] = []
    for row in cost_model.model_cost.layers:
        if row.method is not None or row.name in spaces:
            continue
        reason = session.kept_dense.get(row.name)
        if reason is None:
            reason = "left out by --layers/--exclude" if layers is not None and row.name not in layers else \
                "no factorization of it is cheaper than the layer"
        rows.append({"name": row.name, "type": row.type, "method": "dense", "rank": None, "params": row.params,
                     "macs": row.macs, "bytes": row.bytes, "dense_params": row.params, "dense_macs": row.macs,
                     "distortion": 0.0, "break_even": {}, "reason": reason})
    for other in cost_model.model_cost.others:
        rows.append({"name": other.name, "type": other.type, "method": "dense", "rank": None, "params": other.params,
                     "macs": other.macs, "bytes": other.bytes, "dense_params": other.params,
                     "dense_macs": other.macs, "distortion": 0.0, "break_even": {}, "reason": other.reason})
    for measured in cost_model.model_cost.not_counted:
        rows.append({"name": measured.name or "(model)", "type": measured.type or "ops", "method": "dense",
                     "rank": None, "params": 0, "macs": measured.macs, "bytes": 0, "dense_params": 0,
                     "dense_macs": measured.macs, "distortion": 0.0, "break_even": {},
                     "reason": f"not counted by formula: {', '.join(measured.ops)} measured by FlopCounterMode"})
    return rows


def _below_minimum(kind: str, target: int, breakdown: dict[str, Any], original: dict[str, int], *,
                   dropped: dict[str, list[str]] | None = None) -> str:
    lowest = breakdown["total"]
    whole = original[kind] or 1
    text = (f"the {kind} budget {target:,} is below the minimum reachable {lowest:,} ({lowest / whole:.1%} of the "
            f"original {original[kind]:,}).")
    fixed = breakdown["fixed"]
    if fixed:
        stuck = sum(value for _, value, _ in fixed)
        parts = []
        for what, value, names in fixed:
            shown = f" ({', '.join(names[:4])}{' ...' if len(names) > 4 else ''})" if names else ""
            parts.append(f"{what} {value:,}{shown}")
        text += (f" Of that minimum, {stuck:,} ({stuck / whole:.1%} of the original) cannot be factorized: "
                 f"{'; '.join(parts)}.")
    text += f" The factorizable layers at rank 1 with their cheapest method add {breakdown['factorizable']:,}."
    return text + (_dropped_text(dropped) if dropped else " Raise the budget.")


def _dropped_text(dropped: dict[str, list[str]]) -> str:
    """Why a latency-aware budget cannot be reached: candidates measured slower than their dense layer."""
    return (f" Measured on ONNX Runtime, {sum(map(len, dropped.values()))} candidate(s) of {len(dropped)} layer(s) "
            f"ran slower than their dense layer and are not used ({', '.join(list(dropped)[:4])}"
            f"{' ...' if len(dropped) > 4 else ''}). Raise the budget, or pass --ignore-latency (latency=False) to "
            "budget by formula alone.")


def _maybe(fn, model):
    """A report-only accuracy, or None when the data has no usable labels for it."""
    from ..errors import DataError

    try:
        return fn(model)
    except DataError:
        return None
