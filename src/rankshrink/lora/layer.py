"""How one layer carries LoRA adapters: ``y = base(x) + Σ s·B·A·dropout(x)``.

Three wrappers, one per kind of base layer:

* :class:`LinearWithLoRA` - ``nn.Linear``; A is (r, in), B is (out, r).
* :class:`ConvWithLoRA` - ``nn.Conv1d``/``nn.Conv2d``; A is a conv with the base's
  kernel size, stride, padding, dilation and padding mode into r channels,
  (r, in, *k); B is a 1×1 conv back to the output channels, (out, r, 1[, 1]).
  Then ``s·B∘A`` is exactly the kernel update ``ΔW[o] = s·Σ_j B[o, j]·A[j]``.
* :class:`FactorizedWithLoRA` - a ``rankshrink.factorized.Factorized`` block (a
  compressed layer); the adapter has the shape of the layer the block replaced
  (its ``geometry``) and runs beside the block.

Each wrapper holds any number of named adapters (``lora_A[name]``, ``lora_B[name]``),
a list of active ones (their outputs are summed) and a list of merged ones (folded
into the base weights, so they cost nothing at inference). The base layer stays a
plain torch module in ``base_layer``; :meth:`LoraLayerBase.unwrap` hands it back.

The unmerged forward is kept cheap: the base output comes from one ``F.linear``/conv
call on the frozen weights, the adapter adds one ``x @ Aᵀ`` and one fused in-place
``addmm_`` (``out += s·(xAᵀ)Bᵀ``) - no copies of x, no scaled copy of B, and dropout
is skipped entirely (not an identity module call) when its probability is 0 or the
layer is in eval mode.
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING, Any, Iterable, TypeGuard, cast

import torch
import torch.nn.functional as F
from torch import nn

from ..decompose import low_rank_factors, weight_svd
from ..errors import ConfigError, LayerError
from ..factorized import Factorized, layer_weight
from ..fingerprint import state_fingerprint
from ..methods import get_method
from .config import scaling_for

_ADAPTER_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*$")
# Layer types that can carry an adapter, by the names users may target them with.
SUPPORTED_TYPE_NAMES = ("Linear", "Conv1d", "Conv2d", "Factorized")


def is_factorized(module: nn.Module) -> TypeGuard[Factorized]:
    """True for a :class:`rankshrink.factorized.Factorized` block."""
    return isinstance(module, Factorized)


def unsupported_reason(module: nn.Module) -> str | None:
    """Why ``module`` cannot carry a LoRA adapter, or None if it can."""
    if isinstance(module, LoraLayerBase):
        return None
    if is_factorized(module):
        kind = module.geometry.get("type")
        if kind not in ("Linear", "Conv1d", "Conv2d"):
            return f"factorized layer replaces a {kind}, which LoRA does not support"
        return None
    if type(module) is nn.Linear:
        return None
    if type(module) in (nn.Conv1d, nn.Conv2d):
        if module.groups != 1:
            return (f"grouped/depthwise convolution (groups={module.groups}) has no single kernel matrix "
                    "for a low-rank update")
        return None
    if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)):
        return f"subclass {type(module).__name__} may change forward(); only plain torch layers are adapted"
    return f"{type(module).__name__} is not a Linear, Conv1d, Conv2d or factorized layer"


def layer_digest(module: nn.Module) -> str:
    """SHA-256 of a layer's tensors (names, shapes, dtypes and bytes): its fingerprint."""
    return state_fingerprint(module.state_dict(), sort=True)


def _geometry_of(module: nn.Module) -> dict[str, Any]:
    """Shape facts of a Linear/Conv base (or the layer a Factorized block replaced)."""
    if is_factorized(module):
        g = dict(module.geometry)
    elif isinstance(module, nn.Linear):
        g = {"type": "Linear", "in_features": module.in_features, "out_features": module.out_features,
             "bias": module.bias is not None}
    else:
        g = {"type": type(module).__name__, "in_channels": module.in_channels,
             "out_channels": module.out_channels, "kernel_size": module.kernel_size,
             "stride": module.stride, "padding": module.padding, "dilation": module.dilation,
             "padding_mode": module.padding_mode, "bias": module.bias is not None}
    if g["type"] != "Linear":
        for key in ("kernel_size", "stride", "dilation"):
            g[key] = tuple(g[key])
        if not isinstance(g["padding"], str):
            g["padding"] = tuple(g["padding"])
    return g


