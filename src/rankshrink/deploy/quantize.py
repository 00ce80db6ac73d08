"""int8 on top: ONNX Runtime's quantization of an exported model, and side-by-side measurements.

* :func:`quantize_onnx` -- ``dynamic`` (``onnxruntime.quantization.quantize_dynamic``: int8
  weights, activations quantized at run time; for Linear-heavy models) or ``static`` (QDQ,
  activation ranges calibrated on calibration data through a ``CalibrationDataReader``; for
  convolutional models). The result is written atomically (``model.int8.onnx`` by convention);
  the input file is only read.
* :func:`measure_onnx_files` -- for each ONNX file: its size in bytes, a metric computed on
  ONNX Runtime over a data set, and its latency at each batch size, all files timed
  interleaved so their ratios are comparable (the rows original / low-rank / int8 /
  low-rank + int8).

ONNX Runtime does the quantization itself; this module only feeds it data, picks the
format per mode, and writes the file safely.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import tempfile
import time
import warnings
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import torch
from torch.utils.data import Dataset

from .. import inputs as model_inputs
from ..data import iterate_batches
from ..errors import ConfigError, DataError, FileFormatError
from ..files import atomic_path
from ..validation import check_bool, check_choice, check_int
from .latency import Latency, first_sample, repeat_to_batch, time_rounds, time_sessions
from .onnx import ExportError, ort_session, require_onnxruntime

__all__ = ["INT8_MODES", "ACTIVATION_TYPES", "QuantizeConfig", "quantize_onnx", "quantize_where_faster", "Int8Choice",
           "SLOWER_MARGIN", "onnx_input_name", "timing_graph",
           "onnx_input_names", "graph_feed", "OnnxMeasurement", "measure_onnx_files", "onnx_accuracy"]

INT8_MODES = ("dynamic", "static")
ACTIVATION_TYPES = ("uint8", "int8")
# Dynamic quantization turns a Conv into ConvInteger, which ONNX Runtime's CPU provider runs
# slowly (measured: ResNet-8 7.5x slower than float32); by default it quantizes matrix products only.
_DYNAMIC_OPS = ("MatMul", "Gemm")


@dataclass(frozen=True, kw_only=True)
class QuantizeConfig:
    """How to quantize. ``mode``: 'dynamic' or 'static' (QDQ). ``per_channel``: one scale per
    output channel of each weight. ``calibration_samples`` / ``calibration_batch``: how much of
    the calibration data the static mode's range calibration reads, in batches of that size.
    ``preprocess``: run ONNX Runtime's quantization pre-processing (shape inference and graph
    optimization) first, as its documentation recommends. ``activations``: the static mode's
    activation type; 'uint8' (U8S8) by default: with int8 activations (S8S8) the QDQ ResNet-8
    ran 1.6-2x slower than float32 on an AVX-512 VNNI Xeon, with uint8 1.4x faster.
    ``op_types``: the operator types to quantize (default: every type ONNX Runtime quantizes
    for 'static', MatMul and Gemm for 'dynamic'). ``exclude_nodes``: names of nodes (of the
    pre-processed graph) left in float32 (see :func:`quantize_where_faster`)."""

    mode: str = "dynamic"
    per_channel: bool = True
    calibration_samples: int = 256
    calibration_batch: int = 32
    preprocess: bool = True
    activations: str = "uint8"
    op_types: tuple[str, ...] | None = None
    exclude_nodes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_choice(self.mode, "int8 mode", INT8_MODES)
        check_bool(self.per_channel, "per_channel")
        check_int(self.calibration_samples, "calibration_samples", minimum=1)
        check_int(self.calibration_batch, "calibration_batch", minimum=1)
        check_bool(self.preprocess, "preprocess")
        check_choice(self.activations, "activations", ACTIVATION_TYPES)
        if self.op_types is not None and (not isinstance(self.op_types, tuple) or not self.op_types
                                          or not all(isinstance(t, str) and t for t in self.op_types)):
            raise ConfigError(f"op_types must be None or a non-empty tuple of ONNX operator names, "
                              f"got {self.op_types!r}.")
        if not isinstance(self.exclude_nodes, tuple) or not all(isinstance(n, str) for n in self.exclude_nodes):
            raise ConfigError(f"exclude_nodes must be a tuple of ONNX node names, got {self.exclude_nodes!r}.")


def _require_quantization():
    require_onnxruntime()
    try:
        from onnxruntime import quantization
    except ImportError as exc:  # pragma: no cover - ships with onnxruntime
        raise ExportError(f"int8 quantization needs onnxruntime.quantization ({exc}): "
                          "pip install 'rankshrink[onnx]'.") from None
    return quantization


def onnx_input_names(path_or_bytes: str | os.PathLike | bytes) -> list[str]:
    """The names of an ONNX model's data inputs (initializers excluded), in graph order."""
    import onnx

    try:
        model = onnx.load_model_from_string(path_or_bytes) if isinstance(path_or_bytes, bytes) else \
            onnx.load(str(path_or_bytes), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError, OSError, ...
        raise FileFormatError(f"'{path_or_bytes if not isinstance(path_or_bytes, bytes) else 'the model'}' is not "
                              f"a readable ONNX model ({type(exc).__name__}: {exc}).") from None
    initializers = {t.name for t in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in initializers]


def onnx_input_name(path_or_bytes: str | os.PathLike | bytes) -> str:
    """The name of an ONNX model's single data input (initializers excluded)."""
    inputs = onnx_input_names(path_or_bytes)
    if len(inputs) != 1:
        raise FileFormatError(f"the ONNX model has {len(inputs)} data inputs ({', '.join(inputs)}); this step "
                              "handles models with one input.")
    return inputs[0]


def graph_feed(names: list[str], inputs: Any) -> dict[str, np.ndarray]:
    """An ONNX Runtime feed for a graph with inputs ``names`` from an input structure of any form: by name where
    the structure's names (:func:`rankshrink.inputs.leaves`) are the graph's, else in order."""
    found = model_inputs.leaves(inputs)
    arrays = {name: (t.detach().cpu().float() if t.is_floating_point() else t.detach().cpu()).numpy()
              for name, t in found}
    if set(arrays) == set(names):
        return {name: arrays[name] for name in names}
    if len(found) != len(names):
        raise DataError(f"the ONNX model takes {len(names)} input(s) ({', '.join(names)}) but the data has "
                        f"{len(found)} ({', '.join(arrays)}).")
    return dict(zip(names, arrays.values()))


def _calibration_batches(data: Dataset | torch.Tensor | Any, samples: int, batch_size: int) -> Iterator[Any]:
    if isinstance(data, torch.Tensor):
        inputs = data[:samples]
        for start in range(0, len(inputs), batch_size):
            yield inputs[start:start + batch_size]
        return
    if not isinstance(data, Dataset):  # one batch of inputs in the model's own form (tuple, dict)
        inputs = model_inputs.take(data, slice(0, samples))
        size = model_inputs.batch_size(inputs)
        for start in range(0, size, batch_size):
            yield model_inputs.take(inputs, slice(start, start + batch_size))
        return
    seen = 0
    for inputs, _ in iterate_batches(data, batch_size):
        if seen >= samples:
            return
        chunk = model_inputs.take(inputs, slice(0, samples - seen))
        seen += model_inputs.batch_size(chunk)
        yield chunk


def _reader(quantization, input_names: list[str], data: Dataset | torch.Tensor, config: QuantizeConfig):
    class Reader(quantization.CalibrationDataReader):
        """Feeds calibration batches to ONNX Runtime's calibrator, then None."""

        def __init__(self) -> None:
            self._batches = _calibration_batches(data, config.calibration_samples, config.calibration_batch)

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self._batches, None)
            return None if batch is None else graph_feed(input_names, batch)

    return Reader()


