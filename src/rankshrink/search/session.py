"""What every search needs, set up once: data splits, metric, cache, factorizer, proxy.

Honest splits: the metric (and so every tolerance decision) runs on the
*validation* split; calibration statistics and the distortion proxy use a subset of
the *training* split; the *test* split is only ever used for the final report.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn
from torch.utils.data import Dataset

from ..data import Splits, _dataset_len, calibration_subset, first_batch
from ..errors import ConfigError, DataError
from ..fingerprint import code_fingerprint, dataset_fingerprint, module_fingerprint, object_fingerprint
from ..plan import DEFAULT_CALIBRATION, Plan
from .cache import EvaluationCache
from .config import SearchConfig
from .evaluate import Distortion, Evaluator, Factorizer
from .metrics import Metric, as_metric

__all__ = ["Session", "resolve_cache", "as_search_data"]


def resolve_cache(cache: Any) -> EvaluationCache:
    """True/None: the default cache dir; False: no cache; a path: that dir; or an EvaluationCache."""
    if isinstance(cache, EvaluationCache):
        return cache
    if cache is True or cache is None:
        return EvaluationCache()
    if cache is False:
        return EvaluationCache.disabled()
    if isinstance(cache, (str, Path)):
        return EvaluationCache(Path(cache).expanduser())
    raise ConfigError(f"cache must be True, False, a directory or an EvaluationCache, got {type(cache).__name__}.")


@dataclass
class _Data:
    val: Dataset | None
    train: Dataset | None
    test: Dataset | None
    val_fp: str | None
    train_fp: str | None
    num_classes: int | None


def as_search_data(data: Any) -> Any:
    """What ``compress(model, data)`` accepts, as Splits or one data set: a data SPEC string is loaded,
    a mapping with 'train' and 'val' (and 'test') becomes Splits; Splits and data sets pass through."""
    if isinstance(data, str):
        from ..data import load_data

        data = load_data(data)
    elif isinstance(data, Mapping) and "train" in data and set(data) <= {"train", "val", "test", "num_classes"}:
        from ..data import splits_from

        data = splits_from(data["train"], data.get("val", data["train"]), data.get("test"),
                           num_classes=data.get("num_classes"))
    return data


def _resolve_data(data: Any) -> _Data:
    if data is None:
        return _Data(None, None, None, None, None, None)
    data = as_search_data(data)
    if isinstance(data, Splits):
        for split in ("train", "val"):
            if _dataset_len(getattr(data, split)) == 0:
                raise DataError(f"the {split} split of data set '{data.name}' is empty; the search needs "
                                "validation samples to enforce the tolerance and training samples to calibrate.")
        test = data.test if _dataset_len(data.test) else None
        # Keys come from the content (rankshrink.fingerprint), never from a name a user writes.
        return _Data(data.val, data.train, test, dataset_fingerprint(data.val), dataset_fingerprint(data.train),
                     data.num_classes)
    from ..data import as_dataset

    try:
        dataset = as_dataset(data)
    except DataError as exc:
        raise DataError(f"data must be a rankshrink Splits, a data SPEC string, a mapping with 'train' and 'val', or "
                        f"one data set used for everything: {exc}") from None
    if _dataset_len(dataset) == 0:
        raise DataError("the data set is empty; the search needs validation samples.")
    fp = dataset_fingerprint(dataset)
    return _Data(dataset, dataset, None, fp, fp, None)


def _calibration_fingerprint(calibration) -> str:
    import hashlib

    from ..fingerprint import update_with_tensor

    digest = hashlib.sha256(b"rankshrink-calibration-v2")
    for name, stats in sorted(calibration.stats.items()):
        digest.update(f"{name}:{stats.kind}:{stats.count}".encode())
        for key, tensor in sorted(stats.tensors().items()):
            if key != "patch_mean":
                update_with_tensor(digest, tensor.double())
    return digest.hexdigest()


def _proxy_kind(metric: Metric) -> str | None:
    """The distortion that matches a label-free metric (cosine, mse, kl); None: chosen from the outputs."""
    key = (metric.key or "").split(":")[0]
    return key if key in ("cosine", "mse", "kl") else None


def _inputs_of(dataset: Dataset, n: int, seed: int, skip: int = 0) -> Any:
    subset = calibration_subset(dataset, n, seed=seed, skip=skip)
    return first_batch(subset, _dataset_len(subset))[0]


# distortion='auto' uses the closed form from this many model parameters on (search/closed_form.py).
CLOSED_FORM_MIN_PARAMS = 1_000_000


class Session:
    """Everything a search shares: metric, evaluator (with cache), factorizer, proxy, costs' example input."""

    def __init__(self, model: nn.Module, data: Any = None, config: SearchConfig | None = None, *,
                 apply_fn: Callable[[nn.Module, Plan], nn.Module] | None = None,
                 example_input: Any = None, calibration=None):
        if not isinstance(model, nn.Module):
            raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
        config = config or SearchConfig()
        from ..inputs import to_model
        from ..models import check_finite

        check_finite(model)  # names the layer with NaN/Inf weights before anything runs
        self.config = config
        self.timings: dict[str, float] = {"calibrate": 0.0, "proxy": 0.0, "factorize": 0.0, "evaluate": 0.0}
        self.model = model
        self.seed = config.seed
        self.progress = config.progress
        self.data = _resolve_data(data)
        metric = config.metric
        if self.data.val is None and not callable(metric) and not isinstance(metric, Metric):
            raise ConfigError("the search needs data (a Splits or a validation data set) or a metric callable "
                              "model -> float.")
        self.metric = as_metric(metric, model, self.data.val, fingerprint=self.data.val_fp,
                                num_classes=self.data.num_classes)
        # The weights and the code that runs them: another wrapper around the same weights is another model.
        self.model_fp = object_fingerprint({"weights": module_fingerprint(model), "code": code_fingerprint(model)})
        self.cache = resolve_cache(config.cache)

        # Example input for the cost model.
        if example_input is None:
            source = self.data.val if self.data.val is not None else self.data.train
            if source is None:
                raise ConfigError("without data, pass example_input (one batch) so costs can be counted.")
            example_input = first_batch(source, 1)[0]
        self.example_input = to_model(example_input, model)  # half-precision models get cast inputs
        self.kept_dense: dict[str, str] = {}  # layer -> why the search leaves it dense (tied, no method ...)
        self.latency: Any = None  # a rankshrink.search.latency.SearchLatency when latency is measured

        # The fit: data-aware when there is training data to calibrate on.
        fit = config.fit
        if fit == "auto":
            fit = "activations" if (calibration is not None or
                                    (self.data.train is not None and apply_fn is None)) else "weights"
        options = dict(config.factorize_options or {})
        options.setdefault("seed", config.seed)
        self.fit = fit
        cal_fp = None
        self.plan_calibration: dict[str, Any] | None = None
        if fit == "activations" and apply_fn is None:
            if calibration is None:
                if self.data.train is None:
                    raise ConfigError("fit='activations' needs training data to calibrate on.")
                from ..calibration import calibrate

                start = time.perf_counter()
                with warnings.catch_warnings():
                    # Small calibration sets are expected for tiny layers; the damping handles them.
                    warnings.filterwarnings("ignore", message=".*input vectors.*")
                    calibration = calibrate(model, self.data.train, samples=config.calibration_samples,
                                            seed=config.seed, batch_size=DEFAULT_CALIBRATION["batch_size"])
                self.timings["calibrate"] += time.perf_counter() - start
                cal_fp = object_fingerprint({"model": self.model_fp, "data": self.data.train_fp,
                                             "samples": config.calibration_samples, "seed": config.seed})
                # How apply() redraws these statistics, so the plan reproduces the model found here.
                self.plan_calibration = {"samples": config.calibration_samples, "seed": config.seed,
                                         "batch_size": DEFAULT_CALIBRATION["batch_size"],
                                         "data": self.data.train_fp}
            else:
                cal_fp = _calibration_fingerprint(calibration)
        self.calibration = calibration
        self.factorizer = Factorizer(model, calibration=calibration, fit=fit, options=options, apply_fn=apply_fn)
        self.options_fp = object_fingerprint({
            "fit": fit, "calibration": cal_fp, "options": options,
            "apply_fn": None if apply_fn is None else f"{getattr(apply_fn, '__module__', '')}."
                                                      f"{getattr(apply_fn, '__qualname__', repr(apply_fn))}:"
                                                      f"{getattr(apply_fn, 'cache_key', '')}"})
        self.factorize_options = options

        # Label-free proxy on training inputs (never the validation set), made on first use: the
        # closed-form distortions (search/closed_form.py) need only the small probe batch.
        # 'auto': closed form for models big enough that a forward pass per candidate dominates the search;
        # below that the forward proxy is cheap and measures every candidate (it won on the digits CNN).
        self.closed_form = config.distortion == "closed-form" or (
            config.distortion == "auto" and sum(p.numel() for p in model.parameters()) >= CLOSED_FORM_MIN_PARAMS)
        self._distortions: dict[tuple[int, int], Distortion] = {}
        self._distortion_kind = _proxy_kind(self.metric)
        self._pool: Any = None
        self.unreached: dict[str, str] = {}  # layer -> why its output does not reach the model's output
        if self.data.train is not None:  # a failure names the layer and the shapes, before any search
            self.probe_distortion if self.closed_form else self.distortion  # noqa: B018
        self.evaluator: Evaluator | None = None
        self._proxy_fp = object_fingerprint({
            "model": self.model_fp, "factorize": self.options_fp, "data": self.data.train_fp,
            "samples": config.proxy_samples, "seed": config.seed, "kind": self._distortion_kind or "auto",
            "distortion": config.distortion, "probe_samples": config.probe_samples if self.closed_form else None,
            "probe_version": 2,
            "proxy": "forward" if self.data.train is not None else "weights"})

    def _distortion_on(self, samples: int, skip: int = 0) -> Distortion | None:
        if self.data.train is None:
            return None
        found = self._distortions.get((samples, skip))
        if found is None:
            inputs = _inputs_of(self.data.train, samples, self.config.seed, skip)
            found = Distortion(self.model, inputs, kind=self._distortion_kind)
            self._distortions[(samples, skip)] = found
        return found

    @property
    def distortion(self) -> Distortion | None:
        """The forward proxy on ``proxy_samples`` training inputs (None without training data)."""
        return self._distortion_on(self.config.proxy_samples)

    @property
    def probe_distortion(self) -> Distortion | None:
        """The proxy on ``probe_samples`` training inputs, for the closed-form curves' sensitivity probes.

        They are samples the activation fits were not calibrated on (when the training split has enough):
        a probe measures how the factors generalise -- an embedding fitted to the tokens the calibration
        saw would look perfect on those very sentences.
        """
        skip = self.config.calibration_samples if self.fit == "activations" else 0
        return self._distortion_on(self.config.probe_samples, skip)

    def proxy_key(self, layer: str) -> str | None:
        """Cache key of one layer's candidate proxies."""
        return object_fingerprint({"proxies": self._proxy_fp, "layer": layer, "version": 3})

    # -- the worker pool (search/parallel.py): made on first use, after the baseline evaluation
    @property
    def parallelism(self) -> int:
        if self.config.ray_address is None and (self.config.workers or 1) <= 1:
            return 1
        return self.pool.parallelism

    @property
    def pool(self) -> Any:
        if self._pool is None:
            from .parallel import make_pool

            self._pool = make_pool(self.config, self.model, self.metric, self.probe_distortion)
        return self._pool

    def metric_values(self, tasks: list[dict[str, nn.Module]]) -> list[tuple[float, float, Any]]:
        """(value, seconds, predictions) of the metric with each task's blocks in place, on the pool."""
        return self.pool.metric_values(tasks)

    def probe_distortions(self, tasks: list[tuple[str, nn.Module]], *, progress: bool = False) -> list[float]:
        """The probe-batch distortion of the model with each (layer, block) in place, on the pool."""
        if self.probe_distortion is None:  # no training data: the weight error stands in for the distortion
            from .evaluate import weight_distortion

            return [weight_distortion(self.model.get_submodule(name), block) for name, block in tasks]
        return self.pool.distortions([{name: block} for name, block in tasks])

    def close(self) -> None:
        """Stop the worker pool (if one was started)."""
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def start(self, total: int | None = None, desc: str = "searching", *,
              costs: Callable[[Plan], dict[str, int]] | None = None) -> Evaluator:
        """A fresh evaluator; ``costs(plan)`` puts each evaluated plan's exact costs in its record."""
        self.evaluator = Evaluator(self.metric, self.factorizer, self.cache, model_fp=self.model_fp,
                                   options_fp=self.options_fp, progress=self.progress, total=total, desc=desc,
                                   costs=costs, confidence=self.config.confidence, seed=self.seed, pool=self)
        return self.evaluator

    def chance(self) -> float | None:
        """The metric a constant prediction reaches on the validation data (None: not known for this metric)."""
        val = self.data.val
        if val is None or self.metric.dataset is not val:
            return None
        if self.metric.key not in ("accuracy", "per_class_accuracy:mean"):
            return None
        from ..data import iterate_batches

        parts = [labels for _, labels in iterate_batches(val, 4096) if labels is not None]
        if not parts:
            return None
        counts = torch.bincount(torch.cat(parts))
        present = counts[counts > 0]
        if self.metric.key == "accuracy":
            return float(present.max()) / float(present.sum())
        return 1.0 / len(present)

    def check_baseline(self, baseline: float) -> None:
        """Stop before searching when the original's validation metric is at chance (or below ``min_baseline``)."""
        chance = self.chance()
        least = self.config.min_baseline
        if least is None:
            if chance is None:
                return
            least = chance + 0.25 * (1.0 - chance)
        if baseline >= least and not (self.config.min_baseline is None and chance is not None and baseline <= chance):
            return
        name = self.metric.name
        detail = (f"chance is {chance:.1%} (always predicting the most common class)" if chance is not None
                  and self.metric.key == "accuracy" else f"chance is {chance:.1%}" if chance is not None else "")
        where = "at or below" if self.config.min_baseline is None and chance is not None and baseline <= chance \
            else "below"
        limit = (f"{where} chance" if where == "at or below" else f"below the least accepted {least:.1%}")
        raise DataError(f"the original model scores {baseline:.1%} {name} on this data's validation split, {limit}"
                        f"{' (' + detail + ')' if detail else ''}; is it the data it was trained on (same inputs, "
                        "size, scaling and label order)? Nothing was compressed. To compress it anyway pass "
                        "--min-baseline 0 (API: min_baseline=0.0).")

    def test_accuracy(self, model: nn.Module) -> float | None:
        """Top-1 accuracy on the test split (reports only), or None without one."""
        if self.data.test is None:
            return None
        from ..metrics import accuracy

        return accuracy(model, self.data.test)

    def val_accuracy(self, model: nn.Module) -> float | None:
        if self.data.val is None:
            return None
        from ..metrics import accuracy

        return accuracy(model, self.data.val)
