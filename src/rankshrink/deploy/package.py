"""What ``rankshrink compress`` ships: ``model.onnx`` verified on real inputs, ``model.int8.onnx`` on top, and
the rows that say what each variant costs on ONNX Runtime.

* :func:`export_verified` -- the graph of a model (:func:`~rankshrink.deploy.onnx.onnx_bytes`), checked
  against PyTorch on a held-out batch of real inputs (:func:`~rankshrink.deploy.onnx.verify_onnx`);
* :func:`shipped_bytes` -- the size of the file that would be shipped (int8 included), for byte budgets
  that count files (``SearchConfig.file_bytes``);
* :func:`write_deployment` -- writes ``model.onnx`` (and ``model.int8.onnx``) into an output set's
  staging directory and measures the original, low-rank, int8 and low-rank+int8 variants side by
  side (file bytes, accuracy on ONNX Runtime, latency per batch size): ``summary.json``'s
  ``latency_ms`` and ``deployment``.
"""

from __future__ import annotations

import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from torch import nn

from ..factorized import Factorized
from ..files import atomic_path
from ..validation import check_bool, check_int
from .onnx import onnx_bytes, verify_onnx

__all__ = ["ExportConfig", "export_verified", "shipped_bytes", "write_deployment", "int8_advice", "remeasured_advice",
           "ONNX_FILE", "INT8_FILE"]

ONNX_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"
MEASURE_ROUNDS = 3  # the rows are medians of 3 interleaved runs, as the search measures plans


@dataclass(frozen=True, kw_only=True)
class ExportConfig:
    """How the shipped files are made and measured: ``dynamic_axes`` beyond the batch (``{"input_ids": (1,)}``),
    ``allow_traced_branches`` (tracer warnings about data-dependent control flow are errors otherwise),
    ``int8`` (None, 'dynamic' or 'static'; static leaves in float32 the nodes whose int8 kernel measures slower,
    unless ``int8_everywhere``), the latency ``batches`` and ONNX Runtime ``threads``, the opset."""

    dynamic_axes: Mapping[str, tuple[int, ...]] | None = None
    allow_traced_branches: bool = False
    int8: str | None = None
    int8_everywhere: bool = False
    batches: tuple[int, ...] = (1, 32)
    threads: int = 1
    opset: int = 17
    runs: int = 30
    min_ms: float = 50.0

    def __post_init__(self) -> None:
        from .quantize import INT8_MODES

        check_bool(self.allow_traced_branches, "allow_traced_branches")
        check_bool(self.int8_everywhere, "int8_everywhere")
        if self.int8 is not None and self.int8 not in INT8_MODES:
            from ..errors import ConfigError

            raise ConfigError(f"int8 must be None or one of {', '.join(INT8_MODES)}, got {self.int8!r}.")
        check_int(self.threads, "threads", minimum=1)
        for batch in self.batches:
            check_int(batch, "batch size", minimum=1)


def export_verified(model: nn.Module, example_input: Any, verify_inputs: Any, config: ExportConfig) -> bytes:
    """``model``'s ONNX graph, verified against PyTorch on ``verify_inputs`` (real, held out) at several batch
    sizes and dynamic-axis lengths; :class:`~rankshrink.deploy.onnx.ExportError` says what is wrong."""
    data = onnx_bytes(model, example_input, opset=config.opset, dynamic_axes=config.dynamic_axes,
                      allow_traced_branches=config.allow_traced_branches)
    verify_onnx(model, data, verify_inputs, dynamic_axes=config.dynamic_axes, threads=config.threads)
    return data


