"""Latency on ONNX Runtime, and the rule that no factorized layer may ship if it runs slower
than the dense layer it replaced.

Latencies are measured interleaved (dense and factorized alternate), so both see the same machine
load; compare ratios from one run, not absolute times across runs. Each :class:`Latency` has the
median, p90 and fastest call; whole-model decisions compare fastest calls (see :class:`Latency`).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from .. import inputs as model_inputs
from ..cost import count
from ..errors import ConfigError
from ..factorized import Factorized
from ..plan import Plan
from .onnx import onnx_bytes, onnx_feed, ort_session, require_onnxruntime

__all__ = ["Latency", "onnx_latency", "LayerSpeed", "layer_latencies", "drop_slower_layers", "time_sessions",
           "first_sample", "repeat_to_batch", "model_latencies", "time_rounds", "BURST"]


@dataclass
class Latency:
    """One graph's timed calls: their median, p90, count, and the fastest call.

    ``fastest_ms`` is what the graph costs when nothing else competes for the core and its caches, as on a
    device that runs one model. On this shared 2-core machine the median moves with the neighbours' load,
    the fastest call much less where calls are short: measured with ``benchmarks/latency_noise.py`` (a plan
    and its original timed again and again for 75 s, each time as plans are timed, 3 runs), at batch 1
    the DS-CNN's ``--max-macs 0.25`` plan measured above the 0.97 that counts as faster 90 times of 182 by
    medians and 16 by the fastest call of the 3 runs (interquartile range of the ratio 0.170 vs 0.005),
    a CIFAR CNN plan 143 vs 36 of 216, while the original's median moved between 0.066 and 0.097 ms
    (10th-90th percentile). At batch 32 (~1-2 ms calls, fewer of them) the fastest call was not steadier
    (interquartile range 0.12-0.14 vs 0.04) and read the CIFAR plan faster than its median did. Whole-plan
    decisions (faster than the original, within a latency budget, int8 nodes kept) compare fastest calls;
    medians and p90s are reported beside them.
    """

    median_ms: float
    p90_ms: float
    runs: int
    fastest_ms: float


# Calls in a row per session per round, the first untimed, so a model's weights are warm as on a device
# that runs one model over and over. With one call per session per round the ratio of a plan to its
# original depended on how many files were interleaved: measured on the wide MLP (4.2 MB of weights) at
# batch 1, rank-24/48/56 plans ran 0.32/0.45/0.57x the original timed among 8 files but 0.43/0.56/0.63x
# timed in pairs with bursts of 4; with bursts of 16 both ways agreed within noise (0.39/0.52/0.60x among
# 8, 0.36-0.43/0.52-0.57/0.60-0.64x in pairs), as they did at batch 32 throughout.
BURST = 16


def first_sample(example_input: Any) -> Any:
    """The first row of an input structure (any form), detached; floating tensors as float32 (what the graphs take)."""
    return model_inputs.map_tensors(
        lambda t: t[:1].detach().cpu().float() if t.is_floating_point() else t[:1].detach().cpu(), example_input)


def repeat_to_batch(sample: Any, batch: int) -> Any:
    """A one-row input structure repeated to ``batch`` rows (the latency measurements' inputs)."""
    return model_inputs.map_tensors(lambda t: t.expand(batch, *t.shape[1:]).contiguous(), sample)


def model_latencies(models: dict[str, nn.Module], example_input: Any, *, batches: tuple[int, ...] = (1, 32),
                    threads: int = 1, runs: int = 20, warmup: int = 3, min_ms: float = 30.0,
                    max_runs: int = 400, int8: str | None = None) -> dict[str, dict[int, Latency]]:
    """Each model's latency on ONNX Runtime at each batch size (inputs: the example's first row repeated),
    all models timed interleaved; exported for timing only (not verified, traced branches allowed), and
    with ``int8`` ('static', 'dynamic') quantized first (:func:`rankshrink.deploy.quantize.timing_graph`)."""
    from .quantize import timing_graph

    ort = require_onnxruntime()
    sample = first_sample(example_input)
    names = list(models)
    calibration = repeat_to_batch(sample, 8) if int8 else None
    sessions = [ort_session(ort, timing_graph(models[n], sample, int8=int8, calibration=calibration), threads)
                for n in names]
    result: dict[str, dict[int, Latency]] = {name: {} for name in names}
    for batch in batches:
        feed = onnx_feed(repeat_to_batch(sample, batch))
        for name, latency in zip(names, time_sessions(sessions, [feed] * len(names), runs=runs, warmup=warmup,
                                                      min_ms=min_ms, max_runs=max_runs)):
            result[name][batch] = latency
    return result


def _summary(samples: list[float]) -> Latency:
    ordered = sorted(samples)
    return Latency(statistics.median(ordered), ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))],
                   len(ordered), ordered[0])


