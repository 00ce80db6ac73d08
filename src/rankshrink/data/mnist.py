"""MNIST from its IDX files (plain or gzip) in a directory the user names; never downloaded."""

from __future__ import annotations

import gzip
import math
import os
import struct
import zlib
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import DataError, FileFormatError
from .splits import _NEVER_DOWNLOADS, Splits, _holdout_size, _make_splits

_IDX_TYPES = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


_HEADER_MAX = 4 + 4 * 255
# Deflate cannot compress better than about 1032:1, so a .gz file declaring more data than this
# many times its size is lying; the rest of any .gz is read only up to what its header declares.
_GZIP_MAX_RATIO = 1100


def _open(path: Path):
    from ..files import require_file

    require_file(path, "MNIST file")
    try:
        return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")
    except OSError as exc:
        raise FileFormatError(f"cannot read '{path}' ({exc}).") from None


def _read_exactly(handle, size: int, path: Path) -> bytes:
    """``size`` bytes in blocks; one byte more is a read error, so a gzip bomb is never inflated past the header."""
    buffer = bytearray(size)
    view, done = memoryview(buffer), 0
    while done < size:
        got = handle.readinto(view[done:done + (1 << 24)])
        if not got:
            raise FileFormatError(f"'{path}' declares {size:,} bytes of data but holds {done:,}; the file is "
                                  "truncated or corrupt.")
        done += got
    if handle.read(1):
        raise FileFormatError(f"'{path}' holds more data than the {size:,} bytes its header declares; it is not an "
                              "MNIST file (or a damaged one), and rankshrink reads no further.")
    return bytes(buffer)


def read_idx(path: str | Path) -> np.ndarray:
    """Parse one IDX file (the MNIST format), optionally gzip-compressed, into an array.

    The header is read first; the data is then read only up to the size it declares
    (checked against the file's size first), so neither a header whose dimensions
    overflow nor a gzip bomb can make rankshrink allocate or inflate more than that.
    """
    path = Path(path)
    try:
        with _open(path) as handle:
            head = handle.read(4)
            if len(head) < 4 or head[0] != 0 or head[1] != 0 or head[2] not in _IDX_TYPES:
                magic = head.hex()
                raise FileFormatError(
                    f"'{path}' is not an IDX file (magic number 0x{magic or 'empty'}; expected "
                    "0x0000 followed by a type code and the number of dimensions)."
                )
            ndim = head[3]
            raw_dims = handle.read(4 * ndim)
            if ndim == 0 or len(raw_dims) < 4 * ndim:
                raise FileFormatError(f"'{path}' has a truncated IDX header ({ndim} dimensions declared).")
            dims = struct.unpack(f">{ndim}I", raw_dims)
            dtype = np.dtype(_IDX_TYPES[head[2]])
            expected = math.prod(dims) * dtype.itemsize  # Python integers: no overflow
            on_disk = path.stat().st_size
            limit = (on_disk * _GZIP_MAX_RATIO + _HEADER_MAX) if path.suffix == ".gz" else on_disk
            if expected > limit:
                raise FileFormatError(
                    f"'{path}' declares shape {dims} ({expected:,} bytes of data) but the file is only {on_disk:,} "
                    "bytes; the header is corrupt.")
            data = _read_exactly(handle, expected, path)
    except (OSError, EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise FileFormatError(f"cannot read '{path}' ({exc}); it may be truncated or not gzip.") from None
    return np.frombuffer(data, dtype=dtype).reshape(dims).astype(dtype.newbyteorder("="))


def _find_file(directories: Sequence[Path], stems: Sequence[str]) -> Path | None:
    for directory in directories:
        for stem in stems:
            for name in (stem, stem + ".gz"):
                candidate = directory / name
                if os.path.lexists(candidate):  # a FIFO or directory under the name is reported, not skipped
                    return candidate
    return None


def load_mnist(root: str | Path) -> Splits:
    """MNIST from the four IDX files in ``root`` (or ``root/MNIST/raw``), plain or ``.gz``.

    Images become (1, 28, 28) in [0, 1]. Validation is the last 5000 training images
    (10% for sets under 50000); the official test set is ``test``.
    """
    from ..files import require_dir

    root = require_dir(Path(root).expanduser(), "MNIST directory", error=DataError, hint=(
        f"({_NEVER_DOWNLOADS}: put train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte "
        "and t10k-labels-idx1-ubyte, optionally .gz, there.)"))
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
        if not np.issubdtype(labels.dtype, np.integer):  # float labels would be truncated silently
            raise FileFormatError(f"'{found[labels_key]}' holds {labels.dtype} labels; MNIST labels are integers "
                                  "(IDX type 0x08, unsigned byte).")
        if len(labels) and (labels.min() < 0 or labels.max() > 9):
            raise FileFormatError(f"'{found[labels_key]}' has labels outside 0..9.")
        scale = 255.0 if images.dtype == np.uint8 else 1.0
        return (images.astype(np.float32) / scale)[:, None], labels.astype(np.int64)

    train_x, train_y = pair("train-images-idx3-ubyte", "train-labels-idx1-ubyte")
    test_x, test_y = pair("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
    if train_x.shape[1:] != test_x.shape[1:]:
        raise DataError(f"MNIST files in '{root}' hold training images of {train_x.shape[2]}x{train_x.shape[3]} "
                        f"pixels but test images of {test_x.shape[2]}x{test_x.shape[3]}; both must have one size "
                        f"('{found['train-images-idx3-ubyte'].name}', '{found['t10k-images-idx3-ubyte'].name}').")
    if len(train_y) < 2 or len(test_y) < 1:
        raise DataError(f"MNIST files in '{root}' hold too few samples ({len(train_y)} train, "
                        f"{len(test_y)} test).")
    cut = len(train_y) - _holdout_size(len(train_y))
    return _make_splits("mnist", 10, (train_x[:cut], train_y[:cut]),
                        (train_x[cut:], train_y[cut:]), (test_x, test_y))