def _checked_paths(model, output, config: QuantizeConfig, calibration) -> tuple[Path, Path]:
    source, target = Path(model), Path(output)
    if not source.is_file():
        raise FileFormatError(f"ONNX model '{source}' does not exist.")
    if target.resolve() == source.resolve():
        raise ConfigError(f"the int8 output '{target}' is the input model; choose another file "
                          "(model.int8.onnx) so the input is not overwritten.")
    if config.mode == "static" and calibration is None:
        raise ConfigError("int8 mode 'static' calibrates activation ranges: pass calibration data "
                          "(calibration=splits.train), or use mode='dynamic'.")
    return source, target


def _prepared(quantization, source: Path, work: str, config: QuantizeConfig) -> Path:
    """``source`` after ONNX Runtime's quantization pre-processing (when asked for and it works)."""
    if not config.preprocess:
        return source
    candidate = Path(work) / "prepared.onnx"
    try:
        quantization.quant_pre_process(str(source), str(candidate), skip_symbolic_shape=False)
        return candidate
    except Exception as exc:  # pre-processing is an optimisation: quantize the graph as it is
        warnings.warn(f"ONNX Runtime's quantization pre-processing failed on '{source}' "
                      f"({type(exc).__name__}: {exc}); quantizing without it.", RuntimeWarning, stacklevel=3)
        return source


