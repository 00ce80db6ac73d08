"""A data set in three disjoint parts: train, validation (decisions) and test (reports).

Build one with :func:`splits_from` (three parts you already have) or :func:`split_data`
(one pool, split deterministically and stratified by label). The fingerprint that keys
caches and checkpoints is computed from the content (:mod:`rankshrink.fingerprint`), never
written by hand.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

from .. import inputs as model_inputs
from ..errors import ConfigError, DataError

__all__ = ["Splits", "splits_from", "split_data", "stratified_indices", "parse_fractions", "DEFAULT_FRACTIONS"]


_NEVER_DOWNLOADS = "rankshrink never downloads data"
DEFAULT_FRACTIONS = (0.8, 0.1, 0.1)


@dataclass(frozen=True)
class Splits:
    """A data set in three disjoint parts plus what a model needs to know about it.

    ``train`` is what models train (and calibrate) on, ``val`` decides (tolerances, early
    stopping), ``test`` is only reported (it may be empty). Items are ``(inputs, label)``
    or, for unlabelled data (``num_classes`` None), ``inputs`` alone. ``input_shape`` is the
    per-sample shape: a tuple, or a tuple/dict of tuples for models with several inputs.
    Build one with :func:`splits_from` or :func:`split_data`; :attr:`fingerprint` is the
    sha256 of the content.
    """

    train: Dataset
    val: Dataset
    test: Dataset
    num_classes: int | None
    input_shape: Any
    name: str = "data"

    @cached_property
    def fingerprint(self) -> str:
        """sha256 of every sample of the three parts (and the class count): what caches are keyed by."""
        from ..fingerprint import dataset_fingerprint, object_fingerprint

        return object_fingerprint({"train": dataset_fingerprint(self.train), "val": dataset_fingerprint(self.val),
                                   "test": dataset_fingerprint(self.test), "num_classes": self.num_classes})

    @property
    def labelled(self) -> bool:
        return self.num_classes is not None

    def __repr__(self) -> str:
        return (f"Splits(name={self.name!r}, train={len(self.train)}, val={len(self.val)}, "  # type: ignore[arg-type]
                f"test={len(self.test)}, input_shape={self.input_shape}, "  # type: ignore[arg-type]
                f"num_classes={self.num_classes})")


def _labels_of(dataset: Dataset) -> torch.Tensor | None:
    from .batches import _dataset_len, iterate_batches

    if _dataset_len(dataset) == 0:
        return None
    parts = [labels for _, labels in iterate_batches(dataset, 4096)]
    if parts[0] is None:
        return None
    return torch.cat([p for p in parts if p is not None])


def _empty_like(dataset: Dataset) -> Dataset:
    from .batches import first_batch
    from .dataset import make_dataset

    inputs, labels = first_batch(dataset)
    return make_dataset(model_inputs.take(inputs, slice(0, 0)), None if labels is None else labels[:0])


def splits_from(train: Any, val: Any, test: Any = None, *, num_classes: int | None = None,
                name: str = "data") -> Splits:
    """Splits from three parts (``test`` optional), each a Dataset, a DataLoader, a tensor or array of
    inputs, a dict of input tensors (keyword inputs) or an ``(inputs, labels)`` pair.

    Items must all carry labels (then ``num_classes`` defaults to the largest label + 1) or
    none of them (unlabelled: the search then measures agreement with the original model).
    A DataLoader contributes its data set (rankshrink batches and shuffles itself).
    """
    from .batches import _dataset_len, first_batch
    from .dataset import as_dataset

    parts = {"train": as_dataset(train, "train"), "val": as_dataset(val, "val")}
    for split, dataset in parts.items():
        if _dataset_len(dataset) == 0:
            raise DataError(f"the {split} part is empty; it needs at least one sample.")
    parts["test"] = as_dataset(test, "test") if test is not None else _empty_like(parts["val"])
    labels = {split: _labels_of(dataset) for split, dataset in parts.items()}
    present = {split: y is not None for split, y in labels.items() if _dataset_len(parts[split])}
    if len(set(present.values())) > 1:
        have = [s for s, p in present.items() if p]
        lack = [s for s, p in present.items() if not p]
        raise DataError(f"the {', '.join(have)} part(s) have labels but {', '.join(lack)} do not; give labels to "
                        "every part or to none.")
    shapes = {split: _sample_shapes(d, first_batch) for split, d in parts.items() if _dataset_len(d)}
    if len({repr(s) for s in shapes.values()}) > 1:
        shown = "; ".join(f"{split} {shape}" for split, shape in shapes.items())
        raise DataError(f"the parts hold inputs of different shapes ({shown}); every sample needs the same inputs.")
    labelled = all(present.values())
    if labelled:
        top = max(int(y.max()) for y in labels.values() if y is not None and len(y))
        if num_classes is None:
            num_classes = top + 1
        elif top >= num_classes:
            raise DataError(f"num_classes={num_classes} but the data has label {top}.")
    elif num_classes is not None:
        raise DataError("num_classes was given but the data has no labels.")
    return Splits(parts["train"], parts["val"], parts["test"], num_classes, shapes["train"], name)


def _sample_shapes(dataset: Dataset, first_batch) -> Any:
    """Per-sample input shapes (as stored: a data set that trims its batches' padding reports the full width)."""
    from .dataset import InputDataset, base_of

    base = base_of(dataset)[0]
    if isinstance(base, InputDataset):
        return model_inputs.sample_shapes(model_inputs.take(base.inputs, slice(0, 1)))
    return model_inputs.sample_shapes(first_batch(dataset)[0])


def parse_fractions(value: Any, what: str = "split") -> tuple[float, float, float]:
    """(train, val, test) fractions from '0.8,0.1,0.1', '0.9,0.1' or a sequence; they must sum to 1."""
    if isinstance(value, str):
        try:
            value = [float(part) for part in value.replace(";", ",").split(",") if part.strip()]
        except ValueError:
            raise ConfigError(f"{what} must be fractions like 0.8,0.1,0.1 (train, val, test), got {value!r}.") from None
    try:
        parts = [float(v) for v in value]
    except (TypeError, ValueError):
        raise ConfigError(f"{what} must be fractions like 0.8,0.1,0.1 (train, val, test), got {value!r}.") from None
    if len(parts) == 2:
        parts.append(max(0.0, 1.0 - sum(parts)))
    if len(parts) != 3 or not all(math.isfinite(p) and p >= 0 for p in parts) or parts[0] <= 0 or parts[1] <= 0 \
            or abs(sum(parts) - 1.0) > 1e-6:
        raise ConfigError(f"{what} must be three non-negative fractions (train, val, test) with train and val above "
                          f"0, summing to 1, like 0.8,0.1,0.1; got {value!r}.")
    return parts[0], parts[1], parts[2]


def stratified_indices(labels: torch.Tensor | np.ndarray | int, fractions: Sequence[float] = DEFAULT_FRACTIONS,
                       seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train, val, test) sorted index tensors: a deterministic split for ``seed``, stratified by label.

    ``labels``: one label per sample, or the number of samples (unlabelled: a seeded random
    split). The part sizes are ``round(fraction·N)`` (val at least 1, train the rest); within
    every class each part gets its share to within one sample.
    """
    train_f, val_f, test_f = parse_fractions(fractions)
    if isinstance(labels, int):
        n, y = labels, torch.zeros(labels, dtype=torch.long)
    else:
        y = torch.as_tensor(np.asarray(labels)).reshape(-1).long()
        n = len(y)
    if n < 2:
        raise DataError(f"cannot split {n} sample(s) into training and validation parts; the data needs at least 2.")
    n_val = max(1, round(val_f * n))
    n_test = min(round(test_f * n), n - n_val - 1)
    targets = [n - n_val - n_test, n_val, n_test]
    gen = torch.Generator().manual_seed(seed)
    # Class blocks, each in a seeded random order; a deficit round-robin over that sequence gives
    # every part its exact size and every class block its share to within one sample. (Written
    # here because scikit-learn's stratified split refuses classes with fewer than two samples.)
    order = torch.cat([(y == c).nonzero().reshape(-1)[torch.randperm(int((y == c).sum()), generator=gen)]
                       for c in torch.unique(y)])
    assigned = [0, 0, 0]
    parts: list[list[int]] = [[], [], []]
    for i, index in enumerate(order.tolist()):
        deficits = [targets[s] * (i + 1) / n - assigned[s] for s in range(3)]
        s = max(range(3), key=lambda k: (deficits[k], -k))
        assigned[s] += 1
        parts[s].append(index)
    return tuple(torch.tensor(sorted(p), dtype=torch.long) for p in parts)  # type: ignore[return-value]


def split_data(inputs: Any, labels: Any = None, *, fractions: Sequence[float] = DEFAULT_FRACTIONS, seed: int = 0,
               num_classes: int | None = None, name: str = "data", trim_key: str | None = None) -> Splits:
    """Splits of one pool of samples: ``inputs`` (a tensor/array, a tuple or a dict of them, one row per
    sample) and optional ``labels``, split by :func:`stratified_indices` (``fractions`` of train, val, test).
    ``trim_key``: batches of the parts cut their padding (see :class:`~rankshrink.data.InputDataset`)."""
    from .dataset import InputDataset, make_dataset

    pool = InputDataset(inputs, labels)
    parts = stratified_indices(pool.labels if pool.labels is not None else len(pool), fractions, seed)
    datasets = [make_dataset(*pool.rows(index), trim_key=trim_key) for index in parts]
    return splits_from(*datasets, num_classes=num_classes, name=name)


def _make_splits(name: str, num_classes: int, train: tuple[np.ndarray | torch.Tensor, ...],
                 val: tuple[np.ndarray | torch.Tensor, ...], test: tuple[np.ndarray | torch.Tensor, ...]) -> Splits:
    """Splits of float32 images and int64 labels (the built-in loaders)."""
    parts = []
    for part, (x, y) in zip(("train", "val", "test"), (train, val, test)):
        y = torch.as_tensor(y)
        if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
            # int64 conversion would truncate 2.7 to 2 without a word
            raise DataError(f"data set '{name}': the {part} labels are {y.dtype}; class labels must be integers "
                            "(convert whole-number labels with labels.astype('int64') first).")
        parts.append(TensorDataset(torch.as_tensor(x, dtype=torch.float32).contiguous(),
                                   y.to(torch.int64).contiguous()))
    return Splits(parts[0], parts[1], parts[2], num_classes, tuple(parts[0].tensors[0].shape[1:]), name)


def _holdout_size(n: int) -> int:
    """Validation size carved from the end of a training set: 5000, or 10% of small sets."""
    return min(5000, max(1, n // 10))
