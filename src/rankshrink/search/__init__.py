"""Rank selection: the smallest ranks within an accuracy tolerance, or the best accuracy within a budget.

* :func:`plan` -- the whole network, tolerance or budget mode (:mod:`.api`, :mod:`.allocate`).
* :func:`smallest_rank` / :func:`brute_force_rank` -- one layer, tolerance mode (:mod:`.single`).
* :mod:`.metrics` -- metrics (callables ``model -> float``, higher is better).
* :mod:`.cache` -- the resumable on-disk evaluation cache; :mod:`.evaluate` -- the
  injectable factorization step, the counted/cached evaluator and the distortion proxy.
* :mod:`.space` -- every layer's candidates (method × rank) with exact costs and proxies.
* :mod:`.session` -- the shared set-up (splits, metric, calibration, cache).

Data flow of :func:`plan`: calibrate on the training split → for every layer and
candidate, exact cost by formula and output distortion on training inputs (no metric
evaluation) → per-layer frontiers (method choice) → one-dimensional allocation path →
real evaluations of whole models on the validation split (bisection in tolerance
mode, a final check and a few neighbours in budget mode) → Plan + records; the test
split is only used for the report.
"""

from .api import Budget, SearchResult, evaluation_bound, plan
from .cache import CacheWarning, EvaluationCache, model_fingerprint
from .evaluate import EvaluationRecord, Factorizer, SearchInterrupted
from .metrics import Metric, accuracy_metric, agreement_metric, as_metric, per_class_metric
from .single import LayerSearchResult, brute_force_rank, smallest_passing, smallest_rank

__all__ = [
    "plan", "Budget", "SearchResult", "evaluation_bound",
    "smallest_rank", "brute_force_rank", "smallest_passing", "LayerSearchResult",
    "EvaluationCache", "CacheWarning", "model_fingerprint",
    "Metric", "accuracy_metric", "agreement_metric", "per_class_metric", "as_metric",
    "Factorizer", "EvaluationRecord", "SearchInterrupted",
]
