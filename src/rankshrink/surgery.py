"""Model surgery: find layers by qualified name and replace them in a copy.

This is the only module that walks and rewrites module trees. The input model is
never modified: :func:`apply` deep-copies it first.
"""

from __future__ import annotations

import copy
import difflib
import os
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import nn

from .errors import FileFormatError, LayerError, PlanError
from .factorized import (Factorized, build_factorized, factorize, layer_geometry, methods_for,
                         normalize_rank, unsupported_reason)
from .fileio import atomic_write_json, load_tensors, prepare_output_dir, save_tensors, verify_output_set
from .plan import Plan

WEIGHTS_FILE = "model.safetensors"
PLAN_FILE = "plan.json"


def get_layer(model: nn.Module, name: str) -> nn.Module:
    """The submodule called ``name``, or a PlanError suggesting close names."""
    if name and name in dict(model.named_modules(remove_duplicate=False)):  # any alias of a shared module
        return model.get_submodule(name)
    candidates = [n for n, m in model.named_modules() if n and unsupported_reason(m) is None]
    close = difflib.get_close_matches(name, candidates, n=3)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    listing = ", ".join(candidates[:12]) + (" ..." if len(candidates) > 12 else "")
    raise PlanError(f"layer '{name}' does not exist in {type(model).__name__}.{hint} "
                    f"Factorizable layers: {listing or 'none'}.")


def aliases(model: nn.Module) -> dict[int, list[str]]:
    """Module id -> every qualified name it is reachable under (shared modules have several)."""
    names: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        names.setdefault(id(module), []).append(name)
    return names