def _reversed_padding(geometry: dict[str, Any]) -> list[int]:
    """F.pad amounts for a padding_mode other than 'zeros' (what nn.ConvNd computes)."""
    padding, k, d = geometry["padding"], geometry["kernel_size"], geometry["dilation"]
    pads: list[int] = []
    for i in reversed(range(len(k))):
        if padding == "valid":
            left = right = 0
        elif padding == "same":
            total = d[i] * (k[i] - 1)
            left = total // 2
            right = total - left
        else:
            left = right = padding[i]
        pads += [left, right]
    return pads


class _AdapterShapes:
    """Adapter and weight shapes from a layer's ``geometry`` (the wrappers' and a not-yet-wrapped layer's)."""

    geometry: dict[str, Any]

    @property
    def in_features(self) -> int:
        g = self.geometry
        return g["in_features"] if g["type"] == "Linear" else g["in_channels"]

    @property
    def out_features(self) -> int:
        g = self.geometry
        return g["out_features"] if g["type"] == "Linear" else g["out_channels"]

    @property
    def is_conv(self) -> bool:
        return self.geometry["type"] != "Linear"

    def max_rank(self) -> int:
        """Rank of the full kernel matrix: min(out, in·k…)."""
        fan_in = self.in_features * (math.prod(self.geometry["kernel_size"]) if self.is_conv else 1)
        return min(self.out_features, fan_in)

    def a_shape(self, r: int) -> tuple[int, ...]:
        if self.is_conv:
            return (r, self.in_features, *self.geometry["kernel_size"])
        return (r, self.in_features)

    def b_shape(self, r: int) -> tuple[int, ...]:
        if self.is_conv:
            return (self.out_features, r, *([1] * len(self.geometry["kernel_size"])))
        return (self.out_features, r)

    @property
    def weight_shape(self) -> tuple[int, ...]:
        if self.is_conv:
            return (self.out_features, self.in_features, *self.geometry["kernel_size"])
        return (self.out_features, self.in_features)


