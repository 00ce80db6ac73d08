"""Loading what commands need from their arguments: the model, data, an example batch."""

from __future__ import annotations

import argparse
import math

import torch

from ..errors import ConfigError


def load_model(args: argparse.Namespace):
    from ..models import load_model_spec

    return load_model_spec(args.model, getattr(args, "weights", None),
                           trust_pickle=getattr(args, "trust_pickle", False),
                           progress=not getattr(args, "quiet", False))


def default_data_spec(model_spec: str) -> str | None:
    """The built-in model's own data set, or None for user models."""
    from ..models import BUILTIN_MODELS

    if model_spec.startswith("builtin:"):
        entry = BUILTIN_MODELS.get(model_spec[len("builtin:"):])
        return entry.default_data if entry else None
    return None


# The largest example input a command builds: 2^28 values (1 GiB as float32), checked before allocating.
MAX_INPUT_VALUES = 1 << 28


def parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(part) for part in text.replace("x", ",").split(",") if part.strip())
    except ValueError:
        shape = ()
    if not shape or any(d <= 0 for d in shape) or len(text) > 200:
        raise ConfigError(f"--input-shape must be positive integers like 1,28,28, got {text[:60]!r}.")
    values = math.prod(shape)
    if values > MAX_INPUT_VALUES:
        raise ConfigError(f"--input-shape {text} is {values:,} values per sample ({4 * values / 1e9:,.1f} GB as "
                          f"float32), more than the {MAX_INPUT_VALUES:,} rankshrink allocates for an example input; "
                          "pass the shape of one real sample, such as 3,224,224.")
    return shape


def example_batch(args: argparse.Namespace, model) -> torch.Tensor:
    """One example input (batch of 1) from --input-shape, --data, or the built-in's own data."""
    if getattr(args, "input_shape", None):
        dtype = next((p.dtype for p in model.parameters()), torch.float32)
        return torch.zeros(1, *parse_shape(args.input_shape), dtype=dtype)
    spec = getattr(args, "data", None) or default_data_spec(args.model)
    if spec is None:
        raise ConfigError("cannot tell the model's input shape: pass --data SPEC or --input-shape 1,28,28.")
    from ..data import load_data
    from ..metrics import to_model

    splits = load_data(spec)
    return to_model(splits.val.tensors[0][:1], model)  # a float16/bfloat16 model gets inputs of its dtype
