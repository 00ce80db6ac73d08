"""What a search is asked to do: the target (a tolerance or a :class:`Budget`) and a :class:`SearchConfig`.

Both are plain, checked-on-creation data; :func:`rankshrink.compress` takes the config
or its fields as keywords, and every stage of the search reads its options from here.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping

from ..errors import ConfigError
from ..validation import check_bool, check_choice, check_int, check_number, check_optional_int

__all__ = ["SearchConfig", "Budget", "COST_KINDS", "SENSITIVITIES", "FIT_CHOICES", "MAX_GLOBAL_EVALUATIONS",
           "DISTORTIONS", "DEVICES", "BUDGET_OF", "check_tolerance", "budget_text"]

COST_KINDS = ("macs", "params", "bytes", "latency")
SENSITIVITIES = ("auto", "probe", "proxy")
DISTORTIONS = ("auto", "closed-form", "forward")
DEVICES = ("cpu", "cuda", "auto")
BUDGET_OF = ("model", "factorizable")
FIT_CHOICES = ("auto", "activations", "weights")
# Whole-model evaluations a search may spend beyond its per-layer probes.
MAX_GLOBAL_EVALUATIONS = 10


@dataclass(frozen=True, kw_only=True)
class SearchConfig:
    """How :func:`rankshrink.compress` searches.

    ``metric``: 'auto' (accuracy with labels, agreement without), 'accuracy', 'agreement'
    (with the original's predictions, no labels needed), 'per-class', 'worst-class' or a
    callable ``model -> float`` (higher is better). ``minimize``: what tolerance mode makes
    smallest ('macs', 'params', 'bytes', 'latency'). ``methods``: restrict the methods tried;
    ``layers`` / ``exclude``: glob patterns over qualified layer names (``features.*``) choosing
    the layers compressed. ``fold_bn``: fold eval-mode BatchNorm layers into the Linear/Conv
    before them first (the factors see the real weights; the plan records the folds).
    ``min_baseline``: the least validation metric the original model must reach for the
    search to start (None: clearly above chance, i.e. at least a quarter of the way from
    chance to perfect, when chance is known; 0 turns the check off). ``fit``: 'activations'
    (data-aware factors; what 'auto' picks when there is training data), 'weights' or 'auto'.
    ``sensitivity``: how tolerance mode spends its evaluations: 'auto' (the default) orders the
    allocation path by the distortion proxy and gives the evaluations one-layer probes would
    take to whole-model plans (measured cheaper answers than 'probe' on the digits and CIFAR
    CNNs); 'probe' first bisects each layer alone to calibrate its sensitivity; 'proxy' uses
    the proxy with at most ``max_global_evaluations`` whole-model evaluations (budget mode
    always does).
    ``factorize_options``: method options for every method, or per method under its name (see
    :func:`rankshrink.methods.select_options`). ``calibration_samples``: training samples
    whose layer inputs the activation fits use; ``proxy_samples``: training samples the
    distortion proxy runs on. ``max_global_evaluations``: whole-model evaluations beyond
    the probes. ``cache``: True (the user cache), False, a directory or an
    :class:`~rankshrink.search.cache.EvaluationCache`. ``threads``: torch/BLAS threads
    during the search (None: one for models up to 4M parameters). ``report_test``: also
    measure the test split (reports only). ``confidence`` (e.g. 0.95; None: off): the
    tolerance applies to the upper end of the paired bootstrap ``confidence`` interval of
    the drop instead of the measured drop, so a plan passes only if the validation set
    makes a drop within the tolerance that likely; the reported ``drop_ci`` uses this
    level too (0.95 without one).

    Latency (measured on ONNX Runtime's CPU provider; the CLI turns it on by default):
    ``latency`` True measures every candidate against its dense layer
    (:mod:`rankshrink.search.latency`): a candidate slower than the dense layer at some batch
    size in ``batches`` is never picked, ranks are rounded to multiples of ``rank_multiple``
    where that measures faster, and the final model is measured against the original: a plan
    slower at some batch size is not returned (tolerance mode keeps the fastest plan within
    the tolerance that is faster, possibly the original) unless ``allow_slower``.
    ``minimize='latency'`` and ``{"latency": 0.6}`` / ``{"latency_ms": 2.0}`` budgets imply
    it. ``latency_threads``: ONNX Runtime intra-op threads for every measurement.
    ``latency_int8`` ('static' or 'dynamic'; None: float32): whole plans are measured as the int8
    files that ship (``compress --int8``) against the original's, so the int8 file is what must be
    faster; candidates are still filtered and costed in float32.
    ``file_bytes``: a callable ``model -> int`` (the size of the file that will be shipped,
    e.g. :func:`rankshrink.deploy.shipped_bytes`); a bytes budget then counts it instead of
    the parameter bytes.
    ``distortion``: how candidates' distortions are found -- 'closed-form' (from each layer's
    whitened singular values, scaled by one sensitivity probe per layer on ``probe_samples``
    training inputs; :mod:`~rankshrink.search.closed_form`), 'forward' (one forward pass of the
    ``proxy_samples`` batch per candidate) or 'auto' (closed form, where the method has one, for models of
    at least 1 M parameters, whose searches per-candidate passes would dominate; forward below).
    ``workers`` / ``ray_address``: evaluate independent probes and plans on that many Ray workers
    (a local cluster; or the cluster at that address) -- the plan is the same as in-process
    (:mod:`~rankshrink.search.parallel`). ``device``: 'cpu', 'cuda' or 'auto' (CUDA when available)
    for calibration and evaluation; None keeps the model where it is.
    """

    metric: Any = "auto"
    minimize: str = "macs"
    methods: tuple[str, ...] | None = None
    layers: tuple[str, ...] | None = None
    exclude: tuple[str, ...] | None = None
    fold_bn: bool = True
    min_baseline: float | None = None
    fit: str = "auto"
    sensitivity: str = "auto"
    factorize_options: Mapping[str, Any] | None = None
    calibration_samples: int = 512
    proxy_samples: int = 256
    max_global_evaluations: int = MAX_GLOBAL_EVALUATIONS
    seed: int = 0
    cache: Any = True
    progress: bool = True
    threads: int | None = None
    report_test: bool = True
    distortion: str = "auto"
    probe_samples: int = 64
    workers: int | None = None
    ray_address: str | None = None
    device: str | None = None
    confidence: float | None = None
    latency: bool = False
    batches: tuple[int, ...] = (1, 32)
    latency_threads: int = 1
    latency_int8: str | None = None
    rank_multiple: int = 8
    allow_slower: bool = False
    file_bytes: Any = None

    def __post_init__(self) -> None:
        from ..methods import method_names

        check_choice(self.minimize, "minimize", COST_KINDS)
        check_choice(self.fit, "fit", FIT_CHOICES)
        check_choice(self.sensitivity, "sensitivity", SENSITIVITIES)
        check_int(self.calibration_samples, "calibration_samples", minimum=1)
        check_int(self.proxy_samples, "proxy_samples", minimum=1)
        check_int(self.max_global_evaluations, "max_global_evaluations", minimum=1)
        check_int(self.seed, "seed", minimum=0)
        check_bool(self.progress, "progress")
        check_bool(self.report_test, "report_test")
        check_bool(self.fold_bn, "fold_bn")
        check_bool(self.latency, "latency")
        check_bool(self.allow_slower, "allow_slower")
        check_int(self.latency_threads, "latency_threads", minimum=1)
        if self.latency_int8 is not None:
            check_choice(self.latency_int8, "latency_int8", ("static", "dynamic"))
        check_int(self.rank_multiple, "rank_multiple", minimum=1)
        if isinstance(self.batches, int) or not isinstance(self.batches, (tuple, list)) or not self.batches:
            raise ConfigError(f"batches must be a non-empty list of batch sizes, got {self.batches!r}.")
        for batch in self.batches:
            check_int(batch, "batch size", minimum=1)
        object.__setattr__(self, "batches", tuple(dict.fromkeys(self.batches)))
        if self.file_bytes is not None and not callable(self.file_bytes):
            raise ConfigError(f"file_bytes must be a callable model -> bytes, got {type(self.file_bytes).__name__}.")
        if self.min_baseline is not None:
            check_number(self.min_baseline, "min_baseline", minimum=0, maximum=1)
        check_optional_int(self.threads, "threads", minimum=1)
        check_choice(self.distortion, "distortion", DISTORTIONS)
        check_int(self.probe_samples, "probe_samples", minimum=1)
        check_optional_int(self.workers, "workers", minimum=1)
        if self.ray_address is not None and (not isinstance(self.ray_address, str) or not self.ray_address.strip()):
            raise ConfigError(f"ray_address must be a Ray cluster address such as 'ray://host:10001' or 'auto', got "
                              f"{self.ray_address!r}.")
        if self.device is not None:
            check_choice(self.device, "device", DEVICES)
        if self.confidence is not None:
            check_number(self.confidence, "confidence", minimum=0, maximum=1, low_open=True, high_open=True)
        for name in ("methods", "layers", "exclude"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, str) or not all(isinstance(v, str) for v in value):
                raise ConfigError(f"{name} must be a list of names, got {value!r}.")
            object.__setattr__(self, name, tuple(value))
        if self.methods is not None:
            if not self.methods:
                raise ConfigError(f"methods is empty; name at least one of {', '.join(method_names())} "
                                  "(or pass None for all).")
            unknown = [m for m in self.methods if m not in method_names()]
            if unknown:
                raise ConfigError(f"unknown method(s) {', '.join(unknown)}; known methods are "
                                  f"{', '.join(method_names())}.")

    def replace(self, **changes: Any) -> "SearchConfig":
        unknown = sorted(set(changes) - set(self.field_names()))
        if unknown:
            raise ConfigError(f"unknown search option(s) {', '.join(map(repr, unknown))}; the options are "
                              f"{', '.join(self.field_names())}.")
        return dataclasses.replace(self, **changes) if changes else self

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))


@dataclass(frozen=True)
class Budget:
    """A hard cost limit: ``kind`` ('macs', 'params', 'bytes' or 'latency') at ``value``.

    A value in (0, 1] is a ratio of the original model's cost; a value above 1 is an
    absolute count (MACs, parameters or bytes). A latency budget is a ratio of the
    original's measured latency (at every batch size measured), or, with ``unit='ms'``,
    milliseconds at the first batch size (``{"latency_ms": 2.0}``). ``of='factorizable'`` makes
    a ratio one of what the search can factorize: the searched layers get ``value`` of their
    dense cost between them and everything else stays as it is (``{"params": 0.5, "of":
    "factorizable"}``; CLI ``--max-params 50%-of-factorizable``).
    """

    kind: str
    value: float
    unit: str | None = None
    of: str = "model"

    def __post_init__(self) -> None:
        if self.kind not in COST_KINDS:
            raise ConfigError(f"budget kind must be one of {', '.join(COST_KINDS)}, got {self.kind!r}.")
        if self.of not in BUDGET_OF:
            raise ConfigError(f"a budget is relative to one of {', '.join(BUDGET_OF)}, got of={self.of!r}.")
        if self.kind == "latency" and self.of != "model":
            raise ConfigError("a latency budget is a ratio of the whole model's measured latency; drop "
                              "of='factorizable' (--budget-of).")
        v = self.value
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise ConfigError(f"a {self.kind} budget must be a positive number (a ratio in (0, 1] or an absolute "
                              f"count), got {v!r}.")
        if self.unit not in (None, "ms") or (self.unit == "ms" and self.kind != "latency"):
            raise ConfigError(f"a budget's unit can only be 'ms' for a latency budget, got {self.unit!r}.")
        if self.kind == "latency" and self.unit is None and v > 1:
            raise ConfigError(f"a latency budget is a ratio of the original's latency in (0, 1] (0.6) or a time "
                              f"({{'latency_ms': {v:g}}}, CLI --max-latency {v:g}ms), got {v!r}.")

    @property
    def relative(self) -> bool:
        return self.unit is None and self.value <= 1

    def absolute(self, original: Mapping[str, int], factorizable: int | None = None) -> int:
        """The limit in ``kind`` units; ``factorizable``: the dense cost of the searched layers
        (``of='factorizable'``)."""
        if self.relative and self.of == "factorizable":
            if factorizable is None:
                raise ConfigError("a budget relative to the factorizable layers needs their cost.")
            return int(math.floor(original[self.kind] - factorizable + self.value * factorizable))
        if self.relative:
            return int(math.floor(self.value * original[self.kind]))
        return int(math.floor(self.value))

    @classmethod
    def parse(cls, budget: Any) -> "Budget":
        if isinstance(budget, Budget):
            return budget
        if isinstance(budget, Mapping) and 1 <= len(budget) <= 2 and (len(budget) == 1 or "of" in budget):
            of = str(budget.get("of", "model"))
            (kind, value), = ((k, v) for k, v in budget.items() if k != "of")
            if kind == "latency_ms":
                return cls("latency", value, "ms", of)
            return cls(str(kind), value, of=of)
        if isinstance(budget, (tuple, list)) and len(budget) == 2:
            return cls(str(budget[0]), budget[1])
        raise ConfigError(f"budget must be {{'macs'|'params'|'bytes'|'latency': value}} (optionally with 'of': "
                          f"'model' or 'factorizable'), {{'latency_ms': ms}}, a (kind, value) pair or a Budget; "
                          f"got {budget!r}.")


def budget_text(record: Mapping[str, Any]) -> str:
    """A budget as summary.json records it (``budget``), in words: what the CLI and the report print.

    A latency budget reads as a ratio (its ``target`` is in the search's internal units, millionths of the
    original's time, which mean nothing to a user); a bytes budget of the shipped file names the file's
    bytes rather than the parameter bytes it was searched in."""
    kind = record.get("kind")
    if kind == "latency":
        measured = record.get("measured_ratio")
        shown = f" (measured {measured:.2f}x)" if isinstance(measured, (int, float)) else ""
        if record.get("unit") == "ms":
            ratio = record.get("target_ratio")
            of = f", {ratio:.2f}x the original's time" if isinstance(ratio, (int, float)) else ""
            return f"latency <= {record.get('value'):g} ms{of}{shown}"
        return f"latency <= {float(record.get('value') or 0):.2f}x the original's time{shown}"
    if record.get("file_target") is not None:
        return f"bytes <= {record['file_target']:,} (the shipped file)"
    target = record.get("target")
    return f"{kind} <= {target:,}" if isinstance(target, int) else f"{kind} <= {target}"


def check_tolerance(tolerance: Any) -> float:
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not math.isfinite(tolerance):
        raise ConfigError(f"tolerance must be a number in [0, 1), got {tolerance!r}.")
    if not 0 <= tolerance < 1:
        raise ConfigError(f"tolerance must lie in [0, 1) (0.01 = one accuracy point), got {tolerance}.")
    return float(tolerance)