def time_sessions(sessions: list, feeds: list[dict], *, runs: int = 30, warmup: int = 5, min_ms: float = 0.0,
                  max_runs: int = 1000, burst: int = BURST) -> list[Latency]:
    """Interleaved timing of ONNX Runtime sessions: ``runs`` timed calls of each, and more (up to
    ``max_runs``) until every session has run for ``min_ms`` in all, so fast graphs get enough samples.

    Sessions take turns in rounds; in each round a session makes ``burst`` calls in a row, the first
    untimed, so its weights are back in cache as on a device (see ``BURST``). Each round starts at
    the next session (a rotation): measured here, a fixed order gave two identical graphs medians 7%
    apart, the later one faster.
    """
    if runs < 1 or warmup < 0 or max_runs < runs or burst < 1:
        raise ConfigError("runs and burst must be >= 1, warmup >= 0 and max_runs >= runs.")
    count = len(sessions)
    for _ in range(warmup):
        for session, feed in zip(sessions, feeds):
            session.run(None, feed)
    times: list[list[float]] = [[] for _ in sessions]
    per_round = max(1, burst - 1)
    done = rounds = 0
    while done < runs or (min(sum(t) for t in times) < min_ms and done < max_runs):
        timed = min(per_round, (runs if done < runs else max_runs) - done)
        for offset in range(count):
            index = (rounds + offset) % count
            session, feed = sessions[index], feeds[index]
            if burst > 1:
                session.run(None, feed)
            for _ in range(timed):
                start = time.perf_counter()
                session.run(None, feed)
                times[index].append((time.perf_counter() - start) * 1000.0)
        done += timed
        rounds += 1
    return [_summary(t) for t in times]


def time_rounds(sessions: list, feeds: dict[int, list[dict]], *, rounds: int,
                **timing: Any) -> list[dict[int, Latency]]:
    """:func:`time_sessions` at each batch size (``feeds``: batch -> one feed per session), repeated in
    ``rounds`` separate runs. Per session and batch: the median of the runs' medians and of their p90s, the
    fastest call of them all (more runs, more chances that both graphs of a pair meet a quiet moment), and all
    their runs (one run is not enough here: one plan measured 0.88x, 0.99x, 1.04x in three by medians)."""
    runs = [{batch: time_sessions(sessions, per_session, **timing) for batch, per_session in feeds.items()}
            for _ in range(rounds)]

    def combined(index: int, batch: int) -> Latency:
        each = [run[batch][index] for run in runs]
        return Latency(statistics.median(t.median_ms for t in each), statistics.median(t.p90_ms for t in each),
                       sum(t.runs for t in each), min(t.fastest_ms for t in each))

    return [{batch: combined(index, batch) for batch in feeds} for index in range(len(sessions))]


def onnx_latency(models: dict[str, nn.Module], example_input: Any, *, runs: int = 50,
                 warmup: int = 5, threads: int = 1) -> dict[str, Latency]:
    """Median latency on ONNX Runtime (CPU) of each model, measured interleaved."""
    if runs < 1 or warmup < 0 or threads < 1:
        raise ConfigError("runs and threads must be >= 1 and warmup >= 0.")
    ort = require_onnxruntime()
    names = list(models)
    sessions = [ort_session(ort, onnx_bytes(models[n], example_input), threads) for n in names]
    feed = onnx_feed(example_input)
    return dict(zip(names, time_sessions(sessions, [feed] * len(sessions), runs=runs, warmup=warmup)))


@dataclass
class LayerSpeed:
    name: str
    method: str
    rank: Any
    dense_ms: float
    factorized_ms: float

    @property
    def speedup(self) -> float:
        return self.dense_ms / self.factorized_ms if self.factorized_ms > 0 else float("inf")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "speedup": self.speedup}


def _layer_input(layer_cost, batch: int, dtype) -> torch.Tensor:
    geometry = layer_cost.geometry
    if geometry["type"] == "Linear":
        positions = layer_cost.input_size[0]
        shape = (batch, geometry["in_features"]) if positions == 1 else (batch, positions, geometry["in_features"])
    else:
        shape = (batch, geometry["in_channels"], *layer_cost.input_size)
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0)).to(dtype)


def layer_latencies(original: nn.Module, compressed: nn.Module, example_input: Any, *,
                    runs: int = 30, warmup: int = 5, threads: int = 1) -> list[LayerSpeed]:
    """Each factorized layer of ``compressed`` timed against the dense layer it replaced,
    alone, on its real input size (from one forward pass), on ONNX Runtime."""
    ort = require_onnxruntime()
    costs = count(compressed, example_input)
    batch = model_inputs.batch_size(example_input)
    results = []
    for layer_cost in costs.layers:
        if layer_cost.method is None:
            continue
        block = compressed.get_submodule(layer_cost.name)
        assert isinstance(block, Factorized)  # count() gives a method only to Factorized blocks
        dense = original.get_submodule(layer_cost.name)
        x = _layer_input(layer_cost, batch, next(dense.parameters()).dtype)
        sessions = [ort_session(ort, onnx_bytes(m, x), threads) for m in (dense, block)]
        feed = {"input": x.numpy()}
        dense_t, fact_t = time_sessions(sessions, [feed, feed], runs=runs, warmup=warmup)
        results.append(LayerSpeed(layer_cost.name, block.method, block.rank, dense_t.median_ms, fact_t.median_ms))
    return results


def drop_slower_layers(original: nn.Module, plan: Plan, example_input: Any, *,
                       compressed: nn.Module | None = None, min_speedup: float = 1.0,
                       runs: int = 30, threads: int = 1) -> tuple[Plan, list[LayerSpeed]]:
    """The plan without the layers whose factorization is not at least ``min_speedup``
    times faster than the dense layer on ONNX Runtime, and the measurements."""
    from ..surgery import apply

    compressed = compressed if compressed is not None else apply(original, plan)
    speeds = layer_latencies(original, compressed, example_input, runs=runs, threads=threads)
    slow = {s.name for s in speeds if s.speedup < min_speedup}
    kept = plan.only(name for name in plan if name not in slow)  # folds and calibration settings stay
    if slow:
        kept.metadata["dropped_as_slower"] = sorted(slow)
    return kept, speeds
