"""Data from the user's own Python function: ``path/to/file.py:function``.

The function takes no arguments and returns either a :class:`~rankshrink.data.Splits` or a
mapping with ``train``, ``val`` and optionally ``test`` (and optionally ``num_classes`` and
``name``), each a Dataset, a DataLoader, a tensor/array of inputs, a dict of input tensors or
an ``(inputs, labels)`` pair (see :func:`rankshrink.data.splits_from`).
"""

from __future__ import annotations

from typing import Mapping

from ..errors import ConfigError, DataError
from .splits import Splits, splits_from

__all__ = ["load_python_data", "is_python_spec"]

_KEYS = ("train", "val", "test", "num_classes", "name")


def is_python_spec(spec: str) -> bool:
    file_part, sep, attr = spec.rpartition(":")
    return bool(sep) and file_part.lower().endswith(".py") and attr.isidentifier()


def load_python_data(spec: str) -> Splits:
    """Call ``function`` from ``file.py`` (``spec`` is ``file.py:function``) and build Splits from its result."""
    from ..models.spec import function_from_file

    file_part, _, attr = spec.rpartition(":")
    path, function = function_from_file(file_part, attr, "data file")
    try:
        result = function()
    except Exception as exc:
        raise ConfigError(f"calling {attr}() from '{path}' failed: {type(exc).__name__}: {exc} (a data function "
                          "takes no arguments and returns {'train': ..., 'val': ..., 'test': ...}).") from exc
    if isinstance(result, Splits):
        return result
    if not isinstance(result, Mapping):
        raise DataError(f"{attr}() from '{path}' returned a {type(result).__name__}; it must return a Splits or a "
                        "mapping with 'train', 'val' and optionally 'test'.")
    unknown = sorted(str(k) for k in result if k not in _KEYS)
    missing = [k for k in ("train", "val") if k not in result]
    if unknown or missing:
        problem = (f"lacks {', '.join(map(repr, missing))}" if missing else
                   f"has unexpected key(s) {', '.join(map(repr, unknown))}")
        raise DataError(f"the mapping {attr}() from '{path}' returned {problem}; its keys are 'train', 'val', and "
                        "optionally 'test', 'num_classes', 'name'.")
    try:
        return splits_from(result["train"], result["val"], result.get("test"), num_classes=result.get("num_classes"),
                           name=str(result.get("name") or path.stem))
    except DataError as exc:
        raise DataError(f"the data {attr}() from '{path}' returned: {exc}") from None
