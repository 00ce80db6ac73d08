"""Spatial SVD of a Conv2d: a (kh×1) conv S→R, then a (1×kw) conv R→T.

The kernel, arranged as an (S·kh)×(T·kw) matrix, is truncated by SVD; stride,
padding and dilation split exactly between the two factors. Full rank reproduces the
layer. The activation fit is :func:`rankshrink.decompose.activation_spatial_svd`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .. import decompose
from ..factorized import Factorized, axis_padding, conv_arguments, only_axis, weight_shape
from .base import Method, MethodConfig, SVDAlgorithm, matrix_rank_estimates, register


@dataclass(frozen=True, kw_only=True)
class SpatialConfig(MethodConfig, SVDAlgorithm):
    """Conv2d by spatial SVD at ``rank``; see :class:`~rankshrink.methods.base.SVDAlgorithm` for the options."""

    method = "spatial"

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check_svd_options()


@register
class Spatial(Method):
    name = "spatial"
    order = 20
    config_class = SpatialConfig
    layer_types = ("Conv2d",)

    def full_rank(self, geometry: dict[str, Any]) -> int:
        return decompose.spatial_full_rank(weight_shape(geometry))

    def rank_estimates(self, weight: torch.Tensor, keep: float) -> tuple[Any, Any]:
        T, S, kh, kw = weight.shape
        return matrix_rank_estimates(weight.permute(1, 2, 0, 3).reshape(S * kh, T * kw), keep)

    def build(self, geometry: dict[str, Any], rank: Any, *, dtype=None, device=None) -> Factorized:
        kw = {"dtype": dtype, "device": device}
        conv = conv_arguments(geometry)
        k, stride, dilation, padding = conv["kernel_size"], conv["stride"], conv["dilation"], conv["padding"]
        mode = conv["padding_mode"]
        layers = [nn.Conv2d(geometry["in_channels"], rank, (k[0], 1), stride=only_axis(stride, 0),
                            padding=axis_padding(padding, 0), dilation=only_axis(dilation, 0), padding_mode=mode,
                            bias=False, **kw),
                  nn.Conv2d(rank, geometry["out_channels"], (1, k[1]), stride=only_axis(stride, 1),
                            padding=axis_padding(padding, 1), dilation=only_axis(dilation, 1), padding_mode=mode,
                            bias=geometry["bias"], **kw)]
        return Factorized(*layers, method=self.name, rank=rank, geometry=geometry)

    def dense_weight(self, factors: list[torch.Tensor]) -> torch.Tensor:
        return decompose.reconstruct_spatial(decompose.SpatialFactors(*factors))

    def fit_weights(self, weight: torch.Tensor, rank: Any, config: MethodConfig) -> list[torch.Tensor]:
        assert isinstance(config, SpatialConfig)
        return list(decompose.spatial_svd(weight, rank, **config.svd_options()))

    def fit_activations(self, weight: torch.Tensor, rank: Any, config: MethodConfig, stats, *,
                        centered: bool, layer: str) -> list[torch.Tensor]:
        assert isinstance(config, SpatialConfig)
        return list(decompose.activation_spatial_svd(weight, stats.moment(centered), rank, damping=config.damping,
                                                     **config.svd_options()))
