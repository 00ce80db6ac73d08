"""Data sets: built-in digits, local MNIST/CIFAR-10 files, deterministic synthetic sets.

Every loader returns a :class:`Splits` with float32 inputs and int64 labels in three
disjoint parts: ``train`` (what models train on), ``val`` (model selection, rank-search
tolerances, early stopping) and ``test`` (reported only, never used for decisions).
rankshrink never downloads anything: MNIST and CIFAR-10 are read from a directory the
user names. A data SPEC string selects a loader (see :func:`load_data`).
"""

from __future__ import annotations

import gzip
import hashlib
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Subset, TensorDataset, default_collate

from .errors import ConfigError, DataError, FileFormatError

__all__ = [
    "Splits",
    "load_digits_splits",
    "load_mnist",
    "load_cifar10",
    "load_synthetic",
    "load_data",
    "read_idx",
    "calibration_subset",
    "iterate_batches",
    "DATA_SPEC_FORMS",
]

DATA_SPEC_FORMS = (
    "builtin:digits",
    "mnist:/path/to/dir",
    "cifar10:/path/to/dir",
    "synthetic:cifar",
    "synthetic:mnist",
)

_NEVER_DOWNLOADS = "rankshrink never downloads data"


@dataclass(frozen=True)
class Splits:
    """A data set in three disjoint parts plus what a model needs to know about it."""

    train: TensorDataset
    val: TensorDataset
    test: TensorDataset
    num_classes: int
    input_shape: tuple[int, ...]
    name: str
    fingerprint: str

    def __repr__(self) -> str:
        return (f"Splits(name={self.name!r}, train={len(self.train)}, val={len(self.val)}, "
                f"test={len(self.test)}, input_shape={self.input_shape}, "
                f"num_classes={self.num_classes}, fingerprint={self.fingerprint[:12]}…)")