class _DropWarnings(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno > logging.WARNING


@contextlib.contextmanager
def _quantizer_warnings_hidden():
    """ONNX Runtime's quantizer logs warnings on the root logger (one per 1-D weight of a BatchNorm, say),
    about nothing the user can act on; a search quantizing plan after plan would print them all."""
    drop = _DropWarnings()
    root = logging.getLogger()
    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)


def _quantized(quantization, prepared: Path, target: Path, source: Path, input_names: list[str],
               calibration, config: QuantizeConfig) -> Path:
    """Quantize the pre-processed graph into ``target`` (atomically)."""
    excluded = list(config.exclude_nodes)
    with _quantizer_warnings_hidden(), atomic_path(target) as tmp:
        try:
            if config.mode == "dynamic":
                quantization.quantize_dynamic(str(prepared), str(tmp), per_channel=config.per_channel,
                                              op_types_to_quantize=list(config.op_types or _DYNAMIC_OPS),
                                              nodes_to_exclude=excluded, weight_type=quantization.QuantType.QInt8)
            else:
                assert calibration is not None
                activation_type = (quantization.QuantType.QUInt8 if config.activations == "uint8"
                                   else quantization.QuantType.QInt8)
                quantization.quantize_static(str(prepared), str(tmp),
                                             _reader(quantization, input_names, calibration, config),
                                             quant_format=quantization.QuantFormat.QDQ,
                                             op_types_to_quantize=list(config.op_types) if config.op_types
                                             else None, nodes_to_exclude=excluded,
                                             per_channel=config.per_channel, activation_type=activation_type,
                                             weight_type=quantization.QuantType.QInt8)
        except (ConfigError, DataError):
            raise
        except Exception as exc:  # ONNX Runtime's quantizer raises many types; report them as one
            raise ExportError(f"int8 {config.mode} quantization of '{source}' failed: {type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
    return target


def _with_mode(config: QuantizeConfig | None, mode: str | None) -> QuantizeConfig:
    config = config or QuantizeConfig()
    return config if mode is None else QuantizeConfig(**{**asdict(config), "mode": mode})


def quantize_onnx(model: str | os.PathLike, output: str | os.PathLike, *, mode: str | None = None,
                  calibration: Dataset | torch.Tensor | None = None,
                  config: QuantizeConfig | None = None) -> Path:
    """Quantize the ONNX file ``model`` to int8 and write it to ``output`` atomically.

    ``mode`` ('dynamic' or 'static') overrides ``config.mode``. 'static' needs
    ``calibration``: a data set of (input, label) pairs (e.g. ``splits.train``) or a tensor
    of inputs; the first ``config.calibration_samples`` are used.
    """
    config = _with_mode(config, mode)
    source, target = _checked_paths(model, output, config, calibration)
    quantization = _require_quantization()
    input_names = onnx_input_names(source)
    with tempfile.TemporaryDirectory(prefix="rankshrink-int8-") as work:
        prepared = _prepared(quantization, source, work, config)
        return _quantized(quantization, prepared, target, source, input_names, calibration, config)


def timing_graph(module: torch.nn.Module, example: Any, *, int8: str | None = None,
                 calibration: Any = None, where_faster: tuple[int, ...] | None = None, threads: int = 1) -> bytes:
    """``module`` as an ONNX graph to time: exported (traced branches allowed: they change what a graph
    computes, not how long it takes) and, with ``int8`` ('static' or 'dynamic'), quantized, every node
    included; static ranges are calibrated on ``calibration`` (default ``example``: scales do not change
    the time). ``where_faster`` (batch sizes; 'static' only): quantized as ``compress --int8 static``
    ships it, the nodes profiled slower in int8 at those batch sizes left float32
    (:func:`quantize_where_faster`): the file that ships, where every-node int8 can be slower."""
    from .onnx import onnx_bytes

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = onnx_bytes(module, example, allow_traced_branches=True)
    if int8 is None:
        return graph
    config = QuantizeConfig(mode=int8, calibration_samples=8, calibration_batch=8)
    with tempfile.TemporaryDirectory(prefix="rankshrink-timing-") as work:
        source = Path(work) / "float.onnx"
        source.write_bytes(graph)
        calibration = example if calibration is None else calibration
        if where_faster and int8 == "static":
            choice = quantize_where_faster(source, Path(work) / "int8.onnx", example_input=example,
                                           calibration=calibration, config=config, batches=where_faster,
                                           threads=threads)
            return choice.path.read_bytes()
        return quantize_onnx(source, Path(work) / "int8.onnx", config=config, calibration=calibration).read_bytes()


# --------------------------------------------------------------------------- int8 only where it is faster

# Operators whose int8 kernels are compared with their float32 ones node by node.
_COMPUTE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
# A node stays float32 when its int8 kernel takes this much longer than its float32 one (mean over the batch
# sizes): leaving a node out of an int8 chain adds a DequantizeLinear/QuantizeLinear pair around it.
SLOWER_MARGIN = 1.15
# Profiling: each graph runs at least this long per batch size (ONNX Runtime reports whole microseconds).
_PROFILE_MS = 150.0
_PROFILE_RUNS = (20, 400)  # at least, at most


@dataclass
class Int8Choice:
    """What :func:`quantize_where_faster` shipped: ``path``; ``float_nodes``, the nodes left in float32 (empty:
    every node quantized); ``ratio``, its latency over every-node int8 at each batch size (measured side by side;
    None when there was nothing to compare); ``node_us``: per compared node, float32 and int8 microseconds;
    ``reused``: the float32 nodes were decided earlier in this process for a graph of the same structure
    (nothing profiled, ``ratio`` None and ``node_us`` empty)."""

    path: Path
    float_nodes: list[str]
    ratio: dict[int, float] | None
    node_us: dict[str, dict[str, dict[int, float]]]
    reused: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"float_nodes": list(self.float_nodes), "reused": self.reused,
                "ratio_to_all_int8": None if self.ratio is None else {str(b): r for b, r in self.ratio.items()},
                "node_us": {n: {k: {str(b): t for b, t in v.items()} for k, v in d.items()}
                            for n, d in self.node_us.items()}}


