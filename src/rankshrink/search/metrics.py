"""Metrics for the rank search: callables ``model -> float`` where higher is better.

A metric is anything callable on a model that returns a number. The built-ins wrap
:mod:`rankshrink.metrics` and carry a ``key`` (what they measure) and a
``data_fingerprint`` (on which data), which together let the search cache their
values on disk. A plain callable works too; it is cached only if it has a string
attribute ``cache_key`` (it is then trusted to name what it computes, data
included), otherwise every call is a fresh evaluation.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from ..errors import ConfigError, DataError
from ..fingerprint import dataset_fingerprint
from .bootstrap import Statistic, accuracy_statistic, agreement_statistic, per_class_statistic

__all__ = ["Metric", "accuracy_metric", "per_class_metric", "agreement_metric", "comparison_metric", "as_metric",
           "dataset_labels", "register_metric", "metric_names", "METRIC_NAMES", "LABEL_FREE"]

# name -> (builder(original, dataset, fingerprint=, num_classes=) -> Metric, needs labels, aliases)
_REGISTRY: dict[str, tuple[Callable[..., "Metric"], bool]] = {}
_ALIASES: dict[str, str] = {}


def register_metric(name: str, *, labels: bool, aliases: tuple[str, ...] = ()):
    """Decorator: register ``builder(original, dataset, *, fingerprint, num_classes) -> Metric`` under ``name``.

    ``labels``: whether the metric needs labelled validation data (label-free ones compare with the
    original model). ``aliases`` are other names accepted for it.
    """
    def decorate(builder):
        _REGISTRY[name] = (builder, labels)
        for alias in aliases:
            _ALIASES[alias] = name
        return builder
    return decorate


def metric_names() -> tuple[str, ...]:
    """'auto' and every registered metric, in registration order."""
    return ("auto", *_REGISTRY)


def _check_dataset(dataset: Dataset | None, what: str) -> Dataset:
    from ..data import _dataset_len

    if dataset is None:
        raise DataError(f"the {what} metric needs a data set.")
    if _dataset_len(dataset) == 0:
        raise DataError(f"the data set for the {what} metric is empty; the search needs validation samples.")
    return dataset


class Metric:
    """A named metric ``model -> float`` (higher is better).

    ``key``: what is measured (e.g. 'accuracy'); ``data_fingerprint``: on which data.
    Both None means the metric cannot be cached. ``dataset`` is kept for reports.

    The built-ins are functions of the per-sample predictions: ``predict(model)`` gives
    them (int64 array, one class per sample) and ``statistic()`` the function that turns
    predictions at resampled positions into metric values (see
    :mod:`~rankshrink.search.bootstrap`), so their drops get bootstrap intervals. A plain
    callable has neither (``predict`` None).
    """

    def __init__(self, fn: Callable[[nn.Module], float], name: str, *, key: str | None = None,
                 data_fingerprint: str | None = None, dataset: Dataset | None = None,
                 predict: Callable[[nn.Module], np.ndarray] | None = None,
                 statistic: Callable[[], Statistic] | None = None):
        self.fn = fn
        self.name = name
        self.key = key
        self.data_fingerprint = data_fingerprint
        self.dataset = dataset
        self.predict = predict
        self._statistic_factory = statistic
        self._statistic: Statistic | None = None

    @property
    def per_sample(self) -> bool:
        """Whether the metric is a function of per-sample predictions (bootstrap intervals possible)."""
        return self.predict is not None and self._statistic_factory is not None

    def statistic(self) -> Statistic:
        """``(predictions, index (rows, n)) -> metric per row`` (built once, on first use)."""
        if self._statistic is None:
            if self._statistic_factory is None:
                raise ConfigError(f"metric '{self.name}' is not a function of per-sample predictions.")
            self._statistic = self._statistic_factory()
        return self._statistic

    def from_predictions(self, predictions: np.ndarray) -> float:
        """The metric of a model whose per-sample predictions are ``predictions``."""
        predictions = np.asarray(predictions).reshape(-1)
        value = float(self.statistic()(predictions, np.arange(predictions.size)[None, :])[0])
        if not math.isfinite(value):
            raise DataError(f"metric '{self.name}' is {value} on these predictions.")
        return value

    @property
    def cacheable(self) -> bool:
        return self.key is not None

    def __call__(self, model: nn.Module) -> float:
        value = self.fn(model)
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                raise DataError(f"metric '{self.name}' returned a tensor of shape {tuple(value.shape)}; "
                                "a metric must return one number.")
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise DataError(f"metric '{self.name}' returned {type(value).__name__}; a metric must return "
                            "a number (higher is better).")
        value = float(value)
        if not math.isfinite(value):
            raise DataError(f"metric '{self.name}' returned {value}; a metric must return a finite number "
                            "(NaN usually means the model's outputs or the labels are broken).")
        return value

    def __repr__(self) -> str:
        return f"Metric({self.name!r})"


def dataset_labels(dataset: Dataset) -> np.ndarray:
    """Every label of ``dataset`` in order (int64); DataError when it has none."""
    from ..data import iterate_batches

    parts = []
    for _, y in iterate_batches(dataset, 1024):
        if y is None:
            raise DataError("the data set has no labels.")
        parts.append(torch.as_tensor(y).reshape(-1))
    return torch.cat(parts).long().numpy()


def _predictor(dataset: Dataset, batch_size: int) -> Callable[[nn.Module], np.ndarray]:
    from ..metrics import predictions

    return lambda model: predictions(model, dataset, batch_size).numpy()


def accuracy_metric(dataset: Dataset | None, *, fingerprint: str | None = None, batch_size: int = 512) -> Metric:
    """Top-1 accuracy on ``dataset`` (a fraction in [0, 1])."""
    from ..metrics import accuracy

    data = _check_dataset(dataset, "accuracy")
    return Metric(lambda model: accuracy(model, data, batch_size), "accuracy", key="accuracy",
                  data_fingerprint=fingerprint or dataset_fingerprint(data), dataset=data,
                  predict=_predictor(data, batch_size), statistic=lambda: accuracy_statistic(dataset_labels(data)))


def per_class_metric(dataset: Dataset | None, reduce: str = "mean", *, num_classes: int | None = None,
                     fingerprint: str | None = None, batch_size: int = 512) -> Metric:
    """Per-class accuracy reduced to one number: 'mean' (balanced accuracy) or 'min' (worst class).

    Classes absent from ``dataset`` are ignored.
    """
    from ..metrics import per_class_accuracy

    if reduce not in ("mean", "min"):
        raise ConfigError(f"per-class accuracy reduces by 'mean' or 'min', got {reduce!r}.")
    data = _check_dataset(dataset, "per-class accuracy")

    def fn(model: nn.Module) -> float:
        values = [v for v in per_class_accuracy(model, data, batch_size, num_classes=num_classes)
                  if not math.isnan(v)]
        return (sum(values) / len(values)) if reduce == "mean" else min(values)

    name = "per-class" if reduce == "mean" else "worst-class"
    return Metric(fn, name, key=f"per_class_accuracy:{reduce}",
                  data_fingerprint=fingerprint or dataset_fingerprint(data), dataset=data,
                  predict=_predictor(data, batch_size),
                  statistic=lambda: per_class_statistic(dataset_labels(data), reduce, num_classes))


def agreement_metric(original: nn.Module, dataset: Dataset | None, *, fingerprint: str | None = None,
                     batch_size: int = 512) -> Metric:
    """Fraction of samples where the model predicts what ``original`` predicts (no labels needed).

    The original's predictions are computed once, on first use.
    """
    from ..metrics import agreement, predictions

    data = _check_dataset(dataset, "agreement")
    reference: list[torch.Tensor] = []

    def fn(model: nn.Module) -> float:
        if not reference:
            reference.append(predictions(original, data, batch_size))
        return agreement(model, data, reference[0], batch_size)

    def statistic() -> Statistic:
        if not reference:
            reference.append(predictions(original, data, batch_size))
        return agreement_statistic(reference[0].numpy())

    # The reference is a function of the original model, whose fingerprint is in every cache key.
    return Metric(fn, "agreement", key="agreement",
                  data_fingerprint=fingerprint or dataset_fingerprint(data), dataset=data,
                  predict=_predictor(data, batch_size), statistic=statistic)


def comparison_metric(original: nn.Module, dataset: Dataset | None, measure: str, *,
                      fingerprint: str | None = None, batch_size: int = 128) -> Metric:
    """A label-free metric comparing the model's outputs with ``original``'s on ``dataset``
    (:func:`rankshrink.metrics.output_agreement`: 'cosine', 'mse' or 'kl'; the original scores 1, 1, 0).

    The original's outputs are computed once, on first use.
    """
    from ..metrics import output_agreement, representations

    data = _check_dataset(dataset, measure)
    reference: list[torch.Tensor] = []

    def fn(model: nn.Module) -> float:
        if not reference:
            reference.append(representations(original, data, batch_size))
        return output_agreement(model, data, reference[0], measure, batch_size)

    # The reference is a function of the original model, whose fingerprint is in every cache key.
    return Metric(fn, measure, key=f"{measure}:v1", data_fingerprint=fingerprint or dataset_fingerprint(data),
                  dataset=data)


@register_metric("accuracy", labels=True, aliases=("top1", "top-1"))
def _accuracy(original, dataset, *, fingerprint=None, num_classes=None) -> Metric:
    return accuracy_metric(dataset, fingerprint=fingerprint)


@register_metric("agreement", labels=False)
def _agreement(original, dataset, *, fingerprint=None, num_classes=None) -> Metric:
    return agreement_metric(original, dataset, fingerprint=fingerprint)


@register_metric("per-class", labels=True, aliases=("per-class-accuracy", "balanced"))
def _per_class(original, dataset, *, fingerprint=None, num_classes=None) -> Metric:
    return per_class_metric(dataset, "mean", num_classes=num_classes, fingerprint=fingerprint)


@register_metric("worst-class", labels=True, aliases=("min-class",))
def _worst_class(original, dataset, *, fingerprint=None, num_classes=None) -> Metric:
    return per_class_metric(dataset, "min", num_classes=num_classes, fingerprint=fingerprint)


@register_metric("cosine", labels=False)
def _cosine(original, dataset, *, fingerprint=None, num_classes=None) -> Metric:
    return comparison_metric(original, dataset, "cosine", fingerprint=fingerprint)


@register_metric("mse", labels=False)
def _mse(original, dataset, *, fingerprint=None, num_classes=None) -> Metric:
    return comparison_metric(original, dataset, "mse", fingerprint=fingerprint)


@register_metric("kl", labels=False)
def _kl(original, dataset, *, fingerprint=None, num_classes=None) -> Metric:
    return comparison_metric(original, dataset, "kl", fingerprint=fingerprint)


METRIC_NAMES = metric_names()
# The metrics that need no labels (they compare with the original model).
LABEL_FREE = tuple(name for name, (_, labels) in _REGISTRY.items() if not labels)


def _auto_metric(original: nn.Module, dataset: Dataset | None) -> str:
    """accuracy with labels; without: agreement for a classifier's logits, cosine for anything else."""
    from ..data import first_batch, has_labels

    if dataset is None or has_labels(dataset):
        return "accuracy"
    from ..inputs import call_checked, to_model
    from ..metrics import eval_mode
    from ..outputs import output_kind, representation

    try:
        inputs = to_model(first_batch(dataset, 4)[0], original)
        with torch.no_grad(), eval_mode(original):
            output = call_checked(original, inputs, what="the validation data")
        kind, rep = output_kind(output), representation(output, inputs)
    except Exception:  # data the model cannot take: the search's own first evaluation reports it in full
        return "agreement"
    return "agreement" if kind == "logits" and rep.dim() == 2 and rep.shape[1] > 1 else "cosine"


