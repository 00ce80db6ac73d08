"""MNIST from its IDX files (plain or gzip) in a directory the user names; never downloaded."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import DataError, FileFormatError
from .splits import _NEVER_DOWNLOADS, Splits, _holdout_size, _make_splits

_IDX_TYPES = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _read_maybe_gzip(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as handle:
                return handle.read()
        return path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise FileFormatError(f"cannot read '{path}' ({exc}); it may be truncated or not gzip.") from None


def read_idx(path: str | Path) -> np.ndarray:
    """Parse one IDX file (the MNIST format), optionally gzip-compressed, into an array."""
    path = Path(path)
    data = _read_maybe_gzip(path)
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_TYPES:
        magic = data[:4].hex() if len(data) >= 4 else data.hex()
        raise FileFormatError(
            f"'{path}' is not an IDX file (magic number 0x{magic or 'empty'}; expected "
            "0x0000 followed by a type code and the number of dimensions)."
        )
    ndim = data[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(data) < header:
        raise FileFormatError(f"'{path}' has a truncated IDX header ({ndim} dimensions declared).")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    dtype = np.dtype(_IDX_TYPES[data[2]])
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(data) - header != expected:
        raise FileFormatError(
            f"'{path}' declares shape {dims} ({expected} bytes of data) but holds "
            f"{len(data) - header} bytes; the file is truncated or corrupt."
        )
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def _find_file(directories: Sequence[Path], stems: Sequence[str]) -> Path | None:
    for directory in directories:
        for stem in stems:
            for name in (stem, stem + ".gz"):
                candidate = directory / name
                if candidate.is_file():
                    return candidate
    return None


def load_mnist(root: str | Path) -> Splits:
    """MNIST from the four IDX files in ``root`` (or ``root/MNIST/raw``), plain or ``.gz``.

    Images become (1, 28, 28) in [0, 1]. Validation is the last 5000 training images
    (10% for sets under 50000); the official test set is ``test``.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(
            f"MNIST directory '{root}' does not exist; {_NEVER_DOWNLOADS}. Put "
            "train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte and "
            "t10k-labels-idx1-ubyte (optionally .gz) there."
        )
    directories = [root, root / "MNIST" / "raw", root / "raw"]
    wanted = {
        "train-images-idx3-ubyte": ["train-images-idx3-ubyte", "train-images.idx3-ubyte"],
        "train-labels-idx1-ubyte": ["train-labels-idx1-ubyte", "train-labels.idx1-ubyte"],
        "t10k-images-idx3-ubyte": ["t10k-images-idx3-ubyte", "t10k-images.idx3-ubyte"],
        "t10k-labels-idx1-ubyte": ["t10k-labels-idx1-ubyte", "t10k-labels.idx1-ubyte"],
    }
    located = {key: _find_file(directories, stems) for key, stems in wanted.items()}
    missing = [key for key, path in located.items() if path is None]
    if missing:
        raise DataError(
            f"MNIST directory '{root}' lacks {', '.join(missing)} (plain or .gz); "
            f"{_NEVER_DOWNLOADS}. Copy the IDX files there yourself."
        )
    found = {key: path for key, path in located.items() if path is not None}

    def pair(images_key: str, labels_key: str) -> tuple[np.ndarray, np.ndarray]:
        images, labels = read_idx(found[images_key]), read_idx(found[labels_key])
        if images.ndim != 3 or labels.ndim != 1:
            raise FileFormatError(
                f"'{found[images_key]}' must hold (N, H, W) images and '{found[labels_key]}' "
                f"(N,) labels; found shapes {images.shape} and {labels.shape}."
            )
        if len(images) != len(labels):
            raise FileFormatError(
                f"'{found[images_key]}' holds {len(images)} images but '{found[labels_key]}' "
                f"holds {len(labels)} labels."
            )
        if len(labels) and (labels.min() < 0 or labels.max() > 9):
            raise FileFormatError(f"'{found[labels_key]}' has labels outside 0..9.")
        scale = 255.0 if images.dtype == np.uint8 else 1.0
        return (images.astype(np.float32) / scale)[:, None], labels.astype(np.int64)

    train_x, train_y = pair("train-images-idx3-ubyte", "train-labels-idx1-ubyte")
    test_x, test_y = pair("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
    if len(train_y) < 2 or len(test_y) < 1:
        raise DataError(f"MNIST files in '{root}' hold too few samples ({len(train_y)} train, "
                        f"{len(test_y)} test).")
    cut = len(train_y) - _holdout_size(len(train_y))
    return _make_splits("mnist", 10, (train_x[:cut], train_y[:cut]),
                        (train_x[cut:], train_y[cut:]), (test_x, test_y))
