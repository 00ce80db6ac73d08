"""Data sets of model inputs of any form, with or without labels, and what user objects become one.

:class:`InputDataset` holds inputs (a tensor, a tuple of tensors = positional arguments, or a
dict of tensors = keyword arguments; every tensor has one row per sample) and optional
int64 labels. Its items are ``(inputs, label)`` or ``inputs`` alone, like a user's own data
set. :func:`as_dataset` turns what users hand over (a Dataset, a DataLoader, a tensor or
array, a dict of tensors, an ``(inputs, labels)`` pair) into a map-style data set.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from .. import inputs as model_inputs
from ..errors import DataError

__all__ = ["InputDataset", "make_dataset", "as_dataset", "check_labels", "trim_padding", "LABEL_KEYS"]

# Keys of a dict-valued data set item that hold its label (the rest are keyword inputs).
LABEL_KEYS = ("label", "labels")


def _as_tensor(value: Any, what: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.ndarray):
        if value.dtype == object:
            raise DataError(f"{what} is an array of Python objects; pass numbers (a numeric array or tensor).")
        return torch.from_numpy(np.ascontiguousarray(value))
    try:
        return torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError):
        raise DataError(f"{what} must be a tensor or an array, got {type(value).__name__}.") from None


def _structure(value: Any, what: str) -> Any:
    """A structure of tensors from tensors/arrays in tuples, lists and dicts."""
    if isinstance(value, Mapping):
        bad = [k for k in value if not isinstance(k, str) or not k.isidentifier()]
        if bad:
            raise DataError(f"{what}: input names must be Python identifiers (they are passed as keyword "
                            f"arguments), got {bad[0]!r}.")
        return {key: _structure(item, f"{what}['{key}']") for key, item in value.items()}
    if isinstance(value, (tuple, list)):
        return tuple(_structure(item, f"{what}[{index}]") for index, item in enumerate(value))
    return _as_tensor(value, what)


def check_labels(labels: Any, n: int, what: str) -> torch.Tensor:
    """``labels`` as a 1-D int64 tensor of ``n`` non-negative class indices, or a DataError naming ``what``."""
    y = _as_tensor(labels, what)
    if y.dtype == torch.bool:
        y = y.long()
    if y.is_floating_point() or y.is_complex():
        raise DataError(f"{what} are {str(y.dtype).replace('torch.', '')}; labels must be integer class indices "
                        "(0, 1, ...). Convert them, e.g. y.astype('int64'), or leave them out to compress by "
                        "agreement with the original model.")
    if y.dim() != 1:
        raise DataError(f"{what} must be one label per sample (shape ({n},)), got shape {tuple(y.shape)}.")
    if len(y) != n:
        raise DataError(f"{what} has {len(y)} labels for {n} samples; give one label per sample.")
    y = y.to(torch.int64)
    if len(y) and int(y.min()) < 0:
        raise DataError(f"{what} holds the negative label {int(y.min())}; labels must be class indices 0, 1, ....")
    return y.contiguous()


def trim_padding(inputs: Any, mask_key: str) -> Any:
    """Dict ``inputs`` cut after the last position any row's ``inputs[mask_key]`` marks as real.

    Every (batch, positions) tensor shaped like the mask is cut the same way; a model that honours its
    attention mask computes the same outputs for the real tokens, faster.
    """
    mask = inputs.get(mask_key) if isinstance(inputs, Mapping) else None
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or mask.shape[1] == 0:
        return inputs
    used = torch.nonzero(mask.any(dim=0))
    length = int(used.max()) + 1 if used.numel() else 1
    if length == mask.shape[1]:
        return inputs
    return {key: (value[:, :length] if isinstance(value, torch.Tensor) and value.dim() >= 2
                  and tuple(value.shape[:2]) == tuple(mask.shape) else value)
            for key, value in inputs.items()}


class InputDataset(Dataset):
    """Inputs of any form (every tensor with one row per sample) and optional int64 labels.

    ``dataset[i]`` is ``(inputs_i, label_i)`` with labels, else ``inputs_i``; :meth:`rows`
    slices many samples at once (what batching uses). ``trim_key`` (dict inputs, e.g.
    ``'attention_mask'``): :meth:`rows` cuts each batch's padding after its longest sample
    (:func:`trim_padding`), which text data uses.
    """

    def __init__(self, inputs: Any, labels: Any = None, *, what: str = "data", trim_key: str | None = None):
        self.inputs = _structure(inputs, f"{what} inputs")
        if not model_inputs.leaves(self.inputs):
            raise DataError(f"{what}: the inputs hold no tensor.")
        self._n = model_inputs.batch_size(self.inputs)
        self.labels = None if labels is None else check_labels(labels, self._n, f"{what} labels")
        self.trim_key = trim_key

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, index: int) -> Any:
        item = model_inputs.take(self.inputs, index)
        return item if self.labels is None else (item, self.labels[index])

    def rows(self, index: torch.Tensor, *, trim: bool = True) -> tuple[Any, torch.Tensor | None]:
        inputs = model_inputs.take(self.inputs, index)
        if trim and self.trim_key is not None:
            inputs = trim_padding(inputs, self.trim_key)
        return inputs, (None if self.labels is None else self.labels[index])

    def content(self) -> list[tuple[str, torch.Tensor]]:
        """Every tensor, named, in a fixed order (what its fingerprint hashes)."""
        named = model_inputs.leaves(self.inputs)
        return named + ([("label", self.labels)] if self.labels is not None else [])

    def __repr__(self) -> str:
        labels = "labelled" if self.labels is not None else "unlabelled"
        shapes = model_inputs.describe(self.inputs, per_sample=True)
        return f"InputDataset({self._n} samples, {labels}, inputs {shapes})"


def make_dataset(inputs: Any, labels: torch.Tensor | None, *, trim_key: str | None = None) -> Dataset:
    """A TensorDataset ``(x, y)`` for one tensor with labels (the common case), else an InputDataset."""
    if isinstance(inputs, torch.Tensor) and labels is not None:
        return TensorDataset(inputs, labels)
    return InputDataset(inputs, labels, trim_key=trim_key)


def _from_loader(loader: DataLoader, what: str) -> Dataset:
    dataset = loader.dataset
    try:
        len(dataset)  # type: ignore[arg-type]
        dataset[0]
        return dataset  # map-style: rankshrink batches it itself (the loader's sampler/collate are not used)
    except (TypeError, NotImplementedError, IndexError, KeyError):
        pass
    from .batches import split_item

    batches = [split_item(batch, f"{what}, batch {i}", batched=True) for i, batch in enumerate(loader)]
    if not batches:
        raise DataError(f"{what}: the DataLoader yielded no batches.")
    labelled = {labels is not None for _, labels in batches}
    if len(labelled) > 1:
        raise DataError(f"{what}: some batches have labels and some do not.")
    inputs = model_inputs.concat([inp for inp, _ in batches])
    labels = torch.cat([torch.as_tensor(y).reshape(-1) for _, y in batches]) if labelled == {True} else None
    return make_dataset(inputs, labels)


def as_dataset(value: Any, what: str = "data") -> Dataset:
    """A map-style data set from a Dataset, a DataLoader, a tensor/array (inputs only), a dict of tensors
    (keyword inputs), or a pair ``(inputs, labels)`` (labels may be None)."""
    if isinstance(value, DataLoader):
        return _from_loader(value, what)
    if isinstance(value, Dataset) and not isinstance(value, torch.utils.data.IterableDataset):
        return value
    if isinstance(value, torch.utils.data.IterableDataset):
        return _from_loader(DataLoader(value, batch_size=256), what)
    if isinstance(value, tuple) and len(value) == 2 and not isinstance(value[1], Mapping):
        inputs, labels = value
        inputs = _structure(inputs, f"{what} inputs")
        n = model_inputs.batch_size(inputs)
        return make_dataset(inputs, None if labels is None else check_labels(labels, n, f"{what} labels"))
    if isinstance(value, (torch.Tensor, np.ndarray, Mapping)):
        return InputDataset(value, what=what)
    if hasattr(value, "__getitem__") and hasattr(value, "__len__"):
        return value  # a map-style data set that does not subclass Dataset
    raise DataError(f"{what} must be a Dataset, a DataLoader, a tensor or array of inputs, a dict of input tensors "
                    f"or an (inputs, labels) pair; got {type(value).__name__}.")


def base_of(dataset: Dataset) -> tuple[Dataset, torch.Tensor | None]:
    """(the data set under Subsets, the index map into it or None)."""
    index = None
    while isinstance(dataset, Subset):
        here = torch.as_tensor(list(dataset.indices), dtype=torch.long)
        index = here if index is None else here[index]
        dataset = dataset.dataset
    return dataset, index
