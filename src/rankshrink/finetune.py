"""Recovery fine-tuning (the seeds' *direct* problem) and the combined indirect → direct workflow.

The seeds search ranks with a cheap indirect objective (keep each layer's
activations close), then train the factors on the real loss. Here:

* :func:`finetune` chooses what trains (the factor layers only, by default) and
  hands everything else to :func:`rankshrink.train.train`, the one training loop:
  optional distillation from the original model (KL on temperature-softened
  logits), validation-based early stop and keep-best (so the result is never worse
  on validation than the model it started from), cosine or constant learning rate,
  a progress bar, a deterministic seed, resumable checkpoints; BatchNorm layers whose
  parameters do not train keep their running statistics.
* :func:`compress_and_recover` searches ranks with :func:`rankshrink.search.plan`
  (data-aware factors by default), fine-tunes the result, and verifies it against the
  user's tolerance, optionally searching with a looser tolerance first because
  fine-tuning wins back part of the drop. It reports accuracy before compression,
  after factorization and after fine-tuning.

The module is callable: ``import rankshrink.finetune as ft; ft(model, data, 3)`` is
:func:`finetune`, so ``rankshrink.finetune(...)`` works as a function while
``rankshrink.finetune.compress_and_recover`` stays reachable.
"""

from __future__ import annotations

import copy
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

from torch import nn
from torch.utils.data import Dataset

from .data import Splits, _dataset_len
from .errors import ConfigError, DataError
from .factorized import Factorized
from .metrics import accuracy
from ._callable import make_module_callable

__all__ = ["FinetuneResult", "RecoveryResult", "finetune", "factor_parameters", "compress_and_recover",
           "TRAIN_CHOICES", "DEFAULT_LR"]

TRAIN_CHOICES = ("factors", "all")
# Measured on the digits and CIFAR-shaped CNNs (3 epochs, Adam, factors only): 1e-3 recovers
# least, 1e-2 sometimes cannot beat a data-aware start; 3e-3 improved every case tried.
DEFAULT_LR = 3e-3


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
    if isinstance(data, Splits):
        return data.train, val_data if val_data is not None else data.val, \
            test_data if test_data is not None else data.test
    if data is None:
        raise DataError("fine-tuning needs training data: pass a Splits or a data set of (input, label) pairs.")
    return data, val_data, test_data


def finetune(model: nn.Module, data, epochs: int = 3, *, val_data: Dataset | None = None,
             test_data: Dataset | None = None, teacher: nn.Module | None = None, train: str = "factors",
             lr: float = DEFAULT_LR, batch_size: int = 64, optimizer: str = "adam", weight_decay: float = 0.0,
             schedule: str = "cosine", patience: int | None = None, distill_temperature: float = 2.0,
             distill_weight: float = 0.5, metric: Callable[[nn.Module], float] | None = None, seed: int = 0,
             checkpoint_dir=None, progress: bool = True, inplace: bool = False) -> FinetuneResult:
    """Fine-tune a factorized ``model`` to recover accuracy; return a :class:`FinetuneResult`.

    ``data``: a :class:`~rankshrink.data.Splits` (train / val / test) or a training data
    set (then pass ``val_data`` for early stopping and keep-best). ``train``: 'factors'
    (the parameters of the factorized blocks only: the default, cheapest and safest) or
    'all'. ``teacher``: the original model, to add knowledge distillation
    (``distill_weight`` · T² · KL(teacher_T ‖ student_T) + (1 − ``distill_weight``) · CE).
    ``metric(model) -> float`` replaces validation accuracy. ``patience``: stop after
    that many epochs without improvement. ``checkpoint_dir``: resumable checkpoints (a
    rerun with the same arguments continues). The model is copied unless ``inplace``.
    Without validation data nothing can guarantee the result is not worse: a warning says so.
    """
    from .train import train as train_loop

    if not isinstance(model, nn.Module):
        raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
    if train not in TRAIN_CHOICES:
        raise ConfigError(f"train must be one of {', '.join(TRAIN_CHOICES)}, got {train!r}.")
    if teacher is not None and not isinstance(teacher, nn.Module):
        raise ConfigError(f"teacher must be the original torch.nn.Module, got {type(teacher).__name__}.")
    train_data, val, test = _splits_of(data, val_data, test_data)
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
    test_before = accuracy(work, test) if test is not None and _dataset_len(test) else None
    # train() sets requires_grad for exactly these parameters during the run and restores it after.
    result = train_loop(work, train_data, val_data=val, epochs=epochs, lr=lr, batch_size=batch_size,
                        optimizer=optimizer, weight_decay=weight_decay, schedule=schedule, parameters=params,
                        teacher=teacher, distill_temperature=distill_temperature,
                        distill_weight=distill_weight, patience=patience, metric=metric, seed=seed,
                        checkpoint_dir=checkpoint_dir, progress=progress, keep_best=True)
    val_after = result.best_val  # keep-best: the returned weights are the best-scoring ones
    test_after = accuracy(work, test) if test_before is not None else None
    return FinetuneResult(model=work, train=result, trained=train, trained_parameters=sum(p.numel() for p in params),
                          total_parameters=sum(p.numel() for p in work.parameters()),
                          val_before=result.initial_val, val_after=val_after, test_before=test_before,
                          test_after=test_after, distilled=teacher is not None,
                          seconds=time.perf_counter() - start)


# --------------------------------------------------------------------------- the combined workflow

