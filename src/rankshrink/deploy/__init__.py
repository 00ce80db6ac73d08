"""Deployment: ONNX out, checked; latency on ONNX Runtime; never ship a factorization slower than dense.

* :mod:`.onnx` -- :func:`export` / :func:`export_onnx`: the graph, verified against PyTorch.
* :mod:`.latency` -- interleaved ONNX Runtime timing of whole models and of single layers,
  and :func:`drop_slower_layers`.
"""

from .latency import Latency, LayerSpeed, drop_slower_layers, layer_latencies, onnx_latency
from .onnx import ExportError, export_onnx, onnx_bytes

export = export_onnx

__all__ = ["export", "export_onnx", "onnx_bytes", "ExportError", "Latency", "LayerSpeed", "onnx_latency",
           "layer_latencies", "drop_slower_layers"]
