"""Data from one array file: ``PATH.npz``, ``PATH.safetensors`` or ``PATH.pt`` (tensors only).

Keys:

* ``x`` -- the inputs, one row per sample; or several inputs as ``x.NAME`` (passed to the
  model as keyword arguments ``NAME=``) or ``x.0``, ``x.1``, ... (positional arguments);
* ``y`` -- optional integer class labels, one per sample (without them the search measures
  agreement with the original model);
* ``train``, ``val``, ``test`` -- optional integer index arrays choosing each part (disjoint,
  in range; ``test`` may be left out). Without them the samples are split deterministically,
  stratified by label (``fractions``, default 0.8/0.1/0.1, seeded).

Arrays keep their dtype (integer inputs such as token ids stay integers; floating inputs are
cast to the model's dtype when it runs). ``.npz`` files are read without pickle, ``.pt`` files
with ``torch.load(weights_only=True)``, and must hold a dict of tensors.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..errors import DataError, FileFormatError, UnsafeFileError
from .splits import DEFAULT_FRACTIONS, Splits, split_data, splits_from

__all__ = ["ARRAY_SUFFIXES", "load_array_file", "read_arrays"]

ARRAY_SUFFIXES = (".npz", ".safetensors", ".pt", ".pth")
INDEX_KEYS = ("train", "val", "test")
_KEYS_HELP = "x (or x.NAME / x.0, x.1, ... for several inputs), optional y, and optional train/val/test indices"


def read_arrays(path: str | Path) -> dict[str, torch.Tensor]:
    """Every array in the file, as tensors (nothing is unpickled)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileFormatError(f"data file '{path}' does not exist.")
    if path.is_dir():
        raise FileFormatError(f"data path '{path}' is a directory; pass a .npz, .safetensors or .pt file (or "
                              "imagefolder:DIR for a folder of images).")
    suffix = path.suffix.lower()
    if suffix == ".npz":
        return _read_npz(path)
    if suffix == ".safetensors":
        return _read_safetensors(path)
    return _read_pt(path)


def _read_npz(path: Path) -> dict[str, torch.Tensor]:
    import zipfile

    try:
        with np.load(path, allow_pickle=False) as archive:
            return {key: torch.from_numpy(np.ascontiguousarray(archive[key])) for key in archive.files}
    except ValueError as exc:
        if "pickle" in str(exc).lower() or "object" in str(exc).lower():
            raise UnsafeFileError(f"data file '{path}' holds arrays of Python objects, which need pickle; save "
                                  "numeric arrays (np.savez(path, x=..., y=...)).") from None
        raise FileFormatError(f"data file '{path}' is not a readable .npz archive ({exc}).") from None
    except (OSError, EOFError, zipfile.BadZipFile) as exc:
        raise FileFormatError(f"data file '{path}' is not a readable .npz archive ({type(exc).__name__}: "
                              f"{exc}); it may be truncated.") from None


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return dict(load_file(str(path)))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise FileFormatError(f"data file '{path}' is not a readable safetensors file ({exc}); it may be "
                              "truncated.") from None


