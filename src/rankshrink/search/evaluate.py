"""Building compressed models for plans, and counting, caching and recording evaluations.

:class:`Factorizer` turns a :class:`~rankshrink.plan.Plan` into a compressed model.
It is the search's one injectable factorization step: by default it calls
:func:`rankshrink.factorize` per layer (activation-optimal factors when given a
calibration) and memoises every (layer, method, rank) block, so a search that tries
hundreds of plans factorizes each layer/rank once. A user ``apply_fn(model, plan)``
replaces it; it is then called once per plan.

:class:`Evaluator` is the only place where the metric runs: it looks the plan up in
the on-disk cache, otherwise builds the model, evaluates and stores the value, and
keeps a record of every evaluation (plan, value, time, cached or not).

:class:`Distortion` is the search's data-driven but label-free proxy: how far the
network's outputs on a calibration batch move when one layer is replaced (mean KL
divergence of the softmax for classifier logits, mean 1 − cosine for an encoder's mean-pooled
hidden states, relative squared error otherwise; or the kind matching a label-free metric).
It runs the network forward on a small batch of training inputs, never the metric.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from .. import inputs as model_inputs
from ..errors import ConfigError, DataError
from ..factorized import Factorized, layer_weight
from ..layers import factorizable_layers
from ..memory import release_memory
from ..methods import FITS, MethodConfig, factorize, make_config, select_options
from ..metrics import eval_mode
from ..plan import Plan
from ..surgery import build
from .cache import EvaluationCache, cache_key
from .metrics import Metric

__all__ = ["Factorizer", "Evaluator", "EvaluationRecord", "Distortion", "SearchInterrupted", "single_threaded"]


# Factorizations of layers up to this many weights run single-threaded: small SVDs/ALS gain
# nothing from a second thread, and on a shared, busy machine threaded LAPACK/BLAS calls on
# small matrices can be 10-100x slower than one thread (spinning threads wait for cores).
SINGLE_THREAD_MAX_WEIGHTS = 1 << 20
# What the factorizer keeps between plans: the blocks of the last MEMO_PLANS plans built (a search's next
# plan is its current one with a layer or two changed), and the whitening factors of at most
# WHITENING_CACHE_BYTES of statistics, least recently used dropped first. Unbounded, a BERT-base search
# held every block it ever tried (0.25 GiB) and 48 768-wide whitenings (0.21 GiB); a dropped one is rebuilt
# identically when asked for again (an eigendecomposition of a 768-wide moment takes about 0.1 s).
MEMO_PLANS = 2
WHITENING_CACHE_BYTES = 64 * 2**20


@contextlib.contextmanager
def single_threaded(enabled: bool = True):
    """Run the block with one torch thread and one BLAS thread; restore both afterwards."""
    if not enabled:
        yield
        return
    old = torch.get_num_threads()
    try:
        from threadpoolctl import threadpool_limits
        limiter = threadpool_limits(1)
    except Exception:  # threadpoolctl is optional
        limiter = contextlib.nullcontext()
    torch.set_num_threads(1)
    try:
        with limiter:
            yield
    finally:
        torch.set_num_threads(old)


SMALL_MODEL_PARAMS = 4_000_000


def thread_policy(model, threads):
    """A context for a search: one thread for small models (``threads=None``) or when asked."""
    from ..errors import ConfigError

    if threads is None:
        single = isinstance(model, nn.Module) and sum(p.numel() for p in model.parameters()) <= SMALL_MODEL_PARAMS
    elif isinstance(threads, int) and not isinstance(threads, bool) and threads >= 1:
        single = threads == 1
    else:
        raise ConfigError(f"threads must be a positive integer or None, got {threads!r}.")
    return single_threaded(single)


class SearchInterrupted(KeyboardInterrupt):
    """Raised when a search is interrupted; finished evaluations are in the cache."""


class Factorizer:
    """Plan -> compressed model, memoising each layer's factorized block.

    ``calibration``: a :class:`rankshrink.calibration.Calibration` of ``model``; ``fit``:
    'activations' (needs the calibration) or 'weights'. ``options`` are method options
    shared by every layer (see :func:`rankshrink.methods.select_options`). ``apply_fn``,
    if given, replaces all of this: ``apply_fn(model, plan) -> compressed model``.
    """

    def __init__(self, model: nn.Module, *, calibration=None, fit: str = "weights",
                 options: dict[str, Any] | None = None,
                 apply_fn: Callable[[nn.Module, Plan], nn.Module] | None = None):
        if fit not in FITS:
            raise ConfigError(f"fit must be one of {', '.join(FITS)}, got {fit!r}.")
        if fit == "activations" and calibration is None and apply_fn is None:
            raise ConfigError("fit='activations' needs calibration data; pass data or use fit='weights'.")
        self.model = model
        self.calibration = calibration
        self.fit = fit
        self.options = dict(options or {})
        self.apply_fn = apply_fn
        self.modules = dict(factorizable_layers(model))
        self._memo: dict[tuple, nn.Module] = {}
        self._recent_plans: deque[set[tuple]] = deque(maxlen=MEMO_PLANS)  # memo keys of the last plans built
        self._whitened: OrderedDict[int, Any] = OrderedDict()  # statistics with cached whitenings, oldest first
        self._configs: dict[tuple, MethodConfig] = {}
        self.seconds = 0.0

    def config(self, method: str, rank: Any) -> MethodConfig:
        """The plan entry for ``method`` at ``rank`` with this search's fit and options."""
        rank = tuple(rank) if isinstance(rank, list) else rank
        key = (method, rank)
        found = self._configs.get(key)
        if found is None:
            fit = self.fit if self.apply_fn is None else "weights"
            found = make_config(method, rank, fit=fit, **select_options(method, self.options))
            self._configs[key] = found
        return found

    def block(self, name: str, method: str, rank: Any) -> nn.Module:
        """The factorized replacement of layer ``name`` (memoised; do not modify it)."""
        return self.block_for(name, self.config(method, rank))

    def block_for(self, name: str, entry: MethodConfig) -> nn.Module:
        key = (name, entry)
        found = self._memo.get(key)
        if found is not None:
            return found
        start = time.perf_counter()
        module = self.modules.get(name)
        if module is None:
            raise ConfigError(f"layer '{name}' is not a factorizable layer of {type(self.model).__name__}.")
        if self.apply_fn is not None:
            built = self.apply_fn(self.model, Plan.from_mapping({name: entry}))
            block = built.get_submodule(name)
        else:
            stats = self.calibration.get(name) if entry.fit == "activations" else None
            with single_threaded(layer_weight(module).numel() <= SINGLE_THREAD_MAX_WEIGHTS):
                block = factorize(module, entry, name=f"layer '{name}'", input_stats=stats)
            if stats is not None:
                self._bound_whitenings(stats)
        block.eval()
        self._memo[key] = block
        self.seconds += time.perf_counter() - start
        return block

    def _bound_whitenings(self, stats: Any) -> None:
        """Keep ``stats``' derived factors; drop the least recently used others beyond WHITENING_CACHE_BYTES."""
        self._whitened.pop(id(stats), None)
        self._whitened[id(stats)] = stats
        total = sum(found.cache_nbytes() for found in self._whitened.values())
        while total > WHITENING_CACHE_BYTES and len(self._whitened) > 1:
            _, oldest = self._whitened.popitem(last=False)
            total -= oldest.cache_nbytes()
            oldest.clear_cache()

    def _built(self, plan: Plan) -> None:
        """Remember ``plan``'s blocks as recently used; forget the blocks no recent plan used."""
        self._recent_plans.append({(name, entry) for name, entry in plan.items()})
        keep = set().union(*self._recent_plans)
        for key in [key for key in self._memo if key not in keep]:
            del self._memo[key]

    def build(self, plan: Plan, *, share: bool = True) -> nn.Module:
        """The compressed model for ``plan`` (``model`` is untouched).

        With ``share`` the memoised blocks are used as they are (fine for evaluation); otherwise the
        result owns all its weights: each memoised block is handed over (and forgotten here: rebuilt if
        asked for again) rather than copied, so a large model's final build adds no second set of blocks.
        """
        if plan.fold_batchnorm:
            from ..layers import get_layer

            unfolded = [bn for _, bn in plan.fold_batchnorm if not isinstance(get_layer(self.model, bn), nn.Identity)]
            if unfolded:  # the memoised blocks were fitted to this model's (unfolded) layers
                raise ConfigError(f"the plan folds BatchNorm layer(s) {', '.join(unfolded)}, which this search's "
                                  "model still has; build it with rankshrink.apply(model, plan, data=...).")
        if self.apply_fn is not None and not share:
            return self.apply_fn(self.model, plan)

        def memoised(name: str, module: nn.Module, entry: MethodConfig, rank: Any) -> nn.Module:
            block = self.block_for(name, entry)
            if not share:
                self._memo.pop((name, entry), None)
            return block

        built = build(self.model, plan, memoised, share_weights=share)
        if share:
            self._built(plan)
        return built

    def forget(self) -> None:
        self._memo.clear()

    def release(self, name: str, block: nn.Module) -> None:
        """Drop one memoised block (the search keeps only what later plans may reuse)."""
        for key in [key for key, found in self._memo.items() if key[0] == name and found is block]:
            del self._memo[key]

    def blocks(self, plan: Plan) -> dict[str, nn.Module]:
        """The memoised block of every layer of ``plan`` (built when missing)."""
        found = {name: self.block_for(name, entry) for name, entry in plan.items()}
        self._built(plan)
        return found


