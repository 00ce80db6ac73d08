"""A data set in three disjoint parts: train, validation (decisions) and test (reports)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import TensorDataset

from ..errors import DataError

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
    for part, (x, y) in zip(("train", "val", "test"), (train, val, test)):
        y = torch.as_tensor(y)
        if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
            # int64 conversion would truncate 2.7 to 2 without a word
            raise DataError(f"data set '{name}': the {part} labels are {y.dtype}; class labels must be integers "
                            "(convert whole-number labels with labels.astype('int64') first).")
        x = torch.as_tensor(x, dtype=torch.float32).contiguous()
        y = y.to(torch.int64).contiguous()
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