# The float32 nodes decided per graph structure (weights aside) and settings, in this process. Profiling is
# noisy, so deciding again for the file that ships can give another graph than the one a search measured. A
# CIFAR CNN plan the int8-aware search timed at 0.80x its int8 original was profiled again when shipped,
# left 6 nodes float32 and ran 1.29x. With the choice kept, the file that ships is the graph that was measured.
_FLOAT_NODE_DECISIONS: OrderedDict[str, list[str]] = OrderedDict()
_DECISIONS_KEPT = 512


def _without_values(tensor) -> None:
    """Keep a TensorProto's name, type and shape; drop its values (they do not change the time)."""
    for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data",
                  "string_data"):
        tensor.ClearField(field)


def _decision_key(prepared: Path, config: QuantizeConfig, batches: tuple[int, ...], threads: int) -> str:
    """A fingerprint of ``prepared``'s structure (nodes, names, attributes, shapes; no weight values) and of
    what the float32 decision depends on."""
    import onnx

    model = onnx.load(str(prepared), load_external_data=False)
    for tensor in model.graph.initializer:
        _without_values(tensor)
    for node in model.graph.node:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                _without_values(attribute.t)
    digest = hashlib.sha256(model.SerializeToString(deterministic=True))
    digest.update(json.dumps({"per_channel": config.per_channel, "activations": config.activations,
                              "op_types": config.op_types, "exclude": sorted(config.exclude_nodes),
                              "preprocess": config.preprocess, "batches": list(batches), "threads": threads,
                              "runtime": require_onnxruntime().__version__}, sort_keys=True).encode())
    return digest.hexdigest()


