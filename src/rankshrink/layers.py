"""Which layers a model has: qualified names, aliases of shared modules, tied weights, what can be factorized.

Read-only queries on module trees (rewriting them is :mod:`rankshrink.surgery`'s job):
cost counting, analysis, calibration and the search ask here.
"""

from __future__ import annotations

import difflib
from typing import Iterable

import torch
from torch import nn

from .errors import PlanError
from .factorized import Factorized, unsupported_reason

__all__ = ["get_layer", "aliases", "factorizable_layers", "skipped_layers", "ancestors", "inside_factorized",
           "tied_parameters"]


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


def ancestors(model: nn.Module, name: str) -> Iterable[nn.Module]:
    """The modules enclosing ``name``, outermost first (``model`` itself excluded)."""
    node = model
    for part in name.split(".")[:-1]:
        node = node.get_submodule(part)
        yield node


def inside_factorized(model: nn.Module, name: str) -> bool:
    """Whether layer ``name`` is one of the factors of a :class:`Factorized` block."""
    return any(isinstance(parent, Factorized) for parent in ancestors(model, name))


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


def tied_parameters(model: nn.Module, module: nn.Module) -> list[str]:
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
