"""The one way to load a data SPEC string."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from ..errors import DataError
from .arrays import ARRAY_SUFFIXES, load_array_file
from .builtin import _SYNTHETIC_SHAPES, load_digits_splits, load_synthetic
from .cifar import load_cifar10
from .imagefolder import load_image_folder
from .mnist import load_mnist
from .pyfile import is_python_spec, load_python_data
from .splits import _NEVER_DOWNLOADS, DEFAULT_FRACTIONS, Splits

DATA_SPEC_FORMS = (
    "builtin:digits",
    "mnist:/path/to/dir",
    "cifar10:/path/to/dir",
    "synthetic:cifar",
    "synthetic:mnist",
    "synthetic:mfcc",
    "synthetic:vww",
    "synthetic:anomaly",
    "synthetic:spectrum",
    "PATH.npz",
    "PATH.safetensors",
    "PATH.pt",
    "path/to/file.py:function",
    "imagefolder:/path/to/dir",
    "text:FILE",
)


def load_data(spec: str | None = None, *, split: Sequence[float] | str | None = None, seed: int = 0,
              input_shape: Sequence[int] | None = None, tokenizer: Any = None,
              max_length: int | None = None) -> Splits:
    """Load the data set a SPEC string names; ``None`` means ``builtin:digits``.

    Forms: ``builtin:digits``, ``mnist:/path/dir``, ``cifar10:/path/dir``,
    ``synthetic:cifar``, ``synthetic:mnist``, and the MLPerf Tiny-shaped ``synthetic:mfcc``,
    ``synthetic:vww``, ``synthetic:anomaly``, ``synthetic:spectrum`` (see :mod:`.synthetic`).
    Forms: ``builtin:digits``, ``mnist:/path/dir``, ``cifar10:/path/dir``, ``synthetic:cifar``,
    ``synthetic:mnist`` (built in or local files); ``PATH.npz`` / ``PATH.safetensors`` /
    ``PATH.pt`` (arrays ``x``, optional ``y`` and ``train``/``val``/``test`` indices, see
    :mod:`rankshrink.data.arrays`); ``file.py:function`` (your own function, see
    :mod:`rankshrink.data.pyfile`); ``imagefolder:DIR`` (class folders of images, see
    :mod:`rankshrink.data.imagefolder`). ``split`` (train, val, test fractions, default
    0.8, 0.1, 0.1) and ``seed`` split the files and folders that do not say how;
    ``input_shape`` (C, H, W) is what an image folder is resized to. ``text:FILE`` is one sample per line,
    tokenized by ``tokenizer`` (a Hugging Face model directory or tokenizer) to at most ``max_length``
    tokens (default 128), see :mod:`rankshrink.data.text`.
    """
    from .splits import parse_fractions

    if spec is None:
        spec = "builtin:digits"
    if not isinstance(spec, str):
        raise DataError(f"a data spec must be a string, not {type(spec).__name__}.")
    fractions = DEFAULT_FRACTIONS if split is None else parse_fractions(split, "split")
    text = spec.strip()
    if is_python_spec(text):
        return load_python_data(text)
    kind, sep, rest = text.partition(":")
    kind = kind.lower()
    if sep and kind == "builtin" and rest.strip().lower() == "digits":
        return load_digits_splits()
    if sep and kind in ("mnist", "cifar10") and rest.strip():
        return load_mnist(rest.strip()) if kind == "mnist" else load_cifar10(rest.strip())
    if sep and kind == "synthetic" and rest.strip().lower() in _SYNTHETIC_SHAPES:
        return load_synthetic(rest.strip().lower())
    if sep and kind == "text" and rest.strip():
        from .text import DEFAULT_MAX_LENGTH, load_text

        return load_text(rest.strip(), tokenizer, max_length=max_length or DEFAULT_MAX_LENGTH, fractions=fractions,
                         seed=seed)
    if sep and kind == "imagefolder" and rest.strip():
        return load_image_folder(rest.strip(), input_shape=input_shape, fractions=fractions, seed=seed)
    if Path(text).suffix.lower() in ARRAY_SUFFIXES:
        return load_array_file(text, fractions=fractions, seed=seed)
    raise DataError(
        f"unknown data spec {spec!r}; valid forms are {', '.join(DATA_SPEC_FORMS)} "
        f"({_NEVER_DOWNLOADS}: MNIST/CIFAR-10 must already be in the directory you name)."
    )