def _remember_decision(key: str, float_nodes: list[str]) -> None:
    _FLOAT_NODE_DECISIONS[key] = list(float_nodes)
    _FLOAT_NODE_DECISIONS.move_to_end(key)
    while len(_FLOAT_NODE_DECISIONS) > _DECISIONS_KEPT:
        _FLOAT_NODE_DECISIONS.popitem(last=False)


def _compute_node_of(event: str, nodes: dict[str, Any], producers: dict[str, Any]) -> str | None:
    """The compute node (Conv/Gemm/MatMul) of the pre-processed graph an ONNX Runtime profile event belongs to.

    ONNX Runtime renames what it fuses: an int8 QLinearConv is the Conv's name plus ``_token_N``; a float32
    NCHWc Conv (with its fused activation or sum) is named after its output tensor plus ``_nchwc``, which may be
    the activation's output: the producers are walked back to the compute node.
    """
    name = re.sub(r"_token_\d+$", "", event)
    node = nodes.get(name)
    if node is None:
        node = producers.get(re.sub(r"_nchwc$", "", name))
    for _ in range(4):
        if node is None or node.op_type in _COMPUTE_OPS:
            break
        sources = [producers.get(i) for i in node.input]
        computed = [n for n in sources if n is not None and n.op_type in _COMPUTE_OPS]
        node = computed[0] if computed else next((n for n in sources if n is not None), None)
    return node.name if node is not None and node.op_type in _COMPUTE_OPS else None


def _node_microseconds(ort, path: Path, feed: dict[str, np.ndarray], threads: int, work: str,
                       nodes: dict[str, Any], producers: dict[str, Any]) -> dict[str, float]:
    """Mean microseconds per run of each compute node of ``path``'s graph, from ONNX Runtime's profiler."""
    session = ort_session(ort, path.read_bytes(), threads, profile_prefix=str(Path(work) / f"profile-{path.stem}"))
    start = time.perf_counter()
    for _ in range(3):
        session.run(None, feed)
    each_ms = (time.perf_counter() - start) * 1000.0 / 3
    runs = int(min(max(_PROFILE_MS / max(each_ms, 1e-3), _PROFILE_RUNS[0]), _PROFILE_RUNS[1]))
    for _ in range(runs):
        session.run(None, feed)
    profile = Path(session.end_profiling())
    events = json.loads(profile.read_text())
    profile.unlink()
    totals: dict[str, float] = {}
    for event in events:
        if event.get("cat") != "Node" or not str(event.get("name", "")).endswith("_kernel_time"):
            continue
        node = _compute_node_of(event["name"][:-len("_kernel_time")], nodes, producers)
        if node is not None:
            totals[node] = totals.get(node, 0.0) + float(event["dur"])
    calls = runs + 3  # the warm-up runs are profiled too
    return {node: total / calls for node, total in totals.items()}


