"""Batches and subsets of map-style data sets, for inputs of any form, with or without labels.

Batches are ``(inputs, labels)``: ``inputs`` is a tensor, a tuple (positional arguments) or a
dict (keyword arguments) of tensors with one row per sample, and ``labels`` an int64
tensor or None. TensorDatasets (one tensor = inputs alone; two = inputs and labels when the second holds one integer
per sample, else two positional inputs such as token ids and an attention mask),
:class:`~rankshrink.data.dataset.InputDataset` and Subsets of them are sliced directly, which
is much faster than per-sample collation; other data sets are read item by item, each item
being ``(inputs, label)`` (a pair whose second element is a scalar), a dict with a ``label``
/ ``labels`` key beside its inputs, or inputs alone.
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping

import numpy as np
import torch
from torch.utils.data import Dataset, Subset, TensorDataset, default_collate

from .. import inputs as model_inputs
from ..errors import ConfigError, DataError
from .dataset import LABEL_KEYS, InputDataset, base_of, check_labels, make_dataset

Batch = tuple[Any, "torch.Tensor | None"]


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


def _is_label(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return value.dim() == 0
    return isinstance(value, (int, float, bool, np.integer, np.floating, np.bool_))


def _is_label_batch(value: Any, inputs: Any) -> bool:
    if not isinstance(value, torch.Tensor) or value.dim() != 1 or value.is_floating_point():
        return False
    try:
        return model_inputs.batch_size(inputs) == len(value)
    except DataError:
        return False


def split_item(item: Any, what: str, *, batched: bool = False) -> Batch:
    """(inputs, label or None) of one data set item, or of one collated batch with ``batched``."""
    if isinstance(item, (tuple, list)) and len(item) == 2 and (
            _is_label(item[1]) if not batched else _is_label_batch(item[1], item[0])):
        return item[0], item[1]
    if isinstance(item, Mapping):
        keys = [k for k in LABEL_KEYS if k in item]
        if keys:
            return {k: v for k, v in item.items() if k not in LABEL_KEYS}, item[keys[0]]
        return dict(item), None
    if model_inputs.is_structure(item) or isinstance(item, np.ndarray):
        return item, None
    raise DataError(f"{what} is a {type(item).__name__}; data set items must be (inputs, label) pairs or inputs "
                    "(tensors, tuples or dicts of tensors).")


def _collate(items: list[Any], first_index: int, dataset: Dataset) -> Batch:
    parts = [split_item(item, f"item {first_index + i} of {type(dataset).__name__}") for i, item in enumerate(items)]
    labelled = [label is not None for _, label in parts]
    if any(labelled) and not all(labelled):
        bad = first_index + labelled.index(not labelled[0])
        raise DataError(f"item {bad} of {type(dataset).__name__} {'has' if labelled[bad - first_index] else 'lacks'} "
                        f"a label unlike item {first_index}; every item must be (inputs, label), or every item inputs "
                        "alone.")
    try:
        inputs = default_collate([inp for inp, _ in parts])
    except (RuntimeError, TypeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"items {first_index}..{first_index + len(items) - 1} of {type(dataset).__name__} cannot be "
                        f"stacked into one batch ({first}); every sample needs inputs of one shape.") from None
    inputs = _tensors(inputs)
    labels = None
    if all(labelled):
        raw = [label for _, label in parts]
        values = torch.stack([torch.as_tensor(v) for v in raw])
        labels = check_labels(values.reshape(-1), len(items),
                              f"the labels of items {first_index}..{first_index + len(items) - 1} of "
                              f"{type(dataset).__name__}")
    return inputs, labels


def _tensors(value: Any) -> Any:
    """numpy arrays from a collate as tensors."""
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value)
    if isinstance(value, Mapping):
        return {k: _tensors(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return tuple(_tensors(v) for v in value)
    return value


def _labels_tensor(tensor: torch.Tensor) -> bool:
    """Whether the second tensor of a TensorDataset holds labels: one integer (or bool) per sample."""
    return tensor.dim() == 1 and not tensor.is_floating_point() and not tensor.is_complex()


def _tensor_rows(tensors: tuple[torch.Tensor, ...], rows: torch.Tensor) -> Batch:
    if len(tensors) == 1:
        return tensors[0][rows], None
    if len(tensors) == 2:
        if not _labels_tensor(tensors[1]):
            # (ids, mask)-like pairs: a second tensor that is not one class index per sample is an input, never
            # labels; both go to the model as positional arguments.
            return (tensors[0][rows], tensors[1][rows]), None
        return tensors[0][rows], tensors[1][rows]
    raise DataError(f"a TensorDataset for rankshrink holds (inputs,) or (inputs, labels); this one holds "
                    f"{len(tensors)} tensors. For several inputs use rankshrink.data.InputDataset((x1, x2), labels) "
                    "or a dict of inputs.")


def iterate_batches(dataset: Dataset, batch_size: int, *, order: torch.Tensor | None = None,
                    drop_last_single: bool = False) -> Iterator[Batch]:
    """Yield ``(inputs, labels)`` batches in ``order`` (default: dataset order); labels may be None.

    ``drop_last_single`` skips a final batch of one sample (BatchNorm cannot train on it).
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {batch_size}.")
    n = _dataset_len(dataset)
    indices = torch.arange(n) if order is None else order
    base, index_map = base_of(dataset)
    fast = base if isinstance(base, (TensorDataset, InputDataset)) else None
    if isinstance(fast, TensorDataset) and len(fast.tensors) not in (1, 2):
        _tensor_rows(tuple(fast.tensors), indices[:0])  # raises the message above
    for start in range(0, len(indices), batch_size):
        chunk = indices[start:start + batch_size]
        if drop_last_single and len(chunk) == 1 and len(indices) > 1:
            return
        if fast is not None:
            rows = chunk if index_map is None else index_map[chunk]
            if isinstance(fast, TensorDataset):
                yield _tensor_rows(tuple(fast.tensors), rows)
            else:
                yield fast.rows(rows)
        else:
            items = [dataset[int(i)] for i in chunk]
            yield _collate(items, int(chunk[0]) if len(chunk) else 0, dataset)


