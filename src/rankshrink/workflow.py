"""The combined workflow: search ranks with the indirect objective, recover with the direct one, verify.

The seeds search ranks with a cheap indirect objective (keep each layer's activations
close), then train the factors on the real loss. :func:`compress_and_recover` does both
and checks the user's tolerance at the end, optionally searching with a looser
tolerance first because fine-tuning wins back part of the drop. It reports accuracy
before compression, after factorization and after fine-tuning.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .data import Splits, _dataset_len
from .errors import ConfigError, DataError
from .finetuning import FinetuneResult, finetune
from .metrics import accuracy

__all__ = ["RecoveryResult", "compress_and_recover"]


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
                         fit: str = "auto", search_options: dict | None = None,
                         finetune_options: dict | None = None, progress: bool = True,
                         seed: int = 0) -> RecoveryResult:
    """Search ranks with the indirect objective, recover with the direct one, verify.

    1. :func:`rankshrink.compress` ``(model, data, tolerance=search_tolerance, fit=...)``
       (``search_tolerance`` defaults to ``tolerance``; a looser one, e.g. 2×, lets the
       search go further on the expectation that fine-tuning recovers part of the drop).
    2. :func:`finetune` for ``epochs`` (distilling from ``model`` when ``distill``).
    3. Verify: the fine-tuned validation accuracy must be within ``tolerance`` of the
       original's. If a looser search tolerance fails this, the search is repeated at
       the midpoint and finally at ``tolerance`` itself, which always passes (the search
       guarantees it, and fine-tuning never lowers validation accuracy).

    ``data`` must be a :class:`~rankshrink.data.Splits` (validation decides, test is
    only reported). ``search_options`` go to :func:`rankshrink.compress` (e.g. ``cache``,
    ``methods``); ``finetune_options`` to :func:`finetune` (e.g. ``lr``, ``train``).
    """
    from .search import compress

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
        found = compress(model, data, tolerance=attempt_tolerance, fit=fit, progress=progress, seed=seed,
                         **search_options)
        small = found.model
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
    assert chosen is not None  # tolerances is never empty
    found, small, factorized_val, factorized_test, tuned, final, final_val, final_test, passes, used = chosen
    return RecoveryResult(
        model=final, plan=found.plan, tolerance=float(tolerance), search_tolerance=used,
        accuracy={"original": {"val": original_val, "test": original_test},
                  "factorized": {"val": factorized_val, "test": factorized_test},
                  "finetuned": {"val": final_val, "test": final_test}},
        macs_ratio=found.ratio("macs"), params_ratio=found.ratio("params"), meets_tolerance=passes,
        search=found, finetune=tuned, attempts=attempts, seconds=time.perf_counter() - start)
