"""How a model gets LoRA adapters: add, freeze, count, switch, combine, merge, remove.

Which functions copy and which act in place:

* :func:`add_adapters` and :func:`remove_adapters` return a **new** model by default
  (``copy.deepcopy``; the model passed in is untouched) and take ``inplace=True``
  to change it instead - like :func:`rankshrink.apply`, which never mutates its input.
* Everything else (:func:`set_adapter`, :func:`disable_adapters`, :func:`merge_adapters`,
  :func:`unmerge_adapters`, :func:`combine_adapters`, :func:`delete_adapter`,
  :func:`mark_only_adapters_trainable`) changes adapter state of an already adapted
  model in place, and returns that model for chaining.

Layers are replaced with :func:`rankshrink.surgery.replace_layer`; only the named layers change.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import re
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import nn

from ..errors import ConfigError, LayerError
from ..surgery import replace_layer
from .config import LoraConfig, Target
from .layer import (
    SUPPORTED_TYPE_NAMES,
    LoraLayerBase,
    _AdapterShapes,
    is_factorized,
    layer_digest,
    unsupported_reason,
    wrap_layer,
)

DEFAULT_ADAPTER = "default"


# ---------------------------------------------------------------------------- finding layers
def lora_layers(model: nn.Module) -> dict[str, LoraLayerBase]:
    """Qualified name -> LoRA wrapper, for every adapted layer of ``model``."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayerBase)}


