"""Rank selection: the smallest model within an accuracy tolerance, or the best one within a budget.

* :func:`compress` -- the whole network, tolerance or budget mode (:mod:`.api`, :mod:`.allocate`).
* :mod:`.config` -- :class:`SearchConfig` (every option) and :class:`Budget`.
* :func:`smallest_rank` / :func:`brute_force_rank` -- one layer, tolerance mode (:mod:`.single`).
* :mod:`.metrics` -- metrics (callables ``model -> float``, higher is better).
* :mod:`.cache` -- the resumable on-disk evaluation cache; :mod:`.evaluate` -- the
  injectable factorization step, the counted/cached evaluator and the distortion proxy.
* :mod:`.space` -- every layer's candidates (method × rank) with exact costs and proxies.
* :mod:`.session` -- the shared set-up (splits, metric, calibration, cache).

Data flow of :func:`compress`: calibrate on the training split → for every layer and
candidate, exact cost by formula and output distortion on training inputs (no metric
evaluation) → per-layer frontiers (method choice) → one-dimensional allocation path →
real evaluations of whole models on the validation split (bisection in tolerance
mode, a final check and a few neighbours in budget mode) → Plan + records; the test
split is only used for the report.
"""

from .api import CompressResult, compress, evaluation_bound
from .cache import CacheWarning, EvaluationCache
from .config import Budget, SearchConfig
from .evaluate import EvaluationRecord, Factorizer, SearchInterrupted
from .metrics import Metric, accuracy_metric, agreement_metric, as_metric, per_class_metric
from .single import LayerSearchResult, brute_force_rank, smallest_passing, smallest_rank

__all__ = [
    "compress", "CompressResult", "SearchConfig", "Budget", "evaluation_bound",
    "smallest_rank", "brute_force_rank", "smallest_passing", "LayerSearchResult",
    "EvaluationCache", "CacheWarning",
    "Metric", "accuracy_metric", "agreement_metric", "per_class_metric", "as_metric",
    "Factorizer", "EvaluationRecord", "SearchInterrupted",
]
