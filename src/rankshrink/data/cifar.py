"""CIFAR-10 from its python pickle batches, read with an unpickler that only rebuilds plain data."""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError, FileFormatError
from .splits import _NEVER_DOWNLOADS, Splits, _holdout_size, _make_splits


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    # Python 3 writes bytes inside protocol-2 pickles as _codecs.encode(str, "latin1").
    if encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"refusing _codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


def _numpy_global(module: str, name: str) -> Any:
    import importlib

    for candidate in (module.replace("numpy.core.", "numpy._core."), module):
        try:
            return getattr(importlib.import_module(candidate), name)
        except (ImportError, AttributeError):
            continue
    raise pickle.UnpicklingError(f"numpy has no {module}.{name}")


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that rebuilds plain containers, bytes and numpy arrays, nothing else."""

    _NUMPY = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._NUMPY:
            return _numpy_global(module, name)
        if (module, name) == ("_codecs", "encode"):
            return _latin1_encode
        raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed")


def _load_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    from ..files import require_file

    require_file(path, "CIFAR-10 batch")
    try:
        with open(path, "rb") as handle:
            obj = _RestrictedUnpickler(handle, encoding="bytes").load()
    except pickle.UnpicklingError as exc:
        raise FileFormatError(
            f"'{path}' is not a CIFAR-10 batch rankshrink will read ({exc}); CIFAR-10 batches "
            "only hold a dict of bytes, lists and numpy arrays, and other pickled objects could "
            "run code, so they are refused."
        ) from None
    except (OSError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as exc:
        raise FileFormatError(f"'{path}' is not a readable CIFAR-10 batch ({type(exc).__name__}: {exc}).") from None
    if not isinstance(obj, dict):
        raise FileFormatError(f"'{path}' holds a {type(obj).__name__}, not a CIFAR-10 batch dict.")
    entries = {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in obj.items()}
    if "data" not in entries or "labels" not in entries:
        raise FileFormatError(f"'{path}' lacks the 'data' or 'labels' entry of a CIFAR-10 batch.")
    try:
        data = np.asarray(entries["data"])
        labels = np.asarray(entries["labels"])
    except (ValueError, TypeError) as exc:  # a ragged list: rows of different lengths
        raise FileFormatError(f"'{path}': 'data' and 'labels' must be arrays (N rows of 3072 bytes, N labels); "
                              f"they cannot be read as such ({str(exc).split('. ')[0][:160]}).") from None
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise FileFormatError(
            f"'{path}': 'data' must be a uint8 array of shape (N, 3072); found {data.dtype} {data.shape}."
        )
    if labels.ndim != 1 or len(labels) != len(data) or not np.issubdtype(labels.dtype, np.integer):
        raise FileFormatError(f"'{path}': 'labels' must be {len(data)} integers; found {labels.dtype} {labels.shape}.")
    if len(labels) and (labels.min() < 0 or labels.max() > 9):
        raise FileFormatError(f"'{path}' has labels outside 0..9.")
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


_CIFAR_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


def load_cifar10(root: str | Path, *, normalize: bool = False) -> Splits:
    """CIFAR-10 from its python pickle batches in ``root`` or ``root/cifar-10-batches-py``.

    Images become (3, 32, 32) in [0, 1], or in [-1, 1] with ``normalize`` (mean 0.5,
    std 0.5 per channel, as in the seeds). The batches are read with a restricted
    unpickler that only rebuilds containers, bytes and numpy arrays. Validation is the
    last 5000 training images; ``test_batch`` is the test set.
    """
    from ..files import require_dir

    root = require_dir(Path(root).expanduser(), "CIFAR-10 directory", error=DataError, hint=(
        f"({_NEVER_DOWNLOADS}: unpack cifar-10-python.tar.gz there, data_batch_1..5 and test_batch.)"))
    directory = root
    if not os.path.lexists(root / "data_batch_1") and (root / "cifar-10-batches-py").is_dir():
        directory = root / "cifar-10-batches-py"
    missing = [name for name in _CIFAR_FILES if not os.path.lexists(directory / name)]
    if missing:
        raise DataError(
            f"CIFAR-10 directory '{directory}' lacks {', '.join(missing)}; {_NEVER_DOWNLOADS}. "
            "Unpack the python version of CIFAR-10 (cifar-10-python.tar.gz) there yourself."
        )
    batches = [_load_cifar_batch(directory / name) for name in _CIFAR_FILES]
    train_x = np.concatenate([b[0] for b in batches[:5]])
    train_y = np.concatenate([b[1] for b in batches[:5]])
    test_x, test_y = batches[5]
    if len(train_y) < 2 or len(test_y) < 1:
        raise DataError(f"CIFAR-10 batches in '{directory}' hold too few samples.")

    def scale(x: np.ndarray) -> np.ndarray:
        out = x.astype(np.float32) / 255.0
        return (out - 0.5) / 0.5 if normalize else out

    cut = len(train_y) - _holdout_size(len(train_y))
    return _make_splits("cifar10-normalized" if normalize else "cifar10", 10,
                        (scale(train_x[:cut]), train_y[:cut]), (scale(train_x[cut:]), train_y[cut:]),
                        (scale(test_x), test_y))
