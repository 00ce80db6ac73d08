"""Batches and subsets of map-style data sets (TensorDatasets sliced directly)."""

from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import Dataset, Subset, TensorDataset, default_collate

from ..errors import ConfigError, DataError


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
