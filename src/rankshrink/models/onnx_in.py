"""ONNX in: an ONNX file converted to a torch model (through onnx2torch, an optional dependency).

* Weights stored as ``Constant`` nodes (common in graphs exported from other frameworks) are
  moved into initializers first: onnx2torch builds ``nn.Conv2d`` / ``nn.Linear`` layers, which
  rankshrink can factorize, only from initializer weights.
* Operators that onnx2torch cannot convert are listed by name, on one line, before anything runs.
* The input file is only read.

The converted model is a ``torch.fx.GraphModule`` whose layers are named after the ONNX
nodes (dots become slashes, as onnx2torch does), e.g. ``features/0/Conv``.
"""

from __future__ import annotations

import contextlib
import os
import sys
import types
from pathlib import Path
from typing import Any, Iterator

from torch import nn

from ..errors import ConfigError, FileFormatError
from ._scoped import scoped_items

__all__ = ["load_onnx_model", "constants_to_initializers", "unsupported_ops", "require_onnx2torch"]

# Not the ``onnx-in`` extra: onnx2torch requires torchvision, and pip, resolving it, replaced a CPU torch
# 2.13 with a CUDA torch 2.14 and torchvision 0.29 here (``pip install --dry-run``). Its other
# requirements (numpy, onnx, torch) are rankshrink's own.
_INSTALL_HINT = "pip install --no-deps 'onnx2torch>=1.5' (--no-deps: with its dependencies pip also installs " \
    "torchvision and, with it, another torch build)"


@contextlib.contextmanager
def _torchvision_stand_in() -> Iterator[None]:
    """Let onnx2torch import where torchvision is absent or does not load.

    onnx2torch imports torchvision at import time for two converters only (NonMaxSuppression
    and RoiAlign); a CPU-only torch often has no matching torchvision. While onnx2torch is
    imported, a stand-in module whose functions raise a clear error takes its place; it is
    removed from ``sys.modules`` afterwards, so other code never sees it.
    """
    try:
        import torchvision  # noqa: F401
        yield
        return
    except Exception:  # ImportError, or a torchvision built for another torch (RuntimeError)
        pass

    def unavailable(*_args: Any, **_kwargs: Any) -> Any:
        raise ConfigError("this ONNX model uses NonMaxSuppression or RoiAlign, whose conversion needs "
                          "torchvision: pip install torchvision (built for your torch).")

    package, ops = types.ModuleType("torchvision"), types.ModuleType("torchvision.ops")
    for name in ("nms", "box_convert", "roi_align", "batched_nms"):
        setattr(ops, name, unavailable)
    package.ops = ops  # type: ignore[attr-defined]
    with scoped_items(sys.modules, {"torchvision": package, "torchvision.ops": ops}):
        yield


def require_onnx2torch():
    """The onnx2torch package, or a one-line install hint."""
    try:
        import onnx  # noqa: F401
    except ImportError:
        raise ConfigError(f"reading ONNX models needs the 'onnx' and 'onnx2torch' packages: {_INSTALL_HINT}.") from None
    with _torchvision_stand_in():
        try:
            import onnx2torch
        except ImportError as exc:
            raise ConfigError(f"reading ONNX models needs onnx2torch ({exc}): {_INSTALL_HINT}.") from None
    return onnx2torch


def constants_to_initializers(model) -> int:
    """Move the tensors of the main graph's ``Constant`` nodes into initializers (in place);
    returns how many were moved. Constants inside subgraphs (If/Loop bodies) stay."""
    from onnx import helper, numpy_helper

    graph = model.graph
    kept, moved = [], 0
    for node in graph.node:
        if node.op_type != "Constant" or node.domain not in ("", "ai.onnx") or len(node.output) != 1:
            kept.append(node)
            continue
        tensor = _constant_tensor(node, helper, numpy_helper)
        if tensor is None:
            kept.append(node)  # a sparse or string constant: leave it to the converter
            continue
        tensor.name = node.output[0]
        graph.initializer.append(tensor)
        moved += 1
    if moved:
        del graph.node[:]
        graph.node.extend(kept)
    return moved


def _constant_tensor(node, helper, numpy_helper):
    import numpy as np

    attributes = {a.name: a for a in node.attribute}
    if "value" in attributes:
        tensor = type(attributes["value"].t)()
        tensor.CopyFrom(attributes["value"].t)
        return tensor
    scalars = {"value_float": (lambda a: np.array(a.f, dtype=np.float32)),
               "value_floats": (lambda a: np.array(list(a.floats), dtype=np.float32)),
               "value_int": (lambda a: np.array(a.i, dtype=np.int64)),
               "value_ints": (lambda a: np.array(list(a.ints), dtype=np.int64))}
    for name, make in scalars.items():
        if name in attributes:
            return numpy_helper.from_array(make(attributes[name]), name=node.output[0])
    return None


def _opset_versions(model) -> dict[str, int]:
    return {("" if entry.domain == "ai.onnx" else entry.domain): entry.version for entry in model.opset_import}


def unsupported_ops(model) -> list[str]:
    """The main graph's operators onnx2torch has no converter for, as 'Op' (or 'domain::Op') at the
    model's opset, each once, in graph order."""
    require_onnx2torch()
    from onnx2torch.node_converters.registry import get_converter

    versions = _opset_versions(model)
    missing: list[str] = []
    for node in model.graph.node:
        domain = "" if node.domain == "ai.onnx" else node.domain
        label = f"{domain}::{node.op_type}" if domain else node.op_type
        if label in missing:
            continue
        version = versions.get(domain)
        if version is None:
            missing.append(f"{label} (no opset imported for domain '{domain}')")
            continue
        try:
            get_converter(operation_type=node.op_type, version=version, domain=domain)
        except NotImplementedError:
            missing.append(label)
    return missing


def load_onnx_model(path: str | os.PathLike) -> nn.Module:
    """The torch model (eval mode) of the ONNX file ``path``.

    Weights held in ``Constant`` nodes become initializers first (on a copy in memory; the
    file is only read). Operators onnx2torch cannot convert are refused in one message that
    lists them.
    """
    require_onnx2torch()
    import onnx
    from onnx2torch import convert

    path = Path(path).expanduser()
    if not path.is_file():
        raise FileFormatError(f"ONNX model '{path}' does not exist.")
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # onnx raises DecodeError, OSError, ...
        raise FileFormatError(f"'{path}' is not a readable ONNX model ({type(exc).__name__}: {exc}).") from None
    try:
        onnx.checker.check_model(model)
    except Exception as exc:  # ValidationError and friends
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FileFormatError(f"ONNX model '{path}' is not valid: {first}") from None
    constants_to_initializers(model)
    missing = unsupported_ops(model)
    if missing:
        raise FileFormatError(f"ONNX model '{path}' uses operators that cannot be converted to torch: "
                              f"{', '.join(missing)}; export the model without them or with a newer onnx2torch.")
    try:
        converted = convert(model)
    except ConfigError:
        raise
    except Exception as exc:  # a converter refusing an attribute combination, shape inference, ...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FileFormatError(f"converting ONNX model '{path}' to torch failed: "
                              f"{type(exc).__name__}: {first}") from None
    return converted.eval()
