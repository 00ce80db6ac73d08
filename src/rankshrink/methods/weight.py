"""Weight SVD of a Conv1d/Conv2d: a full-size conv S→R, then a 1×1 conv R→T.

The kernel, arranged as a T×(S·k…) matrix, is truncated by SVD; stride, padding and
dilation stay on the first factor. Full rank reproduces the layer. The activation fit
is :func:`rankshrink.decompose.activation_weight_svd`. A LoRA adapter merges exactly by
widening the rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .. import decompose
from ..factorized import Factorized, conv_arguments, conv_class, pointwise, weight_shape
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
class WeightConfig(MethodConfig, SVDAlgorithm):
    """Conv1d/Conv2d by weight SVD at ``rank``; see :class:`~rankshrink.methods.base.SVDAlgorithm` for the options."""

    method = "weight"

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check_svd_options()


@register
class Weight(Method):
    name = "weight"
    order = 30
    config_class = WeightConfig
    layer_types = ("Conv2d", "Conv1d")
    can_merge_adapter = True

    def full_rank(self, geometry: dict[str, Any]) -> int:
        return decompose.weight_full_rank(weight_shape(geometry))

    def rank_estimates(self, weight: torch.Tensor, keep: float) -> tuple[Any, Any]:
        return matrix_rank_estimates(weight.reshape(weight.shape[0], -1), keep)

    def spectrum_rank(self, rank: Any) -> int | None:
        return int(rank)

    def build(self, geometry: dict[str, Any], rank: Any, *, dtype=None, device=None) -> Factorized:
        kw = {"dtype": dtype, "device": device}
        cls = conv_class(geometry)
        conv = conv_arguments(geometry)
        layers = [cls(geometry["in_channels"], rank, bias=False, **conv, **kw),
                  pointwise(cls, rank, geometry["out_channels"], geometry["bias"], **kw)]
        return Factorized(*layers, method=self.name, rank=rank, geometry=geometry)

    def dense_weight(self, factors: list[torch.Tensor]) -> torch.Tensor:
        return decompose.reconstruct_weight(decompose.WeightFactors(*factors))

    def fit_weights(self, weight: torch.Tensor, rank: Any, config: MethodConfig) -> list[torch.Tensor]:
        assert isinstance(config, WeightConfig)
        return list(decompose.weight_svd(weight, rank, **config.svd_options()))

    def fit_activations(self, weight: torch.Tensor, rank: Any, config: MethodConfig, stats, *,
                        centered: bool, layer: str) -> list[torch.Tensor]:
        assert isinstance(config, WeightConfig)
        whitened = stats.whitening(centered, config.damping)
        return list(decompose.activation_weight_svd(weight, whitened, rank, **config.svd_options()))

    def error_curve(self, weight: torch.Tensor, config: MethodConfig, stats=None, *,
                    centered: bool = False) -> tuple[torch.Tensor, float] | None:
        # The weight SVD truncates the (T, S·Πk) kernel matrix, which acts on the full patches.
        return matrix_error_curve(weight.reshape(weight.shape[0], -1), config.damping, stats, centered=centered)

    def merge_adapter(self, block: Factorized, A: torch.Tensor, B: torch.Tensor, scaling: float) -> tuple[int, int]:
        return widen_rank(block, A, B, scaling)

    def unmerge_adapter(self, block: Factorized, span: tuple[int, int]) -> None:
        narrow_rank(block, span)