def _candidates(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(name, module) of every module, not descending into wrappers and factorized blocks."""
    opaque: list[str] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(p + ".") for p in opaque):
            continue
        if isinstance(module, LoraLayerBase) or is_factorized(module):
            opaque.append(name)
        yield name, module


def _describe(module: nn.Module) -> str:
    base = module.base_layer if isinstance(module, LoraLayerBase) else module
    if is_factorized(base):
        g = base.geometry
        inner = _shape_text(g)
        return f"Factorized {base.method} {g['type']} {inner}"
    if isinstance(base, nn.Linear):
        return f"Linear {base.in_features}→{base.out_features}"
    if isinstance(base, (nn.Conv1d, nn.Conv2d)):
        return f"{type(base).__name__} {base.in_channels}→{base.out_channels} k={tuple(base.kernel_size)}"
    return type(base).__name__


def _shape_text(g: Mapping[str, Any]) -> str:
    if g["type"] == "Linear":
        return f"{g['in_features']}→{g['out_features']}"
    return f"{g['in_channels']}→{g['out_channels']} k={tuple(g['kernel_size'])}"


def adaptable_layers(model: nn.Module) -> dict[str, str]:
    """Name -> short description of every layer that can take an adapter."""
    return {name: _describe(m) for name, m in _candidates(model) if unsupported_reason(m) is None}


def _type_matches(kind: str, module: nn.Module) -> bool:
    base = module.base_layer if isinstance(module, LoraLayerBase) else module
    if kind == "all":
        return unsupported_reason(base) is None
    if kind == "Factorized":
        return is_factorized(base)
    return not is_factorized(base) and type(base).__name__ == kind and unsupported_reason(base) is None


def find_targets(model: nn.Module, target: Target) -> list[str]:
    """Qualified names of the layers ``target`` selects (see :class:`LoraConfig`).

    Raises :class:`LayerError` when an item selects nothing (listing the layers that
    exist) or names a layer that cannot take an adapter.
    """
    if target is None:
        raise ConfigError("no LoRA target given; pass target_modules (e.g. ['fc1', 'fc2'], 'Linear' or 'all'). "
                          f"Layers that can take an adapter: {_listing(model)}.")
    items = [target] if isinstance(target, (str, re.Pattern, type)) else list(target)
    candidates = list(_candidates(model))
    chosen: dict[str, None] = {}
    for item in items:
        hits: list[str] = []
        if isinstance(item, type):
            for name, m in candidates:
                base = m.base_layer if isinstance(m, LoraLayerBase) else m
                if isinstance(base, item) and unsupported_reason(base) is None:
                    hits.append(name)
        elif isinstance(item, re.Pattern):
            hits = [name for name, m in candidates if item.fullmatch(name) and unsupported_reason(m) is None]
        elif item == "all" or item in SUPPORTED_TYPE_NAMES:
            hits = [name for name, m in candidates if _type_matches(item, m)]
        else:
            named = [(name, m) for name, m in candidates if name == item or name.endswith("." + item)]
            for name, m in named:
                reason = unsupported_reason(m)
                if reason is not None:
                    inside = [n for n in adaptable_layers(model) if n.startswith(name + ".")]
                    hint = f" Its adaptable sub-layers: {', '.join(inside)}." if inside else ""
                    raise LayerError(f"LoRA target '{item}' selects layer '{name}', which cannot take an adapter: "
                                     f"{reason}.{hint}")
                hits.append(name)
            if not named:
                try:
                    pattern = re.compile(item)
                except re.error:
                    pattern = None
                if pattern is not None:
                    hits = [name for name, m in candidates
                            if pattern.fullmatch(name) and unsupported_reason(m) is None]
        if not hits:
            shown = item.pattern if isinstance(item, re.Pattern) else getattr(item, "__name__", item)
            raise LayerError(f"LoRA target '{shown}' matches no layer of {type(model).__name__}. "
                             f"Layers that can take an adapter: {_listing(model)}. Use one of these names, a type "
                             f"({', '.join(SUPPORTED_TYPE_NAMES)}), 'all', or a regex matching whole names.")
        for name in hits:
            chosen[name] = None
    return list(chosen)


def _listing(model: nn.Module) -> str:
    layers = adaptable_layers(model)
    if not layers:
        return "none (the model has no Linear, Conv1d, Conv2d or factorized layer)"
    return ", ".join(f"{n} ({d})" for n, d in layers.items())


# ---------------------------------------------------------------------------- add / remove
def add_adapters(model: nn.Module, config: LoraConfig | None = None, name: str = DEFAULT_ADAPTER, *,
                 inplace: bool = False, freeze: bool = True, activate: bool = True, seed: int | None = 0,
                 **config_kwargs) -> nn.Module:
    """Add adapter ``name`` to the layers ``config.target_modules`` selects.

    ``config`` is a :class:`LoraConfig`, or leave it out and pass its fields as keywords
    (``add_adapters(model, r=4, lora_alpha=8, target_modules=["fc1"])``). Returns a
    deep copy of ``model`` with the adapter (``inplace=True``: ``model`` itself).
    ``freeze``: every parameter except this adapter's A and B stops requiring grad
    (the seeds' ``freeze_linear_layers``, for all layer types). ``activate``: the new
    adapter becomes the one the forward uses. ``seed`` makes A's initialisation
    reproducible (None: use the global RNG).
    """
    if config is None:
        config = LoraConfig(**config_kwargs)
    elif config_kwargs:
        raise ConfigError(f"pass either a LoraConfig or keyword fields, not both (got {sorted(config_kwargs)}).")
    elif not isinstance(config, LoraConfig):
        raise ConfigError(f"config must be a rankshrink.lora.LoraConfig, got {type(config).__name__}.")
    config.validate()
    names = find_targets(model, config.target_modules)
    # Check every layer before changing anything, so a bad rank leaves no half-adapted model.
    for layer_name in names:
        module = model.get_submodule(layer_name)
        probe = module if isinstance(module, LoraLayerBase) else None
        r = config.rank_for(layer_name)
        if probe is not None and name in probe.lora_A:
            raise LayerError(f"layer '{layer_name}' already has an adapter named '{name}'; pass another name= or "
                             "delete_adapter() it first.")
        top = (probe or _ShapeProbe(module)).max_rank()
        if r > top:
            shape = (probe or _ShapeProbe(module)).weight_shape
            raise LayerError(
                f"LoRA rank {r} does not fit layer '{layer_name}' (weight shape {shape}): the rank must be in "
                f"1..{top} = min(out, in·kernel). Choose a rank of at most {top} (--rank {top}), or leave "
                f"'{layer_name}' out of the targets (rank_pattern can give it its own rank)."
            )
    if not inplace:
        model = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    for layer_name in names:
        module = model.get_submodule(layer_name)
        wrapper = wrap_layer(module, layer_name=layer_name)
        wrapper.add_adapter(name, config.rank_for(layer_name), config.alpha_for(layer_name),
                            lora_dropout=config.lora_dropout, use_rslora=config.use_rslora,
                            init_lora_weights=config.init_lora_weights, generator=generator)
        if wrapper is not module:
            replace_layer(model, layer_name, wrapper)
        if activate:
            wrapper.set_active([name])
    if activate:
        set_adapter(model, name)
    if freeze:
        mark_only_adapters_trainable(model, [name])
    return model


class _ShapeProbe(_AdapterShapes):
    """max_rank/weight_shape of a not-yet-wrapped layer, without building a wrapper."""

    def __init__(self, module: nn.Module):
        from .layer import _geometry_of
        reason = unsupported_reason(module)
        if reason is not None:
            raise LayerError(f"layer cannot take a LoRA adapter: {reason}.")
        self.geometry = _geometry_of(module)


def remove_adapters(model: nn.Module, *, merge: bool = False, inplace: bool = False) -> nn.Module:
    """Plain torch layers back: every wrapper is replaced by its base layer.

    ``merge=True`` first folds the active adapters into the weights (``W + s·B·A``),
    giving a model with the adapter's behaviour and the base's structure and speed;
    ``merge=False`` gives the original layers back (already merged adapters stay
    merged - unmerge them first to undo). Returns a copy unless ``inplace``.
    """
    if not lora_layers(model):
        raise LayerError(f"{type(model).__name__} has no LoRA adapters to remove.")
    if not inplace:
        model = copy.deepcopy(model)
    for layer_name, wrapper in lora_layers(model).items():
        if merge:
            pending = [n for n in wrapper.active_adapters if n not in wrapper.merged_adapters]
            if pending and not wrapper.adapters_disabled:
                wrapper.merge(pending)
        replace_layer(model, layer_name, wrapper.unwrap())
    return model


def delete_adapter(model: nn.Module, name: str) -> nn.Module:
    """Drop adapter ``name`` from every layer that has it (unmerging it first)."""
    layers = _layers_with(model, name)
    for wrapper in layers.values():
        wrapper.delete_adapter(name)
    return model


# ---------------------------------------------------------------------------- switching
def adapter_names(model: nn.Module) -> list[str]:
    """Every adapter name present in the model, in order of first appearance."""
    seen: dict[str, None] = {}
    for wrapper in lora_layers(model).values():
        for n in wrapper.adapter_names:
            seen[n] = None
    return list(seen)


def _layers_with(model: nn.Module, name: str) -> dict[str, LoraLayerBase]:
    layers = lora_layers(model)
    if not layers:
        raise LayerError(f"{type(model).__name__} has no LoRA adapters; call rankshrink.lora.add_adapters() first.")
    found = {k: w for k, w in layers.items() if name in w.lora_A}
    if not found:
        have = ", ".join(f"'{n}'" for n in adapter_names(model))
        raise LayerError(f"no adapter named '{name}' in the model (it has {have}).")
    return found


def set_adapter(model: nn.Module, names: str | Sequence[str]) -> nn.Module:
    """Make ``names`` the active adapter(s); several active adapters' outputs add up.

    Also re-enables adapters after :func:`disable_adapters`.
    """
    names = [names] if isinstance(names, str) else list(names)
    if not names:
        raise ConfigError("set_adapter needs at least one adapter name; use disable_adapters() to turn all off.")
    for n in names:
        _layers_with(model, n)
    for wrapper in lora_layers(model).values():
        wrapper.set_active([n for n in names if n in wrapper.lora_A])
        wrapper.set_disabled(False)
    return model


def active_adapters(model: nn.Module) -> list[str]:
    seen: dict[str, None] = {}
    for wrapper in lora_layers(model).values():
        if not wrapper.adapters_disabled:
            for n in wrapper.active_adapters:
                seen[n] = None
    return list(seen)


def disable_adapters(model: nn.Module) -> nn.Module:
    """Run the base model only: unmerged adapters are skipped, merged ones are unmerged."""
    for wrapper in lora_layers(model).values():
        if wrapper.merged_adapters:
            wrapper.unmerge()
        wrapper.set_disabled(True)
    return model


def enable_adapters(model: nn.Module) -> nn.Module:
    for wrapper in lora_layers(model).values():
        wrapper.set_disabled(False)
    return model


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """``with adapters_disabled(model): base_out = model(x)`` - adapters back on afterwards."""
    layers = lora_layers(model)
    before = {k: w.adapters_disabled for k, w in layers.items()}
    merged = {k: list(w.merged_adapters) for k, w in layers.items()}
    disable_adapters(model)
    try:
        yield model
    finally:
        for k, w in layers.items():
            w.set_disabled(before[k])
            if merged[k]:
                w.merge(merged[k])


def combine_adapters(model: nn.Module, weights: Mapping[str, float], name: str, *,
                     activate: bool = True) -> nn.Module:
    """New adapter ``name`` whose update is ``Σ wᵢ·sᵢ·Bᵢ·Aᵢ`` over ``weights`` = {adapter: wᵢ}.

    Exact: A and B are stacked (rank Σ rᵢ, scaling 1), not averaged. Layers that carry
    only some of the adapters combine those they have.
    """
    if not isinstance(weights, Mapping) or not weights:
        raise ConfigError("combine_adapters needs a non-empty mapping {adapter name: weight}.")
    for adapter, w in weights.items():
        _layers_with(model, adapter)
        if isinstance(w, bool) or not isinstance(w, (int, float)):
            raise ConfigError(f"weight of adapter '{adapter}' must be a number, got {w!r}.")
    if name in adapter_names(model):
        raise LayerError(f"an adapter named '{name}' already exists; choose another name for the combination.")
    for layer_name, wrapper in lora_layers(model).items():
        merged = [a for a in weights if a in wrapper.merged_adapters]
        if merged:
            raise LayerError(f"adapter '{merged[0]}' is merged into layer '{layer_name}'; call unmerge_adapters() "
                             "before combining, or its update would count twice.")
    for wrapper in lora_layers(model).values():
        parts = [(a, float(w)) for a, w in weights.items() if a in wrapper.lora_A]
        if not parts:
            continue
        A = torch.cat([wrapper.lora_A[a].detach() for a, _ in parts], 0)
        B = torch.cat([wrapper.lora_B[a].detach() * (w * wrapper.scaling[a]) for a, w in parts], 1)
        r = A.shape[0]
        if r > wrapper.max_rank():  # stacked rank exceeds the layer: store the exact product's SVD instead
            A, B = _refactor(wrapper, A, B)
            r = A.shape[0]
        wrapper.add_adapter_from(name, A, B, 1.0, r=r, lora_alpha=float(r))
        wrapper.lora_A[name].requires_grad_(False)
        wrapper.lora_B[name].requires_grad_(False)
    if activate:
        set_adapter(model, name)
    return model


def _refactor(wrapper: LoraLayerBase, A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    out, r = B.shape[0], B.shape[1]
    mat = B.to(torch.float64).reshape(out, r) @ A.to(torch.float64).reshape(r, -1)
    U, S, Vh = torch.linalg.svd(mat, full_matrices=False)
    k = wrapper.max_rank()
    root = S[:k].sqrt()
    newA = (root[:, None] * Vh[:k]).reshape(k, *A.shape[1:]).to(A.dtype)
    newB = (U[:, :k] * root).reshape(out, k, *B.shape[2:]).to(B.dtype)
    return newA, newB


# ---------------------------------------------------------------------------- merge
def merge_adapters(model: nn.Module, names: str | Sequence[str] | None = None) -> nn.Module:
    """Fold adapters (default: the active ones) into the base weights, ``W ← W + s·B·A``.

    The wrappers stay (see :func:`remove_adapters` to drop them); merged adapters are
    skipped by the forward, so outputs do not change. Merging an adapter twice raises.
    """
    layers = lora_layers(model)
    if not layers:
        raise LayerError(f"{type(model).__name__} has no LoRA adapters to merge.")
    if isinstance(names, str):
        names = [names]
    if names is not None:
        for n in names:
            _layers_with(model, n)
    # Validate everywhere first, so an error leaves nothing half-merged.
    for layer_name, w in layers.items():
        todo = [n for n in (w.active_adapters if names is None else names) if n in w.lora_A]
        for n in todo:
            if n in w.merged_adapters:
                raise LayerError(f"adapter '{n}' is already merged into layer '{layer_name}'; merging it twice would "
                                 "add its update twice. Call unmerge_adapters() first.")
            w._check_mergeable(n)
    for w in layers.values():
        todo = [n for n in (w.active_adapters if names is None else names) if n in w.lora_A]
        if todo:
            w.merge(todo)
    return model


def unmerge_adapters(model: nn.Module, names: str | Sequence[str] | None = None) -> nn.Module:
    """Take merged adapters (default: all) back out of the weights, ``W ← W − s·B·A``.

    Exact up to one float rounding (the update is computed in float64). Unmerging an
    adapter that was never merged raises.
    """
    layers = lora_layers(model)
    if not layers:
        raise LayerError(f"{type(model).__name__} has no LoRA adapters to unmerge.")
    if isinstance(names, str):
        names = [names]
    if names is None:
        if not any(w.merged_adapters for w in layers.values()):
            raise LayerError("no adapter is merged, so there is nothing to unmerge; call merge_adapters() first.")
        for w in layers.values():
            if w.merged_adapters:
                w.unmerge()
        return model
    for n in names:
        for layer_name, w in _layers_with(model, n).items():
            if n not in w.merged_adapters:
                raise LayerError(f"adapter '{n}' is not merged into layer '{layer_name}', so it cannot be unmerged; "
                                 "call merge_adapters() first (or leave it unmerged).")
    for n in names:
        for w in _layers_with(model, n).values():
            w.unmerge([n])
    return model


# ---------------------------------------------------------------------------- parameters
@dataclass(frozen=True)
class ParameterCount:
    trainable: int
    total: int
    adapter: int

    @property
    def frozen(self) -> int:
        return self.total - self.trainable

    @property
    def trainable_percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return (f"trainable params: {self.trainable:,} || all params: {self.total:,} || "
                f"trainable%: {self.trainable_percent:.4f}")


def _is_adapter_param(qualified: str) -> bool:
    parts = qualified.split(".")
    return len(parts) >= 2 and parts[-2] in ("lora_A", "lora_B")


def count_parameters(model: nn.Module) -> ParameterCount:
    """Trainable, total and adapter parameter counts (shared parameters counted once)."""
    trainable = total = adapter = 0
    for qualified, p in model.named_parameters():
        n = p.numel()
        total += n
        if p.requires_grad:
            trainable += n
        if _is_adapter_param(qualified):
            adapter += n
    return ParameterCount(trainable=trainable, total=total, adapter=adapter)


def adapter_parameters(model: nn.Module, names: str | Sequence[str] | None = None) -> list[nn.Parameter]:
    """A and B of adapters ``names`` (default: the active ones), for an optimizer."""
    layers = lora_layers(model)
    if not layers:
        raise LayerError(f"{type(model).__name__} has no LoRA adapters; call rankshrink.lora.add_adapters() first.")
    if isinstance(names, str):
        names = [names]
    wanted = active_adapters(model) if names is None else list(names)
    for n in wanted:
        _layers_with(model, n)
    params = []
    for w in layers.values():
        for n in wanted:
            if n in w.lora_A:
                params += [w.lora_A[n], w.lora_B[n]]
    return params


def mark_only_adapters_trainable(model: nn.Module, names: str | Sequence[str] | None = None) -> nn.Module:
    """Freeze everything except adapters ``names`` (default: the active ones).

    The seeds' ``freeze_linear_layers``, generalised: every base parameter of every
    layer type (norms, embeddings, biases, factorized blocks) stops requiring grad.
    """
    keep = {id(p) for p in adapter_parameters(model, names)}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)
    return model


# ---------------------------------------------------------------------------- fingerprint
def fingerprint(model: nn.Module, layer_names: Sequence[str]) -> str:
    """SHA-256 over the original (pre-adapter) weights of ``layer_names``.

    An adapter records the fingerprint of the layers it was trained on, so loading it
    onto another base (other weights, other dtype) is caught.
    """
    digest = hashlib.sha256()
    for layer_name in sorted(layer_names):
        module = model.get_submodule(layer_name)
        d = module.base_digest if isinstance(module, LoraLayerBase) else layer_digest(module)
        digest.update(f"{layer_name}={d};".encode())
    return digest.hexdigest()
