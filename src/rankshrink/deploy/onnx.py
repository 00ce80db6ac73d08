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

from .. import inputs as model_inputs
from ..errors import RankshrinkError
from ..files import atomic_path

__all__ = ["ExportError", "onnx_bytes", "export_onnx", "require_onnxruntime", "ort_session", "onnx_feed"]


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


class _Flat(nn.Module):
    """The model called with its inputs as flat positional tensors (how ONNX graphs take them)."""

    def __init__(self, model: nn.Module, template: Any):
        super().__init__()
        self.model = model
        self.template = template

    def forward(self, *tensors: torch.Tensor) -> Any:
        return model_inputs.call_model(self.model, model_inputs.rebuild(self.template, tensors))


def _output_names(model: nn.Module, example_input: Any) -> list[str]:
    with torch.no_grad():
        out = model_inputs.call_model(copy.deepcopy(model).eval(), example_input)
    count = len(model_inputs.leaves(out)) if not isinstance(out, torch.Tensor) else 1
    return ["output"] if count == 1 else [f"output_{i}" for i in range(count)]


def onnx_feed(example_input: Any) -> dict[str, Any]:
    """ONNX Runtime's feed for ``example_input``: every input tensor by its graph name."""
    return {name: tensor.detach().cpu().numpy() for name, tensor in model_inputs.leaves(example_input)}


def onnx_bytes(model: nn.Module, example_input: Any, *, opset: int = 17,
               dynamic_batch: bool = True) -> bytes:
    """Serialise ``model`` (in eval mode, on a copy) to an ONNX graph.

    ``example_input``: one batch -- a tensor (graph input ``input``), a tuple (``input_0``,
    ``input_1``, ...) or a dict (its keys); every input and output gets a dynamic batch axis.
    """
    require_onnxruntime()
    model = copy.deepcopy(model).eval()
    names = model_inputs.input_names(example_input)
    outputs = _output_names(model, example_input)
    kwargs: dict[str, Any] = dict(input_names=names, output_names=outputs, opset_version=opset,
                                  do_constant_folding=True)
    if dynamic_batch:
        kwargs["dynamic_axes"] = {name: {0: "batch"} for name in names + outputs}
    if "dynamo" in inspect.signature(torch.onnx.export).parameters:
        kwargs["dynamo"] = False  # the TorchScript exporter needs no extra packages and keeps names
    flat = _Flat(model, example_input)
    tensors = tuple(t for _, t in model_inputs.leaves(example_input))
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            # The TorchScript exporter writes to file objects too; torch annotates ``f`` as a path only.
            torch.onnx.export(flat, tensors, buffer, **kwargs)  # type: ignore[arg-type]
        except Exception as exc:  # the exporter raises many types; report them as one
            raise ExportError(f"ONNX export of {type(model).__name__} failed: "
                              f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
    return buffer.getvalue()


def export_onnx(model: nn.Module, example_input: Any, path: str | os.PathLike, *,
                opset: int = 17, check: bool = True) -> Path:
    """Write ``model`` as ONNX to ``path`` (atomically); with ``check`` verify its outputs
    against PyTorch on ``example_input`` (any input form) with ONNX Runtime."""
    data = onnx_bytes(model, example_input, opset=opset)
    if check:
        ort = require_onnxruntime()
        session = ort_session(ort, data, threads=1)
        got = session.run(None, onnx_feed(example_input))
        with torch.no_grad():
            out = model_inputs.call_model(copy.deepcopy(model).eval(), example_input)
        expected = [t.detach().cpu().numpy() for _, t in model_inputs.leaves(out)] if not isinstance(
            out, torch.Tensor) else [out.detach().cpu().numpy()]
        for g, e in zip(got, expected):
            scale = max(1.0, float(abs(e).max())) if e.size else 1.0
            if g.shape != e.shape or (e.size and float(abs(g - e).max()) > 1e-3 * scale):
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
