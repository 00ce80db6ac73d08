"""Where models run: ``--device cpu|cuda|auto`` for calibration, evaluation and fine-tuning.

Every place that runs a model moves its inputs to the model's device (:func:`rankshrink.inputs.to_model`),
so choosing a device is choosing where the model lives. Input statistics are streamed in float64 on
that device and kept on the CPU; decompositions run on the CPU and their factors go to the model's
device.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .errors import ConfigError

__all__ = ["DEVICE_CHOICES", "resolve_device", "on_device"]

DEVICE_CHOICES = ("cpu", "cuda", "auto")


def resolve_device(name: str | torch.device | None) -> torch.device | None:
    """'cpu', 'cuda' (or 'cuda:N'), 'auto' (CUDA when available, else the CPU); None stays None."""
    if name is None or isinstance(name, torch.device):
        return name
    text = str(name).strip().lower()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if text == "cpu":
        return torch.device("cpu")
    if text == "cuda" or text.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {name}: no CUDA device is available to this torch "
                              f"({torch.__version__}); use --device cpu (or auto).")
        return torch.device(text)
    raise ConfigError(f"device must be one of {', '.join(DEVICE_CHOICES)}, got {name!r}.")


def on_device(model: nn.Module, device: str | torch.device | None) -> nn.Module:
    """``model`` itself when it is on ``device`` already (or ``device`` is None), else a copy moved there
    (the caller's model is never moved)."""
    target = resolve_device(device)
    if target is None:
        return model
    current = {t.device for t in (*model.parameters(), *model.buffers())}
    if current <= {target} or (target.type == "cuda" and target.index is None
                               and all(d.type == "cuda" for d in current) and current):
        return model
    return copy.deepcopy(model).to(target)
