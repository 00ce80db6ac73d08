"""CP (CANDECOMP/PARAFAC) of a Conv1d/Conv2d: 1×1 S→R, a depthwise conv per spatial axis, 1×1 R→T.

A rank-R sum of rank-one kernels; only approximate even at high rank. ``algorithm``:
'compressed' (ALS on the channel-compressed core, lifted and refined on the kernel),
'als' (TensorLy ``parafac`` on the full kernel) or 'auto' (compressed whenever that
shrinks a mode). The activation fit whitens the input channel mode and then runs
``als_iters`` sweeps of exact least squares on the true activation objective
(:func:`rankshrink.decompose.activation_cp`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .. import decompose
from ..decompose.stats import MIN_INVERSE_DAMPING, statistics_of_kind
from ..factorized import Factorized, axis_padding, conv_arguments, conv_class, only_axis, pointwise, weight_shape
from ..validation import check_choice, check_int, check_number
from .base import Method, MethodConfig, register


@dataclass(frozen=True, kw_only=True)
class CPConfig(MethodConfig):
    """CP at ``rank``; ``n_iter_max`` ALS sweeps (on the compressed core), ``refine_iters`` on the kernel."""

    algorithm: str = "auto"
    n_iter_max: int = 100
    refine_iters: int = 25
    tol: float = 1e-7
    als_iters: int = 5

    method = "cp"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice(self.algorithm, "algorithm", ("auto", "als", "compressed"))
        check_int(self.n_iter_max, "n_iter_max", minimum=1)
        check_int(self.refine_iters, "refine_iters", minimum=0)
        check_number(self.tol, "tol", minimum=0)
        check_int(self.als_iters, "als_iters", minimum=0)


@register
class CP(Method):
    name = "cp"
    order = 50
    config_class = CPConfig
    layer_types = ("Conv2d", "Conv1d")
    exact_at_full_rank = False
    statistics = "channel"
    grid_dense_up_to = 4
    grid_ratio = 1.4

    def full_rank(self, geometry: dict[str, Any]) -> int:
        return decompose.cp_max_rank(weight_shape(geometry))

    def search_max_rank(self, geometry: dict[str, Any], break_even: int) -> int:
        # CP ranks beyond the channel counts are rarely worth their ALS time.
        return min(break_even, max(geometry["out_channels"], geometry["in_channels"]))

    def rank_estimates(self, weight: torch.Tensor, keep: float) -> tuple[Any, Any]:
        from ..ranks import channel_mode_estimates

        evbmf, energy = channel_mode_estimates(weight, keep)
        return max(evbmf), max(energy)  # one rank for both channel modes

    def build(self, geometry: dict[str, Any], rank: Any, *, dtype=None, device=None) -> Factorized:
        kw = {"dtype": dtype, "device": device}
        cls = conv_class(geometry)
        conv = conv_arguments(geometry)
        k = conv["kernel_size"]
        depthwise = [cls(rank, rank, only_axis(k, axis), stride=only_axis(conv["stride"], axis),
                         padding=axis_padding(conv["padding"], axis), dilation=only_axis(conv["dilation"], axis),
                         padding_mode=conv["padding_mode"], groups=rank, bias=False, **kw)
                     for axis in range(len(k))]
        layers = [pointwise(cls, geometry["in_channels"], rank, False, **kw), *depthwise,
                  pointwise(cls, rank, geometry["out_channels"], geometry["bias"], **kw)]
        return Factorized(*layers, method=self.name, rank=rank, geometry=geometry)

    def dense_weight(self, factors: list[torch.Tensor]) -> torch.Tensor:
        return decompose.reconstruct_cp(decompose.CPFactors(factors[0], tuple(factors[1:-1]), factors[-1]))

    def _options(self, config: MethodConfig) -> dict[str, Any]:
        assert isinstance(config, CPConfig)
        return {"method": config.algorithm, "n_iter_max": config.n_iter_max, "refine_iters": config.refine_iters,
                "tol": config.tol, "seed": config.seed}

    def fit_weights(self, weight: torch.Tensor, rank: Any, config: MethodConfig) -> list[torch.Tensor]:
        f = decompose.cp(weight, rank, **self._options(config))
        return [f.first, *f.depthwise, f.last]

    def fit_activations(self, weight: torch.Tensor, rank: Any, config: MethodConfig, stats, *,
                        centered: bool, layer: str) -> list[torch.Tensor]:
        assert isinstance(config, CPConfig)
        channel = statistics_of_kind(stats, "channel", weight.shape, layer=layer, method=self.name)
        whitened = channel.whitening(centered, max(config.damping, MIN_INVERSE_DAMPING))
        full = stats.moment(centered) if stats.kind == "full" else None
        f = decompose.activation_cp(weight, whitened, rank, damping=config.damping, full_moment=full,
                                    als_iters=config.als_iters, **self._options(config))
        return [f.first, *f.depthwise, f.last]