def factorizable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every layer that can be factorized, in model order, each once."""
    return [(n, m) for n, m in model.named_modules() if n and unsupported_reason(m) is None]


def skipped_layers(model: nn.Module) -> list[tuple[str, str]]:
    """(name, reason) for layers with weights that will not be factorized."""
    skipped = []
    for name, module in model.named_modules():
        if not name or isinstance(module, Factorized) or inside_factorized(model, name):
            continue
        reason = unsupported_reason(module)
        has_weight = isinstance(getattr(module, "weight", None), torch.Tensor)
        if reason is not None and has_weight:
            skipped.append((name, reason))
    return skipped


def ancestors(model: nn.Module, name: str) -> Iterable[nn.Module]:
    """The modules enclosing ``name``, outermost first (``model`` itself excluded)."""
    node = model
    for part in name.split(".")[:-1]:
        node = node.get_submodule(part)
        yield node


def inside_factorized(model: nn.Module, name: str) -> bool:
    """Whether layer ``name`` is one of the factors of a :class:`Factorized` block."""
    return any(isinstance(parent, Factorized) for parent in ancestors(model, name))


def replace_layer(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` at ``name`` (works through Sequential, ModuleList, ModuleDict, attributes)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if isinstance(parent, nn.ModuleDict) or child in parent._modules:
        parent._modules[child] = new
    else:
        setattr(parent, child, new)


def _tied_parameters(model: nn.Module, module: nn.Module, name: str) -> list[str]:
    """Names of other modules sharing a parameter tensor with ``module`` (tied weights)."""
    own = {id(p) for p in module.parameters(recurse=False)}
    same_module = set(aliases(model).get(id(module), []))
    tied = []
    for other_name, other in model.named_modules(remove_duplicate=False):
        if other_name in same_module or other is module:
            continue
        if any(id(p) in own for p in other.parameters(recurse=False)):
            tied.append(other_name)
    return tied


def validate_plan(model: nn.Module, plan: Plan) -> dict[str, object]:
    """Check every entry against ``model`` before touching anything.

    Returns name -> normalised rank. Raises PlanError/LayerError naming the first
    bad layer: missing, not factorizable, wrong method, rank out of range, or tied.
    """
    if not isinstance(plan, Plan):
        raise PlanError(f"expected a rankshrink Plan, got {type(plan).__name__}; build one with Plan.from_mapping(...).")
    ranks = {}
    seen: dict[int, str] = {}
    for name, entry in plan.items():
        module = get_layer(model, name)
        reason = unsupported_reason(module)
        if reason is not None:
            raise LayerError(f"layer '{name}' ({type(module).__name__}) cannot be factorized: {reason}.")
        if id(module) in seen:
            raise PlanError(f"layers '{seen[id(module)]}' and '{name}' are the same shared module; "
                            "list it once in the plan (it is replaced everywhere it is used).")
        seen[id(module)] = name
        tied = _tied_parameters(model, module, name)
        if tied:
            raise LayerError(f"layer '{name}' shares its weights with {', '.join(tied)} (tied weights); "
                             "factorizing it alone would silently untie them. Remove it from the plan.")
        geometry = layer_geometry(module)
        if entry.method not in methods_for(geometry):
            raise LayerError(f"layer '{name}': method '{entry.method}' does not apply to {geometry['type']}; "
                             f"use one of {', '.join(methods_for(geometry))}.")
        ranks[name] = normalize_rank(geometry, entry.method, entry.rank, layer=f"layer '{name}'")
    return ranks


def apply(model: nn.Module, plan: Plan, *, inplace: bool = False, progress: bool = False,
          calibration=None, **options) -> nn.Module:
    """A copy of ``model`` with every layer in ``plan`` replaced by its factorization.

    The whole plan is validated before any work. ``options`` are passed to
    :func:`rankshrink.factorize` (e.g. ``seed``). With ``inplace=True`` the model
    itself is changed (useful for models too large to copy).

    ``calibration`` (from :func:`rankshrink.calibrate.calibrate` on this model) makes
    every factorization activation-optimal for its layer's inputs; ``objective``
    ('activations', the default with a calibration, or 'weights') and the data-aware
    options ``damping``/``bias_correction`` pass through to ``factorize``.
    """
    if isinstance(plan, dict):
        plan = Plan.from_mapping(plan)
    validate_plan(model, plan)
    objective = options.get("objective")
    layer_stats: dict[str, object] = {}
    if objective == "activations" and calibration is None:
        raise PlanError("objective='activations' needs calibration data: pass calibration=rankshrink.calibrate."
                        "calibrate(model, data), or use objective='weights'.")
    if calibration is not None and objective != "weights":
        names = aliases(model)
        for name in plan:
            module = model.get_submodule(name)
            found = next((calibration.get(alias) for alias in [name, *names.get(id(module), [])]
                          if calibration.get(alias) is not None), None)
            if found is None:
                calibration[name]  # raises DataError naming the layer and what was calibrated
            layer_stats[name] = found
    target = model if inplace else copy.deepcopy(model)
    where = aliases(target)
    items = list(plan.items())
    iterator = items
    if progress:
        from tqdm.auto import tqdm
        iterator = tqdm(items, desc="factorizing", unit="layer")
    for name, entry in iterator:
        module = target.get_submodule(name)
        if layer_stats:
            block = factorize(module, entry.method, entry.rank, name=f"layer '{name}'",
                              input_stats=layer_stats[name], **options)
        else:
            block = factorize(module, entry.method, entry.rank, name=f"layer '{name}'", **options)
        for alias in where[id(module)]:  # a shared module is replaced everywhere it is used
            replace_layer(target, alias, block)
    return target


def save(model: nn.Module, plan: Plan, directory: str | os.PathLike, *, force: bool = False,
         extra_files: dict[str, object] | None = None) -> Path:
    """Write ``model.safetensors`` and ``plan.json`` (each atomically) into ``directory``."""
    directory = prepare_output_dir(directory, force=force)
    state = model.state_dict()
    save_tensors(directory / WEIGHTS_FILE, state, metadata={"format": "rankshrink-model"})
    plan.save(directory / PLAN_FILE)
    for filename, content in (extra_files or {}).items():
        atomic_write_json(directory / filename, content)
    return directory


def load(factory: Callable[[], nn.Module] | nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Rebuild a compressed model saved by :func:`save` on a fresh instance of its class.

    ``factory`` is the user's model class (or any zero-argument callable returning
    the uncompressed model, or such a model itself, which is not modified). The
    planned layers are replaced by empty factor layers, then all weights load strictly.
    """
    directory = Path(directory)
    # A set written by fileio.output_set records checksums: refuse a mix of two runs' files.
    verify_output_set(directory, names=[PLAN_FILE, WEIGHTS_FILE])
    plan = Plan.load(directory / PLAN_FILE) if (directory / PLAN_FILE).exists() else None
    if plan is None:
        raise FileFormatError(f"'{directory}' has no {PLAN_FILE}; it is not a model saved by rankshrink.save().")
    base = copy.deepcopy(factory) if isinstance(factory, nn.Module) else factory()
    if not isinstance(base, nn.Module):
        raise PlanError(f"the factory returned {type(base).__name__}, not an nn.Module.")
    ranks = validate_plan(base, plan)
    where = aliases(base)
    for name, entry in plan.items():
        module = base.get_submodule(name)
        weight = module.weight
        block = build_factorized(layer_geometry(module), entry.method, ranks[name],
                                 dtype=weight.dtype, device=weight.device)
        for alias in where[id(module)]:
            replace_layer(base, alias, block)
    state = load_tensors(directory / WEIGHTS_FILE)
    load_state_dict_checked(base, state, directory / WEIGHTS_FILE)
    return base.eval()


def load_state_dict_checked(model: nn.Module, state: dict[str, torch.Tensor], source) -> None:
    """``load_state_dict(strict=True)`` with an error naming the first mismatching key/shape."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        detail = (f"missing key '{missing[0]}'" if missing else "") + (
            ("; " if missing else "") + f"unexpected key '{unexpected[0]}'" if unexpected else "")
        raise FileFormatError(f"'{source}' does not match the model: {detail} "
                              f"({len(missing)} missing, {len(unexpected)} unexpected).")
    for key, tensor in expected.items():
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise FileFormatError(f"'{source}' does not match the model: '{key}' has shape "
                                  f"{tuple(state[key].shape)} in the file but {tuple(tensor.shape)} in the model.")
    model.load_state_dict(state, strict=True)
