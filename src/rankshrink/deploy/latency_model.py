"""A latency model from measurement on ONNX Runtime (CPU execution provider).

MAC counts do not say what runs faster: a factorized block is several small kernels where
the dense layer was one, and on a CPU it can be slower at half the MACs. This module
measures instead:

* **one candidate** (layer geometry, input size, method, rank) is a tiny standalone ONNX
  graph of the factorized block, timed *interleaved* with the dense layer it replaces at
  each batch size, so both see the same machine load; what is kept is the time ratio
  (factorized / dense) and both times (:meth:`LatencyModel.measure`);
* **the cache**: every measurement is one checksummed JSON file under
  ``user_cache_dir()/latency/`` (written atomically), keyed by the shapes, method, rank,
  batch, threads, ONNX Runtime version and CPU model, so a second search on the same
  machine measures nothing again;
* **ranks in between**: where measuring every rank would be too slow, a few ranks spread
  over the candidates are measured and the ratio of the others is interpolated in their
  MAC count (:meth:`LatencyModel.estimate`);
* **the filter**: :meth:`LatencyModel.advise` returns the ranks measured slower than dense
  and, for each rank, a rank rounded to a multiple (of 8, say) that measured faster;
* **the whole model**: the model with every candidate layer dense is timed with each of
  those layers alone (:meth:`LatencyModel.baseline`); the rest of the graph is the model's
  time minus the layers' own; a plan's latency is predicted as the rest plus each layer's
  time (dense, or dense × the measured ratio) (:meth:`LatencyModel.predict`), and
  :meth:`LatencyModel.check` compares the prediction with a measurement of the final model;
* **in context** (:meth:`LatencyModel.measure_in_model`, ``predict(..., context='model')``):
  the whole model with one layer factorized, timed against the model, for what a layer alone
  cannot show (layout changes around the block; see ``benchmarks/results/latency.md``).

Factor blocks are built through the method registry only (``get_method(name).build``).
"""

from __future__ import annotations

import copy
import json
import math
import os
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from .. import inputs as model_inputs
from ..cost import count
from ..errors import ConfigError, LayerError
from ..factorized import Factorized, conv_arguments, conv_class, layer_geometry
from ..files import atomic_write_text, user_cache_dir
from ..fingerprint import jsonable, object_fingerprint
from ..methods import get_method
from ..plan import Plan
from ..validation import check_choice, check_int, check_number
from .latency import Latency, first_sample, repeat_to_batch, time_sessions
from .onnx import onnx_feed, ort_session, require_onnxruntime

__all__ = ["LatencySettings", "LatencyCache", "Timing", "RankAdvice", "LayerBaseline", "ModelBaseline",
           "PredictionCheck", "LatencyModel", "cpu_model", "runtime_identity", "dense_layer", "factor_block",
           "layer_input", "rounded_ranks"]

_FORMAT = "rankshrink-latency"
_VERSION = 3  # 3: timings in bursts of deploy.latency.BURST calls
_GROUP = 3  # candidates timed with one dense layer in one interleaved group


# --------------------------------------------------------------------------- identity and settings

def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``'s 'model name', else ``platform.processor()``)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def runtime_identity(threads: int) -> dict[str, Any]:
    """What a latency depends on besides the graph: runtime, its version, provider, CPU, threads."""
    ort = require_onnxruntime()
    return {"runtime": "onnxruntime", "version": ort.__version__, "provider": "CPUExecutionProvider",
            "cpu": cpu_model(), "threads": threads}