def _fingerprint(parts: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> str:
    digest = hashlib.sha256(b"rankshrink-splits-v1")
    for x, y in parts:
        digest.update(repr((tuple(x.shape), str(x.dtype), tuple(y.shape), str(y.dtype))).encode())
        # ``.data`` is the same C-contiguous buffer; numpy types ndarray as a Buffer only on Python 3.12+
        digest.update(x.contiguous().numpy().data)
        digest.update(y.contiguous().numpy().data)
    return digest.hexdigest()


def _make_splits(name: str, num_classes: int, train: tuple[np.ndarray | torch.Tensor, ...],
                 val: tuple[np.ndarray | torch.Tensor, ...], test: tuple[np.ndarray | torch.Tensor, ...]) -> Splits:
    parts = []
    for x, y in (train, val, test):
        x = torch.as_tensor(x, dtype=torch.float32).contiguous()
        y = torch.as_tensor(y, dtype=torch.int64).contiguous()
        parts.append((x, y))
    return Splits(
        train=TensorDataset(*parts[0]),
        val=TensorDataset(*parts[1]),
        test=TensorDataset(*parts[2]),
        num_classes=num_classes,
        input_shape=tuple(parts[0][0].shape[1:]),
        name=name,
        fingerprint=_fingerprint(parts),
    )


def _holdout_size(n: int) -> int:
    """Validation size carved from the end of a training set: 5000, or 10% of small sets."""
    return min(5000, max(1, n // 10))


# --------------------------------------------------------------------------- digits

def load_digits_splits(seed: int = 0) -> Splits:
    """scikit-learn's bundled 8×8 digits (1797 images, offline), as (1, 8, 8) in [0, 1].

    Split deterministically for ``seed``, stratified by class: 80% ``train``; the
    held-out 20% is halved into ``val`` and ``test`` (1437 / 180 / 180). Train is what
    models train on, validation sets rank-search tolerances and early stopping, test is
    only reported.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = (bunch.data.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8)
    y = bunch.target.astype(np.int64)
    index = np.arange(len(y))
    train_idx, held_idx = train_test_split(index, test_size=0.2, stratify=y, random_state=seed)
    val_idx, test_idx = train_test_split(held_idx, test_size=0.5, stratify=y[held_idx],
                                         random_state=seed)
    # Sorted indices keep the stored order independent of sklearn's shuffling details.
    train_idx, val_idx, test_idx = np.sort(train_idx), np.sort(val_idx), np.sort(test_idx)
    return _make_splits("digits", 10, (x[train_idx], y[train_idx]), (x[val_idx], y[val_idx]),
                        (x[test_idx], y[test_idx]))


# --------------------------------------------------------------------------- MNIST (IDX)

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


# --------------------------------------------------------------------------- CIFAR-10 (pickle)

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
    data = np.asarray(entries["data"])
    labels = np.asarray(entries["labels"])
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
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(
            f"CIFAR-10 directory '{root}' does not exist; {_NEVER_DOWNLOADS}. Unpack "
            "cifar-10-python.tar.gz there (data_batch_1..5 and test_batch)."
        )
    directory = root
    if not (root / "data_batch_1").is_file() and (root / "cifar-10-batches-py").is_dir():
        directory = root / "cifar-10-batches-py"
    missing = [name for name in _CIFAR_FILES if not (directory / name).is_file()]
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


# --------------------------------------------------------------------------- synthetic

_SYNTHETIC_SHAPES = {"cifar": (3, 32, 32), "mnist": (1, 28, 28)}


def load_synthetic(kind: str = "cifar", *, n_train: int = 4000, n_val: int = 500,
                   n_test: int = 500, num_classes: int = 10, seed: int = 0) -> Splits:
    """A deterministic, learnable stand-in with CIFAR-10 or MNIST shapes.

    Each class has a smooth random template; a sample is its class template, randomly
    shifted by up to 4 pixels, blended with a second class's template and Gaussian
    noise, clipped to [0, 1]. A small CNN learns it well but not perfectly, so
    compression has a visible accuracy cost (the
    seeds' CIFAR CNN reaches about 90% test accuracy on ``synthetic:cifar``).
    """
    if kind not in _SYNTHETIC_SHAPES:
        raise DataError(f"unknown synthetic data set {kind!r}; choose one of {sorted(_SYNTHETIC_SHAPES)}.")
    if min(n_train, n_val, n_test) < 1 or num_classes < 2:
        raise ConfigError("synthetic data needs at least one sample per split and two classes.")
    channels, height, width = _SYNTHETIC_SHAPES[kind]
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.randn(num_classes, channels, 6, 6, generator=gen)
    templates = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bicubic",
                                                align_corners=False)
    templates = templates / templates.flatten(1).std(dim=1).view(-1, 1, 1, 1)
    total = n_train + n_val + n_test
    labels = torch.arange(total) % num_classes
    labels = labels[torch.randperm(total, generator=gen)]
    others = (labels + torch.randint(1, num_classes, (total,), generator=gen)) % num_classes
    mix = 0.8 * torch.rand(total, generator=gen)
    base = templates[labels] + mix.view(-1, 1, 1, 1) * templates[others]
    shifts = torch.randint(-4, 5, (total, 2), generator=gen)
    # Per-sample torch.roll as one gather: out[..., i, j] = base[..., (i - dy) % H, (j - dx) % W].
    rows = (torch.arange(height).view(1, -1) - shifts[:, :1]) % height
    cols = (torch.arange(width).view(1, -1) - shifts[:, 1:]) % width
    shifted = base[torch.arange(total).view(-1, 1, 1, 1), torch.arange(channels).view(1, -1, 1, 1),
                   rows.view(total, 1, height, 1), cols.view(total, 1, 1, width)]
    noise = torch.randn(total, channels, height, width, generator=gen)
    # Faint templates under strong noise: the CIFAR CNN reaches about 90%, not 100%.
    x = (0.5 + 0.08 * shifted + 0.3 * noise).clamp_(0.0, 1.0)
    a, b = n_train, n_train + n_val
    return _make_splits(f"synthetic-{kind}", num_classes, (x[:a], labels[:a]), (x[a:b], labels[a:b]),
                        (x[b:], labels[b:]))


# --------------------------------------------------------------------------- specs

def load_data(spec: str | None = None) -> Splits:
    """Load the data set a SPEC string names; ``None`` means ``builtin:digits``.

    Forms: ``builtin:digits``, ``mnist:/path/dir``, ``cifar10:/path/dir``,
    ``synthetic:cifar``, ``synthetic:mnist``.
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


# --------------------------------------------------------------------------- subsets and batches

def _tensor_source(dataset: Dataset) -> tuple[tuple[torch.Tensor, ...], torch.Tensor | None] | None:
    """(tensors, index map) when ``dataset`` is a TensorDataset or a Subset of one, else None."""
    if isinstance(dataset, TensorDataset):
        return tuple(dataset.tensors), None
    if isinstance(dataset, Subset) and isinstance(dataset.dataset, TensorDataset):
        return tuple(dataset.dataset.tensors), torch.as_tensor(list(dataset.indices), dtype=torch.long)
    return None


def _dataset_len(dataset: Dataset) -> int:
    try:
        return len(dataset)  # type: ignore[arg-type]
    except TypeError:
        raise DataError(f"data set of type {type(dataset).__name__} has no length; "
                        "rankshrink needs a map-style data set (e.g. TensorDataset).") from None


def iterate_batches(dataset: Dataset, batch_size: int, *, order: torch.Tensor | None = None,
                    drop_last_single: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (inputs, labels) batches in ``order`` (default: dataset order).

    TensorDatasets (and Subsets of them) are sliced directly, which is much faster
    than per-sample collation; other data sets must return (input, label) pairs.
    ``drop_last_single`` skips a final batch of one sample (BatchNorm cannot train on it).
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {batch_size}.")
    n = _dataset_len(dataset)
    indices = torch.arange(n) if order is None else order
    source = _tensor_source(dataset)
    if source is not None and len(source[0]) != 2:
        raise DataError(f"a TensorDataset for rankshrink holds (inputs, labels); this one holds "
                        f"{len(source[0])} tensors.")
    for start in range(0, len(indices), batch_size):
        chunk = indices[start:start + batch_size]
        if drop_last_single and len(chunk) == 1 and len(indices) > 1:
            return
        if source is not None:
            tensors, index_map = source
            rows = chunk if index_map is None else index_map[chunk]
            yield tensors[0][rows], tensors[1][rows]
        else:
            items = [dataset[int(i)] for i in chunk]
            if not all(isinstance(item, (tuple, list)) and len(item) == 2 for item in items):
                raise DataError(f"data set {type(dataset).__name__} must return (input, label) pairs.")
            inputs, labels = default_collate(items)
            yield torch.as_tensor(inputs), torch.as_tensor(labels)


def calibration_subset(dataset: Dataset, n: int = 512, seed: int = 0) -> TensorDataset:
    """A deterministic random subset of ``n`` samples (all of them if fewer), in dataset order."""
    if n < 1:
        raise ConfigError(f"calibration subset size must be at least 1, got {n}.")
    total = _dataset_len(dataset)
    if total == 0:
        raise DataError("cannot take a calibration subset of an empty data set.")
    if n >= total:
        chosen = torch.arange(total)
    else:
        gen = torch.Generator().manual_seed(seed)
        chosen = torch.randperm(total, generator=gen)[:n].sort().values
    xs, ys = zip(*iterate_batches(dataset, max(1, len(chosen)), order=chosen))
    return TensorDataset(torch.cat(xs).clone(), torch.cat(ys).clone())
