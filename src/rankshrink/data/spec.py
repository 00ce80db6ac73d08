"""The one way to load a data SPEC string."""

from __future__ import annotations

from ..errors import DataError
from .builtin import _SYNTHETIC_SHAPES, load_digits_splits, load_synthetic
from .cifar import load_cifar10
from .mnist import load_mnist
from .splits import _NEVER_DOWNLOADS, Splits

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
)


def load_data(spec: str | None = None) -> Splits:
    """Load the data set a SPEC string names; ``None`` means ``builtin:digits``.

    Forms: ``builtin:digits``, ``mnist:/path/dir``, ``cifar10:/path/dir``,
    ``synthetic:cifar``, ``synthetic:mnist``, and the MLPerf Tiny-shaped ``synthetic:mfcc``,
    ``synthetic:vww``, ``synthetic:anomaly``, ``synthetic:spectrum`` (see :mod:`.synthetic`).
    """
    if spec is None:
        spec = "builtin:digits"
    if not isinstance(spec, str):
        raise DataError(f"a data spec must be a string, not {type(spec).__name__}.")
    kind, sep, rest = spec.strip().partition(":")
    kind = kind.lower()
    if sep and kind == "builtin" and rest.strip().lower() == "digits":
        return load_digits_splits()
    if sep and kind in ("mnist", "cifar10") and rest.strip():
        return load_mnist(rest.strip()) if kind == "mnist" else load_cifar10(rest.strip())
    if sep and kind == "synthetic" and rest.strip().lower() in _SYNTHETIC_SHAPES:
        return load_synthetic(rest.strip().lower())
    raise DataError(
        f"unknown data spec {spec!r}; valid forms are {', '.join(DATA_SPEC_FORMS)} "
        f"({_NEVER_DOWNLOADS}: MNIST/CIFAR-10 must already be in the directory you name)."
    )