@dataclass(frozen=True, kw_only=True)
class LatencySettings:
    """How latencies are measured.

    ``batches``: the batch sizes every candidate is timed at. ``threads``: ONNX Runtime
    intra-op threads. Each measurement is at least ``runs`` interleaved rounds after
    ``warmup``, extended (up to ``max_runs``) until each graph ran ``min_ms`` in all.
    ``anchors``: how many ranks per (layer, method) :meth:`LatencyModel.estimate` measures
    before interpolating the rest. ``int8`` ('static' or 'dynamic'): every graph (a candidate,
    its dense layer, a whole model) is quantized before it is timed, as the shipped
    ``model.int8.onnx`` is: int8 kernels rank candidates differently (measured at batch 1, 3x3
    convs: on 16 channels every factorization tried took 1.17-1.67x the int8 dense layer, on
    32 channels 0.89-1.14x, on 64 channels 0.63-0.77x; in float32 0.3-0.75x).
    """

    batches: tuple[int, ...] = (1, 32)
    threads: int = 1
    runs: int = 20
    warmup: int = 3
    min_ms: float = 30.0
    max_runs: int = 400
    anchors: int = 5
    int8: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.batches, tuple) or not self.batches:
            raise ConfigError(f"batches must be a non-empty tuple of batch sizes, got {self.batches!r}.")
        for batch in self.batches:
            check_int(batch, "batch size", minimum=1)
        check_int(self.threads, "threads", minimum=1)
        check_int(self.runs, "runs", minimum=1)
        check_int(self.warmup, "warmup", minimum=0)
        check_number(self.min_ms, "min_ms", minimum=0)
        check_int(self.max_runs, "max_runs", minimum=self.runs)
        check_int(self.anchors, "anchors", minimum=2)
        if self.int8 is not None:
            check_choice(self.int8, "int8", ("static", "dynamic"))


# --------------------------------------------------------------------------- the cache

