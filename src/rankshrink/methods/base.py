"""What every factorization method is, the registry that finds them, and the one driver that applies them.

A method is one module in this package: a config dataclass (a subclass of
:class:`MethodConfig`: its rank or ranks, the fit, and the method's own options) and a
:class:`Method` (which layers it fits, its rank range, the ``nn.Sequential`` it builds,
its decomposition from weights and from input statistics, its rank grid and rank
estimates for the search, its cost, and what merging a LoRA adapter into it means).
Everything else in rankshrink asks :func:`get_method` / :func:`method_names`; nothing
outside this package branches on a method's name. Adding a method = one new module
that defines both classes and decorates the method with :func:`register`, plus its tests.

The dispatch follows torchao's ``quantize_(model, config)``: :func:`factorize` takes a
config (or a method name, a rank and options, which it turns into one) and hands the
work to the config's method.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import torch
from torch import nn

from ..errors import ConfigError, LayerError
from ..factorized import (
    Factorized,
    geometry_type,
    layer_bias,
    layer_geometry,
    layer_type,
    layer_weight,
    unsupported_reason,
    weight_shape,
)
from ..validation import check_bool, check_choice, check_int, check_number

__all__ = ["FITS", "MethodConfig", "Method", "register", "get_method", "method_names", "methods_for",
           "default_method", "make_config", "config_from_json", "select_options", "factorize", "FactorizationWarning",
           "bigger_than_dense"]

FITS = ("weights", "activations")
# The fields every config has; options not listed here belong to one method's config.
COMMON_OPTIONS = ("damping", "bias_correction", "seed")


def short_repr(value: Any, limit: int = 40) -> str:
    """``repr(value)``, shortened to about ``limit`` characters (a rank read from a file may have 4000 digits)."""
    if isinstance(value, int) and value.bit_length() > 4 * limit:  # repr() itself refuses over 4300 digits
        return f"<an integer of about {int(value.bit_length() * 0.30103)} digits>"
    text = repr(value)
    if len(text) <= limit:
        return text
    return f"{text[:limit // 2]}…{text[-8:]} ({len(text)} characters)"


# --------------------------------------------------------------------------- configs

@dataclass(frozen=True, kw_only=True)
class MethodConfig:
    """One layer's factorization: method, rank, fit and options (a plan entry, serialized as JSON).

    ``fit``: 'weights' (factors closest to the weight) or 'activations' (closest in the
    layer's outputs on calibration data; needs the layer's input statistics).
    ``damping``: relative ridge on the input statistics (``damping → ∞`` is the plain
    weight fit). ``bias_correction``: with a bias, fit centred inputs and move
    ``(W − W′)·mean`` into the bias. ``seed``: randomized parts (randomized SVD, CP
    initialisation). Subclasses add the method's own options.
    """

    rank: Any
    fit: str = "weights"
    damping: float = 0.0
    bias_correction: bool = True
    seed: int = 0

    method: ClassVar[str] = ""

    def __post_init__(self) -> None:
        self._check_rank()
        check_choice(self.fit, "fit", FITS)
        check_number(self.damping, "damping", minimum=0)
        check_bool(self.bias_correction, "bias_correction")
        check_int(self.seed, "seed", minimum=0)

    def _check_rank(self) -> None:
        check_int(self.rank, "rank", minimum=1)

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls) if f.name not in ("rank", "fit"))

    def options(self) -> dict[str, Any]:
        """Every option (defaults included, so a plan reproduces its model even if defaults change)."""
        return {name: getattr(self, name) for name in self.option_names()}

    def replace(self, **changes: Any) -> "MethodConfig":
        return dataclasses.replace(self, **changes)

    def rank_json(self) -> Any:
        return list(self.rank) if isinstance(self.rank, tuple) else self.rank

    def to_json(self) -> dict[str, Any]:
        return {"method": self.method, "rank": self.rank_json(), "fit": self.fit, "options": self.options()}

    def label(self) -> str:
        rank = "x".join(str(r) for r in self.rank) if isinstance(self.rank, tuple) else str(self.rank)
        return f"{self.method}:{rank}"


# --------------------------------------------------------------------------- methods

class Method(ABC):
    """Everything about one factorization method (subclass it, set the class attributes, :func:`register` it)."""

    name: ClassVar[str]
    order: ClassVar[int]                          # position in listings and in the search's tie-breaks
    config_class: ClassVar[type[MethodConfig]]
    layer_types: ClassVar[tuple[str, ...]]       # geometry types it can replace
    default_for: ClassVar[tuple[str, ...]] = ()  # layer types where it is the one-layer search's default
    exact_at_full_rank: ClassVar[bool] = True     # full rank reproduces the layer exactly
    statistics: ClassVar[str] = "full"            # input statistics its activation fit needs ('full'/'channel')
    # The search's rank grid: every rank up to ``dense_up_to``, then steps of ``ratio``.
    grid_dense_up_to: ClassVar[int] = 12
    grid_ratio: ClassVar[float] = 1.12
    can_merge_adapter: ClassVar[bool] = False

    # -- ranks
    @abstractmethod
    def full_rank(self, geometry: dict[str, Any]) -> int:
        """The largest meaningful rank (exact reconstruction, or a rank bound)."""

    def normalize_rank(self, geometry: dict[str, Any], rank: Any, *, layer: str = "layer") -> Any:
        """``rank`` validated for this layer; the form the built block records."""
        top = self.full_rank(geometry)
        if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= top:
            raise LayerError(f"{layer}: rank {short_repr(rank)} is outside 1..{top} for method '{self.name}' on "
                             f"{geometry['type']} with weight shape {weight_shape(geometry)}; choose a rank in "
                             "that range.")
        return rank

    def neighbour(self, geometry: dict[str, Any], rank: Any, step: int) -> Any | None:
        """``rank`` moved by ``step``, or None when that leaves the range."""
        new = rank + step
        return new if 1 <= new <= self.full_rank(geometry) else None

    def search_max_rank(self, geometry: dict[str, Any], break_even: int) -> int:
        """The highest rank the search tries (the break-even rank unless a method knows better)."""
        return break_even

    def rank_grid(self, geometry: dict[str, Any], top: int) -> list[Any]:
        """The search's candidate ranks up to ``top``, normalised, without repeats."""
        from ..ranks import rank_grid

        seen, ranks = set(), []
        for rank in rank_grid(top, dense_up_to=self.grid_dense_up_to, ratio=self.grid_ratio):
            norm = self.normalize_rank(geometry, rank)
            if norm not in seen:
                seen.add(norm)
                ranks.append(norm)
        return ranks

    @abstractmethod
    def rank_estimates(self, weight: torch.Tensor, keep: float) -> tuple[Any, Any]:
        """(EVBMF rank, rank keeping ``keep`` of Σσ²) for this method's factorization of ``weight``."""

    def spectrum_rank(self, rank: Any) -> int | None:
        """The rank this factorization leaves the weight's (out, in·k…) matrix with, when it truncates that
        matrix's spectrum (the report marks it there); None when its rank is a rank of another object."""
        return None

    # -- structure
    @abstractmethod
    def build(self, geometry: dict[str, Any], rank: Any, *, dtype=None, device=None) -> Factorized:
        """The factor layers for ``geometry`` at (normalised) ``rank``, weights uninitialised."""

    @abstractmethod
    def dense_weight(self, factors: list[torch.Tensor]) -> torch.Tensor:
        """The weight of the one layer the factor weights (first factor first) are equivalent to."""

    # -- fitting
    @abstractmethod
    def fit_weights(self, weight: torch.Tensor, rank: Any, config: MethodConfig) -> list[torch.Tensor]:
        """Factor weights (first factor first) closest to ``weight``."""

    @abstractmethod
    def fit_activations(self, weight: torch.Tensor, rank: Any, config: MethodConfig, stats, *,
                        centered: bool, layer: str) -> list[torch.Tensor]:
        """Factor weights closest in the layer's outputs, from its input statistics ``stats``."""

    # -- closed form (optional)
    def error_curve(self, weight: torch.Tensor, config: MethodConfig, stats=None, *,
                    centered: bool = False) -> tuple[torch.Tensor, float] | None:
        """``(errors, total)``: the squared output error of this method's factorization at every rank
        ``0..full_rank`` (``errors[r]``) and the layer's output energy, in closed form from singular values,
        or None when the method has no closed form (then the search measures each candidate).

        With ``stats`` (the layer's input statistics) the errors are data-aware, ``‖(W − W′_r)X‖²``
        summed over the calibration inputs; without, weight errors ``‖W − W′_r‖²``.
        """
        return None

    # -- cost
    def cost(self, geometry: dict[str, Any], rank: Any, input_size):
        """Params, multiplies and additions of the factorization (by formula, no weights computed)."""
        from ..cost import module_cost

        return module_cost(self.build(geometry, self.normalize_rank(geometry, rank), device="meta"),
                           tuple(input_size))[0]

    # -- LoRA
    def merge_adapter(self, block: Factorized, A: torch.Tensor, B: torch.Tensor, scaling: float) -> tuple[int, int]:
        """Fold a LoRA update ``scaling·B·A`` into ``block`` exactly; returns the span to unmerge."""
        raise LayerError(f"a LoRA adapter cannot be merged into a '{self.name}' block exactly; keep it unmerged.")

    def unmerge_adapter(self, block: Factorized, span: tuple[int, int]) -> None:
        raise LayerError(f"'{self.name}' blocks hold no merged adapters.")

    # -- helpers
    def check_layer(self, geometry: dict[str, Any], layer: str = "layer") -> None:
        if geometry["type"] not in self.layer_types:
            allowed = methods_for(geometry)
            raise LayerError(f"{layer}: method '{self.name}' does not apply to {geometry['type']}; "
                             f"use one of {', '.join(allowed)}.")

    def make_config(self, rank: Any, **options: Any) -> MethodConfig:
        known = set(self.config_class.option_names()) | {"fit"}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ConfigError(f"unknown factorization option(s) {', '.join(map(repr, unknown))} for method "
                              f"'{self.name}'; its options are {', '.join(sorted(known))}.")
        if isinstance(rank, list):
            rank = tuple(rank)
        return self.config_class(rank=rank, **options)


