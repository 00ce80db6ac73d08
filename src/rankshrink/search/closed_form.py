"""Distortions in closed form: every rank of a layer from one SVD, scaled by one measured probe.

The candidates' distortion (how far the network's outputs move when only that layer is
factorized) is what the allocation trades against cost. Measuring it means one forward pass
of the proxy batch per candidate -- about 40 per layer, hours for a 20 M-parameter encoder.
For a method whose factors are a truncated SVD (``svd``, ``weight``, ``embedding``) the layer's
own output error at *every* rank follows from the singular values of its whitened weight
``W·L`` (``C = L Lᵀ`` the calibration inputs' second moment): the optimal rank-r factors leave
``e(r) = Σ_{i>r} σ_i² / Σ σ_i²`` of the layer's output energy (data-aware; the plain weight
spectrum without calibration). :meth:`rankshrink.methods.Method.error_curve` gives it.

How much of that error reaches the network's output depends on the layer (what follows it), and
not linearly: measured on all-MiniLM-L6-v2, the output distortion (1 − cosine) of the word embedding
grows like ``e^1.6`` between ranks 96 and 190 and like ``e^2.3`` below, while a feed-forward layer's
grows like ``e^0.9``. Two *probes* per layer measure it: the layer is factorized at a quarter and at
half of its highest searched rank, the network runs on ``probe_samples`` training inputs the
calibration did not use, and the two measured distortions fix a power law ``D = a·e^p`` through them
(interpolated in log-log between the probes, extrapolated with the nearest segment's exponent,
clamped to [0.5, 3]). Every candidate then gets ``D(e(r))`` with no forward pass. So a layer costs
one SVD and two forward passes of a small batch, whatever its number of candidates; the probes of all
layers are independent and run on the worker pool together (:mod:`rankshrink.search.parallel`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from ..factorized import layer_bias, layer_weight
from ..methods import get_method

__all__ = ["ErrorCurve", "error_curve", "probe_ranks", "MIN_RELATIVE_ERROR", "EXPONENT_RANGE"]

# A probe whose layer keeps more than 1 − 1e-9 of its output energy measures rounding, not sensitivity.
MIN_RELATIVE_ERROR = 1e-9
# The power law's exponent between and beyond the probes is kept in this range.
EXPONENT_RANGE = (0.5, 3.0)


@dataclass
class ErrorCurve:
    """One layer's closed-form errors for one method: ``errors[r]`` at rank r, ``total`` the output energy.

    ``probes``: rank -> measured network distortion with only this layer factorized at that rank.
    """

    layer: str
    method: str
    errors: torch.Tensor
    total: float
    probe_ranks: list[int] = field(default_factory=list)
    probes: dict[int, float] = field(default_factory=dict)

    @property
    def probed(self) -> bool:
        return bool(self.probe_ranks) and all(rank in self.probes for rank in self.probe_ranks)

    def relative(self, rank: int) -> float:
        """The fraction of the layer's output energy the rank-``rank`` factors lose."""
        if self.total <= 0:
            return 0.0
        index = min(max(int(rank), 0), self.errors.numel() - 1)
        return float(self.errors[index]) / self.total

    def distortion(self, rank: int) -> float:
        """The predicted network distortion of the layer at ``rank`` (needs the probes)."""
        assert self.probed, "the layer has not been probed"
        error = self.relative(rank)
        if any(not math.isfinite(value) for value in self.probes.values()):
            return math.inf if error > 0 else 0.0
        points = sorted({(self.relative(r), value) for r, value in self.probes.items()
                         if self.relative(r) > MIN_RELATIVE_ERROR and value > 0})
        if error <= 0 or not points:
            return 0.0
        if len(points) == 1:
            return points[0][1] * error / points[0][0]
        x = math.log(error)
        logs = [(math.log(e), math.log(d)) for e, d in points]
        # The segment holding x, or the nearest end segment.
        i = next((k for k in range(len(logs) - 1) if x <= logs[k + 1][0]), len(logs) - 2)
        (x0, y0), (x1, y1) = logs[i], logs[i + 1]
        slope = (y1 - y0) / (x1 - x0) if x1 > x0 else 1.0
        slope = min(max(slope, EXPONENT_RANGE[0]), EXPONENT_RANGE[1])
        anchor_x, anchor_y = (x1, y1) if x > x1 else (x0, y0)
        return math.exp(anchor_y + slope * (x - anchor_x))


def error_curve(session, name: str, module, method: str) -> ErrorCurve | None:
    """The closed-form curve of ``method`` on layer ``name`` with the search's fit, or None (no closed form)."""
    impl = get_method(method)
    config = session.factorizer.config(method, 1)
    stats = None
    centered = False
    if config.fit == "activations" and session.calibration is not None:
        stats = session.calibration.get(name)
        if stats is None:
            return None
        centered = bool(getattr(config, "bias_correction", False)) and layer_bias(module) is not None
    start = time.perf_counter()
    found = impl.error_curve(layer_weight(module).detach(), config, stats, centered=centered)
    session.timings["closed_form"] = session.timings.get("closed_form", 0.0) + time.perf_counter() - start
    if found is None:
        return None
    errors, total = found
    return ErrorCurve(name, method, errors, total)


def probe_ranks(grid: list[Any]) -> list[int]:
    """The ranks a layer is probed at: the grid ranks nearest a quarter and half of its highest one (where
    budgets of about a third to a half of the layer land); one rank when the grid is too short for two."""
    ints = [rank for rank in grid if isinstance(rank, int)]
    if not ints:
        return []
    top = max(ints)
    chosen = [min(ints, key=lambda rank: (abs(rank - top * fraction), rank)) for fraction in (0.25, 0.5)]
    return sorted(set(chosen))