class LatencyCache:
    """Measurements on disk: one JSON file per key with a checksum, written atomically.

    The layout follows the search's evaluation cache (``<root>/<key[:2]>/<key>.json``);
    it lives here so that deployment does not depend on the search package. A file that
    does not parse, or whose key or checksum is wrong, is ignored and overwritten.
    ``LatencyCache(None)`` stores nothing.
    """

    def __init__(self, root: str | os.PathLike | None) -> None:
        self.root = Path(root) if root is not None else None
        self.hits = 0
        self.writes = 0

    @staticmethod
    def default_root() -> Path:
        return user_cache_dir() / "latency"

    @staticmethod
    def key(payload: Mapping[str, Any]) -> str:
        return object_fingerprint({"format": _FORMAT, "version": _VERSION, **payload})

    def path(self, key: str) -> Path:
        assert self.root is not None
        return self.root / key[:2] / f"{key}.json"

    @staticmethod
    def _checksum(key: str, body: Any) -> str:
        return object_fingerprint([key, body])

    def get(self, payload: Mapping[str, Any]) -> dict[str, Any] | None:
        if self.root is None:
            return None
        key = self.key(payload)
        try:
            entry = json.loads(self.path(key).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if not isinstance(entry, dict) or entry.get("key") != key or not isinstance(entry.get("body"), dict):
            return None
        if entry.get("checksum") != self._checksum(key, entry["body"]):
            return None
        self.hits += 1
        return entry["body"]

    def put(self, payload: Mapping[str, Any], body: Mapping[str, Any]) -> None:
        if self.root is None:
            return
        key = self.key(payload)
        clean = jsonable(dict(body))
        entry = {"format": _FORMAT, "version": _VERSION, "key": key, "payload": jsonable(dict(payload)),
                 "body": clean, "checksum": self._checksum(key, clean)}
        atomic_write_text(self.path(key), json.dumps(entry, sort_keys=True) + "\n")
        self.writes += 1


# --------------------------------------------------------------------------- graphs of one layer

def _seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def dense_layer(geometry: Mapping[str, Any], *, seed: int = 0) -> nn.Module:
    """The dense Linear/Conv1d/Conv2d/Embedding a geometry describes, with seeded random weights."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if geometry["type"] == "Linear":
            return nn.Linear(geometry["in_features"], geometry["out_features"], bias=geometry["bias"]).eval()
        if geometry["type"] == "Embedding":
            return nn.Embedding(geometry["num_embeddings"], geometry["embedding_dim"]).eval()
        return conv_class(dict(geometry))(geometry["in_channels"], geometry["out_channels"],
                                          bias=geometry["bias"], **conv_arguments(dict(geometry))).eval()


def factor_block(geometry: Mapping[str, Any], method: str, rank: Any, *, seed: int = 0) -> Factorized:
    """The factor block ``method`` builds for ``geometry`` at ``rank`` (through the registry),
    with seeded random weights: timing does not depend on the values, but uninitialised
    memory may hold NaNs or denormals, which do change it."""
    impl = get_method(method)
    geometry = dict(geometry)
    impl.check_layer(geometry)
    block = impl.build(geometry, impl.normalize_rank(geometry, rank))
    generator = _seeded(seed)
    with torch.no_grad():
        for parameter in block.parameters():
            fan_in = max(1, parameter[0].numel()) if parameter.dim() > 1 else 1
            parameter.copy_(torch.randn(parameter.shape, generator=generator) / math.sqrt(fan_in))
    return block.eval()


def layer_input(geometry: Mapping[str, Any], input_size: Sequence[int], batch: int, *, seed: int = 0) -> torch.Tensor:
    """A random input batch for the layer: (batch, in) or (batch, positions, in) for a Linear,
    (batch, channels, *spatial) for a conv, (batch, positions) int64 indices for an Embedding
    (``input_size`` as :func:`rankshrink.cost.count` reports it)."""
    generator = _seeded(seed)
    if geometry["type"] == "Embedding":
        positions = int(math.prod(input_size))
        return torch.randint(0, geometry["num_embeddings"], (batch, positions), generator=generator)
    if geometry["type"] == "Linear":
        positions = int(math.prod(input_size))
        shape: tuple[int, ...] = ((batch, geometry["in_features"]) if positions == 1
                                  else (batch, positions, geometry["in_features"]))
    else:
        shape = (batch, geometry["in_channels"], *[int(s) for s in input_size])
    return torch.randn(shape, generator=generator)


def rounded_ranks(method: str, geometry: Mapping[str, Any], rank: Any, multiple: int) -> list[Any]:
    """The valid ranks next to ``rank`` whose every component is a multiple of ``multiple``
    (rounded down and up; ``rank`` itself excluded). A rank of several components rounds each."""
    check_int(multiple, "multiple", minimum=2)
    impl = get_method(method)
    geometry = dict(geometry)
    parts = list(rank) if isinstance(rank, (tuple, list)) else [rank]
    found = []
    for direction in (math.floor, math.ceil):
        candidate_parts = [max(multiple, int(direction(p / multiple)) * multiple) for p in parts]
        candidate: Any = tuple(candidate_parts) if isinstance(rank, (tuple, list)) else candidate_parts[0]
        try:
            candidate = impl.normalize_rank(geometry, candidate)
        except LayerError:
            continue  # beyond the layer's rank range
        if candidate != rank and candidate not in found:
            found.append(candidate)
    return found


# --------------------------------------------------------------------------- results

@dataclass(frozen=True)
class Timing:
    """One candidate at one batch size, timed against its dense layer in the same run
    (or, with ``measured`` False, its ratio interpolated from measured ranks)."""

    dense_ms: float
    factorized_ms: float
    runs: int
    measured: bool = True

    @property
    def ratio(self) -> float:
        """factorized / dense: below 1 is faster than the dense layer."""
        return self.factorized_ms / self.dense_ms if self.dense_ms > 0 else math.inf

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ratio": self.ratio}


def _rank_key(rank: Any) -> Any:
    return tuple(rank) if isinstance(rank, list) else rank


@dataclass
class RankAdvice:
    """What :meth:`LatencyModel.advise` found for one layer and method.

    ``timings[rank][batch]``: the timing used (measured or interpolated). ``slower``: the
    ranks that are not ``min_speedup`` times faster than dense at some batch size, in the
    order given. ``rounded[rank]``: a rank rounded to a multiple of ``multiple`` that
    measured faster than ``rank`` at every batch size (and not slower than dense).
    """

    method: str
    multiple: int
    min_speedup: float
    timings: dict[Any, dict[int, Timing]]
    slower: list[Any]
    rounded: dict[Any, Any]

    def faster(self) -> list[Any]:
        """The ranks kept: every rank given except the slower ones."""
        return [rank for rank in self.timings if rank not in set(self.slower)]

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "multiple": self.multiple, "min_speedup": self.min_speedup,
                "slower": [jsonable(r) for r in self.slower],
                "rounded": [[jsonable(r), jsonable(c)] for r, c in self.rounded.items()],
                "timings": [{"rank": jsonable(r), "batches": {str(b): t.to_dict() for b, t in per.items()}}
                            for r, per in self.timings.items()]}


@dataclass
class LayerBaseline:
    name: str
    geometry: dict[str, Any]
    input_size: tuple[int, ...]
    calls: int
    dense_ms: dict[int, float]


@dataclass
class ModelBaseline:
    """The model with every candidate layer dense, timed with each such layer alone (interleaved)."""

    model_ms: dict[int, Latency]
    layers: dict[str, LayerBaseline]
    identity: dict[str, Any]
    model: nn.Module | None = field(default=None, repr=False)     # kept for in-context measurements
    sample: Any = field(default=None, repr=False)  # one example input (batch 1, any input form)

    def rest_ms(self, batch: int) -> float:
        """The model's time minus its candidate layers' own: everything else in the graph
        (it may be negative: a layer alone pays the session's fixed cost the model pays once)."""
        return self.model_ms[batch].median_ms - sum(layer.calls * layer.dense_ms[batch]
                                                    for layer in self.layers.values())

    def to_dict(self) -> dict[str, Any]:
        return {"model_ms": {str(b): asdict(v) for b, v in self.model_ms.items()},
                "rest_ms": {str(b): self.rest_ms(b) for b in self.model_ms},
                "layers": {n: {"dense_ms": {str(b): v for b, v in layer.dense_ms.items()}, "calls": layer.calls,
                               "input_size": list(layer.input_size)} for n, layer in self.layers.items()},
                "identity": self.identity}


@dataclass
class PredictionCheck:
    """A prediction against a measurement of the final model (original and final interleaved).

    ``error`` compares ratios to the original, which survive a change of machine load
    between the baseline and the check: ``predicted_ratio / measured_ratio − 1``.
    """

    batch: int
    predicted_ms: float
    measured_ms: float
    original_ms: float
    predicted_ratio: float
    measured_ratio: float
    runs: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def error(self) -> float:
        return self.predicted_ratio / self.measured_ratio - 1.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "error": self.error}


# --------------------------------------------------------------------------- the model

def _session(ort, module: nn.Module, example: Any, settings: LatencySettings, calibration: Any = None):
    """A session of ``module`` to time, quantized when ``settings.int8`` says so (static ranges from
    ``calibration``, a batch of inputs; default ``example``)."""
    from .quantize import timing_graph

    return ort_session(ort, timing_graph(module, example, int8=settings.int8, calibration=calibration),
                       settings.threads)


class LatencyModel:
    """Measured latencies of factorized layers and predicted latencies of whole models.

    ``cache_dir``: where measurements are kept (default ``user_cache_dir()/latency``);
    ``None`` keeps nothing. ``measurements`` counts the timed runs this instance made
    (one run times a dense layer and several candidates at every batch size). ``progress``
    shows a progress bar per batch of measurements.
    """

    def __init__(self, settings: LatencySettings | None = None, *,
                 cache_dir: str | os.PathLike | None = ..., progress: bool = False) -> None:  # type: ignore[assignment]
        self.settings = settings or LatencySettings()
        self.cache = LatencyCache(LatencyCache.default_root() if cache_dir is ... else cache_dir)
        # int8 joins the identity (and so the cache key) only when set: float32 measurements keep their keys.
        self.identity = {**runtime_identity(self.settings.threads),
                         **({"int8": self.settings.int8} if self.settings.int8 else {})}
        self.progress = progress
        self.measurements = 0

    def _groups(self, count: int, what: str):
        """Start indices of the groups of candidates timed together, with a progress bar if asked."""
        from tqdm.auto import tqdm

        return tqdm(range(0, count, _GROUP), desc=what, unit="group", disable=not self.progress, leave=False)

    # -- single candidates
    def _payload(self, geometry: Mapping[str, Any], input_size: Sequence[int], method: str, rank: Any,
                 batch: int) -> dict[str, Any]:
        return {"geometry": dict(geometry), "input_size": [int(s) for s in input_size], "method": method,
                "rank": jsonable(rank), "batch": batch, **self.identity}

    def _batches(self, batches: Iterable[int] | None) -> tuple[int, ...]:
        chosen = tuple(batches) if batches is not None else self.settings.batches
        for batch in chosen:
            check_int(batch, "batch size", minimum=1)
        return chosen

    def measure(self, geometry: Mapping[str, Any], input_size: Sequence[int], method: str, ranks: Iterable[Any],
                batches: Iterable[int] | None = None) -> dict[Any, dict[int, Timing]]:
        """Each rank's timing at each batch size, from the cache or measured now: the ranks
        not cached are timed in one interleaved run with the dense layer."""
        impl = get_method(method)
        geometry = dict(geometry)
        impl.check_layer(geometry)
        batches = self._batches(batches)
        ranks = [impl.normalize_rank(geometry, _rank_key(r)) for r in ranks]
        result: dict[Any, dict[int, Timing]] = {}
        missing: list[Any] = []
        for rank in ranks:
            per_batch = {}
            for batch in batches:
                body = self.cache.get(self._payload(geometry, input_size, method, rank, batch))
                if body is None:
                    break
                per_batch[batch] = Timing(float(body["dense_ms"]), float(body["factorized_ms"]), int(body["runs"]))
            if len(per_batch) == len(batches):
                result[rank] = per_batch
            elif rank not in missing:
                missing.append(rank)
        if missing:
            result.update(self._measure_now(geometry, input_size, method, missing, batches))
        return {rank: result[rank] for rank in ranks}

    def _measure_now(self, geometry: dict[str, Any], input_size: Sequence[int], method: str, ranks: list[Any],
                     batches: tuple[int, ...]) -> dict[Any, dict[int, Timing]]:
        ort = require_onnxruntime()
        settings = self.settings
        example = layer_input(geometry, input_size, 1)
        calibration = layer_input(geometry, input_size, 8)
        dense = _session(ort, dense_layer(geometry), example, settings, calibration)
        out: dict[Any, dict[int, Timing]] = {rank: {} for rank in ranks}
        # Small groups (the dense layer and a few candidates): timed among many other graphs a
        # layer runs with a cold cache, and ratios from groups of different sizes disagree.
        for start in self._groups(len(ranks), f"timing {method} on {geometry['type']}"):
            group = ranks[start:start + _GROUP]
            sessions = [dense] + [_session(ort, factor_block(geometry, method, r), example, settings, calibration)
                                  for r in group]
            for batch in batches:
                feed = {"input": layer_input(geometry, input_size, batch).numpy()}
                dense_latency, *blocks = time_sessions(sessions, [feed] * len(sessions), runs=settings.runs,
                                                       warmup=settings.warmup, min_ms=settings.min_ms,
                                                       max_runs=settings.max_runs)
                for rank, latency in zip(group, blocks):
                    timing = Timing(dense_latency.median_ms, latency.median_ms, latency.runs)
                    out[rank][batch] = timing
                    self.cache.put(self._payload(geometry, input_size, method, rank, batch),
                                   {"dense_ms": timing.dense_ms, "factorized_ms": timing.factorized_ms,
                                    "runs": timing.runs, "dense_p90_ms": dense_latency.p90_ms,
                                    "factorized_p90_ms": latency.p90_ms})
            self.measurements += 1
        return out

    def estimate(self, geometry: Mapping[str, Any], input_size: Sequence[int], method: str, ranks: Iterable[Any],
                 batches: Iterable[int] | None = None, *, anchors: int | None = None) -> dict[Any, dict[int, Timing]]:
        """Every rank's timing, measuring only ``anchors`` ranks (spread evenly over the ranks
        ordered by MACs, the cheapest and dearest included) plus whatever is cached, and
        interpolating the others' time ratio linearly in their MAC count."""
        impl = get_method(method)
        geometry = dict(geometry)
        impl.check_layer(geometry)
        batches = self._batches(batches)
        ranks = list(dict.fromkeys(impl.normalize_rank(geometry, _rank_key(r)) for r in ranks))
        if not ranks:
            return {}
        macs = {rank: impl.cost(geometry, rank, tuple(input_size)).macs for rank in ranks}
        ordered = sorted(ranks, key=lambda r: macs[r])
        count_anchors = min(len(ordered), anchors or self.settings.anchors)
        chosen = [ordered[int(i)] for i in np.unique(np.linspace(0, len(ordered) - 1, count_anchors).round())]
        cached = [r for r in ordered if r not in chosen and self._cached(geometry, input_size, method, r, batches)]
        measured = self.measure(geometry, input_size, method, chosen + cached, batches)
        points = sorted(measured, key=lambda r: macs[r])
        result: dict[Any, dict[int, Timing]] = {}
        for rank in ranks:
            if rank in measured:
                result[rank] = measured[rank]
                continue
            result[rank] = {}
            for batch in batches:
                xs = [macs[r] for r in points]
                ratio = float(np.interp(macs[rank], xs, [measured[r][batch].ratio for r in points]))
                dense_ms = float(np.median([measured[r][batch].dense_ms for r in points]))
                result[rank][batch] = Timing(dense_ms, ratio * dense_ms, 0, measured=False)
        return result

    def _cached(self, geometry, input_size, method, rank, batches) -> bool:
        root = self.cache.root
        return root is not None and all(
            self.cache.path(self.cache.key(self._payload(geometry, input_size, method, rank, b))).is_file()
            for b in batches)

    def advise(self, geometry: Mapping[str, Any], input_size: Sequence[int], method: str, ranks: Iterable[Any], *,
               multiple: int = 8, min_speedup: float = 1.0, batches: Iterable[int] | None = None,
               measure_all: bool = False, band: float = 0.25) -> RankAdvice:
        """Which of ``ranks`` to keep for a layer, and which to round.

        Ranks are estimated from a few measured ones (:meth:`estimate`); those whose
        estimated speed-up lies within ``band`` (relative) of ``min_speedup`` are then
        measured, so every verdict near the line comes from a measurement
        (``measure_all`` measures every rank). A rank is *slower* if it is not
        ``min_speedup`` times faster than dense at some batch size. For every rank the
        neighbouring ranks that are multiples of ``multiple`` are measured with it; the
        fastest of them that beats the rank at every batch size (and is not slower) is
        its ``rounded`` rank.
        """
        check_number(min_speedup, "min_speedup", minimum=0, low_open=True)
        check_number(band, "band", minimum=0)
        impl = get_method(method)
        geometry = dict(geometry)
        impl.check_layer(geometry)
        batches = self._batches(batches)
        ranks = list(dict.fromkeys(impl.normalize_rank(geometry, _rank_key(r)) for r in ranks))
        if measure_all:
            timings = self.measure(geometry, input_size, method, ranks, batches)
        else:
            timings = self.estimate(geometry, input_size, method, ranks, batches)
            limit = 1.0 / min_speedup  # the largest ratio that still counts as fast enough
            near = [r for r, per in timings.items() if any(not t.measured for t in per.values())
                    and any(abs(t.ratio - limit) <= band * limit for t in per.values())]
            if near:
                timings.update(self.measure(geometry, input_size, method, near, batches))
        neighbours = {rank: rounded_ranks(method, geometry, rank, multiple) for rank in ranks}
        wanted = [rank for rank in ranks if neighbours[rank] and not all(t.measured for t in timings[rank].values())]
        wanted += [c for cs in neighbours.values() for c in cs]
        measured = self.measure(geometry, input_size, method, list(dict.fromkeys(wanted)), batches) if wanted else {}

        def too_slow(per: Mapping[int, Timing]) -> bool:
            return any(t.dense_ms < min_speedup * t.factorized_ms for t in per.values())

        for rank in ranks:
            if rank in measured:
                timings[rank] = measured[rank]
        rounded: dict[Any, Any] = {}
        for rank in ranks:
            best, best_score = None, math.inf
            for candidate in neighbours[rank]:
                per = measured[candidate]
                if too_slow(per) or not all(per[b].ratio < timings[rank][b].ratio for b in batches):
                    continue
                score = sum(per[b].ratio for b in batches)
                if score < best_score:
                    best, best_score = candidate, score
            if best is not None:
                rounded[rank] = best
        slower = [rank for rank in ranks if too_slow(timings[rank])]
        return RankAdvice(method, multiple, float(min_speedup), timings, slower, rounded)

    # -- whole models
    def baseline(self, model: nn.Module, example_input: Any, *,
                 layers: Iterable[str] | None = None, batches: Iterable[int] | None = None) -> ModelBaseline:
        """Time ``model`` (its candidate layers dense) at each batch size, interleaved with each
        candidate layer alone (``layers``, default: every factorizable dense layer)."""
        ort = require_onnxruntime()
        batches = self._batches(batches)
        settings = self.settings
        sample = first_sample(example_input)
        rows = [row for row in count(model, sample).layers if row.method is None]
        if layers is not None:
            wanted = list(layers)
            unknown = sorted(set(wanted) - {row.name for row in rows})
            if unknown:
                raise LayerError(f"layer(s) {', '.join(unknown)} are not dense factorizable layers of the model.")
            rows = [row for row in rows if row.name in wanted]
        modules = [model] + [model.get_submodule(row.name) for row in rows]
        examples = [sample] + [layer_input(row.geometry, row.input_size, 1) for row in rows]
        calibrations = ([repeat_to_batch(sample, 8)] + [layer_input(row.geometry, row.input_size, 8) for row in rows]
                        if settings.int8 else [None] * len(modules))  # float32 graphs calibrate nothing
        sessions = [_session(ort, m, x, settings, c) for m, x, c in zip(modules, examples, calibrations)]
        model_ms: dict[int, Latency] = {}
        layer_ms: dict[str, dict[int, float]] = {row.name: {} for row in rows}
        for batch in batches:
            feeds = [onnx_feed(repeat_to_batch(sample, batch))]
            feeds += [{"input": layer_input(row.geometry, row.input_size, batch).numpy()} for row in rows]
            whole, *parts = time_sessions(sessions, feeds, runs=settings.runs, warmup=settings.warmup,
                                          min_ms=settings.min_ms, max_runs=settings.max_runs)
            model_ms[batch] = whole
            for row, latency in zip(rows, parts):
                layer_ms[row.name][batch] = latency.median_ms
        self.measurements += 1
        return ModelBaseline(model_ms, {row.name: LayerBaseline(row.name, dict(row.geometry), tuple(row.input_size),
                                                                row.calls, layer_ms[row.name]) for row in rows},
                             dict(self.identity), model=model, sample=sample)

    def measure_in_model(self, model: nn.Module, example_input: Any, layer: str, method: str,
                         ranks: Iterable[Any], batches: Iterable[int] | None = None) -> dict[Any, dict[int, Timing]]:
        """Each rank's timing *in context*: the whole model with only ``layer`` replaced by the
        block, timed interleaved with the unchanged model (``dense_ms`` and ``factorized_ms`` are
        whole-model times). Slower than :meth:`measure`, but it sees what a graph does around a
        layer: ONNX Runtime's CPU provider keeps chains of convolutions in a blocked layout
        (NCHWc) and leaves it around factors whose channel counts do not fit the blocks, which
        costs reorders that a layer timed alone does not pay. Cached per model fingerprint."""
        from ..fingerprint import module_fingerprint
        from ..surgery import replace_layer

        ort = require_onnxruntime()
        settings = self.settings
        batches = self._batches(batches)
        impl = get_method(method)
        dense = model.get_submodule(layer)
        geometry = layer_geometry(dense)
        impl.check_layer(geometry, layer)
        ranks = list(dict.fromkeys(impl.normalize_rank(geometry, _rank_key(r), layer=layer) for r in ranks))
        sample = first_sample(example_input)
        context = {"model": module_fingerprint(model), "layer": layer,
                   "input_shape": [[name, list(t.shape[1:])] for name, t in model_inputs.leaves(sample)]}

        def payload(rank: Any, batch: int) -> dict[str, Any]:
            return {**self._payload(geometry, (), method, rank, batch), "context": context}

        result: dict[Any, dict[int, Timing]] = {}
        missing = []
        for rank in ranks:
            bodies = [self.cache.get(payload(rank, b)) for b in batches]
            if all(body is not None for body in bodies):
                result[rank] = {b: Timing(float(body["dense_ms"]), float(body["factorized_ms"]), int(body["runs"]))
                                for b, body in zip(batches, bodies) if body is not None}
            else:
                missing.append(rank)
        if missing:
            calibration = repeat_to_batch(sample, 8)
            base = _session(ort, model, sample, settings, calibration)
            for start in self._groups(len(missing), f"timing {layer} ({method}) in the model"):
                group = missing[start:start + _GROUP]
                sessions = [base]
                for rank in group:
                    variant = copy.deepcopy(model)
                    replace_layer(variant, layer, factor_block(geometry, method, rank))
                    sessions.append(_session(ort, variant.eval(), sample, settings, calibration))
                for batch in batches:
                    feed = onnx_feed(repeat_to_batch(sample, batch))
                    whole, *variants = time_sessions(sessions, [feed] * len(sessions), runs=settings.runs,
                                                     warmup=settings.warmup, min_ms=settings.min_ms,
                                                     max_runs=settings.max_runs)
                    for rank, latency in zip(group, variants):
                        timing = Timing(whole.median_ms, latency.median_ms, latency.runs)
                        result.setdefault(rank, {})[batch] = timing
                        self.cache.put(payload(rank, batch), {"dense_ms": timing.dense_ms,
                                                              "factorized_ms": timing.factorized_ms,
                                                              "runs": timing.runs})
                self.measurements += 1
        return {rank: result[rank] for rank in ranks}

    def _plan_entries(self, baseline: ModelBaseline, plan: Plan | Mapping[str, tuple[str, Any]]):
        entries = {}
        for name, entry in plan.items():
            method, rank = (entry.method, entry.rank) if not isinstance(entry, tuple) else entry
            if name not in baseline.layers:
                raise LayerError(f"{name}: not a layer the baseline timed; measure the baseline with it "
                                 "(LatencyModel.baseline(model, x, layers=...)).")
            entries[name] = (method, _rank_key(rank))
        return entries

    def predict(self, baseline: ModelBaseline, plan: Plan | Mapping[str, tuple[str, Any]], *,
                measure: bool = True, context: str = "layer") -> dict[int, float]:
        """Predicted latency (ms) per batch size of the baseline's model with ``plan`` applied.

        ``context='layer'``: the rest of the graph plus each layer's time (dense, or dense ×
        its ratio measured alone; interpolated from cached and anchor ranks when ``measure``
        is False). ``context='model'``: the model's time plus, for each planned layer, the
        change it made to the whole model's time on its own (:meth:`measure_in_model`).
        """
        check_choice(context, "context", ("layer", "model"))
        entries = self._plan_entries(baseline, plan)
        batches = tuple(baseline.model_ms)
        if context == "model":
            if baseline.model is None or baseline.sample is None:
                raise ConfigError("context='model' needs a baseline made by LatencyModel.baseline "
                                  "(it keeps the model).")
            change = {b: 0.0 for b in batches}
            for name, (method, rank) in entries.items():
                timing = next(iter(self.measure_in_model(baseline.model, baseline.sample, name, method, [rank],
                                                         batches).values()))
                for b in batches:
                    change[b] += timing[b].ratio - 1.0
            return {b: baseline.model_ms[b].median_ms * (1.0 + change[b]) for b in batches}
        ratios: dict[str, dict[int, float]] = {}
        for name, (method, rank) in entries.items():
            layer = baseline.layers[name]
            if measure:
                per = self.measure(layer.geometry, layer.input_size, method, [rank], batches)
            else:
                per = self.estimate(layer.geometry, layer.input_size, method, [rank], batches)
            timing = next(iter(per.values()))
            ratios[name] = {b: timing[b].ratio for b in batches}
        return {batch: baseline.rest_ms(batch) + sum(
            layer.calls * layer.dense_ms[batch] * ratios.get(name, {}).get(batch, 1.0)
            for name, layer in baseline.layers.items()) for batch in batches}

    def check(self, baseline: ModelBaseline, original: nn.Module, compressed: nn.Module,
              plan: Plan | Mapping[str, tuple[str, Any]], example_input: Any, *,
              context: str = "layer") -> list[PredictionCheck]:
        """Measure ``original`` and ``compressed`` (interleaved) at the baseline's batch sizes
        and compare with :meth:`predict` for ``plan``."""
        ort = require_onnxruntime()
        predicted = self.predict(baseline, plan, context=context)
        sample = first_sample(example_input)
        calibration = repeat_to_batch(sample, 8)
        sessions = [_session(ort, m, sample, self.settings, calibration) for m in (original, compressed)]
        checks = []
        for batch in baseline.model_ms:
            feed = onnx_feed(repeat_to_batch(sample, batch))
            before, after = time_sessions(sessions, [feed, feed], runs=self.settings.runs,
                                          warmup=self.settings.warmup, min_ms=self.settings.min_ms,
                                          max_runs=self.settings.max_runs)
            checks.append(PredictionCheck(batch, predicted[batch], after.median_ms, before.median_ms,
                                          predicted[batch] / baseline.model_ms[batch].median_ms,
                                          after.median_ms / before.median_ms, after.runs))
        self.measurements += 1
        return checks