@dataclass
class EvaluationRecord:
    """One evaluation the search asked for: the plan, its metric value and drop, and its exact costs.

    ``params``/``bytes``/``macs``: the whole compressed model's (None when the search had no
    cost model yet). ``drop_high``: the upper end of the drop's bootstrap interval at the
    search's ``confidence`` (None without one); the tolerance applies to it then.
    """

    index: int
    phase: str
    plan: dict[str, Any]
    value: float
    drop: float | None
    seconds: float
    cached: bool
    params: int | None = None
    bytes: int | None = None
    macs: int | None = None
    drop_high: float | None = None

    def cost(self, kind: str) -> int | None:
        return getattr(self, kind)

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "phase": self.phase, "plan": self.plan, "value": self.value,
                "drop": self.drop, "drop_high": self.drop_high, "params": self.params, "bytes": self.bytes,
                "macs": self.macs, "seconds": round(self.seconds, 6), "cached": self.cached}


class Evaluator:
    """Runs the metric on plans: cache lookup, else build + evaluate + store; records everything.

    ``evaluations`` counts metric runs this time, ``cached`` the answers read from the
    cache; ``requested`` is their sum (what the search algorithm asked for). A plan
    asked for twice in one search is answered from memory and not counted again.

    ``costs(plan) -> {"params", "bytes", "macs"}`` puts the whole model's exact costs into
    every record. Metrics that are functions of per-sample predictions keep them (in memory
    and in the cache), so :meth:`interval` gives the paired bootstrap interval of any
    evaluated plan's drop; with ``confidence`` set, :meth:`decision` returns the value the
    tolerance is checked against: ``baseline − (upper end of the drop's interval)``.
    """

    def __init__(self, metric: Metric, factorizer: Factorizer, cache: EvaluationCache, *,
                 model_fp: str, options_fp: str, progress: bool = False, total: int | None = None,
                 desc: str = "searching", costs: Callable[[Plan], dict[str, int]] | None = None,
                 confidence: float | None = None, seed: int = 0, pool: Any = None):
        self.metric = metric
        self.factorizer = factorizer
        self.cache = cache
        self.model_fp = model_fp
        self.options_fp = options_fp
        self.pool = pool  # search/parallel.py: evaluates independent plans at once (None: one at a time)
        self.costs = costs
        self.confidence = confidence
        self.seed = seed
        if confidence is not None and not metric.per_sample:
            raise ConfigError(f"confidence needs a metric that is a function of per-sample predictions (accuracy, "
                              f"agreement, per-class, worst-class); metric '{metric.name}' is not. Drop confidence "
                              "or use a built-in metric.")
        self.records: list[EvaluationRecord] = []
        self.evaluations = 0
        self.cached = 0
        self.baseline: float | None = None
        self._values: dict[str, float] = {}
        self._prefetched: dict[str, tuple[float, float, Any]] = {}
        self._predictions: dict[str, Any] = {}
        self._intervals: dict[tuple[str, float], tuple[float, float]] = {}
        self._bar = None
        if progress:
            from tqdm.auto import tqdm
            self._bar = tqdm(total=total, desc=desc, unit="eval", file=sys.stderr, leave=False,
                             dynamic_ncols=True)

    @property
    def requested(self) -> int:
        return self.evaluations + self.cached

    def key(self, plan: Plan) -> str | None:
        if not (self.metric.cacheable and self.cache.enabled):
            return None
        return cache_key(self.model_fp, plan.key(), self.metric.key or "", self.metric.data_fingerprint or "",
                         self.options_fp)

    def _bound(self, text: str) -> dict[str, Any]:
        # What the entry is computed for, stored in it and checked on reading (see search/cache.py).
        return {"model": self.model_fp, "data": self.metric.data_fingerprint, "metric": self.metric.key,
                "plan": text, "factorize": self.options_fp}

    @property
    def parallelism(self) -> int:
        return int(getattr(self.pool, "parallelism", 1)) if self.pool is not None else 1

    def prefetch(self, plans: list[Plan]) -> None:
        """Evaluate, in parallel on the pool, the plans the search is about to ask for (when it has workers).

        The values go into the cache and wait for the search's own request, which records them as
        evaluated then; the search's decisions do not depend on what was prefetched.
        """
        if self.parallelism < 2:
            return
        todo: dict[str, Plan] = {}
        for plan in plans:
            text = plan.key()
            if text in self._values or text in self._prefetched or text in todo:
                continue
            key = self.key(plan)
            entry = self.cache.get(key, bound=self._bound(text)) if key is not None else None
            if entry is not None and (not self.metric.per_sample or entry.get("predictions") is not None):
                continue
            todo[text] = plan
        if len(todo) < 2:
            return
        tasks = [self.factorizer.blocks(plan) for plan in todo.values()]
        for (text, plan), (value, seconds, predictions) in zip(todo.items(), self.pool.metric_values(tasks)):
            self._prefetched[text] = (float(value), float(seconds), predictions)
            self.evaluations += 1
            key = self.key(plan)
            if key is not None:
                self.cache.put(key, value, bound=self._bound(text), seconds=seconds, metric=self.metric.key,
                               plan={n: e.to_json() for n, e in plan.items()}, predictions=predictions)

    def evaluate_many(self, plans: list[Plan], phase: str = "") -> list[float]:
        """``[self(plan, phase) for plan in plans]``, the misses evaluated in parallel first."""
        self.prefetch(plans)
        return [self(plan, phase) for plan in plans]

    def __call__(self, plan: Plan, phase: str = "") -> float:
        text = plan.key()
        if text in self._values:
            return self._values[text]
        key = self.key(plan)
        bound = self._bound(text)
        per_sample = self.metric.per_sample
        entry = None
        if key is not None and text not in self._prefetched:
            entry = self.cache.get(key, bound=bound)
            if entry is not None and per_sample and entry.get("predictions") is None:
                entry = None  # written without predictions: evaluate again so intervals can be computed
        predictions = None
        if text in self._prefetched:  # evaluated (and counted) by prefetch
            value, seconds, predictions = self._prefetched.pop(text)
            cached = False
        elif entry is not None:
            value, seconds, cached = float(entry["value"]), 0.0, True
            predictions = entry.get("predictions")
            self.cached += 1
        else:
            start = time.perf_counter()
            model = self.factorizer.build(plan)
            if per_sample:
                assert self.metric.predict is not None
                predictions = self.metric.predict(model)
                value = self.metric.from_predictions(predictions)
            else:
                value = self.metric(model)
            del model
            release_memory()  # one evaluation's activations, given back before the next
            seconds = time.perf_counter() - start
            cached = False
            self.evaluations += 1
            if key is not None:
                self.cache.put(key, value, bound=bound, seconds=seconds, metric=self.metric.key,
                               plan={n: e.to_json() for n, e in plan.items()}, predictions=predictions)
        self._values[text] = value
        if predictions is not None:
            self._predictions[text] = predictions
        drop = None if self.baseline is None else self.baseline - value
        costs = self.costs(plan) if self.costs is not None else {}
        high = None
        if self.confidence is not None and self.baseline is not None and text != Plan().key():
            high = self.interval(plan)[1]
        self.records.append(EvaluationRecord(len(self.records), phase,
                                             {n: e.to_json() for n, e in plan.items()}, value, drop,
                                             seconds, cached, costs.get("params"), costs.get("bytes"),
                                             costs.get("macs"), high))
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix_str(f"{phase} {self.metric.name}={value:.4f}", refresh=False)
        return value

    def decision(self, plan: Plan, phase: str = "") -> float:
        """The value a tolerance is checked against: the metric, or with ``confidence`` the
        pessimistic ``baseline − upper end of the drop's interval``."""
        value = self(plan, phase)
        if self.confidence is None or self.baseline is None or plan.key() == Plan().key():
            return value
        return self.baseline - self.interval(plan)[1]

    def value_of(self, plan: Plan) -> float | None:
        """The metric of an evaluated plan (None if it was not evaluated)."""
        return self._values.get(plan.key())

    def predictions_of(self, plan: Plan):
        return self._predictions.get(plan.key())

    def interval(self, plan: Plan, confidence: float | None = None) -> tuple[float, float]:
        """The paired bootstrap interval of an evaluated plan's drop from the original (``Plan()``)."""
        from .bootstrap import drop_interval

        level = confidence if confidence is not None else (self.confidence or 0.95)
        text = plan.key()
        found = self._intervals.get((text, level))
        if found is None:
            original = self._predictions.get(Plan().key())
            mine = self._predictions.get(text)
            if original is None or mine is None:
                raise ConfigError(f"no per-sample predictions for this plan with metric '{self.metric.name}'; "
                                  "intervals need a built-in metric and an evaluated plan.")
            found = drop_interval(self.metric.statistic(), original, mine, confidence=level, seed=self.seed)
            self._intervals[(text, level)] = found
        return found

    def set_phase_total(self, total: int) -> None:
        if self._bar is not None:
            self._bar.total = max(total, self._bar.n)
            self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class Distortion:
    """How far the network's outputs move when one layer is replaced (label-free proxy).

    ``inputs``: a batch of calibration inputs (any form; not the validation set). The distortion
    is the mean KL divergence ``KL(softmax(original) || softmax(changed))`` when the
    model returns 2-D logits, else the squared error relative to the original outputs'
    energy. Layers are swapped with a forward hook for the duration of one pass; the
    model is not copied or modified.
    """

    KINDS = ("kl", "mse", "cosine")

    def __init__(self, model: nn.Module, inputs: Any, *, batch_size: int = 256, kind: str | None = None):
        from ..inputs import to_model

        if kind is not None and kind not in self.KINDS:
            raise ConfigError(f"distortion kind must be one of {', '.join(self.KINDS)}, got {kind!r}.")
        self.model = model
        self.inputs = to_model(inputs, model)
        self.rows = model_inputs.batch_size(self.inputs)
        self.batch_size = batch_size
        self.passes = 0
        self.seconds = 0.0
        self.output_kind = "logits"
        self.reference = self._forward()
        if not torch.isfinite(self.reference).all():
            raise DataError("the model produces NaN or infinite outputs on the calibration inputs.")
        if kind is None:  # logits: KL of the softmax; an encoder's hidden states: 1 − cosine; anything else: mse
            kind = ("cosine" if self.output_kind == "hidden" else
                    "kl" if self.reference.dim() == 2 and self.reference.shape[1] > 1 else "mse")
        self.kind = kind
        if self.kind == "kl":
            self._ref_logp = F.log_softmax(self.reference.double().reshape(self.rows, -1), dim=1)
        else:
            self._ref_energy = float(self.reference.double().pow(2).sum()) or 1.0

    @torch.no_grad()
    def _forward(self) -> torch.Tensor:
        from ..outputs import output_kind, representation

        start = time.perf_counter()
        outs = []
        with eval_mode(self.model), model_inputs.hookable():
            for i in range(0, self.rows, self.batch_size):
                batch = model_inputs.take(self.inputs, slice(i, i + self.batch_size))
                output = model_inputs.call_checked(self.model, batch, what="the training inputs")
                if i == 0:
                    self.output_kind = output_kind(output)
                outs.append(representation(output, batch))
        self.passes += 1
        self.seconds += time.perf_counter() - start
        return torch.cat(outs) if len(outs) > 1 else outs[0]

    def compare(self, output: torch.Tensor) -> float:
        if not torch.isfinite(output).all():
            return math.inf
        if self.kind == "kl":
            logp = F.log_softmax(output.double().reshape(self.rows, -1), dim=1)
            value = float((self._ref_logp.exp() * (self._ref_logp - logp)).sum(dim=1).mean())
        elif self.kind == "cosine":
            value = float((1.0 - F.cosine_similarity(output.double().reshape(self.rows, -1),
                                                     self.reference.double().reshape(self.rows, -1),
                                                     dim=1, eps=1e-12)).mean())
        else:
            value = float((output.double() - self.reference.double()).pow(2).sum()) / self._ref_energy
        return max(value, 0.0)

    def with_replacements(self, replacements: dict[nn.Module, nn.Module]) -> float:
        """Distortion of the network with each key module's output computed by its value."""
        handles = []
        for module, block in replacements.items():
            handles.append(module.register_forward_hook(lambda m, args, out, b=block: b(*args)))
        try:
            output = self._forward()
        finally:
            for handle in handles:
                handle.remove()
        return self.compare(output)


def weight_distortion(module: nn.Module, block: nn.Module) -> float:
    """Relative squared weight error ‖W − W′‖²/‖W‖² (the data-free fallback proxy)."""
    weight = layer_weight(module).detach().double()
    approx = block.dense_weight().double() if isinstance(block, Factorized) else weight
    norm = float(weight.pow(2).sum()) or 1.0
    return float((weight - approx).pow(2).sum()) / norm