@dataclass
class RecoveryResult:
    """The outcome of :func:`compress_and_recover`.

    ``accuracy`` maps 'original', 'factorized' and 'finetuned' to {'val', 'test'}
    accuracies; ``meets_tolerance`` says whether the final validation drop is within
    ``tolerance``. ``attempts`` lists every (search tolerance, result) tried.
    """

    model: nn.Module
    plan: Any
    tolerance: float
    search_tolerance: float
    accuracy: dict[str, dict[str, float | None]]
    macs_ratio: float
    params_ratio: float
    meets_tolerance: bool
    search: Any
    finetune: FinetuneResult | None
    attempts: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"tolerance": self.tolerance, "search_tolerance": self.search_tolerance,
                "accuracy": self.accuracy, "macs_ratio": self.macs_ratio, "params_ratio": self.params_ratio,
                "meets_tolerance": self.meets_tolerance, "plan": self.plan.to_dict(),
                "finetune": self.finetune.to_dict() if self.finetune is not None else None,
                "attempts": self.attempts, "seconds": round(self.seconds, 3)}


def compress_and_recover(model: nn.Module, data: Splits, *, tolerance: float = 0.01,
                         search_tolerance: float | None = None, epochs: int = 3, distill: bool = True,
                         objective: str = "auto", search_options: dict | None = None,
                         finetune_options: dict | None = None, progress: bool = True,
                         seed: int = 0) -> RecoveryResult:
    """Search ranks with the indirect objective, recover with the direct one, verify.

    1. ``rankshrink.search.plan(model, data, tolerance=search_tolerance, objective=...)``
       (``search_tolerance`` defaults to ``tolerance``; a looser one, e.g. 2×, lets the
       search go further on the expectation that fine-tuning recovers part of the drop).
    2. :func:`finetune` for ``epochs`` (distilling from ``model`` when ``distill``).
    3. Verify: the fine-tuned validation accuracy must be within ``tolerance`` of the
       original's. If a looser search tolerance fails this, the search is repeated at
       the midpoint and finally at ``tolerance`` itself, which always passes (the search
       guarantees it, and fine-tuning never lowers validation accuracy).

    ``data`` must be a :class:`~rankshrink.data.Splits` (validation decides, test is
    only reported). ``search_options`` go to ``search.plan`` (e.g. ``cache``,
    ``methods``); ``finetune_options`` to :func:`finetune` (e.g. ``lr``, ``train``).
    """
    from . import search as search_pkg

    if not isinstance(data, Splits):
        raise DataError("compress_and_recover needs a Splits (train for calibration and fine-tuning, val to decide, "
                        "test to report); load one with rankshrink.data.load_data(SPEC).")
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not 0 <= tolerance < 1:
        raise ConfigError(f"tolerance must be a number in [0, 1) (0.01 = one accuracy point), got {tolerance!r}.")
    if search_tolerance is None:
        search_tolerance = tolerance
    if isinstance(search_tolerance, bool) or not isinstance(search_tolerance, (int, float)) or \
            not tolerance <= search_tolerance < 1:
        raise ConfigError(f"search_tolerance must lie in [tolerance, 1) = [{tolerance}, 1), got {search_tolerance!r}.")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
        raise ConfigError(f"epochs must be a non-negative integer, got {epochs!r}.")
    start = time.perf_counter()
    search_options = dict(search_options or {})
    finetune_options = dict(finetune_options or {})
    finetune_options.setdefault("progress", progress)
    finetune_options.setdefault("seed", seed)

    original_val = accuracy(model, data.val)
    original_test = accuracy(model, data.test) if _dataset_len(data.test) else None
    tolerances = [float(search_tolerance)]
    if search_tolerance > tolerance:
        middle = (search_tolerance + tolerance) / 2
        tolerances += [middle, float(tolerance)] if middle - tolerance > 1e-9 else [float(tolerance)]
    attempts: list[dict[str, Any]] = []
    chosen = None
    for attempt_tolerance in tolerances:
        found = search_pkg.plan(model, data, tolerance=attempt_tolerance, objective=objective,
                                progress=progress, seed=seed, **search_options)
        small = found.compressed_model()
        factorized_val = accuracy(small, data.val)
        factorized_test = accuracy(small, data.test) if original_test is not None else None
        tuned = None
        final = small
        if epochs > 0 and len(found.plan):
            tuned = finetune(small, data, epochs, teacher=model if distill else None, inplace=True,
                             **finetune_options)
            final = tuned.model
        final_val = accuracy(final, data.val)
        final_test = accuracy(final, data.test) if original_test is not None else None
        passes = original_val - final_val <= tolerance + 1e-12
        attempts.append({"search_tolerance": attempt_tolerance, "macs_ratio": found.ratio("macs"),
                         "params_ratio": found.ratio("params"), "factorized_val": factorized_val,
                         "finetuned_val": final_val, "passes": passes, "plan": found.plan.to_dict()})
        chosen = (found, small, factorized_val, factorized_test, tuned, final, final_val, final_test, passes,
                  attempt_tolerance)
        if passes:
            break
    found, small, factorized_val, factorized_test, tuned, final, final_val, final_test, passes, used = chosen
    return RecoveryResult(
        model=final, plan=found.plan, tolerance=float(tolerance), search_tolerance=used,
        accuracy={"original": {"val": original_val, "test": original_test},
                  "factorized": {"val": factorized_val, "test": factorized_test},
                  "finetuned": {"val": final_val, "test": final_test}},
        macs_ratio=found.ratio("macs"), params_ratio=found.ratio("params"), meets_tolerance=passes,
        search=found, finetune=tuned, attempts=attempts, seconds=time.perf_counter() - start)


# ``rankshrink.finetune(...)`` calls the function; the module stays importable.
make_module_callable(__name__, "rankshrink.finetune:finetune")
