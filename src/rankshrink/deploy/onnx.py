"""ONNX export, checked against PyTorch on ONNX Runtime before anything is written."""

from __future__ import annotations

import copy
import inspect
import io
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import RankshrinkError
from ..files import atomic_path

__all__ = ["ExportError", "onnx_bytes", "export_onnx", "require_onnxruntime", "ort_session"]


class ExportError(RankshrinkError, RuntimeError):
    """ONNX export or ONNX Runtime is unavailable or failed."""


def require_onnxruntime():
    try:
        import onnx  # noqa: F401  (the exporter needs it; fail here with a clear message)
        import onnxruntime
    except ImportError:
        raise ExportError("ONNX export needs the 'onnx' and 'onnxruntime' packages: "
                          "pip install 'rankshrink[onnx]'.") from None
    return onnxruntime


def onnx_bytes(model: nn.Module, example_input: torch.Tensor, *, opset: int = 17,
               dynamic_batch: bool = True) -> bytes:
    """Serialise ``model`` (in eval mode, on a copy) to an ONNX graph."""
    require_onnxruntime()
    model = copy.deepcopy(model).eval()
    kwargs: dict[str, Any] = dict(input_names=["input"], output_names=["output"], opset_version=opset,
                                  do_constant_folding=True)
    if dynamic_batch:
        kwargs["dynamic_axes"] = {"input": {0: "batch"}, "output": {0: "batch"}}
    if "dynamo" in inspect.signature(torch.onnx.export).parameters:
        kwargs["dynamo"] = False  # the TorchScript exporter needs no extra packages and keeps names
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            # The TorchScript exporter writes to file objects too; torch annotates ``f`` as a path only.
            torch.onnx.export(model, (example_input,), buffer, **kwargs)  # type: ignore[arg-type]
        except Exception as exc:  # the exporter raises many types; report them as one
            raise ExportError(f"ONNX export of {type(model).__name__} failed: "
                              f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
    return buffer.getvalue()


def export_onnx(model: nn.Module, example_input: torch.Tensor, path: str | os.PathLike, *,
                opset: int = 17, check: bool = True) -> Path:
    """Write ``model`` as ONNX to ``path`` (atomically); with ``check`` verify its outputs
    against PyTorch on ``example_input`` with ONNX Runtime."""
    data = onnx_bytes(model, example_input, opset=opset)
    if check:
        ort = require_onnxruntime()
        session = ort_session(ort, data, threads=1)
        got = session.run(None, {"input": example_input.detach().cpu().numpy()})[0]
        with torch.no_grad():
            expected = copy.deepcopy(model).eval()(example_input).detach().cpu().numpy()
        scale = max(1.0, float(abs(expected).max()))
        if got.shape != expected.shape or float(abs(got - expected).max()) > 1e-3 * scale:
            raise ExportError("the ONNX graph's output differs from PyTorch's; not written.")
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return path




def ort_session(ort, data: bytes, threads: int):
    """An ONNX Runtime CPU session for a serialised graph, with ``threads`` intra-op threads."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
