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
           "geometry_type", "is_transposed_linear", "linear_features", "weight_shape", "conv_class", "pointwise",
           "axis_padding", "only_axis", "conv_arguments"]

# Layer types a factorization can replace (the ``type`` of a geometry).
LAYER_TYPES = ("Linear", "Conv1d", "Conv2d", "Embedding")


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


def is_transposed_linear(module: nn.Module) -> bool:
    """Whether ``module`` is a GPT-2-style ``transformers`` ``Conv1D``: ``y = x·W + b`` with ``W`` stored (in, out).

    It computes what ``nn.Linear`` does with the transposed weight, so rankshrink treats it as a Linear
    (its geometry is a Linear's, :func:`layer_weight` returns the (out, in) view) and a factorization
    replaces it with plain ``nn.Linear`` factors. A fused QKV projection (``c_attn``) is one such layer,
    factorized as one matrix.
    """
    weight = getattr(module, "weight", None)
    return (type(module).__name__ == "Conv1D" and type(module).__module__.startswith("transformers")
            and isinstance(weight, torch.Tensor) and weight.dim() == 2
            and tuple(weight.shape) == (getattr(module, "nx", None), getattr(module, "nf", None)))


def linear_features(module: nn.Module) -> tuple[int, int] | None:
    """(in_features, out_features) of a Linear or a transposed-weight Linear (``Conv1D``), else None."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if is_transposed_linear(module):
        return int(module.nx), int(module.nf)  # type: ignore[arg-type]
    return None


# nn.Module.__getattr__ is typed ``Tensor | Module``; these give a layer's parameters their tensor type.
def layer_weight(layer: nn.Module) -> torch.Tensor:
    """``layer.weight`` of a Linear/Conv/Embedding layer (or any module whose weight is a tensor).

    A transposed-weight Linear (``transformers`` ``Conv1D``) gives the (out, in) view of its weight, like a Linear.
    """
    weight = layer.weight
    assert isinstance(weight, torch.Tensor), f"{layer_type(layer)} has no weight tensor"
    return weight.T if is_transposed_linear(layer) else weight


def layer_bias(layer: nn.Module) -> torch.Tensor | None:
    """``layer.bias`` of a Linear/Conv layer: a tensor, or None for a layer without one (``bias=False``, Embedding)."""
    bias = getattr(layer, "bias", None)
    assert bias is None or isinstance(bias, torch.Tensor), f"{layer_type(layer)} has no bias tensor"
    return bias


def unsupported_reason(module: nn.Module) -> str | None:
    """Why ``module`` cannot be factorized, or None if it can."""
    if isinstance(module, Factorized):
        return "already factorized"
    if type(module) is nn.Linear or is_transposed_linear(module):
        return None
    if type(module) in (nn.Conv1d, nn.Conv2d):
        if module.groups != 1:
            kind = "depthwise" if module.groups == module.in_channels else "grouped"
            return f"{kind} convolution (groups={module.groups}) is already cheap per channel; not factorized"
        return None
    if type(module) is nn.Embedding:
        if module.max_norm is not None:
            return ("Embedding with max_norm renormalises the rows it looks up, which a factorized table cannot "
                    "do; not factorized")
        return None
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Linear, nn.Embedding)):
        return f"subclass {layer_type(module)} may change forward(); only plain torch layers are factorized"
    if isinstance(module, nn.modules.conv._ConvNd):
        return f"{layer_type(module)} is not supported (Linear, Conv1d, Conv2d and Embedding are)"
    if isinstance(module, nn.EmbeddingBag):
        return f"{layer_type(module)} sums or averages its lookups in one op; only nn.Embedding is factorized"
    if isinstance(module, (nn.RNNBase, nn.RNNCellBase, nn.MultiheadAttention)):
        return f"{layer_type(module)} computes with its weights directly, not through Linear layers; not factorized"
    if type(module).__name__ == "Conv1D":
        return (f"{layer_type(module)} from {type(module).__module__} is not a GPT-2-style Conv1D with a (in, out) "
                "weight; convert it to nn.Linear first")
    return f"{layer_type(module)} has no weight matrix to factorize"


def layer_geometry(module: nn.Module) -> dict[str, Any]:
    """Constructor arguments of a Linear/Conv1d/Conv2d/Embedding, as a JSON-friendly dict."""
    reason = unsupported_reason(module)
    if reason is not None:
        raise LayerError(f"cannot factorize {layer_type(module)}: {reason}.")
    features = linear_features(module)
    if features is not None:
        return {"type": "Linear", "in_features": features[0], "out_features": features[1],
                "bias": layer_bias(module) is not None}
    if isinstance(module, nn.Embedding):
        return {"type": "Embedding", "num_embeddings": module.num_embeddings, "embedding_dim": module.embedding_dim,
                "padding_idx": module.padding_idx, "scale_grad_by_freq": bool(module.scale_grad_by_freq),
                "sparse": bool(module.sparse), "bias": False}
    assert isinstance(module, (nn.Conv1d, nn.Conv2d))
    padding = module.padding if isinstance(module.padding, str) else list(module.padding)
    return {"type": layer_type(module), "in_channels": module.in_channels,
            "out_channels": module.out_channels, "kernel_size": list(module.kernel_size),
            "stride": list(module.stride), "padding": padding, "dilation": list(module.dilation),
            "padding_mode": module.padding_mode, "bias": module.bias is not None}


def geometry_type(module: nn.Module) -> str:
    """The geometry type a factorizable module has (a ``Conv1D`` is a 'Linear'); its class name otherwise."""
    return layer_geometry(module)["type"] if unsupported_reason(module) is None else layer_type(module)


def weight_shape(geometry: dict[str, Any]) -> tuple[int, ...]:
    """The shape of :func:`layer_weight` for a layer of ``geometry`` ((V, d) for an Embedding)."""
    if geometry["type"] == "Linear":
        return geometry["out_features"], geometry["in_features"]
    if geometry["type"] == "Embedding":
        return geometry["num_embeddings"], geometry["embedding_dim"]
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
