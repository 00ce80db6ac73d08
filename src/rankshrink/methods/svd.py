"""Truncated SVD of a Linear layer: ``W (m×n) ≈ U_r·V_r``, i.e. Linear(n→r) then Linear(r→m).

A rank-r factorization stores r(m+n) weights instead of mn, so it is smaller while
``r < mn/(m+n)`` (the break-even rank). Full rank reproduces the layer exactly. The
activation fit is the closed form of :func:`rankshrink.decompose.activation_svd`.
A LoRA adapter merges exactly by widening the rank (r → r + r_lora).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .. import decompose
from ..factorized import Factorized
from .base import (
    Method,
    MethodConfig,
    SVDAlgorithm,
    matrix_error_curve,
    matrix_rank_estimates,
    narrow_rank,
    register,
    widen_rank,
)


@dataclass(frozen=True, kw_only=True)
class SVDConfig(MethodConfig, SVDAlgorithm):
    """Linear by truncated SVD at ``rank``; see :class:`~rankshrink.methods.base.SVDAlgorithm` for the options."""

    method = "svd"

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check_svd_options()


@register
class SVD(Method):
    name = "svd"
    order = 10
    config_class = SVDConfig
    layer_types = ("Linear",)
    default_for = ("Linear",)
    can_merge_adapter = True

    def full_rank(self, geometry: dict[str, Any]) -> int:
        return min(geometry["out_features"], geometry["in_features"])

    def rank_estimates(self, weight: torch.Tensor, keep: float) -> tuple[Any, Any]:
        return matrix_rank_estimates(weight.reshape(weight.shape[0], -1), keep)

    def spectrum_rank(self, rank: Any) -> int | None:
        return int(rank)

    def build(self, geometry: dict[str, Any], rank: Any, *, dtype=None, device=None) -> Factorized:
        kw = {"dtype": dtype, "device": device}
        layers = [nn.Linear(geometry["in_features"], rank, bias=False, **kw),
                  nn.Linear(rank, geometry["out_features"], bias=geometry["bias"], **kw)]
        return Factorized(*layers, method=self.name, rank=rank, geometry=geometry)

    def dense_weight(self, factors: list[torch.Tensor]) -> torch.Tensor:
        return factors[1] @ factors[0]

    def fit_weights(self, weight: torch.Tensor, rank: Any, config: MethodConfig) -> list[torch.Tensor]:
        assert isinstance(config, SVDConfig)
        left, right = decompose.low_rank_factors(weight, rank, **config.svd_options())
        return [right, left]

    def fit_activations(self, weight: torch.Tensor, rank: Any, config: MethodConfig, stats, *,
                        centered: bool, layer: str) -> list[torch.Tensor]:
        assert isinstance(config, SVDConfig)
        from ..decompose.activation import GRAM_MIN_DIM, gram_activation_svd

        if max(weight.shape) >= GRAM_MIN_DIM:  # large layers: no whitening of the larger side, no full SVD
            found = gram_activation_svd(weight, stats.moment(centered), rank, damping=config.damping)
            return [found.right, found.left]
        whitened = stats.whitening(centered, config.damping)
        left, right = decompose.activation_low_rank_factors(weight, whitened, rank, **config.svd_options())
        return [right, left]

    def error_curve(self, weight: torch.Tensor, config: MethodConfig, stats=None, *,
                    centered: bool = False) -> tuple[torch.Tensor, float] | None:
        return matrix_error_curve(weight, config.damping, stats, centered=centered)

    def merge_adapter(self, block: Factorized, A: torch.Tensor, B: torch.Tensor, scaling: float) -> tuple[int, int]:
        return widen_rank(block, A, B, scaling)

    def unmerge_adapter(self, block: Factorized, span: tuple[int, int]) -> None:
        narrow_rank(block, span)
