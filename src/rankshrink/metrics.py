"""Classification metrics on a data set: predictions, accuracy, per-class accuracy, agreement.

All run under ``torch.no_grad()`` with the model in eval mode and put every submodule
back in the train/eval mode it had before. They check what they are given: an empty
data set, logits that do not fit the labels, or non-finite outputs raise ``DataError``
(non-finite outputs may instead count as wrong with ``nonfinite="wrong"``, which the
training loop uses so a diverged epoch is scored instead of crashing the run).
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator, Literal

import torch
from torch import nn
from torch.utils.data import Dataset

from .data import _dataset_len, iterate_batches
from .errors import ConfigError, DataError

__all__ = ["eval_mode", "predictions", "accuracy", "per_class_accuracy", "agreement"]

NonFinite = Literal["raise", "wrong"]


@contextlib.contextmanager
def eval_mode(*models: nn.Module) -> Iterator[None]:
    """Put ``models`` in eval mode; restore each submodule's own mode afterwards."""
    saved = [(module, module.training) for model in models for module in model.modules()]
    try:
        for model in models:
            model.eval()
        yield
    finally:
        for module, mode in saved:
            module.training = mode


def _device_of(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    for buffer in model.buffers():
        return buffer.device
    return torch.device("cpu")


def _float_dtype_of(model: nn.Module) -> torch.dtype | None:
    for tensor in model.parameters():
        if tensor.is_floating_point():
            return tensor.dtype
    return None


def to_model(inputs: torch.Tensor, model: nn.Module) -> torch.Tensor:
    """``inputs`` on the model's device and, when both are floating point, in its dtype.

    Data sets hold float32; a float16/bfloat16 (or float64) model gets its inputs cast
    instead of failing with a dtype mismatch.
    """
    inputs = inputs.to(_device_of(model))
    dtype = _float_dtype_of(model)
    if dtype is not None and inputs.is_floating_point() and inputs.dtype != dtype:
        inputs = inputs.to(dtype)
    return inputs


def check_logits(logits: torch.Tensor, labels: torch.Tensor) -> None:
    """Raise ``DataError`` unless ``logits`` are (batch, classes) scores covering ``labels``."""
    if logits.ndim != 2 or logits.shape[0] != labels.shape[0]:
        raise DataError(
            f"the model returned outputs of shape {tuple(logits.shape)} for a batch of "
            f"{labels.shape[0]} samples; a classifier must return (batch, classes) logits."
        )
    if labels.ndim != 1 or labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise DataError(f"labels must be a 1-D integer tensor; got {labels.dtype} of shape {tuple(labels.shape)}.")
    if labels.numel():
        low, high = int(labels.min()), int(labels.max())
        if low < 0:
            raise DataError(f"labels must be non-negative class indices; found {low}.")
        if high >= logits.shape[1]:
            raise DataError(
                f"the model outputs {logits.shape[1]} classes (output shape {tuple(logits.shape)}) "
                f"but the data has label {high}; the model's last layer does not fit this data set."
            )


def _predicted(model: nn.Module, dataset: Dataset, batch_size: int,
               nonfinite: NonFinite) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (predicted labels, true labels) per batch; non-finite rows predict -1."""
    if nonfinite not in ("raise", "wrong"):
        raise ConfigError(f"nonfinite must be 'raise' or 'wrong', got {nonfinite!r}.")
    if _dataset_len(dataset) == 0:
        raise DataError("cannot evaluate on an empty data set.")
    device = _device_of(model)
    with torch.no_grad(), eval_mode(model):
        seen = 0
        for inputs, labels in iterate_batches(dataset, batch_size):
            logits = model(to_model(inputs, model))
            if not isinstance(logits, torch.Tensor):
                raise DataError(f"the model returned {type(logits).__name__}, not a tensor of logits.")
            labels = labels.to(device)
            check_logits(logits, labels)
            finite = torch.isfinite(logits).all(dim=1)
            predicted = logits.argmax(dim=1)
            if not bool(finite.all()):
                if nonfinite == "raise":
                    bad = int((~finite).sum())
                    raise DataError(
                        f"the model produced NaN or infinite outputs for {bad} samples (first at "
                        f"sample {seen + int((~finite).nonzero()[0])}); its weights may have diverged."
                    )
                predicted = torch.where(finite, predicted, torch.full_like(predicted, -1))
            seen += labels.shape[0]
            yield predicted.cpu(), labels.cpu().long()


def predictions(model: nn.Module, dataset: Dataset, batch_size: int = 512, *,
                nonfinite: NonFinite = "raise") -> torch.Tensor:
    """Predicted class per sample (int64), in dataset order."""
    return torch.cat([p for p, _ in _predicted(model, dataset, batch_size, nonfinite)])


def accuracy(model: nn.Module, dataset: Dataset, batch_size: int = 512, *,
             nonfinite: NonFinite = "raise") -> float:
    """Fraction of samples whose predicted class equals the label."""
    correct = total = 0
    for predicted, labels in _predicted(model, dataset, batch_size, nonfinite):
        correct += int((predicted == labels).sum())
        total += labels.shape[0]
    return correct / total


def per_class_accuracy(model: nn.Module, dataset: Dataset, batch_size: int = 512, *,
                       num_classes: int | None = None, nonfinite: NonFinite = "raise") -> list[float]:
    """Accuracy per class index; NaN for classes with no samples in ``dataset``."""
    preds, labels = [], []
    for p, y in _predicted(model, dataset, batch_size, nonfinite):
        preds.append(p)
        labels.append(y)
    predicted, truth = torch.cat(preds), torch.cat(labels)
    count = num_classes if num_classes is not None else int(truth.max()) + 1
    if count <= int(truth.max()):
        raise DataError(f"num_classes={count} but the data has label {int(truth.max())}.")
    totals = torch.bincount(truth, minlength=count).tolist()
    hits = torch.bincount(truth[predicted == truth], minlength=count).tolist()
    return [h / t if t else math.nan for h, t in zip(hits, totals)]


def agreement(model: nn.Module, dataset: Dataset, reference_predictions: torch.Tensor,
              batch_size: int = 512, *, nonfinite: NonFinite = "raise") -> float:
    """Fraction of samples where ``model`` predicts what ``reference_predictions`` holds.

    ``reference_predictions`` is typically ``predictions(original_model, dataset)``.
    """
    reference = torch.as_tensor(reference_predictions).reshape(-1).long().cpu()
    n = _dataset_len(dataset)
    if reference.numel() != n:
        raise DataError(f"{reference.numel()} reference predictions for a data set of {n} samples; "
                        "compute them on the same data set.")
    return float((predictions(model, dataset, batch_size, nonfinite=nonfinite) == reference)
                 .float().mean())
