"""Cost model: parameters, bytes, multiplies and additions of layers and models.

Counts come from shapes by formula (per sample, batch excluded):

* Linear (in n, out m, applied at P positions): multiplies ``P·m·n``,
  additions ``P·m·(n−1)`` plus ``P·m`` for the bias.
* Conv (S in, T out channels, groups g, kernel k…, output positions P):
  multiplies ``P·T·(S/g)·Πk``; additions ``P·T·((S/g)·Πk − 1)`` plus ``P·T`` for the bias.

* RNN/GRU/LSTM (g = 1/3/4 gate blocks, hidden H, projection P, per layer and direction):
  ``g·H·(I + P or H)`` (+ ``P·H``) multiplies per time step, times the steps; cells per call.
* MultiheadAttention (E, L queries, S keys): q/k/v/out projections ``L·E² + S·E·kdim + S·E·vdim
  + L·E²`` plus the attention products ``2·L·S·E``. Embeddings: parameters and bytes, no multiplies.

Anything else that multiplies (functional ``matmul``/``bmm``/``scaled_dot_product_attention``,
custom layers) is measured with ``torch.utils.flop_counter``'s per-op formulas during the same
forward pass and listed as *not counted* (by a formula of ours) with those MACs, inside the
totals. A multiply-accumulate (MAC) is counted as one multiply; ``macs == multiplies``.
:func:`count` runs one forward pass with hooks to learn every layer's input size.
The break-even rank is the largest rank whose factorization is still strictly
cheaper than the dense layer (``r < mn/(m+n)`` for a Linear m×n).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from .errors import ConfigError, DataError
from .factorized import Factorized, layer_bias, layer_geometry, linear_features, unsupported_reason


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
    features = linear_features(module)
    if features is not None:  # nn.Linear, or a transposed-weight Linear (transformers' Conv1D)
        return linear_cost(features[0], features[1], layer_bias(module) is not None,
                           math.prod(input_size)), tuple(input_size)
    if isinstance(module, nn.Embedding):  # a table lookup: parameters, no multiplies
        return Cost(module.num_embeddings * module.embedding_dim, 0, 0), tuple(input_size)
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
    if geometry["type"] == "Embedding":
        return nn.Embedding(geometry["num_embeddings"], geometry["embedding_dim"], device="meta")
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
        input_size = (1,) * (1 if geometry["type"] in ("Linear", "Conv1d", "Embedding") else 2)
        if geometry["type"] not in ("Linear", "Embedding"):
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
class OtherCost:
    """A layer counted by formula that is not factorized (grouped/depthwise convs, recurrent
    and attention layers, embeddings ...): its costs summed over its calls, and why it stays."""

    name: str
    type: str
    params: int
    bytes: int
    multiplies: int
    additions: int
    calls: int
    reason: str

    @property
    def macs(self) -> int:
        return self.multiplies

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "macs": self.macs}


@dataclass
class MeasuredCost:
    """Multiplies that no formula covers, measured with ``torch.utils.flop_counter``'s per-op formulas
    (matmul, bmm, attention, convolutions ...) and attributed to the module whose forward ran them
    (``""``: the model's own forward). Included in the model's totals."""

    name: str
    type: str
    macs: int
    ops: dict[str, int]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "type": self.type, "macs": self.macs, "ops": dict(self.ops),
                "note": "no formula for this; measured by FlopCounterMode's formulas and included in the totals"}


@dataclass
class ModelCost:
    layers: list[LayerCost]
    params: int                 # every parameter of the model, counted once
    bytes: int                  # parameters and persistent buffers, as stored
    bytes_by_dtype: dict[str, int]
    multiplies: int             # every multiply of one forward pass per sample: rows + others + not counted
    additions: int
    other_params: int = 0       # parameters outside the factorizable rows (norms, embeddings, recurrent ...)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    other_multiplies: int = 0   # multiplies outside the rows (the others and the measured ops)
    other_additions: int = 0
    others: list[OtherCost] = field(default_factory=list)
    not_counted: list[MeasuredCost] = field(default_factory=list)

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
                "others": [row.to_dict() for row in self.others],
                "not_counted": [row.to_dict() for row in self.not_counted],
                "skipped": [{"name": n, "reason": r} for n, r in self.skipped]}


def _input_size(module: nn.Module, inp: torch.Tensor) -> tuple[int, ...]:
    # A factorized block is sized like the layer it replaced (Linear: positions; conv: spatial).
    if isinstance(module, Factorized):
        kind = module.geometry["type"]
    elif isinstance(module, nn.Embedding):
        kind = "Embedding"
    else:
        kind = "Linear" if linear_features(module) is not None else "Conv2d" if isinstance(module, nn.Conv2d) \
            else "Conv1d"
    if kind == "Embedding":  # indices per sample
        return (max(1, inp[0].numel() if inp.dim() > 1 else 1),)
    if kind == "Linear":
        return (max(1, inp[0].numel() // inp.shape[-1]),)
    spatial = 2 if kind == "Conv2d" else 1
    return tuple(inp.shape[-spatial:])


# --------------------------------------------------------------------------- formulas beyond Linear/Conv

_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_RNN_GATES = {nn.RNN: 1, nn.GRU: 3, nn.LSTM: 4}
_CELL_GATES = {nn.RNNCell: 1, nn.GRUCell: 3, nn.LSTMCell: 4}


def _matmul(rows: int, inner: int, cols: int, bias: bool = False) -> Cost:
    """A (rows × inner) · (inner × cols) product (params not included)."""
    return Cost(0, rows * inner * cols, rows * cols * (inner - 1) + (rows * cols if bias else 0))


def recurrent_step_cost(module: nn.RNNBase) -> Cost:
    """Multiplies and additions of one time step of every layer and direction (gates' elementwise work excluded)."""
    gates = _RNN_GATES[type(module)]
    hidden, proj = module.hidden_size, getattr(module, "proj_size", 0) or 0
    out = proj or hidden
    directions = 2 if module.bidirectional else 1
    total = ZERO
    for layer in range(module.num_layers):
        features = module.input_size if layer == 0 else out * directions
        step = _matmul(gates * hidden, features, 1, module.bias) + _matmul(gates * hidden, out, 1, module.bias)
        if proj:
            step = step + _matmul(proj, hidden, 1)
        total = total + Cost(0, step.multiplies * directions, step.additions * directions)
    return total


def cell_cost(module: nn.RNNCellBase) -> Cost:
    gates = _CELL_GATES[type(module)]
    return _matmul(gates * module.hidden_size, module.input_size, 1, module.bias) + \
        _matmul(gates * module.hidden_size, module.hidden_size, 1, module.bias)


def attention_cost(module: nn.MultiheadAttention, queries: int, keys: int) -> Cost:
    """``MultiheadAttention`` on ``queries`` query and ``keys`` key positions: the q/k/v and output
    projections and the two attention products (``QKᵀ`` and ``softmax·V``)."""
    embed, bias = module.embed_dim, module.in_proj_bias is not None
    keys = keys + (1 if module.bias_k is not None else 0) + (1 if module.add_zero_attn else 0)
    projections = (_matmul(queries, embed, embed, bias) + _matmul(keys, module.kdim, embed, bias)
                   + _matmul(keys, module.vdim, embed, bias))
    products = _matmul(queries, module.head_dim, keys) + _matmul(queries, keys, module.head_dim)
    products = Cost(0, products.multiplies * module.num_heads, products.additions * module.num_heads)
    out_bias = module.out_proj.bias is not None
    return projections + products + _matmul(queries, embed, embed, out_bias)


def _first_tensor(args: tuple, kwargs: dict, position: int, name: str) -> torch.Tensor | None:
    value = args[position] if len(args) > position else kwargs.get(name)
    return value if isinstance(value, torch.Tensor) else None


def _formula_call(module: Any, args: tuple, kwargs: dict, batch: int) -> Cost | None:
    """The cost of one call of a formula module that is not a factorizable row, per sample (None: no formula)."""
    kind = type(module)
    if kind in _CONV_TYPES:
        x = args[0]
        spatial = len(module.kernel_size)
        cost, _ = _conv_module_cost(module, tuple(x.shape[-spatial:]))
        return cost
    if kind in _RNN_GATES:
        x = args[0]
        if isinstance(x, nn.utils.rnn.PackedSequence):
            steps_total = int(x.batch_sizes.sum())
            rows = int(x.batch_sizes[0]) if len(x.batch_sizes) else 1
            step = recurrent_step_cost(module)
            return Cost(0, step.multiplies * steps_total // max(rows, 1), step.additions * steps_total // max(rows, 1))
        steps = x.shape[0] if x.dim() == 2 else (x.shape[1] if module.batch_first else x.shape[0])
        step = recurrent_step_cost(module)
        return Cost(0, step.multiplies * steps, step.additions * steps)
    if kind in _CELL_GATES:
        return cell_cost(module)
    if kind is nn.MultiheadAttention:
        query = _first_tensor(args, kwargs, 0, "query")
        key = _first_tensor(args, kwargs, 1, "key")
        if query is None:
            return None
        key = query if key is None else key
        axis = 0 if query.dim() == 2 else (1 if module.batch_first else 0)
        return attention_cost(module, query.shape[axis], key.shape[axis])
    if kind in (nn.Embedding, nn.EmbeddingBag):
        return ZERO  # a table lookup: parameters and bytes, no multiplies
    return None


def _conv_module_cost(module: Any, input_size: tuple[int, ...]) -> tuple[Cost, tuple[int, ...]]:
    out = conv_output_size(input_size, module.kernel_size, module.stride, module.padding, module.dilation)
    return conv_cost(module.in_channels, module.out_channels, module.kernel_size, module.groups,
                     module.bias is not None, out), out


def _has_formula(module: nn.Module) -> bool:
    return type(module) in _CONV_TYPES or type(module) in _RNN_GATES or type(module) in _CELL_GATES or \
        type(module) in (nn.MultiheadAttention, nn.Embedding, nn.EmbeddingBag)


class _Measure:
    """Multiplies of every op that ran, by FlopCounterMode's per-op formulas, attributed to modules.

    A dispatch mode (like ``FlopCounterMode`` itself) with a module stack kept by forward hooks:
    an op run while a formula module is on the stack belongs to the outermost such module (its
    formula counts it); any other op to the innermost module running.
    """

    def __init__(self, model: nn.Module, formula_ids: set[int]):
        from torch.utils.flop_counter import flop_registry

        self.registry = flop_registry
        self.names = {id(m): n for n, m in model.named_modules()}
        self.types = {id(m): type(m).__name__ for m in model.modules()}
        self.formula_ids = formula_ids
        self.stack: list[int] = []
        self.by_owner: dict[int | None, dict[str, int]] = {}
        self.measured_formula: dict[int, int] = {}

    def hooks(self, model: nn.Module) -> list:
        def enter(module, args) -> None:
            self.stack.append(id(module))

        def leave(module, args, output) -> None:
            if self.stack:
                self.stack.pop()

        handles = []
        for module in model.modules():
            handles.append(module.register_forward_pre_hook(enter))
            handles.append(module.register_forward_hook(leave, always_call=True))
        return handles

    def add(self, op: str, flops: int) -> None:
        owner = next((m for m in self.stack if m in self.formula_ids), None)
        if owner is not None:
            self.measured_formula[owner] = self.measured_formula.get(owner, 0) + flops
            return
        here = self.stack[-1] if self.stack else None
        ops = self.by_owner.setdefault(here, {})
        ops[op] = ops.get(op, 0) + flops

    def mode(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        measure = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                out = func(*args, **kwargs)
                packet = func._overloadpacket
                if packet in measure.registry:
                    measure.add(str(packet), int(measure.registry[packet](*args, **kwargs, out_val=out)))
                return out

        return Mode()

    def results(self, batch: int) -> list[MeasuredCost]:
        rows = []
        for owner, ops in self.by_owner.items():
            flops = sum(ops.values())
            if flops == 0:
                continue
            name = "" if owner is None else self.names.get(owner, "")
            kind = "" if owner is None else self.types.get(owner, "")
            rows.append(MeasuredCost(name, kind, round(flops / 2 / batch),
                                     {op.replace("aten.", ""): round(v / 2 / batch) for op, v in sorted(ops.items())}))
        return sorted(rows, key=lambda r: -r.macs)


@contextlib.contextmanager
def _math_attention():
    """Run scaled_dot_product_attention as its math decomposition, whose matmuls are measurable."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - torch < 2.3
        yield
        return
    with sdpa_kernel(SDPBackend.MATH):
        yield


@torch.no_grad()
def count(model: nn.Module, example_input: Any) -> ModelCost:
    """Per-layer and total costs of ``model`` for one sample shaped like ``example_input``.

    ``example_input`` is a batch (every tensor's first dimension is the batch): a tensor, a tuple
    (positional arguments) or a dict (keyword arguments). Factorizable layers and factorized
    blocks are one row each (``layers``); other layers with a formula (grouped/depthwise and 3-D
    convs, RNN/GRU/LSTM and their cells per step × steps, ``MultiheadAttention``, embeddings) are
    ``others``; every other op that multiplies (a functional ``matmul``, ``bmm``,
    ``scaled_dot_product_attention``, a custom layer's convolution ...) is measured with
    ``torch.utils.flop_counter``'s formulas and listed in ``not_counted`` (no formula of ours),
    attributed to the module that ran it. All of them are in the totals. Elementwise work
    (activations, normalisation, gates) is not counted, as in FlopCounterMode. Layers with
    weights that cannot be factorized are listed in ``skipped`` with the reason. The model is
    run once in eval mode and restored.
    """
    from . import inputs as model_inputs
    from .layers import inside_factorized, skipped_layers

    if isinstance(example_input, list):
        example_input = tuple(example_input)
    if not model_inputs.is_structure(example_input):
        raise DataError("example_input must be a batched tensor, or a tuple/dict of them (first dimension = batch).")
    batch = model_inputs.batch_size(example_input)
    seen_sizes: dict[int, list[tuple[int, ...]]] = {}
    other_calls: dict[int, list[Cost]] = {}
    hooks = []

    def record(module, args, _output):
        seen_sizes.setdefault(id(module), []).append(_input_size(module, args[0]))

    def record_other(module, args, kwargs, _output):
        cost = _formula_call(module, args, kwargs, batch)
        if cost is not None:
            other_calls.setdefault(id(module), []).append(cost)

    targets, others = {}, {}
    for name, module in model.named_modules():
        if isinstance(module, Factorized) or (name and unsupported_reason(module) is None):
            targets[id(module)] = (name, module)
            hooks.append(module.register_forward_hook(record))
        elif name and _has_formula(module) and not inside_factorized(model, name):
            others[id(module)] = (name, module)
            hooks.append(module.register_forward_hook(record_other, with_kwargs=True))
    measure = _Measure(model, set(targets) | set(others))
    hooks += measure.hooks(model)
    was_training = model.training
    model.eval()
    try:
        with model_inputs.hookable(), _math_attention(), measure.mode():
            model_inputs.call_checked(model, example_input, what="the example input")
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
    other_rows = []
    for module_id, (name, module) in others.items():
        calls = other_calls.get(module_id, [])
        if not calls and type(module) not in (nn.Embedding, nn.EmbeddingBag):
            continue
        total = ZERO
        for call in calls:
            total = total + call
        own = list(module.parameters())
        other_rows.append(OtherCost(name, type(module).__name__, sum(p.numel() for p in own),
                                    sum(p.numel() * p.element_size() for p in own), total.multiplies,
                                    total.additions, len(calls), unsupported_reason(module) or ""))
    measured = measure.results(batch)
    # Parameters inside the rows' layers, each tensor once (tied weights appear in two rows).
    counted = sum(p.numel() for p in {id(p): p for row in layers
                                      for p in model.get_submodule(row.name).parameters()}.values())
    other_mult = sum(r.multiplies for r in other_rows) + sum(r.macs for r in measured)
    other_add = sum(r.additions for r in other_rows) + sum(r.macs for r in measured)
    return ModelCost(layers, params, sum(by_dtype.values()), by_dtype,
                     sum(row.multiplies for row in layers) + other_mult,
                     sum(row.additions for row in layers) + other_add,
                     other_params=params - counted, skipped=skipped_layers(model),
                     other_multiplies=other_mult, other_additions=other_add, others=other_rows,
                     not_counted=measured)
