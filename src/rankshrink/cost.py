"""Cost model: parameters, bytes, multiplies and additions of layers and models.

Counts come from shapes by formula (per sample, batch excluded):

* Linear (in n, out m, applied at P positions): multiplies ``P·m·n``,
  additions ``P·m·(n−1)`` plus ``P·m`` for the bias.
* Conv (S in, T out channels, groups g, kernel k…, output positions P):
  multiplies ``P·T·(S/g)·Πk``; additions ``P·T·((S/g)·Πk − 1)`` plus ``P·T`` for the bias.

A multiply-accumulate (MAC) is counted as one multiply; ``macs == multiplies``.
:func:`count` runs one forward pass with hooks to learn every layer's input size.
The break-even rank is the largest rank whose factorization is still strictly
cheaper than the dense layer (``r < mn/(m+n)`` for a Linear m×n).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from .errors import ConfigError, DataError
from .factorized import Factorized, layer_geometry, unsupported_reason


@dataclass(frozen=True)
class Cost:
    params: int
    multiplies: int
    additions: int

    @property
    def macs(self) -> int:
        return self.multiplies

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(self.params + other.params, self.multiplies + other.multiplies,
                    self.additions + other.additions)


ZERO = Cost(0, 0, 0)


def _conv_out(size: int, k: int, s: int, p: int, d: int) -> int:
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def conv_output_size(input_size, kernel_size, stride, padding, dilation) -> tuple[int, ...]:
    """Spatial output size of a convolution (``padding`` may be 'same'/'valid')."""
    if padding == "same":
        return tuple(input_size)
    if padding == "valid":
        padding = (0,) * len(kernel_size)
    return tuple(_conv_out(*args) for args in zip(input_size, kernel_size, stride, padding, dilation))


def linear_cost(in_features: int, out_features: int, bias: bool, positions: int = 1) -> Cost:
    mult = positions * out_features * in_features
    add = positions * out_features * (in_features - 1) + (positions * out_features if bias else 0)
    return Cost(out_features * in_features + (out_features if bias else 0), mult, add)


def conv_cost(in_channels: int, out_channels: int, kernel_size, groups: int, bias: bool,
              output_size) -> Cost:
    per_output = (in_channels // groups) * math.prod(kernel_size)
    positions = math.prod(output_size) * out_channels
    params = out_channels * per_output + (out_channels if bias else 0)
    return Cost(params, positions * per_output, positions * (per_output - 1) + (positions if bias else 0))


def module_cost(module: nn.Module, input_size: tuple[int, ...]) -> tuple[Cost, tuple[int, ...]]:
    """Cost of one Linear/Conv module (any groups) and its output size.

    ``input_size`` is the number of positions ``(P,)`` for a Linear and the spatial
    size for a conv.
    """
    if isinstance(module, nn.Linear):
        return linear_cost(module.in_features, module.out_features, module.bias is not None,
                           math.prod(input_size)), tuple(input_size)
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        out = conv_output_size(input_size, module.kernel_size, module.stride, module.padding, module.dilation)
        return conv_cost(module.in_channels, module.out_channels, module.kernel_size, module.groups,
                         module.bias is not None, out), out
    if isinstance(module, Factorized):
        total, size = ZERO, tuple(input_size)
        for layer in module:
            cost, size = module_cost(layer, size)
            total = total + cost
        return total, size
    raise ConfigError(f"no cost formula for {type(module).__name__}.")


def _dense_from_geometry(geometry: dict[str, Any]) -> nn.Module:
    if geometry["type"] == "Linear":
        return nn.Linear(geometry["in_features"], geometry["out_features"], bias=geometry["bias"], device="meta")
    cls = nn.Conv2d if geometry["type"] == "Conv2d" else nn.Conv1d
    padding = geometry["padding"] if isinstance(geometry["padding"], str) else tuple(geometry["padding"])
    return cls(geometry["in_channels"], geometry["out_channels"], tuple(geometry["kernel_size"]),
               stride=tuple(geometry["stride"]), padding=padding, dilation=tuple(geometry["dilation"]),
               padding_mode=geometry["padding_mode"], bias=geometry["bias"], device="meta")


def dense_cost(geometry: dict[str, Any], input_size) -> Cost:
    """Cost of the dense layer described by ``geometry`` on inputs of ``input_size``."""
    return module_cost(_dense_from_geometry(geometry), tuple(input_size))[0]


def factorized_cost(geometry: dict[str, Any], method: str, rank, input_size) -> Cost:
    """Cost of the factorization of ``geometry`` by ``method`` at ``rank`` (no weights computed)."""
    from .methods import get_method

    return get_method(method).cost(geometry, rank, input_size)


def break_even_rank(geometry: dict[str, Any], method: str, input_size=None, *, by: str = "params") -> int:
    """Largest rank whose factorization is strictly cheaper than the dense layer (0 if none).

    ``by``: 'params' or 'macs' (MACs need ``input_size``). Costs grow with rank,
    so this is a bisection over 1..full rank. Tucker-2 uses equal ranks (r, r) capped by
    the channel counts.
    """
    if by not in ("params", "macs"):
        raise ConfigError(f"by must be 'params' or 'macs', got {by!r}.")
    if input_size is None:
        if by == "macs":
            raise ConfigError("break-even rank for MACs needs the layer's input size.")
        input_size = (1,) * (1 if geometry["type"] in ("Linear", "Conv1d") else 2)
        if geometry["type"] != "Linear":
            input_size = tuple(max(1, (k - 1) * d + 1) for k, d in zip(geometry["kernel_size"], geometry["dilation"]))

    def value(cost: Cost) -> int:
        return cost.params if by == "params" else cost.macs

    from .methods import get_method

    impl = get_method(method)
    impl.check_layer(geometry)
    limit = value(dense_cost(geometry, input_size))
    top = impl.full_rank(geometry)
    lo, hi = 0, top  # invariant: rank lo is cheaper (or lo == 0); find the last cheaper rank
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if value(factorized_cost(geometry, method, mid, input_size)) < limit:
            lo = mid
        else:
            hi = mid - 1
    return lo


def linear_break_even(m: int, n: int) -> int:
    """Largest r with r·(m+n) < m·n: the seeds' ``r < mn/(m+n)`` (126 for 8192×128)."""
    return (m * n - 1) // (m + n)