def first_batch(dataset: Dataset, n: int = 1) -> Batch:
    """The first ``n`` samples as one batch."""
    if _dataset_len(dataset) == 0:
        raise DataError("the data set is empty.")
    return next(iter(iterate_batches(dataset, n)))


def calibration_subset(dataset: Dataset, n: int = 512, seed: int = 0, *, skip: int = 0) -> Dataset:
    """A deterministic random subset of ``n`` samples (all of them if fewer), in dataset order, in memory.

    ``skip``: leave out the ``skip`` samples the same seed's subset of that size holds (so a subset can be
    disjoint from a calibration subset), when the data set has ``skip + n`` samples; else ignored.
    """
    if n < 1:
        raise ConfigError(f"calibration subset size must be at least 1, got {n}.")
    total = _dataset_len(dataset)
    if total == 0:
        raise DataError("cannot take a calibration subset of an empty data set.")
    if skip and skip + n <= total:
        gen = torch.Generator().manual_seed(seed)
        chosen = torch.randperm(total, generator=gen)[skip:skip + n].sort().values
    elif n >= total:
        chosen = torch.arange(total)
    else:
        gen = torch.Generator().manual_seed(seed)
        chosen = torch.randperm(total, generator=gen)[:n].sort().values
    inputs, labels = next(iter(iterate_batches(dataset, max(1, len(chosen)), order=chosen)))
    inputs = model_inputs.map_tensors(lambda t: t.clone(), inputs)
    return make_dataset(inputs, None if labels is None else labels.clone(), trim_key=trim_key_of(dataset))


def trim_key_of(dataset: Dataset) -> str | None:
    """The input whose padding ``dataset``'s batches are cut to (so their axis 1 varies), or None."""
    base = base_of(dataset)[0]
    return base.trim_key if isinstance(base, InputDataset) else None


def has_labels(dataset: Dataset) -> bool:
    """Whether ``dataset``'s samples carry labels (looks at the first sample)."""
    if _dataset_len(dataset) == 0:
        return False
    return first_batch(dataset)[1] is not None