_REGISTRY: dict[str, Method] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: add a method to the registry (its ``name`` must be new)."""
    if cls.name in _REGISTRY:
        raise ConfigError(f"a factorization method named {cls.name!r} is already registered.")
    if cls.config_class.method != cls.name:
        raise ConfigError(f"{cls.__name__}.config_class.method must be {cls.name!r}.")
    _REGISTRY[cls.name] = cls()
    ordered = sorted(_REGISTRY.items(), key=lambda item: item[1].order)
    _REGISTRY.clear()
    _REGISTRY.update(ordered)
    return cls


def method_names() -> tuple[str, ...]:
    """Every registered method, in their listing order."""
    return tuple(_REGISTRY)


def get_method(name: str) -> Method:
    found = _REGISTRY.get(name) if isinstance(name, str) else None
    if found is None:
        raise LayerError(f"unknown method {name!r}; known methods are {', '.join(_REGISTRY)}.")
    return found


def methods_for(module_or_geometry: nn.Module | dict[str, Any]) -> tuple[str, ...]:
    """The methods that can replace a layer (a module or its geometry)."""
    kind = module_or_geometry["type"] if isinstance(module_or_geometry, dict) else geometry_type(module_or_geometry)
    return tuple(name for name, method in _REGISTRY.items() if kind in method.layer_types)


def default_method(layer_type_name: str) -> str:
    """The method the one-layer search uses for a layer type."""
    for name, method in _REGISTRY.items():
        if layer_type_name in method.default_for:
            return name
    raise LayerError(f"no factorization method applies to {layer_type_name}.")


def make_config(method: str | MethodConfig, rank: Any = None, **options: Any) -> MethodConfig:
    """A config from a method name, a rank and options; a config is returned as it is."""
    if isinstance(method, MethodConfig):
        if rank is not None or options:
            raise ConfigError("pass either a method config or a method name with rank and options, not both.")
        return method
    return get_method(method).make_config(rank, **options)


def config_from_json(entry: Mapping[str, Any]) -> MethodConfig:
    """A config from its plan-file form ``{"method", "rank"[, "fit"][, "options"]}``."""
    unknown = set(entry) - {"method", "rank", "fit", "options"}
    if unknown or "method" not in entry or "rank" not in entry:
        raise ConfigError(f"needs the keys 'method' and 'rank' (and optionally 'fit', 'options'), got "
                          f"{sorted(entry)}.")
    options = entry.get("options", {})
    if not isinstance(options, Mapping):
        raise ConfigError(f"'options' must be an object, got {type(options).__name__}.")
    fit = entry.get("fit", "weights")
    return make_config(entry["method"], entry["rank"], fit=fit, **dict(options))


def select_options(method: str, options: Mapping[str, Any] | None) -> dict[str, Any]:
    """One method's share of an options mapping meant for several methods.

    Top-level keys go to every method that has such an option; a key named after a
    method holds options for that method alone (``{"seed": 1, "cp": {"algorithm": "als"}}``).
    A key that no method knows is refused.
    """
    options = dict(options or {})
    own = set(get_method(method).config_class.option_names())
    every = {name for m in _REGISTRY.values() for name in m.config_class.option_names()}
    unknown = sorted(k for k in options if k not in every and k not in _REGISTRY)
    if unknown:
        raise ConfigError(f"unknown factorization option(s) {', '.join(map(repr, unknown))}; known options are "
                          f"{', '.join(sorted(every))} (or a method name mapping to that method's options).")
    picked = {k: v for k, v in options.items() if k in own}
    nested = options.get(method)
    if nested is not None:
        if not isinstance(nested, Mapping):
            raise ConfigError(f"options[{method!r}] must be a mapping of that method's options.")
        bad = sorted(set(nested) - own)
        if bad:
            raise ConfigError(f"unknown option(s) {', '.join(map(repr, bad))} for method '{method}'; its options "
                              f"are {', '.join(sorted(own))}.")
        picked.update(nested)
    return picked


# --------------------------------------------------------------------------- the driver

class FactorizationWarning(UserWarning):
    """A factorization costs more (parameters or MACs) than the dense layer it replaces."""


def bigger_than_dense(geometry: dict[str, Any], method: str, rank: Any, input_size=None, calls: int = 1) -> str | None:
    """Why the factorization costs more than the dense layer (params, or MACs with ``input_size``), or None."""
    from ..cost import dense_cost, factorized_cost

    size = input_size if input_size is not None else (
        (1,) if geometry["type"] in ("Linear", "Embedding") else
        tuple(max(1, (k - 1) * d + 1) for k, d in zip(geometry["kernel_size"], geometry["dilation"])))
    dense, fact = dense_cost(geometry, size), factorized_cost(geometry, method, rank, size)
    problems = []
    if fact.params > dense.params:
        problems.append(f"{fact.params:,} parameters vs {dense.params:,}")
    if input_size is not None and fact.macs > dense.macs and dense.macs > 0:  # a lookup has no MACs to lose
        problems.append(f"{fact.macs * calls:,} MACs vs {dense.macs * calls:,} ({fact.macs / max(dense.macs, 1):.2f}×)")
    return " and ".join(problems) if problems else None

def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # Half-precision weights are factorized in float32 and cast back: SVD/ALS need the range.
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.no_grad()
def factorize(module: nn.Module, method: str | MethodConfig, rank: Any = None, *, input_stats=None,
              name: str | None = None, input_size=None, **options: Any) -> Factorized:
    """Factorized replacement for ``module`` (``nn.Linear``, ``nn.Conv1d`` or ``nn.Conv2d``).

    ``method``: a :class:`MethodConfig` (e.g. ``SVDConfig(rank=16, fit="activations")``), or
    a method name (:func:`method_names`) with ``rank`` and the method's options as
    keywords (``factorize(conv, "cp", 8, algorithm="als")``). ``input_stats`` (the layer's
    :class:`~rankshrink.decompose.InputStats`, e.g. ``rankshrink.calibrate(...)[name]``)
    is what an activation fit minimises the output error on; given with a method name
    and no ``fit``, the fit is 'activations'. ``module`` is not modified. A factorization with
    more parameters than the layer (or, given ``input_size`` -- the layer's per-sample input
    size, optionally as ``(size, calls)`` -- more MACs) is built but warned about
    (:class:`FactorizationWarning`): it makes the model bigger.
    """
    label = name or layer_type(module)
    try:
        if isinstance(method, str) and "fit" not in options and input_stats is not None:
            options["fit"] = "activations"
        config = make_config(method, rank, **options)
    except ConfigError as exc:
        raise LayerError(f"{label}: {exc}") from None
    if config.fit == "weights":
        input_stats = None
    elif input_stats is None:
        raise LayerError(f"{label}: fit 'activations' needs the layer's input statistics: pass input_stats= "
                         "(from rankshrink.calibrate) or data= to apply(), or use fit='weights'.")
    reason = unsupported_reason(module)
    if reason is not None:
        raise LayerError(f"{label}: cannot factorize {layer_type(module)}: {reason}.")
    weight = layer_weight(module).detach()
    if not torch.isfinite(weight).all():
        raise LayerError(f"{label}: weight contains NaN or Inf values; fix or retrain the layer before factorizing.")
    impl = get_method(config.method)
    geometry = layer_geometry(module)
    impl.check_layer(geometry, label)
    rank = impl.normalize_rank(geometry, config.rank, layer=label)
    calls = 1
    if isinstance(input_size, tuple) and len(input_size) == 2 and isinstance(input_size[1], int) and \
            isinstance(input_size[0], tuple):
        input_size, calls = input_size
    bigger = bigger_than_dense(geometry, impl.name, rank, input_size, calls)
    if bigger is not None:
        import warnings

        warnings.warn(f"{label}: {config.label()} costs more than the dense {geometry['type']} ({bigger}); it makes "
                      "the model bigger. Lower the rank or keep the layer dense.", FactorizationWarning, stacklevel=3)
    block = impl.build(geometry, rank, dtype=weight.dtype, device=weight.device)
    # The decompositions run on the CPU (the statistics live there); the factors go to the layer's device.
    work = weight.to(device="cpu", dtype=_compute_dtype(weight.dtype))
    centered = False
    if input_stats is not None:
        from ..decompose.stats import statistics_of_kind

        centered = bool(config.bias_correction) and layer_bias(module) is not None
        try:
            chosen = statistics_of_kind(input_stats, impl.statistics, weight.shape, layer=label, method=impl.name)
            if chosen.count == 0:
                raise ConfigError(f"{label}: the statistics summarise no inputs (the calibration data never "
                                  "reached this layer); use fit='weights' for it.")
            factors = impl.fit_activations(work, rank, config, input_stats, centered=centered, layer=label)
        except LayerError:
            raise
        except ValueError as exc:  # ConfigError from the maths: name the layer
            message = str(exc)
            raise LayerError(message if message.startswith(label) else f"{label}: {message}") from None
    else:
        try:
            factors = impl.fit_weights(work, rank, config)
        except LayerError:
            raise
        except ConfigError as exc:
            raise LayerError(f"{label}: {exc}") from None
    for factor_weight, factor in zip(block.factor_weights(), factors):
        factor_weight.copy_(factor.reshape(factor_weight.shape))
    module_bias = layer_bias(module)
    if module_bias is not None:
        block_bias = block.bias
        assert block_bias is not None  # the block was built with the layer's bias
        block_bias.copy_(module_bias.detach())
        if centered:
            from ..decompose.activation import bias_shift

            shift = bias_shift(work, block.dense_weight().to(device="cpu", dtype=work.dtype),
                               input_stats.input_mean())
            block_bias.add_(shift.to(device=block_bias.device, dtype=block_bias.dtype))
    block.train(module.training)
    return block


# --------------------------------------------------------------------------- shared option sets

@dataclass(frozen=True, kw_only=True)
class SVDAlgorithm:
    """Options of the methods built on one truncated SVD.

    ``algorithm``: 'exact' (LAPACK), 'randomized' (a seeded range finder with
    ``oversample`` extra columns and ``power_iters`` subspace iterations) or 'auto'
    (randomized only for large matrices at small relative rank).
    """

    algorithm: str = "auto"
    oversample: int = 10
    power_iters: int = 4

    def _check_svd_options(self) -> None:
        check_choice(self.algorithm, "algorithm", ("auto", "exact", "randomized"))
        check_int(self.oversample, "oversample", minimum=0)
        check_int(self.power_iters, "power_iters", minimum=0)

    def svd_options(self) -> dict[str, Any]:
        return {"method": self.algorithm, "oversample": self.oversample, "power_iters": self.power_iters,
                "seed": getattr(self, "seed", 0)}


def matrix_error_curve(matrix: torch.Tensor, damping: float, stats=None, *,
                       centered: bool = False) -> tuple[torch.Tensor, float]:
    """Closed-form error curve of a truncated SVD of ``matrix`` (out × in), data-aware with full ``stats``."""
    from ..decompose import tail_errors
    from ..decompose.activation import GRAM_MIN_DIM, gram_singular_values

    work = matrix.detach().to(device="cpu", dtype=torch.float64)
    if stats is not None and max(work.shape) >= GRAM_MIN_DIM and stats.kind == "full":
        singular = gram_singular_values(work, stats.moment(centered).cpu(), damping)  # as gram_activation_svd
        return tail_errors(singular, min(matrix.shape)), float((singular ** 2).sum())
    if stats is not None:
        # The stats' cached whitening: a fit of the same layer reuses it (the search clears it per layer).
        work = work @ stats.whitening(centered, damping).L
    singular = torch.linalg.svdvals(work)
    return tail_errors(singular, min(matrix.shape)), float((singular ** 2).sum())


def matrix_rank_estimates(matrix: torch.Tensor, keep: float) -> tuple[int, int]:
    """(EVBMF rank, energy rank) of one matrix: the estimates of the methods built on one SVD."""
    from ..ranks import energy_rank, evbmf_rank

    return evbmf_rank(matrix), energy_rank(torch.linalg.svdvals(matrix.detach().double()), keep)


def widen_rank(block: Factorized, A: torch.Tensor, B: torch.Tensor, scaling: float) -> tuple[int, int]:
    """Fold ``scaling·B·A`` into a two-factor block (first factor gets A's rows, last B's columns)."""
    first, last = block[0], block[-1]
    first_weight, last_weight = layer_weight(first), layer_weight(last)
    start = first_weight.shape[0]
    block[0] = _resized(first, torch.cat([first_weight.detach(), A.to(first_weight.dtype)], 0))
    scaled_B = (B.to(torch.float64) * scaling).to(last_weight.dtype)
    block[-1] = _resized(last, torch.cat([last_weight.detach(), scaled_B], 1))
    _record_rank(block)
    return start, start + A.shape[0]


def narrow_rank(block: Factorized, span: tuple[int, int]) -> None:
    """Undo :func:`widen_rank`: drop the rank components in ``span``."""
    start, stop = span
    first, last = block[0], block[-1]
    first_weight, last_weight = layer_weight(first), layer_weight(last)
    keep = torch.cat([torch.arange(0, start), torch.arange(stop, first_weight.shape[0])])
    block[0] = _resized(first, first_weight.detach()[keep].clone())
    block[-1] = _resized(last, last_weight.detach()[:, keep].clone())
    _record_rank(block)


def _record_rank(block: Factorized) -> None:
    if isinstance(block.rank, int):
        block.rank = layer_weight(block[0]).shape[0]


def _resized(layer: nn.Module, weight: torch.Tensor) -> nn.Module:
    """A copy of Linear/Conv ``layer`` whose weight is ``weight`` (its rank axis resized)."""
    requires_grad = layer_weight(layer).requires_grad
    bias = layer_bias(layer)
    new: nn.Module
    if isinstance(layer, nn.Linear):
        new = nn.Linear(weight.shape[1], weight.shape[0], bias=layer.bias is not None,
                        dtype=weight.dtype, device=weight.device)
    else:
        new = type(layer)(weight.shape[1], weight.shape[0], layer.kernel_size, stride=layer.stride,
                          padding=layer.padding, dilation=layer.dilation, groups=layer.groups,
                          bias=layer.bias is not None, padding_mode=layer.padding_mode,
                          dtype=weight.dtype, device=weight.device)
    new_weight, new_bias = layer_weight(new), layer_bias(new)
    with torch.no_grad():
        new_weight.copy_(weight)
    new_weight.requires_grad_(requires_grad)
    if bias is not None:
        assert new_bias is not None  # built with bias=True above
        with torch.no_grad():
            new_bias.copy_(bias.detach())
        new_bias.requires_grad_(bias.requires_grad)
    new.train(layer.training)
    return new
