"""Which layers a model has: qualified names, aliases of shared modules, tied weights, what can be factorized.

Read-only queries on module trees (rewriting them is :mod:`rankshrink.surgery`'s job):
cost counting, analysis, calibration and the search ask here.
"""

from __future__ import annotations

import difflib
from fnmatch import fnmatchcase
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from .errors import PlanError
from .factorized import Factorized, unsupported_reason

__all__ = ["get_layer", "aliases", "factorizable_layers", "skipped_layers", "ancestors", "inside_factorized",
           "tied_parameters", "tied_groups", "shared_modules", "select_layers", "matches", "batchnorm_folds",
           "FOLDABLE_TYPES"]


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


def tied_groups(model: nn.Module) -> list[list[str]]:
    """Groups of distinct modules that share a parameter tensor (tied weights), by qualified name."""
    owners: dict[int, list[str]] = {}
    seen_modules: set[int] = set()
    for name, module in model.named_modules():
        if id(module) in seen_modules:
            continue
        seen_modules.add(id(module))
        for p in module.parameters(recurse=False):
            owners.setdefault(id(p), []).append(name)
    groups: list[list[str]] = []
    for names in owners.values():
        if len(names) > 1 and names not in groups:
            groups.append(names)
    return groups


def shared_modules(model: nn.Module) -> list[list[str]]:
    """Modules reachable under several names (one module, several places in the tree)."""
    return [names for names in aliases(model).values() if len(names) > 1]


def matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatchcase(name, pattern) for pattern in patterns)


def select_layers(names: Iterable[str], include: Sequence[str] | None = None, exclude: Sequence[str] | None = None,
                  ) -> list[str]:
    """The ``names`` matched by one of the ``include`` glob patterns (all when None) and by none of ``exclude``.

    Patterns are shell globs over qualified names (``features.*``, ``classifier.1``, ``*.conv?``); a
    pattern that matches none of ``names`` is refused, since it is most likely a typo.
    """
    names = list(names)
    for option, patterns in (("--layers", include), ("--exclude", exclude)):
        for pattern in patterns or ():
            if not isinstance(pattern, str) or not pattern:
                raise PlanError(f"{option} patterns must be non-empty strings, got {pattern!r}.")
            if not any(fnmatchcase(name, pattern) for name in names):
                listing = ", ".join(names[:12]) + (" ..." if len(names) > 12 else "")
                close = difflib.get_close_matches(pattern, names, n=3)
                hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
                raise PlanError(f"{option} pattern '{pattern}' matches no factorizable layer.{hint} The layers are: "
                                f"{listing or 'none'}.")
    chosen = [n for n in names if include is None or matches(n, include)]
    return [n for n in chosen if not exclude or not matches(n, exclude)]


# Layers a following BatchNorm can be folded into (their weight's first axis is the output channel).
FOLDABLE_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _foldable_batchnorm(module: nn.Module) -> bool:
    return (isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats
            and module.running_mean is not None and module.running_var is not None)


def _features(module: nn.Module) -> int:
    return module.out_features if isinstance(module, nn.Linear) else module.out_channels  # type: ignore[return-value]


def batchnorm_folds(model: nn.Module) -> list[tuple[str, str]]:
    """(layer, BatchNorm) pairs where a BatchNorm with running statistics takes the output of a
    Linear/Conv layer that nothing else uses, each called once: the BatchNorm can be folded into it.

    Found on the traced graph (``torch.fx``); a model that cannot be traced falls back to adjacent
    (layer, BatchNorm) children of an ``nn.Sequential``.
    """
    modules = dict(model.named_modules())
    shared = {n for names in shared_modules(model) for n in names}
    pairs: list[tuple[str, str]] = []
    try:
        import torch.fx

        graph = torch.fx.symbolic_trace(model).graph
    except Exception:  # untraceable forward (data-dependent control flow): only the Sequential pattern is safe
        graph = None
    if graph is not None:
        calls: dict[str, int] = {}
        for node in graph.nodes:
            if node.op == "call_module":
                calls[str(node.target)] = calls.get(str(node.target), 0) + 1
        for node in graph.nodes:
            if node.op != "call_module" or not _foldable_batchnorm(modules.get(str(node.target), nn.Identity())):
                continue
            source: Any = node.args[0] if node.args else None
            if getattr(source, "op", None) != "call_module":
                continue
            layer_name, bn_name = str(source.target), str(node.target)
            layer = modules.get(layer_name)
            if (type(layer) in FOLDABLE_TYPES and len(source.users) == 1
                    and calls.get(layer_name) == 1 and calls.get(bn_name) == 1
                    and _features(layer) == modules[bn_name].num_features  # type: ignore[arg-type]
                    and not ({layer_name, bn_name} & shared)):
                pairs.append((layer_name, bn_name))
        return pairs
    for name, module in modules.items():
        if not isinstance(module, nn.Sequential):
            continue
        children = list(module.named_children())
        for (first, layer), (second, bn) in zip(children, children[1:]):
            full = [f"{name}.{first}" if name else first, f"{name}.{second}" if name else second]
            if (type(layer) in FOLDABLE_TYPES and _foldable_batchnorm(bn) and _features(layer) == bn.num_features
                    and not (set(full) & shared)):
                pairs.append((full[0], full[1]))
    return pairs