def quantize_where_faster(model: str | os.PathLike, output: str | os.PathLike, *, example_input: Any,
                          calibration: Dataset | torch.Tensor | None = None, config: QuantizeConfig | None = None,
                          batches: tuple[int, ...] = (1, 32), threads: int = 1) -> Int8Choice:
    """Static int8 of ``model`` into ``output``, leaving in float32 the nodes whose int8 kernel measures slower.

    Every node is quantized first; ONNX Runtime's profiler then times each Conv/Gemm/MatMul of the float32 and
    the int8 graph at each batch size (inputs: ``example_input``'s first sample repeated); nodes whose int8
    kernel is more than ``SLOWER_MARGIN`` times slower on average stay float32 in a second quantization, and
    that file replaces the first only if it measures faster on average, the two timed side by side; a graph of
    the same structure and settings seen before in this process gets the same decision, unprofiled (so the
    file that ships is the graph a search measured; see ``_FLOAT_NODE_DECISIONS``). Measured
    on ResNet-8 with factorized layers, batch 1: int8 QLinearConv of the 3-channel stem took 30 µs against
    12 µs in float32, and the depthwise convolutions of CP factors 2-3x longer. The 'dynamic' mode quantizes
    every node (:func:`quantize_onnx`).
    """
    config = _with_mode(config, "static")
    source, target = _checked_paths(model, output, config, calibration)
    quantization = _require_quantization()
    input_names = onnx_input_names(source)
    with tempfile.TemporaryDirectory(prefix="rankshrink-int8-") as work:
        prepared = _prepared(quantization, source, work, config)
        key = _decision_key(prepared, config, batches, threads)
        reused = key in _FLOAT_NODE_DECISIONS
        if reused:
            float_nodes = _FLOAT_NODE_DECISIONS[key]
            chosen = _quantized(quantization, prepared, Path(work) / "int8.onnx", source, input_names, calibration,
                                _excluding(config, float_nodes))
            ratio, compared = None, {}
        else:
            chosen, float_nodes, ratio, compared = _profiled_choice(
                quantization, prepared, source, input_names, calibration, config, work,
                sample=first_sample(example_input), batches=batches, threads=threads)
        _remember_decision(key, float_nodes)  # and, when reused, kept as the most recently used
        with atomic_path(target) as tmp:
            tmp.write_bytes(chosen.read_bytes())
    return Int8Choice(target, list(float_nodes), ratio, compared, reused=reused)


def _excluding(config: QuantizeConfig, nodes: list[str]) -> QuantizeConfig:
    """``config`` that also leaves ``nodes`` in float32."""
    return QuantizeConfig(**{**asdict(config), "exclude_nodes": tuple(sorted(set(config.exclude_nodes) | set(nodes)))})


def _profiled_choice(quantization, prepared: Path, source: Path, input_names: list[str], calibration: Any,
                     config: QuantizeConfig, work: str, *, sample: Any, batches: tuple[int, ...], threads: int):
    """:func:`quantize_where_faster`'s profiling and decision: (the chosen int8 file in ``work``, the nodes it
    leaves float32, its latency ratio to every-node int8 or None, the per-node microseconds compared)."""
    import onnx

    ort = require_onnxruntime()
    everything = _quantized(quantization, prepared, Path(work) / "all.int8.onnx", source, input_names,
                            calibration, config)
    graph = onnx.load(str(prepared), load_external_data=False).graph
    nodes = {node.name: node for node in graph.node if node.name}
    producers = {out: node for node in graph.node for out in node.output}
    node_us: dict[str, dict[str, dict[int, float]]] = {}
    for batch in batches:
        feed = graph_feed(input_names, repeat_to_batch(sample, batch))
        for kind, path in (("float32", prepared), ("int8", everything)):
            for node, us in _node_microseconds(ort, path, feed, threads, work, nodes, producers).items():
                node_us.setdefault(node, {}).setdefault(kind, {})[batch] = us
    compared = {n: d for n, d in node_us.items()
                if all(b in d.get("float32", {}) and b in d.get("int8", {}) for b in batches)}
    slower = sorted(n for n, d in compared.items()
                    if sum(d["int8"][b] / max(d["float32"][b], 1e-3) for b in batches) / len(batches)
                    > SLOWER_MARGIN)
    if not slower:
        return everything, [], None, compared
    selective = _quantized(quantization, prepared, Path(work) / "selective.int8.onnx", source, input_names,
                           calibration, _excluding(config, slower))
    sessions = [ort_session(ort, p.read_bytes(), threads) for p in (everything, selective)]
    ratio = {}
    for batch in batches:
        feed = graph_feed(input_names, repeat_to_batch(sample, batch))
        both = time_sessions(sessions, [feed, feed], runs=30, min_ms=100.0)
        ratio[batch] = both[1].fastest_ms / both[0].fastest_ms  # fastest calls, as plans are compared
    if sum(ratio.values()) < len(ratio):
        return selective, slower, ratio, compared
    return everything, [], ratio, compared


