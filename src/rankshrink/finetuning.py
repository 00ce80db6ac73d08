"""Recovery fine-tuning: the seeds' *direct* problem, training the factors on the real loss.

The seeds search ranks with a cheap indirect objective (keep each layer's
activations close), then train the factors on the real loss. Here:

* :func:`finetune` chooses what trains (the factor layers only, by default) and
  hands everything else to :func:`rankshrink.train.train`, the one training loop:
  optional distillation from the original model (KL on temperature-softened
  logits), validation-based early stop and keep-best (so the result is never worse
  on validation than the model it started from), cosine or constant learning rate,
  a progress bar, a deterministic seed, resumable checkpoints; BatchNorm layers whose
  parameters do not train keep their running statistics.

The search-then-recover workflow that combines both problems is
:func:`rankshrink.workflow.compress_and_recover`.
"""

from __future__ import annotations

import copy
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable

from torch import nn
from torch.utils.data import Dataset

from .data import Splits, _dataset_len, has_labels
from .errors import ConfigError, DataError
from .factorized import Factorized
from .metrics import accuracy
from .train import REPRESENTATION_LOSSES, TrainConfig

__all__ = ["FinetuneResult", "finetune", "factor_parameters", "TRAIN_CHOICES", "DEFAULT_LR", "ENCODER_LR",
           "FINETUNE_DEFAULTS"]

TRAIN_CHOICES = ("factors", "all")
# Measured on the digits and CIFAR-shaped CNNs (3 epochs, Adam, factors only): 1e-3 recovers
# least, 1e-2 sometimes cannot beat a data-aware start; 3e-3 improved every case tried.
DEFAULT_LR = 3e-3
# Distilling a pretrained encoder's hidden states: measured on all-MiniLM-L6-v2 (issue 15), 3e-3 took validation
# cosine from 0.81 to 0.40 while 1e-4 raised it (3e-5 at 75% of the parameters); pretrained weights want small steps.
ENCODER_LR = 1e-4
# What finetune() trains with unless told otherwise (train() itself defaults to lr 1e-3 for from-scratch training).
FINETUNE_DEFAULTS = TrainConfig(epochs=3, lr=DEFAULT_LR)


@dataclass
class FinetuneResult:
    """What :func:`finetune` did. Accuracies are None where there was no such split.

    ``val_before``/``val_after`` are the validation metric (accuracy unless a custom
    ``metric`` was given) of the model as given and as returned; ``test_*`` are test
    accuracies (reported only, never used for a decision).
    """

    model: nn.Module
    train: Any  # rankshrink.train.TrainResult
    trained: str
    trained_parameters: int
    total_parameters: int
    val_before: float | None
    val_after: float | None
    test_before: float | None
    test_after: float | None
    distilled: bool
    seconds: float

    @property
    def epochs_run(self) -> int:
        return self.train.epochs_run

    @property
    def best_epoch(self) -> int:
        return self.train.best_epoch

    def to_dict(self) -> dict[str, Any]:
        return {"trained": self.trained, "trained_parameters": self.trained_parameters,
                "total_parameters": self.total_parameters, "distilled": self.distilled,
                "val_before": self.val_before, "val_after": self.val_after,
                "test_before": self.test_before, "test_after": self.test_after,
                "epochs_run": self.train.epochs_run, "best_epoch": self.train.best_epoch,
                "stopped_early": self.train.stopped_early, "diverged": self.train.diverged,
                "resumed_from_epoch": self.train.resumed_from_epoch, "seconds": round(self.seconds, 3),
                "history": self.train.history}


