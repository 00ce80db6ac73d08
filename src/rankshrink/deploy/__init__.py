"""Deployment: ONNX out, checked; latency on ONNX Runtime; never ship a factorization slower than dense.

* :mod:`.onnx` -- :func:`export` / :func:`export_onnx`: the graph, verified against PyTorch.
* :mod:`.latency` -- interleaved ONNX Runtime timing of whole models and of single layers,
  and :func:`drop_slower_layers`.
* :mod:`.latency_model` -- :class:`LatencyModel`: measured (and cached) times of factorized
  layers against dense, rank filtering and rounding, whole-model prediction and its check.
* :mod:`.quantize` -- :func:`quantize_onnx` (int8, dynamic or static QDQ) and
  :func:`measure_onnx_files` (bytes, metric on ONNX Runtime, latency, side by side).

The last two import onnxruntime only when used: ``from rankshrink.deploy.latency_model import ...``.
"""

from .latency import Latency, LayerSpeed, drop_slower_layers, layer_latencies, onnx_latency
from .onnx import ExportError, export_onnx, onnx_bytes

export = export_onnx

__all__ = ["export", "export_onnx", "onnx_bytes", "ExportError", "Latency", "LayerSpeed", "onnx_latency",
           "layer_latencies", "drop_slower_layers"]
