"""Loading weights into a model strictly, and refusing models with non-finite weights."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from ..errors import FileFormatError
from ..files import load_state_dict

__all__ = ["load_weights", "apply_state", "check_finite", "dtype_kind"]


def _shape(shape: torch.Size) -> tuple[int, ...]:
    return tuple(int(d) for d in shape)


def dtype_kind(dtype: torch.dtype) -> str:
    if dtype == torch.bool:
        return "boolean"
    if dtype.is_complex:
        return "complex"
    if dtype.is_floating_point:
        return "floating-point"
    return "integer"


def apply_state(model: nn.Module, state: Mapping[str, torch.Tensor], source: str | Path) -> nn.Module:
    """Load ``state`` strictly, naming the first mismatch and ``source`` when it does not fit."""
    expected = model.state_dict()
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]

    def more(items: list[str]) -> str:
        return f" (and {len(items) - 1} more)" if len(items) > 1 else ""

    if missing:
        raise FileFormatError(f"weights file '{source}' does not fit the model: it lacks key "
                              f"'{missing[0]}'{more(missing)}.")
    if unexpected:
        raise FileFormatError(f"weights file '{source}' does not fit the model: it has unexpected key "
                              f"'{unexpected[0]}'{more(unexpected)}.")
    for key, tensor in expected.items():
        if _shape(state[key].shape) != _shape(tensor.shape):
            raise FileFormatError(
                f"weights file '{source}' does not fit the model: '{key}' has shape "
                f"{_shape(state[key].shape)} in the file but {_shape(tensor.shape)} in the model."
            )
        if dtype_kind(state[key].dtype) != dtype_kind(tensor.dtype):
            # load_state_dict would cast silently: integers into floats, and drop imaginary parts
            raise FileFormatError(
                f"weights file '{source}': '{key}' holds {dtype_kind(state[key].dtype)} values ({state[key].dtype}) "
                f"but the model's '{key}' is {dtype_kind(tensor.dtype)} ({tensor.dtype}); rankshrink does not cast "
                "weights between kinds. Save the model's real weights (torch.save(model.state_dict(), ...)).")
    model.load_state_dict(state, strict=True)
    return model


def load_weights(model: nn.Module, weights: str | Path, *, trust_pickle: bool = False) -> nn.Module:
    """Load a state dict file (.safetensors, or .pt/.pth without pickle unless trusted) strictly."""
    return apply_state(model, load_state_dict(weights, trust_pickle=trust_pickle), weights)



def check_finite(model: nn.Module, source: str | None = None, *,
                 fix: str = "Fix or retrain that layer first.") -> None:
    """Refuse a model whose parameters have no values (the meta device), are not real floating point
    (integer, bool, complex), or hold NaN or Inf, naming the first such parameter and layer.

    ``source`` says where the weights came from (e.g. "weights file 'x.pt'"); ``fix`` what to do about
    non-finite values. Buffers are not checked (masks may hold -inf on purpose; counters are integers).
    """
    from ..errors import LayerError

    where = str(source) if source is not None else "the model"
    for name, param in model.named_parameters():
        layer, _, _ = name.rpartition(".")
        if param.device.type == "meta":
            raise LayerError(f"{where}: parameter '{name}' of layer '{layer or '(root)'}' is on the meta device "
                             "(it has a shape but no values); materialize the model (model.to_empty(device='cpu') "
                             "and load its weights) before passing it to rankshrink.")
        if not param.dtype.is_floating_point:
            raise LayerError(f"{where}: parameter '{name}' of layer '{layer or '(root)'}' is {dtype_kind(param.dtype)} "
                             f"({param.dtype}); rankshrink factorizes real floating-point weights only and does not "
                             "cast them. Convert the model (model.float()) only if those values are real weights.")
    for name, param in model.named_parameters():
        bad = int((~torch.isfinite(param.detach())).sum())
        if bad:
            layer, _, _ = name.rpartition(".")
            kind = type(model.get_submodule(layer)).__name__ if layer else type(model).__name__
            where = str(source) if source is not None else "the model"
            raise LayerError(f"{where}: parameter '{name}' of layer '{layer or '(root)'}' ({kind}) holds {bad} "
                             f"NaN/Inf value(s) of {param.numel()}; rankshrink refuses models with non-finite "
                             f"weights. {fix}")
