"""Analyse a model before compressing it: costs, spectra and break-even ranks per layer.

Pure inspection: nothing is factorized and the model is not modified.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn

from .cost import ModelCost, break_even_rank, count, linear_break_even
from .decompose import energy_kept, singular_values
from .factorized import layer_weight
from .methods import methods_for

ENERGY_LEVELS = (0.9, 0.99)


@dataclass
class LayerAnalysis:
    name: str
    type: str
    weight_shape: tuple[int, ...]
    params: int
    macs: int
    input_size: tuple[int, ...]
    methods: tuple[str, ...]
    break_even: dict[str, dict[str, int]]   # method -> {"params": r, "macs": r}
    singular_values: list[float]            # of the weight as (out, in·k…) matrix, descending
    rank_for_energy: dict[str, int]          # "90%" -> smallest rank keeping that share of Σσ²
    spectrum_break_even: int = 0             # break-even rank (params) of that matrix's truncated SVD

    def energy_at(self, rank: int) -> float:
        return energy_kept(torch.tensor(self.singular_values, dtype=torch.float64), rank)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "type": self.type, "weight_shape": list(self.weight_shape),
                "params": self.params, "macs": self.macs, "input_size": list(self.input_size),
                "methods": list(self.methods), "break_even": self.break_even,
                "rank_for_energy": self.rank_for_energy, "spectrum_break_even": self.spectrum_break_even,
                "singular_values": self.singular_values}


@dataclass
class Analysis:
    """What :func:`analyze` found: ``layers`` (the factorizable layers analysed), ``cost`` (the
    whole model: its ``others`` counted by formula and its ``not_counted`` ops measured),
    ``skipped`` layers with the reason, ``tied`` (groups of layers sharing a weight) and
    ``shared`` (one module under several names)."""

    layers: list[LayerAnalysis]
    cost: ModelCost
    skipped: list[tuple[str, str]] = field(default_factory=list)
    tied: list[list[str]] = field(default_factory=list)
    shared: list[list[str]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"params": self.cost.params, "bytes": self.cost.bytes, "macs": self.cost.macs,
                "bytes_by_dtype": self.cost.bytes_by_dtype,
                "layers": [layer.to_dict() for layer in self.layers],
                "others": [row.to_dict() for row in self.cost.others],
                "not_counted": [row.to_dict() for row in self.cost.not_counted],
                "tied": [{"layers": group, "note": "these layers share one weight tensor; they are kept dense"}
                         for group in self.tied],
                "shared": [{"names": names} for names in self.shared],
                "skipped": [{"name": n, "reason": r} for n, r in self.skipped]}


def rank_for_energy(singular: torch.Tensor, level: float) -> int:
    """Smallest rank whose top singular values keep ``level`` of Σσ² (at least 1)."""
    energy = singular.to(torch.float64) ** 2
    total = float(energy.sum())
    if total == 0.0:
        return 1
    cumulative = torch.cumsum(energy, 0) / total
    return int(torch.searchsorted(cumulative, torch.tensor(level - 1e-12, dtype=torch.float64)).item()) + 1


@torch.no_grad()
def analyze(model: nn.Module, example_input: Any, *, layers: Sequence[str] | None = None,
            exclude: Sequence[str] | None = None) -> Analysis:
    """Per-layer costs, weight spectra, energy ranks and break-even ranks of ``model``.

    ``example_input``: one batch (a tensor, a tuple or a dict of tensors). ``layers`` /
    ``exclude``: glob patterns over qualified names choosing the layers analysed (the whole
    model is still counted).
    """
    from .layers import select_layers, shared_modules, tied_groups

    costs = count(model, example_input)
    wanted = set(select_layers([e.name for e in costs.layers if e.method is None], layers, exclude))
    rows = []
    for entry in costs.layers:
        if entry.method is not None or entry.name not in wanted:
            continue  # already factorized (nothing left to analyse) or not asked for
        module = model.get_submodule(entry.name)
        weight = layer_weight(module).detach()
        spectrum = singular_values(weight.reshape(weight.shape[0], -1))
        methods = methods_for(entry.geometry)
        break_even = {m: {"params": break_even_rank(entry.geometry, m, entry.input_size, by="params"),
                          "macs": break_even_rank(entry.geometry, m, entry.input_size, by="macs")}
                      for m in methods}
        out_dim, in_dim = weight.shape[0], weight[0].numel()
        rows.append(LayerAnalysis(
            entry.name, entry.type, tuple(weight.shape), entry.params, entry.macs, entry.input_size, methods,
            break_even, [float(s) for s in spectrum],
            {f"{round(level * 100)}%": rank_for_energy(spectrum, level) for level in ENERGY_LEVELS},
            linear_break_even(out_dim, in_dim)))
    return Analysis(rows, costs, costs.skipped, tied_groups(model), shared_modules(model))