def shipped_bytes(model: nn.Module, example_input: Any, config: ExportConfig, *, calibration: Any = None) -> int:
    """The size in bytes of the file that would be shipped for ``model``: its ONNX graph, or with ``config.int8``
    the quantized one (static: calibrated on ``calibration``). Not verified: this sizes plans during a search."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data = onnx_bytes(model, example_input, opset=config.opset, dynamic_axes=config.dynamic_axes,
                          allow_traced_branches=True)
        if config.int8 is None:
            return len(data)
        from .quantize import QuantizeConfig, quantize_onnx

        with tempfile.TemporaryDirectory(prefix="rankshrink-size-") as work:
            source = Path(work) / ONNX_FILE
            source.write_bytes(data)
            target = quantize_onnx(source, Path(work) / INT8_FILE, calibration=calibration,
                                   config=QuantizeConfig(mode=config.int8, calibration_samples=64))
            return target.stat().st_size


def int8_advice(low_rank, int8, batches: tuple[int, ...]) -> str | None:
    """One line when the int8 file is slower or bigger than the float32 one it was made from (else None): on
    small factorized layers int8 kernels can lose to float32 ones (``benchmarks/results/latency.md``). Fastest
    calls are compared, as the search compares plans."""
    slower = [b for b in batches if int8.latency[b].fastest_ms > low_rank.latency[b].fastest_ms]
    bigger = int8.bytes > low_rank.bytes
    if not slower and not bigger:
        return None
    what = []
    if slower:
        what.append("slower than model.onnx at batch " + ", ".join(
            f"{b} ({int8.latency[b].fastest_ms:.4g} vs {low_rank.latency[b].fastest_ms:.4g} ms)" for b in slower))
    if bigger:
        what.append(f"bigger ({int8.bytes:,} vs {low_rank.bytes:,} bytes)")
    return (f"{INT8_FILE} is {' and '.join(what)}; ship {ONNX_FILE} where that matters"
            + (", or try --int8-everywhere" if bigger else "") + ".")


def remeasured_advice(original, low_rank, batches: tuple[int, ...]) -> str | None:
    """One line when ``model.onnx``, timed again for summary.json, is not faster than the original at some batch
    size (else None), comparing fastest calls as the search does. The search only returns plans it measured
    faster; this is a later measurement, and at batch 1 a small model's ratio can move between the two (by
    medians, DS-CNN's 0.25x-MAC plan measured 0.86x in the search and 1.02x later; at batch 1 its fastest
    calls are steadier, see :class:`rankshrink.deploy.latency.Latency`): the user should know before shipping."""
    slower = [b for b in batches if low_rank.latency[b].fastest_ms >= original.latency[b].fastest_ms]
    if not slower:
        return None
    shown = ", ".join(f"{b} ({low_rank.latency[b].fastest_ms / original.latency[b].fastest_ms:.2f}x)"
                      for b in slower)
    return (f"{ONNX_FILE}, timed again for summary.json, was not faster than the original at batch {shown}, though "
            "the search measured it faster: timings on a busy machine move between measurements. Time both on the "
            "device (rankshrink export --compressed), or ask for a margin with --max-latency.")


def write_deployment(stage: str | Path, original: nn.Module, compressed: nn.Module, example_input: Any,
                     verify_inputs: Any, config: ExportConfig, *, calibration: Any = None, data: Any = None,
                     original_onnx: bytes | None = None) -> dict[str, Any]:
    """Write ``model.onnx`` (``compressed``, verified) and with ``config.int8`` ``model.int8.onnx`` into
    ``stage``; measure them with the original's (``original_onnx``, or exported now) side by side.

    Returns what summary.json records: ``latency_ms`` (original and compressed: median, p90, fastest call, runs,
    threads per batch size), ``deployment`` (one row per variant: file_bytes, accuracy on ONNX Runtime over ``data`` --
    None without labelled data -- and latency per batch size) and ``export`` (the file names, the verification).
    """
    from ..errors import DataError
    from .quantize import QuantizeConfig, measure_onnx_files, quantize_onnx, quantize_where_faster

    stage = Path(stage)
    graph = onnx_bytes(compressed, example_input, opset=config.opset, dynamic_axes=config.dynamic_axes,
                       allow_traced_branches=config.allow_traced_branches)
    verification = verify_onnx(compressed, graph, verify_inputs, dynamic_axes=config.dynamic_axes,
                               threads=config.threads)
    with atomic_path(stage / ONNX_FILE) as tmp:
        tmp.write_bytes(graph)
    with tempfile.TemporaryDirectory(prefix="rankshrink-deploy-") as work:
        files = {"original": Path(work) / "original.onnx", "low-rank": stage / ONNX_FILE}
        if original_onnx is None:
            original_onnx = onnx_bytes(original, example_input, opset=config.opset, dynamic_axes=config.dynamic_axes,
                                       allow_traced_branches=config.allow_traced_branches)
        files["original"].write_bytes(original_onnx)
        float_nodes: dict[str, list[str]] = {}
        if config.int8 is not None:
            quantization = QuantizeConfig(mode=config.int8)
            # The int8 row is made exactly as the shipped low-rank+int8 file is, so the two compare fairly.
            for row, fp32, target in (("int8", files["original"], Path(work) / "original.int8.onnx"),
                                      ("low-rank+int8", stage / ONNX_FILE, stage / INT8_FILE)):
                if config.int8 == "static" and not config.int8_everywhere:
                    choice = quantize_where_faster(fp32, target, example_input=example_input, calibration=calibration,
                                                   config=quantization, batches=config.batches, threads=config.threads)
                    files[row], float_nodes[row] = choice.path, choice.float_nodes
                else:
                    files[row] = quantize_onnx(fp32, target, calibration=calibration, config=quantization)
        try:
            measured = measure_onnx_files(files, data, example_input=example_input, batches=config.batches,
                                          threads=config.threads, runs=config.runs, min_ms=config.min_ms,
                                          rounds=MEASURE_ROUNDS)
        except DataError:  # no labels: latency and size only
            measured = measure_onnx_files(files, None, example_input=example_input, batches=config.batches,
                                          threads=config.threads, runs=config.runs, min_ms=config.min_ms,
                                          rounds=MEASURE_ROUNDS)
    latency_ms = {side: {str(b): {"median": m.latency[b].median_ms, "p90": m.latency[b].p90_ms,
                                  "fastest": m.latency[b].fastest_ms, "runs": m.latency[b].runs,
                                  "threads": config.threads} for b in config.batches}
                  for side, m in (("original", measured["original"]), ("compressed", measured["low-rank"]))}
    deployment = [{"name": name, "file_bytes": m.bytes, "accuracy": m.metric,
                   "latency_ms": {str(b): m.latency[b].median_ms for b in config.batches},
                   "fastest_ms": {str(b): m.latency[b].fastest_ms for b in config.batches}}
                  for name, m in measured.items()]
    if config.int8 is not None:
        advice = int8_advice(measured["low-rank"], measured["low-rank+int8"], config.batches)
    factorized = any(isinstance(m, Factorized) for m in compressed.modules())
    export = {"file": ONNX_FILE, "int8_file": INT8_FILE if config.int8 else None, "int8": config.int8,
              "int8_advice": advice if config.int8 is not None else None,
              "remeasured_advice": (remeasured_advice(measured["original"], measured["low-rank"], config.batches)
                                    if factorized else None),
              "int8_float_nodes": float_nodes.get("low-rank+int8") if config.int8 else None,
              "opset": config.opset, "dynamic_axes": {k: list(v) for k, v in (config.dynamic_axes or {}).items()},
              "verified": verification.to_dict()}
    return {"latency_ms": latency_ms, "deployment": deployment, "export": export}