def factor_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every parameter of every :class:`~rankshrink.factorized.Factorized` block (weights and biases), once."""
    seen, params = set(), []
    for module in model.modules():
        if isinstance(module, Factorized):
            for p in module.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    params.append(p)
    return params


def _splits_of(data, val_data, test_data) -> tuple[Dataset, Dataset | None, Dataset | None]:
    if data is not None and not isinstance(data, Splits):
        from .data import as_dataset
        from .search.session import as_search_data

        data = as_search_data(data)  # a data SPEC string or a {'train', 'val', 'test'} mapping
        if not isinstance(data, Splits):
            data = as_dataset(data, "the training data")
    if isinstance(data, Splits):
        return data.train, val_data if val_data is not None else data.val, \
            test_data if test_data is not None else data.test
    if data is None:
        raise DataError("fine-tuning needs training data: pass a Splits or a data set of (input, label) pairs.")
    return data, val_data, test_data


def _distills_hidden_states(teacher: nn.Module, train_data: Dataset, config: TrainConfig) -> bool:
    """Whether distillation from ``teacher`` runs on hidden-state representations (an encoder)."""
    if config.distill_loss in REPRESENTATION_LOSSES:
        return True
    if config.distill_loss != "auto" or has_labels(train_data):
        return False
    from .search.metrics import _auto_metric

    return _auto_metric(teacher, train_data) == "cosine"


def finetune(model: nn.Module, data, epochs: int | None = None, *, val_data: Dataset | None = None,
             test_data: Dataset | None = None, teacher: nn.Module | None = None, train: str = "factors",
             config: TrainConfig | None = None, metric: Callable[[nn.Module], float] | None = None,
             checkpoint_dir=None, progress: bool = True, inplace: bool = False, **options: Any) -> FinetuneResult:
    """Fine-tune a factorized ``model`` to recover accuracy; return a :class:`FinetuneResult`.

    ``data``: a :class:`~rankshrink.data.Splits` (train / val / test) or a training data
    set (then pass ``val_data`` for early stopping and keep-best). ``train``: 'factors'
    (the parameters of the factorized blocks only: the default, cheapest and safest) or
    'all'. ``teacher``: the original model, to add knowledge distillation
    (``distill_weight`` · T² · KL(teacher_T ‖ student_T) + (1 − ``distill_weight``) · CE).
    ``config`` (a :class:`~rankshrink.train.TrainConfig`, default :data:`FINETUNE_DEFAULTS`)
    and its fields as keywords (``lr=``, ``batch_size=``, ``patience=`` ...) say how to train;
    ``epochs`` overrides the config's. ``metric(model) -> float`` replaces validation accuracy.
    ``checkpoint_dir``: resumable checkpoints (a rerun with the same arguments continues).
    The model is copied unless ``inplace``. Without validation data nothing can guarantee
    the result is not worse: a warning says so.

    Encoders (a Hugging Face model's ``last_hidden_state``) on unlabelled data distil with the cosine of
    the mask-mean-pooled hidden states (``distill_loss='auto'``), validate on that cosine, and, unless
    ``lr`` is given, train at :data:`ENCODER_LR` (1e-4) rather than :data:`DEFAULT_LR`. When no epoch beats
    the starting model, keep-best returns it and a warning says so (and suggests a lower ``lr``).
    """
    from .train import train as train_loop

    if not isinstance(model, nn.Module):
        raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
    from .models.weights import check_finite

    check_finite(model)
    if train not in TRAIN_CHOICES:
        raise ConfigError(f"train must be one of {', '.join(TRAIN_CHOICES)}, got {train!r}.")
    if teacher is not None and not isinstance(teacher, nn.Module):
        raise ConfigError(f"teacher must be the original torch.nn.Module, got {type(teacher).__name__}.")
    if epochs is not None:
        options["epochs"] = epochs
    lr_given = options.get("lr") is not None or config is not None
    if options.get("lr", 0) is None:
        del options["lr"]
    unknown = sorted(set(options) - set(TrainConfig.field_names()))
    if unknown:
        raise ConfigError(f"unknown fine-tuning option(s) {', '.join(map(repr, unknown))}; the options are "
                          f"{', '.join(TrainConfig.field_names())}.")
    run_config = (config or FINETUNE_DEFAULTS).replace(keep_best=True, **options)
    train_data, val, test = _splits_of(data, val_data, test_data)
    if not lr_given and teacher is not None and _distills_hidden_states(teacher, train_data, run_config):
        run_config = run_config.replace(lr=ENCODER_LR)
    if val is None and metric is None:
        warnings.warn("fine-tuning without validation data: keep-best and early stopping are off, so the result "
                      "is not checked against the starting model; pass a Splits or val_data.", UserWarning,
                      stacklevel=2)
    start = time.perf_counter()
    work = model if inplace else copy.deepcopy(model)
    if train == "factors":
        params = factor_parameters(work)
        if not params:
            raise ConfigError(f"{type(model).__name__} has no factorized layers to fine-tune; apply a plan first "
                              "(rankshrink.apply) or pass train='all'.")
    else:
        params = list(work.parameters())
        if not params:
            raise ConfigError(f"{type(model).__name__} has no parameters to train.")
    test_before = accuracy(work, test) if test is not None and _dataset_len(test) and has_labels(test) else None
    # train() sets requires_grad for exactly these parameters during the run and restores it after.
    result = train_loop(work, train_data, val_data=val, config=run_config, parameters=params, teacher=teacher,
                        metric=metric, checkpoint_dir=checkpoint_dir, progress=progress)
    val_after = result.best_val  # keep-best: the returned weights are the best-scoring ones
    if result.epochs_run > 0 and result.best_epoch == 0 and result.initial_val is not None:
        warnings.warn(f"fine-tuning did not improve on the starting model in {result.epochs_run} epoch(s) (validation "
                      f"{result.initial_val:.4f} at the start, best after: "
                      f"{max((h['val_metric'] for h in result.history if h['val_metric'] is not None), default=0):.4f}"
                      f"); keep-best returned the starting weights. Try a lower learning rate (now "
                      f"{run_config.lr:g}; --finetune-lr).", UserWarning, stacklevel=2)
    test_after = accuracy(work, test) if test is not None and test_before is not None else None
    return FinetuneResult(model=work, train=result, trained=train, trained_parameters=sum(p.numel() for p in params),
                          total_parameters=sum(p.numel() for p in work.parameters()),
                          val_before=result.initial_val, val_after=val_after, test_before=test_before,
                          test_after=test_after, distilled=teacher is not None,
                          seconds=time.perf_counter() - start)
