"""Loading what commands need from their arguments: the model, data, an example batch."""

from __future__ import annotations

import argparse
import math
import re
from typing import Any

import torch

from ..errors import ConfigError

_DTYPES = {"float32": torch.float32, "float": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
           "float64": torch.float64, "int64": torch.int64, "long": torch.int64, "int32": torch.int32,
           "bool": torch.bool}


def add_data_arguments(parser: argparse.ArgumentParser, *, data_help: str | None = None,
                       input_shape_help: str | None = None) -> None:
    """``--data SPEC``, ``--split`` and ``--input-shape``, the same for every command."""
    parser.add_argument("--data", help=data_help or "data SPEC: builtin:digits, mnist:DIR, cifar10:DIR, "
                        "synthetic:cifar, PATH.npz / .safetensors / .pt (x, y, optional train/val/test indices), "
                        "file.py:function, imagefolder:DIR, text:FILE (one sample per line, tokenized by the "
                        "hf:DIR model's tokenizer); default: a built-in model's own data")
    parser.add_argument("--max-length", type=int, default=None, metavar="TOKENS",
                        help="text:FILE data: the most tokens per line (default 128)")
    parser.add_argument("--split", default=None, metavar="TRAIN,VAL,TEST",
                        help="fractions for data without a split of its own (.npz/.safetensors/.pt without "
                             "train/val/test indices, image folders): default 0.8,0.1,0.1, stratified, seeded")
    parser.add_argument("--input-shape", help=input_shape_help or "per-sample input shape, e.g. 1,28,28 (instead of "
                        "--data); several inputs as 'image=1,8,8 side=4' (keyword) or '1,8,8;4' (positional), "
                        "an integer input as 'ids=16:int64'; for imagefolder: the C,H,W images are resized to")


def load_data_from_args(args: argparse.Namespace, spec: str | None = None):
    """The Splits ``--data`` (or ``spec``) names, split by ``--split``, images resized to ``--input-shape``."""
    from ..data import load_data

    spec = spec or getattr(args, "data", None)
    shape = getattr(args, "input_shape", None)
    image_shape = None
    if shape and spec and spec.strip().lower().startswith("imagefolder:"):
        parsed = parse_shape(shape)
        if not isinstance(parsed, tuple) or not all(isinstance(d, int) for d in parsed):
            raise ConfigError(f"--input-shape for an image folder is C,H,W, got {shape!r}.")
        image_shape = parsed
    tokenizer = None
    if spec and spec.strip().lower().startswith("text:"):
        model_spec = getattr(args, "model", None) or ""
        if not model_spec.startswith("hf:"):
            raise ConfigError(f"--data {spec} is text, which needs a tokenizer: use it with an hf:DIR model "
                              "(--model hf:DIR), whose tokenizer is used.")
        tokenizer = model_spec[len("hf:"):]
    return load_data(spec, split=getattr(args, "split", None), input_shape=image_shape, tokenizer=tokenizer,
                     max_length=getattr(args, "max_length", None))


def load_model(args: argparse.Namespace, splits=None):
    """The model ``--model``/``--weights`` name; a built-in is sized for ``splits`` (e.g. 784 inputs on MNIST)."""
    from ..models import load_model_spec

    return load_model_spec(args.model, getattr(args, "weights", None),
                           trust_pickle=getattr(args, "trust_pickle", False), data=splits,
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


def _one_shape(text: str) -> tuple[tuple[int, ...], torch.dtype | None]:
    body, _, dtype_name = text.partition(":")
    dtype = None
    if dtype_name:
        dtype = _DTYPES.get(dtype_name.strip().lower())
        if dtype is None:
            raise ConfigError(f"--input-shape dtype must be one of {', '.join(_DTYPES)}, got {dtype_name!r}.")
    try:
        shape = tuple(int(part) for part in body.replace("x", ",").split(",") if part.strip())
    except ValueError:
        shape = ()
    if not shape or any(d <= 0 for d in shape) or len(text) > 200:
        raise ConfigError(f"--input-shape must be positive integers like 1,28,28 (several inputs: 'image=1,8,8 "
                          f"side=4' or '1,8,8;4'), got {text[:60]!r}.")
    values = math.prod(shape)
    if values > MAX_INPUT_VALUES:
        raise ConfigError(f"--input-shape {text} is {values:,} values per sample ({4 * values / 1e9:,.1f} GB as "
                          f"float32), more than the {MAX_INPUT_VALUES:,} rankshrink allocates for an example input; "
                          "pass the shape of one real sample, such as 3,224,224.")
    return shape, dtype


def parse_shape(text: str) -> Any:
    """'1,28,28' -> (1, 28, 28); 'image=1,8,8 side=4' -> {'image': ..., 'side': ...}; '1,8,8;4' -> a tuple of shapes.

    Entries may end in ``:DTYPE`` (``ids=16:int64``); they come back as (shape, dtype) pairs then.
    """
    parts = [p for p in re.split(r"[;\s]+", text.strip()) if p]
    if not parts:
        raise ConfigError("--input-shape is empty; give a shape like 1,28,28.")
    named = ["=" in p for p in parts]
    if any(named) and not all(named):
        raise ConfigError(f"--input-shape: name every input (image=1,8,8 side=4) or none (1,8,8;4), got {text!r}.")

    def entry(part: str):
        shape, dtype = _one_shape(part)
        return shape if dtype is None else (shape, dtype)

    if all(named):
        result = {}
        for part in parts:
            name, _, shape = part.partition("=")
            if not name.isidentifier():
                raise ConfigError(f"--input-shape: input name {name!r} is not a Python identifier.")
            result[name] = entry(shape)
        return result
    shapes = tuple(entry(p) for p in parts)
    return shapes[0] if len(shapes) == 1 else shapes


def _zeros(spec: Any, dtype: torch.dtype) -> Any:
    if isinstance(spec, dict):
        return {k: _zeros(v, dtype) for k, v in spec.items()}
    if isinstance(spec, tuple) and spec and isinstance(spec[0], tuple) and len(spec) == 2 and \
            isinstance(spec[1], torch.dtype):
        return torch.zeros(1, *spec[0], dtype=spec[1])
    if isinstance(spec, tuple) and spec and not isinstance(spec[0], int):
        return tuple(_zeros(v, dtype) for v in spec)
    return torch.zeros(1, *spec, dtype=dtype)


def example_batch(args: argparse.Namespace, model, splits=None) -> Any:
    """One example input (batch of 1, any form) from --input-shape, the data, or the built-in's own data."""
    from ..inputs import to_model

    if getattr(args, "input_shape", None) and not (getattr(args, "data", None) or "").lower().startswith(
            "imagefolder:"):
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        return _zeros(parse_shape(args.input_shape), dtype)
    if splits is None:
        spec = getattr(args, "data", None) or default_data_spec(args.model)
        if spec is None:
            raise ConfigError("cannot tell the model's input shape: pass --data SPEC or --input-shape 1,28,28.")
        splits = load_data_from_args(args, spec)
    from ..data import first_batch

    return to_model(first_batch(splits.val)[0], model)  # a float16/bfloat16 model gets inputs of its dtype