class LoraLayerBase(nn.Module, _AdapterShapes):
    """Common bookkeeping of the three wrappers (adapters, active/merged state)."""

    def __init__(self, base_layer: nn.Module, *, layer_name: str = "") -> None:
        super().__init__()
        reason = unsupported_reason(base_layer)
        if reason is not None:
            raise LayerError(f"layer '{layer_name or type(base_layer).__name__}' cannot take a LoRA adapter: "
                             f"{reason}.")
        self.base_layer = base_layer
        self.layer_name = layer_name
        self.geometry = _geometry_of(base_layer)
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        # Initial A, B of PiSSA adapters (their product was taken out of the base weight).
        self.lora_init = _Buffers()
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.lora_dropout: dict[str, float] = {}
        self.use_rslora: dict[str, bool] = {}
        self.init_mode: dict[str, Any] = {}
        # The forward reads parameters straight from these dicts (the same objects the
        # ParameterDicts and the base layer own; they survive .to(), deepcopy and
        # load_state_dict), skipping nn.Module.__getattr__ on the hot path. An adapter's
        # entries are never None, so they are typed without it.
        self._A = cast("dict[str, nn.Parameter]", self.lora_A._parameters)
        self._B = cast("dict[str, nn.Parameter]", self.lora_B._parameters)
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.adapters_disabled = False
        self.base_digest = layer_digest(base_layer)
        self._run: tuple = ()  # (name, dropout p) of adapters the forward must compute

    # -------------------------------------------------------------- geometry
    def adapter_parameter_count(self, r: int) -> int:
        return math.prod(self.a_shape(r)) + math.prod(self.b_shape(r))

    def _base_weight_param(self) -> torch.Tensor:
        return layer_weight(self.base_layer)

    # -------------------------------------------------------------- adapters
    @property
    def adapter_names(self) -> list[str]:
        return list(self.lora_A.keys())

    def _check_name(self, name: str, *, exists: bool) -> None:
        if exists and name not in self.lora_A:
            have = ", ".join(f"'{n}'" for n in self.adapter_names) or "none"
            raise LayerError(f"layer '{self.layer_name}' has no adapter named '{name}' (it has {have}).")

    def add_adapter(self, name: str, r: int, lora_alpha: float, *, lora_dropout: float = 0.0,
                    use_rslora: bool = False, init_lora_weights: Any = True,
                    generator: torch.Generator | None = None) -> None:
        """Create adapter ``name`` of rank ``r`` (not activated: see :meth:`set_active`)."""
        label = self.layer_name or type(self.base_layer).__name__
        if not isinstance(name, str) or not _ADAPTER_NAME.match(name):
            raise ConfigError(f"adapter name {name!r} must be a non-empty identifier (letters, digits, '_', '-').")
        if name in self.lora_A:
            raise LayerError(f"layer '{label}' already has an adapter named '{name}'; choose another name or "
                             "delete it first.")
        top = self.max_rank()
        if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= top:
            raise LayerError(
                f"LoRA rank {r!r} does not fit layer '{label}' ({self.geometry['type']}, weight shape "
                f"{self.weight_shape}): the rank must be in 1..{top} = min(out, in·kernel). Choose a rank of at "
                f"most {top}, or leave this layer out of the targets."
            )
        if isinstance(lora_alpha, bool) or not isinstance(lora_alpha, (int, float)) or not lora_alpha > 0:
            raise ConfigError(f"lora_alpha for layer '{label}' must be a positive number, got {lora_alpha!r}.")
        if init_lora_weights == "pissa" and is_factorized(self.base_layer):
            raise LayerError(
                f"PiSSA initialisation is not available for factorized layer '{label}' (method "
                f"'{self.base_layer.method}'): it already is a low-rank product. Use init_lora_weights=True."
            )
        weight = self._base_weight_param()
        A = torch.empty(self.a_shape(r), dtype=weight.dtype, device=weight.device)
        B = torch.zeros(self.b_shape(r), dtype=weight.dtype, device=weight.device)
        scaling = scaling_for(r, lora_alpha, use_rslora)
        if init_lora_weights is None:  # filled in by the caller (load, combine): no RNG use
            A.zero_()
        elif init_lora_weights == "gaussian":
            with torch.no_grad():
                A.normal_(0.0, 1.0 / r, generator=generator)
        elif init_lora_weights == "pissa":
            A, B = self._pissa_factors(r, scaling)
            self.lora_init.put(name, A.clone(), B.clone())
        else:
            _kaiming_uniform(A, generator)
            if init_lora_weights is False:
                _kaiming_uniform(B, generator)
        self.lora_A[name] = nn.Parameter(A)
        self.lora_B[name] = nn.Parameter(B)
        self.r[name] = r
        self.lora_alpha[name] = float(lora_alpha)
        self.scaling[name] = scaling
        self.lora_dropout[name] = float(lora_dropout)
        self.use_rslora[name] = bool(use_rslora)
        self.init_mode[name] = init_lora_weights
        if init_lora_weights == "pissa":  # the base keeps the residual
            self._add_to_base(self._delta(A, B, scaling), sign=-1.0)
        self._refresh()

    def add_adapter_from(self, name: str, A: torch.Tensor, B: torch.Tensor, scaling: float, *,
                         r: int, lora_alpha: float, use_rslora: bool = False, lora_dropout: float = 0.0) -> None:
        """Create adapter ``name`` with given A, B (used by load and combine)."""
        self.add_adapter(name, r, lora_alpha, lora_dropout=lora_dropout, use_rslora=use_rslora,
                         init_lora_weights=None)
        self.init_mode[name] = True
        with torch.no_grad():
            self.lora_A[name].copy_(A)
            self.lora_B[name].copy_(B)
        self.scaling[name] = float(scaling)
        self._refresh()

    def delete_adapter(self, name: str) -> None:
        """Drop adapter ``name`` (unmerging it first); a PiSSA adapter gives back its start."""
        self._check_name(name, exists=True)
        if name in self.merged_adapters:
            self.unmerge([name])
        if self.lora_init.has(name):
            A0, B0 = self.lora_init.pop(name)
            self._add_to_base(self._delta(A0, B0, self.scaling[name]), sign=1.0)
        del self.lora_A[name]
        del self.lora_B[name]
        for table in (self.r, self.lora_alpha, self.scaling, self.lora_dropout, self.use_rslora, self.init_mode):
            table.pop(name, None)
        if name in self.active_adapters:
            self.active_adapters.remove(name)
        self._refresh()

    def set_active(self, names: Iterable[str]) -> None:
        names = list(names)
        for name in names:
            self._check_name(name, exists=True)
        self.active_adapters = names
        self._refresh()

    def set_disabled(self, disabled: bool) -> None:
        self.adapters_disabled = bool(disabled)
        self._refresh()

    def _refresh(self) -> None:
        if self.adapters_disabled:
            self._run = ()
        else:
            self._run = tuple((n, self.lora_dropout[n], self.scaling[n]) for n in self.active_adapters
                              if n not in self.merged_adapters)

    # -------------------------------------------------------------- maths
    def _pissa_factors(self, r: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
        """A, B with s·B·A = the best rank-r part of W (√(S/s) on each side)."""
        weight = self._base_weight_param().detach()
        work = weight.to(torch.float64 if weight.dtype == torch.float64 else torch.float32)
        if self.is_conv:
            spatial, pointwise = weight_svd(work, r)
            A, B = spatial, pointwise
        else:
            left, right = low_rank_factors(work, r)
            A, B = right, left
        root = math.sqrt(scaling)
        return (A / root).to(weight.dtype).contiguous(), (B / root).to(weight.dtype).contiguous()

    @staticmethod
    def _delta(A: torch.Tensor, B: torch.Tensor, scaling: float) -> torch.Tensor:
        """s·B·A as a kernel of the base's shape, computed in float64."""
        out, r = B.shape[0], B.shape[1]
        mat = B.detach().to(torch.float64).reshape(out, r) @ A.detach().to(torch.float64).reshape(r, -1)
        return (scaling * mat).reshape(out, *A.shape[1:])

    def delta_weight(self, name: str) -> torch.Tensor:
        """The dense update ``s·B·A`` of adapter ``name``, in the base weight's shape and dtype."""
        self._check_name(name, exists=True)
        return self._delta(self.lora_A[name], self.lora_B[name], self.scaling[name]).to(self.lora_A[name].dtype)

    @torch.no_grad()
    def _add_to_base(self, delta: torch.Tensor, sign: float) -> None:
        weight = self._base_weight_param()
        weight.copy_((weight.detach().to(torch.float64) + sign * delta).to(weight.dtype))

    # -------------------------------------------------------------- merge
    def merge(self, names: Iterable[str] | None = None) -> list[str]:
        """Fold adapters (default: the active ones) into the base weights: W ← W + s·B·A."""
        label = self.layer_name or type(self.base_layer).__name__
        names = list(self.active_adapters if names is None else names)
        for name in names:
            self._check_name(name, exists=True)
            if name in self.merged_adapters:
                raise LayerError(f"adapter '{name}' is already merged into layer '{label}'; merging it twice would "
                                 "add its update twice. Call unmerge_adapters() first.")
        for name in names:
            self._merge_one(name)
            self.merged_adapters.append(name)
        self._refresh()
        return names

    def unmerge(self, names: Iterable[str] | None = None) -> list[str]:
        """Take merged adapters (default: all, newest first) back out of the base weights."""
        label = self.layer_name or type(self.base_layer).__name__
        names = list(reversed(self.merged_adapters) if names is None else names)
        for name in names:
            self._check_name(name, exists=True)
            if name not in self.merged_adapters:
                raise LayerError(f"adapter '{name}' is not merged into layer '{label}', so it cannot be unmerged; "
                                 "call merge_adapters() first (or leave it unmerged).")
        for name in names:
            self._unmerge_one(name)
            self.merged_adapters.remove(name)
        self._refresh()
        return names

    def _merge_one(self, name: str) -> None:
        self._add_to_base(self._delta(self.lora_A[name], self.lora_B[name], self.scaling[name]), sign=1.0)

    def _unmerge_one(self, name: str) -> None:
        self._add_to_base(self._delta(self.lora_A[name], self.lora_B[name], self.scaling[name]), sign=-1.0)

    def _check_mergeable(self, name: str) -> None:
        """Raise if adapter ``name`` cannot be folded into the base; a dense base takes any adapter."""

    def unwrap(self) -> nn.Module:
        """The base layer with merged adapters kept and every other adapter dropped."""
        for name in list(self.adapter_names):
            if name not in self.merged_adapters:
                self.delete_adapter(name)
        return self.base_layer

    def extra_repr(self) -> str:
        parts = [f"{n}: r={self.r[n]}, scaling={self.scaling[n]:.4g}" for n in self.adapter_names]
        state = f"active={self.active_adapters}, merged={self.merged_adapters}"
        if self.adapters_disabled:
            state += ", disabled"
        return "; ".join(parts + [state])


class _Buffers(nn.Module):
    """Named (A, B) tensor pairs kept as buffers: they follow .to() and state_dict, never train."""

    def put(self, name: str, A: torch.Tensor, B: torch.Tensor) -> None:
        self.register_buffer(f"{name}_A", A)
        self.register_buffer(f"{name}_B", B)

    def has(self, name: str) -> bool:
        return f"{name}_A" in self._buffers

    def get(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        A, B = self._buffers[f"{name}_A"], self._buffers[f"{name}_B"]
        assert A is not None and B is not None  # put() registers tensors, never None
        return A, B

    def pop(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        A, B = self._buffers.pop(f"{name}_A"), self._buffers.pop(f"{name}_B")
        assert A is not None and B is not None  # put() registers tensors, never None
        return A, B


def _adapter_conv(self: ConvWithLoRA | FactorizedWithLoRA, x: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """A's conv of ``x`` with the base's stride, padding, dilation and padding mode (both conv wrappers)."""
    g = self.geometry
    if self._pad is not None:
        x = F.pad(x, self._pad, mode=g["padding_mode"])
        return self._conv(x, A, None, g["stride"], 0, g["dilation"])
    return self._conv(x, A, None, g["stride"], g["padding"], g["dilation"])


def _kaiming_uniform(tensor: torch.Tensor, generator: torch.Generator | None) -> None:
    # nn.Linear's default init (kaiming_uniform with a=√5): U(-1/√fan_in, 1/√fan_in).
    fan_in = tensor[0].numel() if tensor.dim() > 1 else tensor.numel()
    bound = 1.0 / math.sqrt(fan_in) if fan_in else 0.0
    with torch.no_grad():
        tensor.uniform_(-bound, bound, generator=generator)


class LinearWithLoRA(LoraLayerBase):
    """``nn.Linear`` plus LoRA adapters (the seeds' ``LinearWithLoRA``, with several adapters)."""

    if TYPE_CHECKING:  # the base layer's type here; kept out of __annotations__, which TorchScript reads
        base_layer: nn.Linear

    def __init__(self, base_layer: nn.Module, *, layer_name: str = "") -> None:
        super().__init__(base_layer, layer_name=layer_name)
        # A Linear's weight is never None; its bias may be, which F.linear takes.
        self._base = cast("dict[str, nn.Parameter]", base_layer._parameters)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self._base
        out = F.linear(x, base["weight"], base["bias"])
        if not self._run:
            return out
        flat = out if out.dim() == 2 else out.view(-1, out.shape[-1])
        for name, p, s in self._run:
            h = F.dropout(x, p, True) if p and self.training else x
            if h.dim() != 2:
                h = h.reshape(-1, h.shape[-1])
            A = self._A[name]
            # For large batches (A·hᵀ)ᵀ is the faster CPU kernel than h·Aᵀ (r ≪ in); for
            # small ones F.linear saves two view dispatches.
            t = torch.mm(A, h.t()).t() if h.shape[0] >= 64 else F.linear(h, A)
            flat.addmm_(t, self._B[name].t(), alpha=s)
        return out


class ConvWithLoRA(LoraLayerBase):
    """``nn.Conv1d``/``nn.Conv2d`` plus LoRA adapters: a k-sized conv to r channels, then 1×1."""

    if TYPE_CHECKING:
        base_layer: nn.Conv1d | nn.Conv2d

    def __init__(self, base_layer: nn.Module, *, layer_name: str = "") -> None:
        super().__init__(base_layer, layer_name=layer_name)
        self._conv = F.conv2d if self.geometry["type"] == "Conv2d" else F.conv1d
        g = self.geometry
        self._pad = None if g["padding_mode"] == "zeros" else _reversed_padding(g)

    _lora_conv = _adapter_conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        out = base._conv_forward(x, base.weight, base.bias)
        for name, p, s in self._run:
            h = F.dropout(x, p, True) if p and self.training else x
            t = self._lora_conv(h, self._A[name])
            out.add_(self._conv(t, self._B[name]), alpha=s)
        return out


class FactorizedWithLoRA(LoraLayerBase):
    """A compressed (``Factorized``) layer plus LoRA adapters shaped like the layer it replaced.

    Merging folds an adapter into the factors exactly where the block's method can
    (:meth:`rankshrink.methods.Method.merge_adapter`; the two-factor SVD methods widen the
    rank, ``R`` becoming ``R + r``); unmerging takes it back out. Blocks of other methods
    keep their adapters unmerged.
    """

    if TYPE_CHECKING:
        base_layer: Factorized

    def __init__(self, base_layer: nn.Module, *, layer_name: str = "") -> None:
        super().__init__(base_layer, layer_name=layer_name)
        g = self.geometry
        if self.is_conv:
            self._conv = F.conv2d if g["type"] == "Conv2d" else F.conv1d
            self._pad = None if g["padding_mode"] == "zeros" else _reversed_padding(g)
        self._merge_slices: dict[str, tuple[int, int]] = {}

    def _base_weight_param(self) -> torch.Tensor:
        return layer_weight(self.base_layer[-1])  # for dtype/device only

    _lora_conv = _adapter_conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        for name, p, s in self._run:
            h = F.dropout(x, p, True) if p and self.training else x
            if self.is_conv:
                t = self._lora_conv(h, self._A[name])
                out = torch.add(out, self._conv(t, self._B[name]), alpha=s)
            else:
                t = F.linear(h, self._A[name])
                shape = out.shape
                out = torch.addmm(out.reshape(-1, shape[-1]), t.reshape(-1, t.shape[-1]), self._B[name].t(),
                                  alpha=s).view(shape)
        return out

    def _check_mergeable(self, name: str) -> None:
        method = self.base_layer.method
        if not get_method(method).can_merge_adapter:
            from ..methods import method_names

            mergeable = [m for m in method_names() if get_method(m).can_merge_adapter]
            raise LayerError(
                f"adapter '{name}' cannot be merged into factorized layer '{self.layer_name}' (method '{method}'): "
                f"only {' and '.join(mergeable)} blocks can absorb a low-rank update exactly. Keep the adapter "
                f"unmerged, or target only {'/'.join(mergeable)}-factorized and dense layers."
            )

    def merge(self, names: Iterable[str] | None = None) -> list[str]:
        for name in list(self.active_adapters if names is None else names):
            self._check_mergeable(name)
        return super().merge(names)

    @torch.no_grad()
    def _merge_one(self, name: str) -> None:
        A, B = self.lora_A[name].detach(), self.lora_B[name].detach()
        self._merge_slices[name] = get_method(self.base_layer.method).merge_adapter(
            self.base_layer, A, B, self.scaling[name])

    @torch.no_grad()
    def _unmerge_one(self, name: str) -> None:
        start, stop = self._merge_slices.pop(name)
        get_method(self.base_layer.method).unmerge_adapter(self.base_layer, (start, stop))
        width = stop - start
        for other, (a, b) in list(self._merge_slices.items()):
            if a >= stop:
                self._merge_slices[other] = (a - width, b - width)

    def _add_to_base(self, delta: torch.Tensor, sign: float) -> None:  # pragma: no cover - guarded above
        raise LayerError(f"factorized layer '{self.layer_name}' has no dense weight to update.")


def wrap_layer(module: nn.Module, *, layer_name: str = "") -> LoraLayerBase:
    """The right wrapper for ``module`` (an existing wrapper is returned as is)."""
    if isinstance(module, LoraLayerBase):
        return module
    reason = unsupported_reason(module)
    if reason is not None:
        raise LayerError(f"layer '{layer_name or type(module).__name__}' cannot take a LoRA adapter: {reason}.")
    if is_factorized(module):
        return FactorizedWithLoRA(module, layer_name=layer_name)
    if isinstance(module, nn.Linear):
        return LinearWithLoRA(module, layer_name=layer_name)
    return ConvWithLoRA(module, layer_name=layer_name)