def _read_pt(path: Path) -> dict[str, torch.Tensor]:
    import pickle

    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UnsafeFileError(f"data file '{path}' needs full pickle to load ({str(exc).splitlines()[0]}); save a "
                              "dict of tensors (torch.save({'x': x, 'y': y}, path)) or use .npz/.safetensors.") \
            from None
    except Exception as exc:  # torch.load raises many types for a file that is not a checkpoint
        raise FileFormatError(f"data file '{path}' is not a readable PyTorch file ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''}); it may be truncated.") from None
    if not isinstance(payload, dict):
        raise FileFormatError(f"data file '{path}' holds a {type(payload).__name__}; it must hold a dict of tensors "
                              f"with the keys {_KEYS_HELP}.")
    bad = [k for k, v in payload.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise FileFormatError(f"data file '{path}': entry {bad[0]!r} is not a tensor; every entry must be a tensor "
                              f"({_KEYS_HELP}).")
    return dict(payload)


def _inputs(arrays: dict[str, torch.Tensor], path: Path) -> Any:
    named = {key[2:]: value for key, value in arrays.items() if key.startswith("x.")}
    if "x" in arrays and named:
        raise DataError(f"data file '{path}' has both 'x' and 'x.{next(iter(named))}'; use 'x' for one input or "
                        "'x.NAME' / 'x.0', 'x.1', ... for several, not both.")
    if "x" in arrays:
        return arrays["x"]
    if not named:
        raise DataError(f"data file '{path}' has no 'x' (the inputs); it has {', '.join(sorted(arrays)) or 'nothing'}. "
                        f"Expected {_KEYS_HELP}.")
    if all(re.fullmatch(r"[0-9]+", key) for key in named):
        positions = sorted(int(key) for key in named)
        if positions != list(range(len(positions))):
            raise DataError(f"data file '{path}': positional inputs must be x.0, x.1, ... without gaps; found "
                            f"{', '.join('x.' + str(p) for p in positions)}.")
        return tuple(named[str(p)] for p in positions)
    bad = [key for key in named if not key.isidentifier()]
    if bad:
        raise DataError(f"data file '{path}': input name 'x.{bad[0]}' is not a Python identifier (inputs are passed as "
                        "keyword arguments); use x.NAME with names like image, side_info, or x.0, x.1, ....")
    return dict(named)


def _indices(arrays: dict[str, torch.Tensor], n: int, path: Path) -> dict[str, torch.Tensor] | None:
    given = {key: arrays[key] for key in INDEX_KEYS if key in arrays}
    if not given:
        return None
    for key in ("train", "val"):
        if key not in given:
            raise DataError(f"data file '{path}' has index array(s) {', '.join(given)} but no '{key}'; give 'train' "
                            "and 'val' (and optionally 'test'), or none of them for an automatic split.")
    seen: dict[int, str] = {}
    for key, index in given.items():
        if index.is_floating_point() or index.dtype == torch.bool or index.dim() != 1:
            raise DataError(f"data file '{path}': '{key}' must be a 1-D array of integer sample indices, got "
                            f"{str(index.dtype).replace('torch.', '')} of shape {tuple(index.shape)}.")
        index = index.long()
        if len(index) == 0 and key != "test":
            raise DataError(f"data file '{path}': '{key}' is empty; it needs at least one sample index.")
        if len(index) and (int(index.min()) < 0 or int(index.max()) >= n):
            bad = int(index.min()) if int(index.min()) < 0 else int(index.max())
            raise DataError(f"data file '{path}': '{key}' holds index {bad}, outside 0..{n - 1} (the file has {n} "
                            "samples).")
        values = index.tolist()
        if len(set(values)) != len(values):
            raise DataError(f"data file '{path}': '{key}' lists a sample more than once.")
        for value in values:
            if value in seen:
                raise DataError(f"data file '{path}': sample {value} is in both '{seen[value]}' and '{key}'; the "
                                "parts must not overlap.")
            seen[value] = key
        given[key] = index
    return given


def load_array_file(path: str | Path, *, fractions: Sequence[float] = DEFAULT_FRACTIONS, seed: int = 0) -> Splits:
    """Splits from one ``.npz`` / ``.safetensors`` / ``.pt`` file (see the module notes for its keys)."""
    from .. import inputs as model_inputs
    from .dataset import InputDataset, check_labels, make_dataset

    path = Path(path).expanduser()
    arrays = read_arrays(path)
    inputs = _inputs(arrays, path)
    unknown = sorted(k for k in arrays if k not in ("x", "y", *INDEX_KEYS) and not k.startswith("x."))
    if unknown:
        raise DataError(f"data file '{path}' has unexpected key(s) {', '.join(map(repr, unknown))}; the keys are "
                        f"{_KEYS_HELP}.")
    try:
        n = model_inputs.batch_size(inputs)
    except DataError as exc:
        raise DataError(f"data file '{path}': {exc}") from None
    labels = None
    if "y" in arrays:
        labels = check_labels(arrays["y"], n, f"data file '{path}': 'y'")
    name = path.stem
    parts = _indices(arrays, n, path)
    if parts is None:
        return split_data(inputs, labels, fractions=fractions, seed=seed, name=name)
    pool = InputDataset(inputs, labels, what=f"data file '{path}'")
    datasets = {key: make_dataset(*pool.rows(index)) for key, index in parts.items()}
    return splits_from(datasets["train"], datasets["val"], datasets.get("test"), name=name)
