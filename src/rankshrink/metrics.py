"""Metrics on a data set: predictions, accuracy, per-class accuracy, agreement; and the label-free
comparisons of a model's outputs with a reference model's (:func:`output_agreement`: cosine, mse, kl).

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
from .inputs import call_checked, device_of, float_dtype_of, output_tensor, to_model

__all__ = ["eval_mode", "predictions", "accuracy", "per_class_accuracy", "agreement", "to_model", "model_logits",
           "representations", "output_agreement", "COMPARISONS"]

# Label-free comparisons of outputs (see output_agreement); each is 1.0 (cosine, mse) or 0.0 (kl) for equal outputs.
COMPARISONS = ("cosine", "mse", "kl")

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


# Kept here for the modules that import them from metrics; the helpers live in rankshrink.inputs.
_device_of = device_of
_float_dtype_of = float_dtype_of


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


def model_logits(model: nn.Module, inputs) -> torch.Tensor:
    """The model's logits on a batch of ``inputs`` (any form); a failure names the layer and shapes."""
    return output_tensor(call_checked(model, to_model(inputs, model)))


def _predicted(model: nn.Module, dataset: Dataset, batch_size: int, nonfinite: NonFinite, *,
               need_labels: bool = True) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """Yield (predicted labels, true labels or None) per batch; non-finite rows predict -1."""
    if nonfinite not in ("raise", "wrong"):
        raise ConfigError(f"nonfinite must be 'raise' or 'wrong', got {nonfinite!r}.")
    if _dataset_len(dataset) == 0:
        raise DataError("cannot evaluate on an empty data set.")
    device = device_of(model)
    with torch.no_grad(), eval_mode(model):
        seen = 0
        for inputs, labels in iterate_batches(dataset, batch_size):
            if labels is None and need_labels:
                raise DataError("the data has no labels, so accuracy cannot be measured; measure agreement with the "
                                "original model instead (metric='agreement', CLI --metric agreement).")
            logits = model_logits(model, inputs)
            if labels is not None:
                labels = labels.to(device)
                check_logits(logits, labels)
            elif logits.ndim != 2:
                raise DataError(f"the model returned outputs of shape {tuple(logits.shape)}; a classifier must "
                                "return (batch, classes) logits.")
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
            seen += predicted.shape[0]
            yield predicted.cpu(), None if labels is None else labels.cpu().long()


def predictions(model: nn.Module, dataset: Dataset, batch_size: int = 512, *,
                nonfinite: NonFinite = "raise") -> torch.Tensor:
    """Predicted class per sample (int64), in dataset order."""
    return torch.cat([p for p, _ in _predicted(model, dataset, batch_size, nonfinite, need_labels=False)])


def accuracy(model: nn.Module, dataset: Dataset, batch_size: int = 512, *,
             nonfinite: NonFinite = "raise") -> float:
    """Fraction of samples whose predicted class equals the label."""
    correct = total = 0
    for predicted, labels in _predicted(model, dataset, batch_size, nonfinite):
        assert labels is not None  # _predicted refuses unlabelled data unless need_labels=False
        correct += int((predicted == labels).sum())
        total += labels.shape[0]
    return correct / total


def per_class_accuracy(model: nn.Module, dataset: Dataset, batch_size: int = 512, *,
                       num_classes: int | None = None, nonfinite: NonFinite = "raise") -> list[float]:
    """Accuracy per class index; NaN for classes with no samples in ``dataset``."""
    preds, labels = [], []
    for p, y in _predicted(model, dataset, batch_size, nonfinite):
        assert y is not None  # _predicted refuses unlabelled data unless need_labels=False
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


# --------------------------------------------------------------------------- label-free comparisons

def _batch_representations(model: nn.Module, dataset: Dataset, batch_size: int) -> Iterator[torch.Tensor]:
    from .outputs import per_sample, representation

    if _dataset_len(dataset) == 0:
        raise DataError("cannot evaluate on an empty data set.")
    with torch.no_grad(), eval_mode(model):
        for inputs, _ in iterate_batches(dataset, batch_size):
            moved = to_model(inputs, model)
            yield per_sample(representation(call_checked(model, moved), moved)).cpu()


def representations(model: nn.Module, dataset: Dataset, batch_size: int = 128) -> torch.Tensor:
    """Every sample's output representation (:func:`rankshrink.outputs.representation`), flattened, float64."""
    return torch.cat(list(_batch_representations(model, dataset, batch_size)))


def output_agreement(model: nn.Module, dataset: Dataset, reference: torch.Tensor, measure: str = "cosine",
                     batch_size: int = 128) -> float:
    """How close ``model``'s outputs are to ``reference`` (:func:`representations` of the original), no labels.

    * ``cosine``: mean over samples of the cosine similarity of the two (flattened) outputs; 1 when equal.
    * ``mse``: ``1 − Σ(y − y₀)² / Σ(y₀ − ȳ₀)²``, one minus the squared error normalised by the reference's
      variance over the data (per feature, summed); 1 when equal, 0 for predicting the mean.
    * ``kl``: ``−mean KL(softmax(y₀) ‖ softmax(y))`` over samples (classifier logits: the softmax runs over
      each sample's outputs); 0 when equal.

    Higher is better for all three. A sample whose output is not finite counts as the worst case:
    cosine −1, an all-zero output for mse, a uniform distribution for kl.
    """
    import torch.nn.functional as F

    if measure not in COMPARISONS:
        raise ConfigError(f"measure must be one of {', '.join(COMPARISONS)}, got {measure!r}.")
    reference = reference.to(torch.float64)
    n = _dataset_len(dataset)
    if reference.shape[0] != n:
        raise DataError(f"{reference.shape[0]} reference outputs for a data set of {n} samples; compute them on "
                        "the same data set.")
    total, seen = 0.0, 0
    for out in _batch_representations(model, dataset, batch_size):
        ref = reference[seen:seen + out.shape[0]]
        if out.shape != ref.shape:
            raise DataError(f"the model's outputs have {out.shape[1]} values per sample but the original's have "
                            f"{ref.shape[1]}; compare models with the same outputs.")
        finite = torch.isfinite(out).all(dim=1)
        if measure == "cosine":
            values = F.cosine_similarity(torch.where(finite[:, None], out, 0.0), ref, dim=1, eps=1e-12)
            total += float(torch.where(finite, values, -1.0).sum())
        elif measure == "mse":
            total += float((torch.where(finite[:, None], out, 0.0) - ref).pow(2).sum())
        else:
            ref_logp = F.log_softmax(ref, dim=1)
            logp = F.log_softmax(torch.where(finite[:, None], out, 0.0), dim=1)
            total += float((ref_logp.exp() * (ref_logp - logp)).sum())
        seen += out.shape[0]
    if measure == "cosine":
        return total / n
    if measure == "mse":
        spread = float((reference - reference.mean(dim=0)).pow(2).sum())
        if spread == 0:
            raise DataError("the original model's outputs are the same for every validation sample, so the mse "
                            "metric (normalised by their variance) is undefined; use --metric cosine.")
        return 1.0 - total / spread
    return -total / n