def size_ratio(original: Cost, compressed: Cost) -> float:
    """E: how many times fewer parameters (original / compressed)."""
    return original.params / compressed.params if compressed.params else math.inf


def speed_ratio(original: Cost, compressed: Cost) -> float:
    """C: how many times fewer multiplies (original / compressed)."""
    return original.multiplies / compressed.multiplies if compressed.multiplies else math.inf


@dataclass
class LayerCost:
    name: str
    type: str                   # Linear, Conv2d, Conv1d, or the replaced type for factorized layers
    method: str | None          # None for dense layers
    rank: Any
    geometry: dict[str, Any]
    input_size: tuple[int, ...]  # positions (Linear) or spatial size (conv), per sample
    params: int
    bytes: int
    multiplies: int
    additions: int
    calls: int = 1

    @property
    def macs(self) -> int:
        return self.multiplies

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["macs"] = self.macs
        data["input_size"] = list(self.input_size)
        return data


@dataclass
class ModelCost:
    layers: list[LayerCost]
    params: int                 # every parameter of the model, counted once
    bytes: int                  # parameters and persistent buffers, as stored
    bytes_by_dtype: dict[str, int]
    multiplies: int             # summed over every Linear/Conv layer run, per sample (rows + other_*)
    additions: int
    other_params: int = 0       # parameters outside Linear/Conv layers (norms, embeddings, ...)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    other_multiplies: int = 0   # of Linear/Conv layers without a row (grouped/depthwise convs, subclasses)
    other_additions: int = 0

    @property
    def macs(self) -> int:
        return self.multiplies

    def layer(self, name: str) -> LayerCost:
        for entry in self.layers:
            if entry.name == name:
                return entry
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        return {"params": self.params, "bytes": self.bytes, "bytes_by_dtype": self.bytes_by_dtype,
                "macs": self.macs, "multiplies": self.multiplies, "additions": self.additions,
                "other_params": self.other_params, "other_multiplies": self.other_multiplies,
                "other_additions": self.other_additions, "layers": [row.to_dict() for row in self.layers],
                "skipped": [{"name": n, "reason": r} for n, r in self.skipped]}


