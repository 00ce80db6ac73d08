"""Layer builders: turn one ``nn.Linear``/``nn.Conv1d``/``nn.Conv2d`` into a chain of smaller layers.

``factorize(module, method, rank)`` returns a :class:`Factorized` block, an
``nn.Sequential`` of standard torch layers (so it prints, scripts and exports to
ONNX like any other network), which remembers the geometry of the layer it
replaced. Stride, padding (numbers or 'same'/'valid'), dilation, padding mode and
bias carry over: the bias sits on the last factor only, and every earlier factor
is bias-free, which is what keeps zero/reflect/circular padding exact.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from . import decompose
from .errors import ConfigError, LayerError

LINEAR_METHODS = ("svd",)
CONV2D_METHODS = ("spatial", "weight", "tucker2", "cp")
CONV1D_METHODS = ("weight", "tucker2", "cp")
ALL_METHODS = ("svd", "spatial", "weight", "tucker2", "cp")
# Methods whose full rank reproduces the layer exactly (CP is only approximate).
EXACT_AT_FULL_RANK = ("svd", "spatial", "weight", "tucker2")


class Factorized(nn.Sequential):
    """A factorized replacement for one layer: its factor layers in order.

    Attributes: ``method`` ('svd', 'spatial', 'weight', 'tucker2', 'cp'), ``rank``
    (int, or (R_out, R_in) for tucker2) and ``geometry`` (the replaced layer's
    constructor arguments, see :func:`layer_geometry`).
    """

    def __init__(self, *layers: nn.Module, method: str, rank, geometry: dict[str, Any]):
        super().__init__(*layers)
        self.method = method
        self.rank = rank
        self.geometry = dict(geometry)

    def extra_repr(self) -> str:
        return f"method={self.method!r}, rank={self.rank!r}, replaces={self.geometry['type']}"

    def factor_weights(self) -> list[torch.Tensor]:
        return [layer.weight for layer in self]

    @torch.no_grad()
    def dense_weight(self) -> torch.Tensor:
        """The weight of the single layer this block is equivalent to."""
        weights = [w.detach() for w in self.factor_weights()]
        if self.method == "svd":
            return weights[1] @ weights[0]
        if self.method == "spatial":
            return decompose.reconstruct_spatial(decompose.SpatialFactors(*weights))
        if self.method == "weight":
            return decompose.reconstruct_weight(decompose.WeightFactors(*weights))
        if self.method == "tucker2":
            return decompose.reconstruct_tucker2(decompose.Tucker2Factors(*weights))
        return decompose.reconstruct_cp(decompose.CPFactors(weights[0], tuple(weights[1:-1]), weights[-1]))

    @property
    def bias(self) -> torch.Tensor | None:
        return self[-1].bias


def layer_type(module: nn.Module) -> str:
    return type(module).__name__


def unsupported_reason(module: nn.Module) -> str | None:
    """Why ``module`` cannot be factorized, or None if it can."""
    if isinstance(module, Factorized):
        return "already factorized"
    if type(module) is nn.Linear:
        return None
    if type(module) in (nn.Conv1d, nn.Conv2d):
        if module.groups != 1:
            kind = "depthwise" if module.groups == module.in_channels else "grouped"
            return f"{kind} convolution (groups={module.groups}) is already cheap per channel; not factorized"
        return None
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Linear)):
        return f"subclass {layer_type(module)} may change forward(); only plain torch layers are factorized"
    if isinstance(module, nn.modules.conv._ConvNd):
        return f"{layer_type(module)} is not supported (Linear, Conv1d and Conv2d are)"
    return f"{layer_type(module)} has no weight matrix to factorize"


def methods_for(module_or_geometry) -> tuple[str, ...]:
    kind = module_or_geometry["type"] if isinstance(module_or_geometry, dict) else layer_type(module_or_geometry)
    return {"Linear": LINEAR_METHODS, "Conv2d": CONV2D_METHODS, "Conv1d": CONV1D_METHODS}.get(kind, ())


def layer_geometry(module: nn.Module) -> dict[str, Any]:
    """Constructor arguments of a Linear/Conv1d/Conv2d, as a JSON-friendly dict."""
    reason = unsupported_reason(module)
    if reason is not None:
        raise LayerError(f"cannot factorize {layer_type(module)}: {reason}.")
    if isinstance(module, nn.Linear):
        return {"type": "Linear", "in_features": module.in_features, "out_features": module.out_features,
                "bias": module.bias is not None}
    padding = module.padding if isinstance(module.padding, str) else list(module.padding)
    return {"type": layer_type(module), "in_channels": module.in_channels,
            "out_channels": module.out_channels, "kernel_size": list(module.kernel_size),
            "stride": list(module.stride), "padding": padding, "dilation": list(module.dilation),
            "padding_mode": module.padding_mode, "bias": module.bias is not None}


def weight_shape(geometry: dict[str, Any]) -> tuple[int, ...]:
    if geometry["type"] == "Linear":
        return geometry["out_features"], geometry["in_features"]
    return (geometry["out_channels"], geometry["in_channels"], *geometry["kernel_size"])


def full_rank(geometry: dict[str, Any], method: str):
    """The largest meaningful rank: exact reconstruction (or, for CP, the rank bound)."""
    shape = weight_shape(geometry)
    _check_method(geometry, method)
    if method == "svd":
        return min(shape)
    if method == "spatial":
        return decompose.spatial_full_rank(shape)
    if method == "weight":
        return decompose.weight_full_rank(shape)
    if method == "tucker2":
        return max(shape[0], shape[1])
    return decompose.cp_max_rank(shape)


def normalize_rank(geometry: dict[str, Any], method: str, rank, *, layer: str = "layer"):
    """Validate ``rank`` for this layer and method; tucker2 ranks become (R_out, R_in)."""
    _check_method(geometry, method, layer)
    shape = weight_shape(geometry)
    if method == "tucker2":
        try:
            return decompose.tucker2_ranks(shape, tuple(rank) if isinstance(rank, list) else rank)
        except ValueError as exc:
            raise LayerError(f"{layer}: {exc}") from None
    top = full_rank(geometry, method)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= top:
        raise LayerError(f"{layer}: rank {rank!r} is outside 1..{top} for method '{method}' on "
                         f"{geometry['type']} with weight shape {shape}; choose a rank in that range.")
    return rank


def _check_method(geometry: dict[str, Any], method: str, layer: str = "layer") -> None:
    allowed = methods_for(geometry)
    if method not in allowed:
        if method not in ALL_METHODS:
            raise LayerError(f"{layer}: unknown method {method!r}; known methods are {', '.join(ALL_METHODS)}.")
        raise LayerError(f"{layer}: method '{method}' does not apply to {geometry['type']}; "
                         f"use one of {', '.join(allowed)}.")


def _conv_cls(geometry):
    return nn.Conv2d if geometry["type"] == "Conv2d" else nn.Conv1d


def _pointwise(cls, cin: int, cout: int, bias: bool, **kw) -> nn.Module:
    return cls(cin, cout, 1, bias=bias, **kw)


def _split_padding(padding, axis: int):
    """The padding for a factor that spans only ``axis`` (0 = height, 1 = width)."""
    if isinstance(padding, str):
        return padding  # 'same'/'valid' are per-dimension rules, so they split exactly
    return tuple(p if i == axis else 0 for i, p in enumerate(padding))


def _only(values, axis: int, fill: int = 1):
    return tuple(v if i == axis else fill for i, v in enumerate(values))


def build_factorized(geometry: dict[str, Any], method: str, rank, *, dtype=None, device=None) -> Factorized:
    """The factor layers for ``geometry``/``method``/``rank``, weights uninitialised.

    Used by :func:`factorize` (which then fills in the weights) and to rebuild a
    saved compressed model before loading its weights.
    """
    rank = normalize_rank(geometry, method, rank)
    kw = {"dtype": dtype, "device": device}
    bias = geometry["bias"]
    if method == "svd":
        layers = [nn.Linear(geometry["in_features"], rank, bias=False, **kw),
                  nn.Linear(rank, geometry["out_features"], bias=bias, **kw)]
        return Factorized(*layers, method=method, rank=rank, geometry=geometry)

    cls = _conv_cls(geometry)
    S, T = geometry["in_channels"], geometry["out_channels"]
    k, stride, dilation = tuple(geometry["kernel_size"]), tuple(geometry["stride"]), tuple(geometry["dilation"])
    padding = geometry["padding"] if isinstance(geometry["padding"], str) else tuple(geometry["padding"])
    mode = geometry["padding_mode"]
    full_conv = dict(stride=stride, padding=padding, dilation=dilation, padding_mode=mode, **kw)

    if method == "spatial":
        layers = [nn.Conv2d(S, rank, (k[0], 1), stride=_only(stride, 0), padding=_split_padding(padding, 0),
                            dilation=_only(dilation, 0), padding_mode=mode, bias=False, **kw),
                  nn.Conv2d(rank, T, (1, k[1]), stride=_only(stride, 1), padding=_split_padding(padding, 1),
                            dilation=_only(dilation, 1), padding_mode=mode, bias=bias, **kw)]
    elif method == "weight":
        layers = [cls(S, rank, k, bias=False, **full_conv), _pointwise(cls, rank, T, bias, **kw)]
    elif method == "tucker2":
        r_out, r_in = rank
        layers = [_pointwise(cls, S, r_in, False, **kw), cls(r_in, r_out, k, bias=False, **full_conv),
                  _pointwise(cls, r_out, T, bias, **kw)]
    else:  # cp: pointwise, one depthwise conv per spatial axis, pointwise
        depthwise = []
        for axis in range(len(k)):
            depthwise.append(cls(rank, rank, _only(k, axis), stride=_only(stride, axis),
                                 padding=_split_padding(padding, axis), dilation=_only(dilation, axis),
                                 padding_mode=mode, groups=rank, bias=False, **kw))
        layers = [_pointwise(cls, S, rank, False, **kw), *depthwise, _pointwise(cls, rank, T, bias, **kw)]
    return Factorized(*layers, method=method, rank=rank, geometry=geometry)


_SVD_OPTIONS = ("svd_method", "oversample", "power_iters", "seed")
# Keyword options each decomposition takes ('svd_method'/'cp_method' become its 'method').
DECOMPOSITION_OPTIONS = {"svd": _SVD_OPTIONS, "spatial": _SVD_OPTIONS, "weight": _SVD_OPTIONS,
                         "tucker2": ("n_iter_max", "tol", "seed"),
                         "cp": ("cp_method", "n_iter_max", "refine_iters", "tol", "seed")}


def decomposition_options(method: str, options: dict[str, Any]) -> dict[str, Any]:
    """The ``options`` that ``method``'s decomposition takes, renamed for it.

    Options meant for another method are dropped (one set of options serves a whole
    plan that mixes methods); a name that no method takes is refused.
    """
    known = {key for keys in DECOMPOSITION_OPTIONS.values() for key in keys}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConfigError(f"unknown factorization option(s) {', '.join(map(repr, unknown))}; "
                          f"known options are {', '.join(sorted(known))}.")
    picked = {key: value for key, value in options.items() if key in DECOMPOSITION_OPTIONS[method]}
    for alias in ("svd_method", "cp_method"):
        if alias in picked:
            picked["method"] = picked.pop(alias)
    return picked


def decompose_weight(weight: torch.Tensor, method: str, rank, *, input_stats=None, **options) -> list[torch.Tensor]:
    """Factor weights (first factor first) of ``weight`` for ``method``; pure maths.

    With ``input_stats`` (a :class:`rankshrink.decompose.InputStats` of the layer's
    inputs) the factors minimise the activation error ``‖(W − W′)X‖_F`` instead of the
    weight error; ``centered=True`` and ``damping=`` then apply (see
    :func:`rankshrink.decompose.data_aware.factor_weights`).
    """
    data_keys = ("centered", "damping", "layer")
    data_options = {key: options.pop(key) for key in data_keys if key in options}
    options = decomposition_options(method, options)
    if input_stats is not None:
        from .decompose.data_aware import factor_weights
        # The SVD-based methods take the SVD options (e.g. randomized); the data-aware
        # Tucker-2/CP solvers have their own fixed schedule.
        svd_options = dict(options) if method in ("svd", "weight", "spatial") else {}
        if "method" in svd_options:  # factor_weights' own `method` is the factorization's
            svd_options["svd_method"] = svd_options.pop("method")
        return factor_weights(weight, method, rank, input_stats, **data_options, **svd_options)
    if method == "svd":
        left, right = decompose.low_rank_factors(weight, rank, **options)
        return [right, left]
    if method == "spatial":
        return list(decompose.spatial_svd(weight, rank, **options))
    if method == "weight":
        return list(decompose.weight_svd(weight, rank, **options))
    if method == "tucker2":
        return list(decompose.tucker2(weight, rank, **options))
    f = decompose.cp(weight, rank, **options)
    return [f.first, *f.depthwise, f.last]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # Half-precision weights are factorized in float32 and cast back: SVD/ALS need the range.
    return torch.float64 if dtype == torch.float64 else torch.float32


OBJECTIVES = ("weights", "activations")


@torch.no_grad()
def factorize(module: nn.Module, method: str, rank, *, name: str | None = None, input_stats=None,
              objective: str | None = None, **options) -> Factorized:
    """Factorized replacement for ``module`` (``nn.Linear``, ``nn.Conv1d`` or ``nn.Conv2d``).

    ``method``: 'svd' (Linear); 'spatial', 'weight', 'tucker2', 'cp' (Conv2d);
    'weight', 'tucker2', 'cp' (Conv1d). ``rank``: int (tucker2 also takes
    (R_out, R_in)). ``options`` go to the decomposition (see ``DECOMPOSITION_OPTIONS``:
    e.g. ``svd_method='randomized'``, ``cp_method='als'``, ``seed``); options of other
    methods are ignored. ``module`` is not modified.

    ``input_stats`` (this layer's :class:`rankshrink.decompose.InputStats`, e.g.
    ``rankshrink.calibrate(...)[name]``) makes the factors activation-optimal:
    ``objective`` is then 'activations' by default ('weights' ignores the statistics).
    Data-aware options: ``bias_correction`` (default True: fit centred inputs and put
    ``(W − W′)·mean`` into the bias, for layers with a bias) and ``damping`` (relative
    ridge on the statistics, default ``rankshrink.decompose.data_aware.DEFAULT_DAMPING``).
    """
    if objective is None:
        objective = "activations" if input_stats is not None else "weights"
    if objective not in OBJECTIVES:
        raise LayerError(f"{name or layer_type(module)}: objective must be one of {', '.join(OBJECTIVES)}, "
                         f"got {objective!r}.")
    bias_correction = options.pop("bias_correction", True)
    data_options = {key: options.pop(key) for key in ("damping",) if key in options}
    if objective == "activations":
        if input_stats is None:
            raise LayerError(f"{name or layer_type(module)}: objective 'activations' needs the layer's input "
                             "statistics: pass input_stats= (from rankshrink.calibrate) or calibration= to "
                             "apply(), or use objective='weights'.")
    else:
        input_stats = None
    label = name or layer_type(module)
    reason = unsupported_reason(module)
    if reason is not None:
        raise LayerError(f"{label}: cannot factorize {layer_type(module)}: {reason}.")
    weight = module.weight.detach()
    if not torch.isfinite(weight).all():
        raise LayerError(f"{label}: weight contains NaN or Inf values; fix or retrain the layer before factorizing.")
    geometry = layer_geometry(module)
    rank = normalize_rank(geometry, method, rank, layer=label)
    block = build_factorized(geometry, method, rank, dtype=weight.dtype, device=weight.device)
    centered = False
    if input_stats is not None:
        centered = bool(bias_correction) and module.bias is not None
        try:
            factors = decompose_weight(weight.to(_compute_dtype(weight.dtype)), method, rank,
                                       input_stats=input_stats, centered=centered, layer=label,
                                       **data_options, **options)
        except LayerError:
            raise
        except ValueError as exc:  # ConfigError from the maths: name the layer
            message = str(exc)
            raise LayerError(message if message.startswith(label) else f"{label}: {message}") from None
    else:
        factors = decompose_weight(weight.to(_compute_dtype(weight.dtype)), method, rank, **options)
    for layer, factor in zip(block, factors):
        layer.weight.copy_(factor.reshape(layer.weight.shape))
    if module.bias is not None:
        block[-1].bias.copy_(module.bias.detach())
        if centered:
            from .decompose.data_aware import bias_shift
            shift = bias_shift(weight, block.dense_weight(), input_stats.input_mean())
            block[-1].bias.add_(shift.to(block[-1].bias.dtype))
    block.train(module.training)
    return block