def as_metric(metric: Any, original: nn.Module, dataset: Dataset | None, *,
              fingerprint: str | None = None, num_classes: int | None = None) -> Metric:
    """Turn a metric name, a :class:`Metric` or a callable into a :class:`Metric`.

    Names: 'auto' (accuracy when ``dataset`` has labels; without: agreement for classifier logits,
    cosine for other outputs such as an encoder's hidden states), 'accuracy', 'agreement' (with
    ``original``'s predictions), 'per-class' (mean of per-class accuracies), 'worst-class' (the
    lowest one), and the label-free comparisons with ``original``'s outputs 'cosine', 'mse' and 'kl'
    (see :func:`rankshrink.metrics.output_agreement`; the tolerance is on the drop from the original's
    1.0, 1.0 and 0.0). More can be added with :func:`register_metric`.
    """
    if isinstance(metric, Metric):
        return metric
    if isinstance(metric, str):
        name = metric.strip().lower().replace("_", "-")
        name = _ALIASES.get(name, name)
        if name == "auto":
            name = _auto_metric(original, dataset)
        if name not in _REGISTRY:
            raise ConfigError(f"unknown metric {metric!r}; use one of {', '.join(metric_names())} or pass a "
                              "callable model -> float (higher is better).")
        builder, labels = _REGISTRY[name]
        if labels and dataset is not None:
            from ..data import _dataset_len, has_labels

            if _dataset_len(dataset) and not has_labels(dataset):
                raise DataError(f"the {metric} metric needs labels but the validation data has none; use a "
                                f"label-free metric ({', '.join(LABEL_FREE)}; CLI --metric, or the default auto) to "
                                "compare with the original model.")
        return builder(original, dataset, fingerprint=fingerprint, num_classes=num_classes)
    if callable(metric):
        key = getattr(metric, "cache_key", None)
        name = getattr(metric, "__name__", None) or type(metric).__name__
        return Metric(metric, name, key=f"custom:{key}" if isinstance(key, str) else None,
                      data_fingerprint="" if isinstance(key, str) else None)
    raise ConfigError(f"a metric must be a name ({', '.join(METRIC_NAMES)}) or a callable model -> float, "
                      f"got {type(metric).__name__}.")
