"""The factorized block and the geometry of the layers it replaces.

A :class:`Factorized` block is an ``nn.Sequential`` of standard torch layers (so it
prints, scripts and exports to ONNX like any other network) that remembers which
method built it, at which rank, and the geometry of the layer it replaced. What the
layers are for each method is decided in :mod:`rankshrink.methods`; this module holds
what they all share: the block class, :func:`layer_geometry` (a layer's constructor
arguments as plain data), why a layer cannot be factorized, and small helpers for
building convolution factors that keep stride, padding, dilation and padding mode exact.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .errors import LayerError

__all__ = ["Factorized", "layer_type", "layer_weight", "layer_bias", "unsupported_reason", "layer_geometry",
           "weight_shape", "conv_class", "pointwise", "axis_padding", "only_axis", "conv_arguments"]

# Layer types a factorization can replace (the ``type`` of a geometry).
LAYER_TYPES = ("Linear", "Conv1d", "Conv2d")


class Factorized(nn.Sequential):
    """A factorized replacement for one layer: its factor layers in order.

    Attributes: ``method`` (the registry name of the method that built it), ``rank``
    (normalised: an int, or a pair for methods with two ranks) and ``geometry`` (the
    replaced layer's constructor arguments, see :func:`layer_geometry`).
    """

    def __init__(self, *layers: nn.Module, method: str, rank: Any, geometry: dict[str, Any]):
        super().__init__(*layers)
        self.method = method
        self.rank = rank
        self.geometry = dict(geometry)

    def extra_repr(self) -> str:
        return f"method={self.method!r}, rank={self.rank!r}, replaces={self.geometry['type']}"

    def factor_weights(self) -> list[torch.Tensor]:
        return [layer_weight(layer) for layer in self]

    @torch.no_grad()
    def dense_weight(self) -> torch.Tensor:
        """The weight of the single layer this block is equivalent to."""
        from .methods import get_method

        return get_method(self.method).dense_weight([w.detach() for w in self.factor_weights()])

    @property
    def bias(self) -> torch.Tensor | None:
        return layer_bias(self[-1])


def layer_type(module: nn.Module) -> str:
    return type(module).__name__


# nn.Module.__getattr__ is typed ``Tensor | Module``; these give a layer's parameters their tensor type.
def layer_weight(layer: nn.Module) -> torch.Tensor:
    """``layer.weight`` of a Linear/Conv layer (or any module whose weight is a tensor)."""
    weight = layer.weight
    assert isinstance(weight, torch.Tensor), f"{layer_type(layer)} has no weight tensor"
    return weight


def layer_bias(layer: nn.Module) -> torch.Tensor | None:
    """``layer.bias`` of a Linear/Conv layer: a tensor, or None for a layer built with ``bias=False``."""
    bias = layer.bias
    assert bias is None or isinstance(bias, torch.Tensor), f"{layer_type(layer)} has no bias tensor"
    return bias


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
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
        return f"{layer_type(module)} is a table lookup (no multiplies to save); not factorized"
    if isinstance(module, (nn.RNNBase, nn.RNNCellBase, nn.MultiheadAttention)):
        return f"{layer_type(module)} computes with its weights directly, not through Linear layers; not factorized"
    return f"{layer_type(module)} has no weight matrix to factorize"


def layer_geometry(module: nn.Module) -> dict[str, Any]:
    """Constructor arguments of a Linear/Conv1d/Conv2d, as a JSON-friendly dict."""
    reason = unsupported_reason(module)
    if reason is not None:
        raise LayerError(f"cannot factorize {layer_type(module)}: {reason}.")
    if isinstance(module, nn.Linear):
        return {"type": "Linear", "in_features": module.in_features, "out_features": module.out_features,
                "bias": module.bias is not None}
    assert isinstance(module, (nn.Conv1d, nn.Conv2d))
    padding = module.padding if isinstance(module.padding, str) else list(module.padding)
    return {"type": layer_type(module), "in_channels": module.in_channels,
            "out_channels": module.out_channels, "kernel_size": list(module.kernel_size),
            "stride": list(module.stride), "padding": padding, "dilation": list(module.dilation),
            "padding_mode": module.padding_mode, "bias": module.bias is not None}


def weight_shape(geometry: dict[str, Any]) -> tuple[int, ...]:
    if geometry["type"] == "Linear":
        return geometry["out_features"], geometry["in_features"]
    return (geometry["out_channels"], geometry["in_channels"], *geometry["kernel_size"])


# --------------------------------------------------------------------------- building convolution factors

def conv_class(geometry: dict[str, Any]) -> type[nn.Conv1d] | type[nn.Conv2d]:
    return nn.Conv2d if geometry["type"] == "Conv2d" else nn.Conv1d


def pointwise(cls, cin: int, cout: int, bias: bool, **kw) -> nn.Module:
    """A 1×1 (or size-1) convolution."""
    return cls(cin, cout, 1, bias=bias, **kw)


def axis_padding(padding, axis: int):
    """The padding for a factor that spans only ``axis`` (0 = height, 1 = width)."""
    if isinstance(padding, str):
        return padding  # 'same'/'valid' are per-dimension rules, so they split exactly
    return tuple(p if i == axis else 0 for i, p in enumerate(padding))


def only_axis(values, axis: int, fill: int = 1) -> Any:
    """``values`` kept on ``axis`` and ``fill`` elsewhere (a kernel/stride/dilation for one axis).

    A tuple of ``len(values)`` ints, typed Any: torch types each ConvNd's sizes for its own dimension count.
    """
    return tuple(v if i == axis else fill for i, v in enumerate(values))


def conv_arguments(geometry: dict[str, Any]) -> dict[str, Any]:
    """kernel_size, stride, padding, dilation, padding_mode of a conv geometry, as tuples."""
    padding = geometry["padding"] if isinstance(geometry["padding"], str) else tuple(geometry["padding"])
    return {"kernel_size": tuple(geometry["kernel_size"]), "stride": tuple(geometry["stride"]),
            "padding": padding, "dilation": tuple(geometry["dilation"]), "padding_mode": geometry["padding_mode"]}
