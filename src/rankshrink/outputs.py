"""What a model's output *is* for label-free comparisons: logits, a sentence embedding, or a tensor.

Classifiers return logits (a tensor, or a ``{"logits": ...}`` mapping / Hugging Face output);
encoders return hidden states (a Hugging Face ``last_hidden_state``). :func:`representation`
turns any of them into one tensor with a batch dimension, the thing the label-free metrics
(cosine, mse, kl), the search's distortion proxy, distillation and the reachability check compare:

* a tensor: itself;
* an output with ``logits``: the logits;
* an output with ``last_hidden_state`` (batch, tokens, hidden): its mean over the real tokens
  (the inputs' ``attention_mask``; every token without one) -- the sentence embedding of
  sentence-transformers' mean pooling, so padding never counts;
* a tuple/list: its first tensor.

:func:`output_kind` says which it was ('logits', 'hidden' or 'tensor').
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from .errors import DataError

__all__ = ["representation", "output_kind", "mean_pooled", "per_sample", "hidden_states"]


def _field(output: Any, name: str) -> Any:
    if isinstance(output, Mapping):
        return output.get(name)
    return getattr(output, name, None)


def output_kind(output: Any) -> str:
    """'logits' (a tensor or logits field), 'hidden' (a last_hidden_state) or 'tensor' (a tuple's first tensor)."""
    if isinstance(output, torch.Tensor) or isinstance(_field(output, "logits"), torch.Tensor):
        return "logits"
    if isinstance(_field(output, "last_hidden_state"), torch.Tensor):
        return "hidden"
    if isinstance(output, (tuple, list)) and any(isinstance(v, torch.Tensor) for v in output):
        return "tensor"
    raise DataError(f"the model returned {type(output).__name__}, which holds no tensor of logits, no "
                    "last_hidden_state and no tensor to compare.")


def mean_pooled(hidden: torch.Tensor, mask: Any = None) -> torch.Tensor:
    """Mean of ``hidden`` (batch, tokens, features) over the tokens where ``mask`` (batch, tokens) is non-zero."""
    if hidden.dim() < 3:
        return hidden
    if isinstance(mask, torch.Tensor) and tuple(mask.shape) == tuple(hidden.shape[:2]):
        weights = mask.to(device=hidden.device, dtype=hidden.dtype).unsqueeze(-1)
        return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)
    return hidden.mean(dim=1)


def representation(output: Any, inputs: Any = None) -> torch.Tensor:
    """The tensor label-free comparisons use (see the module notes); ``inputs`` supply the attention mask."""
    if isinstance(output, torch.Tensor):
        return output
    logits = _field(output, "logits")
    if isinstance(logits, torch.Tensor):
        return logits
    hidden = _field(output, "last_hidden_state")
    if isinstance(hidden, torch.Tensor):
        mask = inputs.get("attention_mask") if isinstance(inputs, Mapping) else None
        return mean_pooled(hidden, mask)
    if isinstance(output, (tuple, list)):
        for value in output:
            if isinstance(value, torch.Tensor):
                return value
    output_kind(output)  # raises the message
    raise AssertionError("unreachable")


def hidden_states(output: Any) -> torch.Tensor:
    """An encoder output's ``last_hidden_state`` (batch, tokens, features)."""
    hidden = _field(output, "last_hidden_state")
    if not isinstance(hidden, torch.Tensor):
        raise DataError(f"the model returned {type(output).__name__}, which has no last_hidden_state; the 'tokens' "
                        "distillation loss is for encoders (use 'cosine' or 'mse').")
    return hidden


def per_sample(tensor: torch.Tensor) -> torch.Tensor:
    """(batch, everything else flattened), in float64."""
    return tensor.reshape(tensor.shape[0], -1).to(torch.float64) if tensor.dim() else tensor.reshape(1, 1).double()
