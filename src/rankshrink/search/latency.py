"""Latency in the search: what runs faster on ONNX Runtime, measured, not counted.

With ``SearchConfig.latency`` (the CLI's default), :class:`SearchLatency`:

* **times the model** once (:meth:`LatencyModel.baseline`: the model and each of its
  factorizable layers alone, interleaved, at every batch size), which gives each layer's
  share of the model's time;
* **measures every candidate** (layer, method, rank) as a standalone graph against its dense
  layer (:meth:`LatencyModel.measure`, cached on disk), on a rank grid snapped to multiples of
  ``rank_multiple`` (measured here: a CP block of a 32→64 3×3 conv at ranks 16, 28, 40, 52 ran
  at 0.29–0.63× the dense time, at 13, 31, 43, 55 at 0.51–1.08×); a rank below the multiple
  is replaced by the multiple where that measures faster at every batch size, and a
  candidate slower than the dense layer at some batch size is dropped, in every mode;
* gives each candidate a **latency cost**: its predicted share of the model's time, in units of
  a millionth of the original's (averaged over the batch sizes a budget constrains), so the
  allocation can minimize or budget it like MACs;
* **measures whole plans** against the original, interleaved (:meth:`measure`), because a
  layer timed alone misses what the graph does around it (ONNX Runtime keeps chains of convs
  in a blocked layout and pays reorders around factors: measured up to 135% prediction error
  on conv nets at batch 32), and acts on it (:mod:`rankshrink.search.ship`): nothing measured
  slower than the original is returned, and a latency budget is met as measured. A plan counts
  as faster only at :data:`FASTER` or less of the original's time, comparing fastest calls
  (the fastest call of :data:`PLAN_ROUNDS` interleaved runs): by medians
  one ds-cnn plan measured 0.88, 0.99 and 1.04 in three consecutive runs at batch 1, because the
  median moves with the neighbours' load on this shared machine and the fastest call much less
  (:class:`rankshrink.deploy.latency.Latency`);
* with ``int8`` (``compress --int8``), **whole plans are timed as int8**, quantized as they ship
  (static: with the nodes profiled slower in int8 left float32), against the original quantized
  the same way, since the int8 file is what ships; candidates are still filtered
  and costed in float32: timed alone as int8 graphs, 206 candidates of ResNet-8's 10 layers and
  all 64 of the digits CNN's measured slower than their int8 dense layer at batch 1 or 32, and a
  search filtering that way could not take the FC autoencoder below 71% of its MACs, yet its
  float32-searched plan at 50% ran 0.61x the original's int8 file at batch 1 once quantized
  whole (``benchmarks/results/latency.md``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable

from torch import nn

from ..errors import LayerError
from ..methods import get_method

if TYPE_CHECKING:
    from ..deploy.latency import Latency

__all__ = ["UNITS", "SearchLatency", "PlanTiming", "FASTER", "PLAN_ROUNDS"]

UNITS = 1_000_000  # the original model's latency cost: costs are millionths of its (weighted) time
FASTER = 0.97      # a plan is faster than the original at this ratio or below (the measurement's noise)
PLAN_ROUNDS = 3    # interleaved runs a whole-plan measurement takes the median of
_MAX_SMALL = 4     # ranks below the multiple kept per (layer, method), spread out (1 and the largest included)


@dataclass
class PlanTiming:
    """One plan measured against the original in the same interleaved run: each one's timing per batch size.
    Decisions compare fastest calls (``original_ms``, ``plan_ms``, ``ratios``; see
    :class:`rankshrink.deploy.latency.Latency`); ``median_ratios`` is reported beside them."""

    original: dict[int, Latency]
    plan: dict[int, Latency]

    @property
    def original_ms(self) -> dict[int, float]:
        return {b: t.fastest_ms for b, t in self.original.items()}

    @property
    def plan_ms(self) -> dict[int, float]:
        return {b: t.fastest_ms for b, t in self.plan.items()}

    @property
    def ratios(self) -> dict[int, float]:
        """Plan over original, fastest calls."""
        return {b: t.fastest_ms / self.original[b].fastest_ms for b, t in self.plan.items()}

    @property
    def median_ratios(self) -> dict[int, float]:
        return {b: t.median_ms / self.original[b].median_ms for b, t in self.plan.items()}

    def faster(self) -> bool:
        """Faster than the original at every batch size measured, by more than the noise (:data:`FASTER`)."""
        return all(r <= FASTER for r in self.ratios.values())

    def worst(self, batches: Iterable[int] | None = None) -> float:
        ratios = self.ratios
        return max(ratios[b] for b in (batches if batches is not None else ratios))

    def describe(self) -> str:
        return ", ".join(f"{r:.2f}x at batch {b}" for b, r in self.ratios.items())


@dataclass
class SearchLatency:
    """Latency measurements for one search (see the module doc). Built by :meth:`create`."""

    model: nn.Module
    sample: Any
    lm: Any                                   # rankshrink.deploy.latency_model.LatencyModel
    baseline: Any                             # its ModelBaseline of ``model``
    multiple: int
    batches: tuple[int, ...]
    weights: dict[int, float] = field(default_factory=dict)
    dropped: dict[str, list[str]] = field(default_factory=dict)   # layer -> candidates measured slower than dense
    rounded: dict[str, dict[str, str]] = field(default_factory=dict)  # layer -> {rank: the multiple used}
    measured_plans: int = 0
    notes: list[str] = field(default_factory=list)
    final: PlanTiming | None = None
    predicted: dict[int, float] = field(default_factory=dict)
    int8: str | None = None                    # whole plans timed quantized ('static', 'dynamic')
    _int8_original_ms: dict[int, float] = field(default_factory=dict)
    _original_graph: bytes | None = field(default=None, repr=False)

    @classmethod
    def create(cls, model: nn.Module, example_input: Any, *, batches: tuple[int, ...], threads: int,
               multiple: int, progress: bool = False, int8: str | None = None) -> "SearchLatency":
        from ..deploy.latency import first_sample
        from ..deploy.latency_model import LatencyModel, LatencySettings

        settings = LatencySettings(batches=tuple(batches), threads=threads)
        lm = LatencyModel(settings, progress=progress)
        sample = first_sample(example_input)
        baseline = lm.baseline(model, sample)
        result = cls(model, sample, lm, baseline, multiple, tuple(batches), int8=int8)
        result.use_batches(batches)
        return result

    # -- costs
    def use_batches(self, batches: Iterable[int]) -> None:
        """Which batch sizes the latency cost averages (all of them; an absolute budget: the first)."""
        chosen = list(batches)
        self.weights = {b: 1.0 / len(chosen) for b in chosen}

    def _share(self, layer: str, batch: int) -> float:
        row = self.baseline.layers[layer]
        return row.calls * row.dense_ms[batch] / self.baseline.model_ms[batch].median_ms

    def dense_cost(self, layer: str) -> int:
        return self.cost(layer, {b: 1.0 for b in self.batches})

    def cost(self, layer: str, ratios: dict[int, float]) -> int:
        """A candidate's latency cost: its predicted share of the model's time (units), from its time ratio."""
        return int(round(UNITS * sum(w * self._share(layer, b) * ratios[b] for b, w in self.weights.items())))

    def predicted_ratios(self, spaces: list, choices: dict) -> dict[int, float]:
        """The whole model's predicted time ratio at each batch size: 1 + Σ layer share × (ratio − 1)."""
        result = {}
        for space in spaces:  # a candidate the filter did not see (allow_slower, a plan given) is measured now
            cand = choices.get(space.name)
            if cand is not None and cand.method is not None and (cand.method, cand.rank) not in space.latency_ratios:
                per = next(iter(self.lm.measure(space.geometry, space.input_size, cand.method, [cand.rank],
                                                self.batches).values()))
                space.latency_ratios[(cand.method, cand.rank)] = {b: per[b].ratio for b in self.batches}
        for batch in self.batches:
            change = 0.0
            for space in spaces:
                cand = choices.get(space.name)
                if cand is None or cand.method is None:
                    continue
                ratio = space.latency_ratios[(cand.method, cand.rank)][batch]
                change += self._share(space.name, batch) * (ratio - 1.0)
            result[batch] = 1.0 + change
        return result

    # -- candidates
    def _snap(self, method: str, geometry: dict[str, Any], rank: Any) -> Any:
        """``rank`` with every component of at least the multiple rounded to the nearest multiple (down where up
        leaves the layer's range)."""
        impl = get_method(method)
        parts = list(rank) if isinstance(rank, (tuple, list)) else [rank]
        m = self.multiple
        if m <= 1 or all(p < m for p in parts):
            return rank
        for round_part in (lambda p: int(math.floor(p / m + 0.5)) * m, lambda p: (p // m) * m):
            snapped = [p if p < m else max(m, round_part(p)) for p in parts]
            value: Any = tuple(snapped) if isinstance(rank, (tuple, list)) else snapped[0]
            try:
                return impl.normalize_rank(geometry, value)
            except LayerError:
                continue
        return rank

    def candidate_ranks(self, space, method: str, grid: list[Any]) -> list[Any]:
        """The ranks of ``grid`` to try for ``space``'s layer with ``method``: snapped to multiples, measured,
        those slower than the dense layer dropped and small ones replaced by the multiple where it is faster.
        Records each kept rank's latency cost and ratios in ``space``."""
        from ..cost import factorized_cost

        impl = get_method(method)
        geometry = dict(space.geometry)
        wanted: list[Any] = []
        for rank in grid:
            snapped = self._snap(method, geometry, impl.normalize_rank(geometry, rank))
            cost = factorized_cost(geometry, method, snapped, space.input_size)
            if space.not_costlier(cost) and snapped not in wanted:
                wanted.append(snapped)
        parts = {r: (list(r) if isinstance(r, (tuple, list)) else [r]) for r in wanted}
        small = [r for r in wanted if all(p < self.multiple for p in parts[r])]
        if len(small) > _MAX_SMALL:
            keep = {small[round(i * (len(small) - 1) / (_MAX_SMALL - 1))] for i in range(_MAX_SMALL)}
            wanted = [r for r in wanted if r not in small or r in keep]
            small = [r for r in small if r in keep]
        if not wanted:
            return []
        unit: Any = None
        if small:
            try:
                unit = impl.normalize_rank(geometry, self.multiple)
            except LayerError:  # the layer's ranks stop below the multiple
                unit = None
        if unit is not None and unit not in wanted:
            cost = factorized_cost(geometry, method, unit, space.input_size)
            unit = unit if space.not_costlier(cost) else None
        measured = self.lm.measure(geometry, space.input_size, method, wanted + ([unit] if unit is not None
                                                                                and unit not in wanted else []),
                                   self.batches)
        kept = []
        for rank in wanted:
            per = measured[rank]
            label = f"{method}:{'x'.join(map(str, rank)) if isinstance(rank, tuple) else rank}"
            # A lookup (an Embedding: no MACs) cannot get faster; its factorization trades a small matmul per
            # token for size, so it is kept with its measured cost and the whole-model check judges the plan.
            lookup = space.dense.macs == 0
            if not lookup and any(t.ratio >= 1.0 for t in per.values()):
                self.dropped.setdefault(space.name, []).append(label)
                continue
            if rank in small and unit is not None and all(measured[unit][b].ratio < per[b].ratio
                                                          for b in self.batches) \
                    and all(t.ratio < 1.0 for t in measured[unit].values()):
                self.rounded.setdefault(space.name, {})[label] = str(unit)
                rank = unit
                per = measured[unit]
            if rank in kept:
                continue
            kept.append(rank)
            ratios = {b: per[b].ratio for b in self.batches}
            space.allowed.add((method, rank))
            space.latency_ratios[(method, rank)] = ratios
            space.latency_costs[(method, rank)] = self.cost(space.name, ratios)
        return kept

    def forget(self, space, cand) -> None:
        """Never pick ``cand`` again (it measured slower in the whole model)."""
        space.allowed.discard((cand.method, cand.rank))
        if cand in space.candidates:
            space.candidates.remove(cand)
        self.dropped.setdefault(space.name, []).append(f"{cand.label()} (in the model)")

    # -- whole plans
    def measure(self, models: list[nn.Module]) -> list[PlanTiming]:
        """Each model timed against the original (both quantized with ``int8``), interleaved, at every batch
        size over :data:`PLAN_ROUNDS` runs: the fastest call of them all, the median of their medians and p90s."""
        from ..deploy.latency import repeat_to_batch, time_rounds
        from ..deploy.onnx import onnx_feed, ort_session, require_onnxruntime
        from ..deploy.quantize import timing_graph

        ort = require_onnxruntime()
        settings = self.lm.settings
        calibration = repeat_to_batch(self.sample, 8) if self.int8 else None

        def graph(m: nn.Module) -> bytes:
            # As compress ships int8: static leaves float32 the nodes profiled slower in int8.
            return timing_graph(m, self.sample, int8=self.int8, calibration=calibration,
                                where_faster=self.batches if self.int8 == "static" else None,
                                threads=settings.threads)

        if self._original_graph is None:
            self._original_graph = graph(self.model)
        sessions = [ort_session(ort, self._original_graph, settings.threads)]
        sessions += [ort_session(ort, graph(m), settings.threads) for m in models]
        feeds = {batch: [onnx_feed(repeat_to_batch(self.sample, batch))] * len(sessions) for batch in self.batches}
        original, *plans = time_rounds(sessions, feeds, rounds=PLAN_ROUNDS, runs=max(30, settings.runs),
                                       warmup=settings.warmup, min_ms=max(60.0, settings.min_ms),
                                       max_runs=max(1000, settings.max_runs))
        self.measured_plans += len(models)
        if self.int8:
            for batch in self.batches:
                self._int8_original_ms.setdefault(batch, original[batch].fastest_ms)
        return [PlanTiming(original, plan) for plan in plans]

    def in_context(self, layer: str, method: str, rank: Any) -> dict[int, float]:
        """``layer`` alone factorized inside the whole model (both quantized with ``int8``): the model's time
        ratio per batch size."""
        lm = self.lm
        if self.int8:
            from dataclasses import replace

            from ..deploy.latency_model import LatencyModel

            lm = LatencyModel(replace(lm.settings, int8=self.int8), cache_dir=lm.cache.root)
        timing = lm.measure_in_model(self.model, self.sample, layer, method, [rank], self.batches)
        per = next(iter(timing.values()))
        return {b: per[b].ratio for b in self.batches}

    def versus(self) -> str:
        """What plans are compared with, in words."""
        return "the original" + (f" (both quantized to int8, {self.int8})" if self.int8 else "")

    def original_ms(self, batch: int) -> float:
        """The original's time at ``batch`` as plans are compared with it (its fastest call; quantized with
        ``int8``)."""
        if self.int8:
            if batch not in self._int8_original_ms:
                self.measure([])
            return self._int8_original_ms[batch]
        return self.baseline.model_ms[batch].fastest_ms

    def summary(self) -> dict[str, Any]:
        """What summary.json records under ``latency_search``."""
        out: dict[str, Any] = {
            "runtime": dict(self.lm.identity), "batches": list(self.batches), "rank_multiple": self.multiple,
            "plans_int8": self.int8, "faster_below": FASTER, "plan_rounds": PLAN_ROUNDS,
            "compared": "fastest call", "original_ms": {str(b): self.original_ms(b) for b in self.batches},
            "dropped_slower": {k: list(v) for k, v in self.dropped.items()},
            "rounded": {k: dict(v) for k, v in self.rounded.items()},
            "plans_measured": self.measured_plans, "notes": list(self.notes)}
        if self.final is not None:
            measured = self.final.ratios
            medians = self.final.median_ratios
            out["prediction"] = {str(b): {"predicted_ratio": self.predicted.get(b), "measured_ratio": measured[b],
                                          "measured_median_ratio": medians.get(b),
                                          "error": (self.predicted[b] / measured[b] - 1.0)
                                          if b in self.predicted else None} for b in self.batches}
        return out