def _input_size(module: nn.Module, inp: torch.Tensor) -> tuple[int, ...]:
    # A factorized block is sized like the layer it replaced (Linear: positions; conv: spatial).
    if isinstance(module, Factorized):
        kind = module.geometry["type"]
    else:
        kind = "Linear" if isinstance(module, nn.Linear) else "Conv2d" if isinstance(module, nn.Conv2d) else "Conv1d"
    if kind == "Linear":
        return (max(1, inp[0].numel() // inp.shape[-1]),)
    spatial = 2 if kind == "Conv2d" else 1
    return tuple(inp.shape[-spatial:])


@torch.no_grad()
def count(model: nn.Module, example_input: torch.Tensor | tuple) -> ModelCost:
    """Per-layer and total costs of ``model`` for one sample shaped like ``example_input``.

    ``example_input`` is a batch (its first dimension is the batch). Dense layers and
    factorized blocks are reported one row each; other layers with weights are listed
    in ``skipped`` with the reason. The model is run once in eval mode and restored.
    """
    from .layers import inside_factorized, skipped_layers

    inputs = example_input if isinstance(example_input, tuple) else (example_input,)
    if not inputs or not isinstance(inputs[0], torch.Tensor) or inputs[0].dim() == 0:
        raise DataError("example_input must be a batched tensor (first dimension = batch).")
    seen_sizes: dict[int, list[tuple[int, ...]]] = {}
    hooks = []

    def record(module, args, _output):
        seen_sizes.setdefault(id(module), []).append(_input_size(module, args[0]))

    targets, others = {}, {}
    for name, module in model.named_modules():
        if isinstance(module, Factorized) or (name and unsupported_reason(module) is None):
            targets[id(module)] = (name, module)
            hooks.append(module.register_forward_hook(record))
        elif name and isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            others[id(module)] = (name, module)  # not factorizable (e.g. depthwise) but it still computes
            hooks.append(module.register_forward_hook(record))
    was_training = model.training
    model.eval()
    try:
        model(*inputs)
    except RuntimeError as exc:
        raise DataError(f"the model failed on an input of shape {tuple(inputs[0].shape)}: "
                        f"{str(exc).splitlines()[0]}") from None
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)

    layers = []
    for module_id, (name, module) in targets.items():
        sizes = seen_sizes.get(module_id, [])
        if not sizes:
            continue  # never called in forward (an unused branch): costs nothing
        if inside_factorized(model, name):
            continue  # counted as part of its block
        cost = ZERO
        for size in sizes:
            call_cost, _ = module_cost(module, size)
            cost = Cost(call_cost.params, cost.multiplies + call_cost.multiplies,
                        cost.additions + call_cost.additions)
        nbytes = sum(p.numel() * p.element_size() for p in module.parameters())
        if isinstance(module, Factorized):
            kind, method, rank, geometry = module.geometry["type"], module.method, module.rank, module.geometry
        else:
            kind, method, rank, geometry = type(module).__name__, None, None, layer_geometry(module)
        layers.append(LayerCost(name, kind, method, rank, geometry, sizes[0], cost.params, nbytes,
                                cost.multiplies, cost.additions, calls=len(sizes)))
    params = sum(p.numel() for p in model.parameters())
    by_dtype: dict[str, int] = {}
    for tensor in list(model.parameters()) + [b for b in model.buffers()]:
        key = str(tensor.dtype).replace("torch.", "")
        by_dtype[key] = by_dtype.get(key, 0) + tensor.numel() * tensor.element_size()
    other = ZERO
    for module_id, (name, module) in others.items():
        if inside_factorized(model, name):
            continue  # a factor of a block (CP's depthwise convs): counted with the block
        for size in seen_sizes.get(module_id, []):
            other = other + module_cost(module, size)[0]
    # Parameters inside the rows' layers, each tensor once (tied weights appear in two rows).
    counted = sum(p.numel() for p in {id(p): p for row in layers
                                      for p in model.get_submodule(row.name).parameters()}.values())
    return ModelCost(layers, params, sum(by_dtype.values()), by_dtype,
                     sum(row.multiplies for row in layers) + other.multiplies,
                     sum(row.additions for row in layers) + other.additions,
                     other_params=params - counted, skipped=skipped_layers(model),
                     other_multiplies=other.multiplies, other_additions=other.additions)
