"""Loading weights into a model strictly, and refusing models with non-finite weights."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from ..errors import FileFormatError
from ..files import load_state_dict

__all__ = ["load_weights", "apply_state", "check_finite"]


def _shape(shape: torch.Size) -> tuple[int, ...]:
    return tuple(int(d) for d in shape)


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
    model.load_state_dict(state, strict=True)
    return model


def load_weights(model: nn.Module, weights: str | Path, *, trust_pickle: bool = False) -> nn.Module:
    """Load a state dict file (.safetensors, or .pt/.pth without pickle unless trusted) strictly."""
    return apply_state(model, load_state_dict(weights, trust_pickle=trust_pickle), weights)



def check_finite(model: nn.Module, source: str | None = None) -> None:
    """Refuse a model whose parameters hold NaN or Inf, naming the first such layer.

    ``source`` says where the weights came from (e.g. "weights file 'x.pt'").
    Buffers are not checked (masks may hold -inf on purpose).
    """
    from ..errors import LayerError

    for name, param in model.named_parameters():
        bad = int((~torch.isfinite(param.detach())).sum())
        if bad:
            layer, _, _ = name.rpartition(".")
            kind = type(model.get_submodule(layer)).__name__ if layer else type(model).__name__
            where = str(source) if source is not None else "the model"
            raise LayerError(f"{where}: parameter '{name}' of layer '{layer or '(root)'}' ({kind}) holds {bad} "
                             f"NaN/Inf value(s) of {param.numel()}; rankshrink refuses models with non-finite "
                             "weights. Fix or retrain that layer first.")
