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

import os
import tempfile
import warnings
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
from .latency import Latency, first_sample, repeat_to_batch, time_sessions
from .onnx import ExportError, ort_session, require_onnxruntime

__all__ = ["INT8_MODES", "ACTIVATION_TYPES", "QuantizeConfig", "quantize_onnx", "onnx_input_name",
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
    for 'static', MatMul and Gemm for 'dynamic')."""

    mode: str = "dynamic"
    per_channel: bool = True
    calibration_samples: int = 256
    calibration_batch: int = 32
    preprocess: bool = True
    activations: str = "uint8"
    op_types: tuple[str, ...] | None = None

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


def _calibration_batches(data: Dataset | torch.Tensor, samples: int, batch_size: int) -> Iterator[Any]:
    if isinstance(data, torch.Tensor):
        inputs = data[:samples]
        for start in range(0, len(inputs), batch_size):
            yield inputs[start:start + batch_size]
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


def quantize_onnx(model: str | os.PathLike, output: str | os.PathLike, *, mode: str | None = None,
                  calibration: Dataset | torch.Tensor | None = None,
                  config: QuantizeConfig | None = None) -> Path:
    """Quantize the ONNX file ``model`` to int8 and write it to ``output`` atomically.

    ``mode`` ('dynamic' or 'static') overrides ``config.mode``. 'static' needs
    ``calibration``: a data set of (input, label) pairs (e.g. ``splits.train``) or a tensor
    of inputs; the first ``config.calibration_samples`` are used.
    """
    config = config or QuantizeConfig()
    if mode is not None:
        config = QuantizeConfig(**{**asdict(config), "mode": mode})
    source, target = Path(model), Path(output)
    if not source.is_file():
        raise FileFormatError(f"ONNX model '{source}' does not exist.")
    if target.resolve() == source.resolve():
        raise ConfigError(f"the int8 output '{target}' is the input model; choose another file "
                          "(model.int8.onnx) so the input is not overwritten.")
    if config.mode == "static" and calibration is None:
        raise ConfigError("int8 mode 'static' calibrates activation ranges: pass calibration data "
                          "(calibration=splits.train), or use mode='dynamic'.")
    quantization = _require_quantization()
    input_names = onnx_input_names(source)
    with tempfile.TemporaryDirectory(prefix="rankshrink-int8-") as work:
        prepared = source
        if config.preprocess:
            candidate = Path(work) / "prepared.onnx"
            try:
                quantization.quant_pre_process(str(source), str(candidate), skip_symbolic_shape=False)
                prepared = candidate
            except Exception as exc:  # pre-processing is an optimisation: quantize the graph as it is
                warnings.warn(f"ONNX Runtime's quantization pre-processing failed on '{source}' "
                              f"({type(exc).__name__}: {exc}); quantizing without it.", RuntimeWarning, stacklevel=2)
        with atomic_path(target) as tmp:
            try:
                if config.mode == "dynamic":
                    quantization.quantize_dynamic(str(prepared), str(tmp), per_channel=config.per_channel,
                                                  op_types_to_quantize=list(config.op_types or _DYNAMIC_OPS),
                                                  weight_type=quantization.QuantType.QInt8)
                else:
                    assert calibration is not None
                    activation_type = (quantization.QuantType.QUInt8 if config.activations == "uint8"
                                       else quantization.QuantType.QInt8)
                    quantization.quantize_static(str(prepared), str(tmp),
                                                 _reader(quantization, input_names, calibration, config),
                                                 quant_format=quantization.QuantFormat.QDQ,
                                                 op_types_to_quantize=list(config.op_types) if config.op_types
                                                 else None,
                                                 per_channel=config.per_channel, activation_type=activation_type,
                                                 weight_type=quantization.QuantType.QInt8)
            except (ConfigError, DataError):
                raise
            except Exception as exc:  # ONNX Runtime's quantizer raises many types; report them as one
                raise ExportError(f"int8 {config.mode} quantization of '{source}' failed: {type(exc).__name__}: "
                                  f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
    return target


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
                       metric_name: str = "accuracy") -> dict[str, OnnxMeasurement]:
    """Bytes, metric and latency of each ONNX file (``name -> path``), measured side by side.

    ``metric(session, data) -> float`` defaults to :func:`onnx_accuracy`; without ``data``
    no metric is computed. Latency inputs repeat ``example_input``'s first sample (default:
    the data's first input) to each batch size; all files are timed interleaved.
    """
    if not files:
        raise ConfigError("measure_onnx_files needs at least one ONNX file.")
    for batch in batches:
        check_int(batch, "batch size", minimum=1)
    check_int(threads, "threads", minimum=1)
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
    latency: dict[str, dict[int, Latency]] = {name: {} for name in names}
    for batch in batches:
        feeds = [graph_feed([i.name for i in session.get_inputs()], repeat_to_batch(sample, batch))
                 for session in sessions]
        for name, measured in zip(names, time_sessions(sessions, feeds, runs=runs, warmup=warmup, min_ms=min_ms)):
            latency[name][batch] = measured
    return {name: OnnxMeasurement(name, str(paths[name]), paths[name].stat().st_size, metrics[name],
                                  metric_name if data is not None else "", latency[name]) for name in names}