# --------------------------------------------------------------------------- measuring files

@dataclass
class OnnxMeasurement:
    """One ONNX file: size, metric on ONNX Runtime, latency per batch size (interleaved with the others)."""

    name: str
    path: str
    bytes: int
    metric: float | None
    metric_name: str
    latency: dict[int, Latency]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "path": self.path, "bytes": self.bytes, "metric": self.metric,
                "metric_name": self.metric_name, "latency": {str(b): asdict(v) for b, v in self.latency.items()}}


def onnx_accuracy(session, dataset: Dataset, *, batch_size: int = 256) -> float:
    """Top-1 accuracy of an ONNX Runtime session's first output (batch, classes) over ``dataset``
    (inputs of any form)."""
    names = [i.name for i in session.get_inputs()]
    correct = total = 0
    for inputs, labels in iterate_batches(dataset, batch_size):
        if labels is None:
            raise DataError("accuracy on ONNX Runtime needs labelled data; this data set has no labels.")
        logits = session.run(None, graph_feed(names, inputs))[0]
        if logits.ndim != 2 or logits.shape[0] != len(labels):
            raise DataError(f"the ONNX model returned outputs of shape {logits.shape} for a batch of {len(labels)}; "
                            "accuracy needs (batch, classes) logits.")
        correct += int((logits.argmax(axis=1) == labels.numpy()).sum())
        total += len(labels)
    if total == 0:
        raise DataError("cannot measure a metric on an empty data set.")
    return correct / total


def measure_onnx_files(files: Mapping[str, str | os.PathLike], data: Dataset | None = None, *,
                       example_input: Any = None, batches: tuple[int, ...] = (1, 32),
                       threads: int = 1, runs: int = 30, warmup: int = 5, min_ms: float = 50.0,
                       metric: Callable[[Any, Dataset], float] | None = None,
                       metric_name: str = "accuracy", rounds: int = 1) -> dict[str, OnnxMeasurement]:
    """Bytes, metric and latency of each ONNX file (``name -> path``), measured side by side.

    ``metric(session, data) -> float`` defaults to :func:`onnx_accuracy`; without ``data``
    no metric is computed. Latency inputs repeat ``example_input``'s first sample (default:
    the data's first input) to each batch size; all files are timed interleaved, in ``rounds``
    separate runs whose medians' median is kept (runs: all of them).
    """
    if not files:
        raise ConfigError("measure_onnx_files needs at least one ONNX file.")
    for batch in batches:
        check_int(batch, "batch size", minimum=1)
    check_int(threads, "threads", minimum=1)
    check_int(rounds, "rounds", minimum=1)
    if example_input is None:
        if data is None:
            raise ConfigError("pass data= or example_input= so the models can be timed.")
        example_input = next(iterate_batches(data, 1))[0]
    sample = first_sample(example_input)
    ort = require_onnxruntime()
    names = list(files)
    paths = {name: Path(files[name]) for name in names}
    for name, path in paths.items():
        if not path.is_file():
            raise FileFormatError(f"ONNX file '{path}' ({name}) does not exist.")
    sessions = [ort_session(ort, paths[name].read_bytes(), threads) for name in names]
    metric_fn = metric or (lambda session, dataset: onnx_accuracy(session, dataset))
    metrics = {name: (metric_fn(session, data) if data is not None else None) for name, session in zip(names, sessions)}
    feeds = {batch: [graph_feed([i.name for i in session.get_inputs()], repeat_to_batch(sample, batch))
                     for session in sessions] for batch in batches}
    latency = dict(zip(names, time_rounds(sessions, feeds, rounds=rounds, runs=runs, warmup=warmup, min_ms=min_ms)))
    return {name: OnnxMeasurement(name, str(paths[name]), paths[name].stat().st_size, metrics[name],
                                  metric_name if data is not None else "", latency[name]) for name in names}
