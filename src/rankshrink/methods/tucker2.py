"""Tucker-2 of a Conv1d/Conv2d on its channel modes: 1×1 S→R_in, a k-sized core R_in→R_out, 1×1 R_out→T.

HOOI from an HOSVD start (TensorLy ``partial_tucker``). The rank is a pair
``(R_out, R_in)``, or one integer ``r`` meaning ``(min(r, T), min(r, S))``. At full ranks
``(T, S)`` the layer is reproduced exactly. The activation fit whitens the input
channel mode with the channel statistics (:func:`rankshrink.decompose.activation_tucker2`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .. import decompose
from ..decompose.stats import MIN_INVERSE_DAMPING, statistics_of_kind
from ..errors import ConfigError, LayerError
from ..factorized import Factorized, conv_arguments, conv_class, pointwise, weight_shape
from ..validation import check_int, check_number
from .base import Method, MethodConfig, register


@dataclass(frozen=True, kw_only=True)
class Tucker2Config(MethodConfig):
    """Tucker-2 at ``rank`` (an int or ``(R_out, R_in)``); ``n_iter_max``/``tol`` bound the HOOI sweeps."""

    n_iter_max: int = 100
    tol: float = 1e-6

    method = "tucker2"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self.n_iter_max, "n_iter_max", minimum=1)
        check_number(self.tol, "tol", minimum=0)

    def _check_rank(self) -> None:
        rank = self.rank
        if isinstance(rank, list):
            object.__setattr__(self, "rank", tuple(rank))
            rank = self.rank
        if isinstance(rank, tuple):
            if len(rank) != 2 or not all(isinstance(r, int) and not isinstance(r, bool) and r >= 1 for r in rank):
                raise ConfigError(f"rank must be a positive integer or a pair [R_out, R_in], got {list(rank)!r}.")
            return
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ConfigError(f"rank must be a positive integer or a pair [R_out, R_in], got {rank!r}.")


@register
class Tucker2(Method):
    name = "tucker2"
    order = 40
    config_class = Tucker2Config
    layer_types = ("Conv2d", "Conv1d")
    default_for = ("Conv2d", "Conv1d")
    statistics = "channel"
    grid_dense_up_to = 8
    grid_ratio = 1.25

    def full_rank(self, geometry: dict[str, Any]) -> int:
        shape = weight_shape(geometry)
        return max(shape[0], shape[1])

    def normalize_rank(self, geometry: dict[str, Any], rank: Any, *, layer: str = "layer") -> Any:
        try:
            return decompose.tucker2_ranks(weight_shape(geometry), tuple(rank) if isinstance(rank, list) else rank)
        except ValueError as exc:
            raise LayerError(f"{layer}: {exc}") from None

    def neighbour(self, geometry: dict[str, Any], rank: Any, step: int) -> Any | None:
        pair = (rank[0] + step, rank[1] + step)
        if min(pair) < 1:
            return None
        try:
            return self.normalize_rank(geometry, pair)
        except LayerError:
            return None

    def rank_estimates(self, weight: torch.Tensor, keep: float) -> tuple[Any, Any]:
        from ..ranks import channel_mode_estimates

        return channel_mode_estimates(weight, keep)

    def spectrum_rank(self, rank: Any) -> int | None:
        return int(rank[0])  # the output-channel (mode-0) truncation

    def build(self, geometry: dict[str, Any], rank: Any, *, dtype=None, device=None) -> Factorized:
        kw = {"dtype": dtype, "device": device}
        cls = conv_class(geometry)
        r_out, r_in = rank
        layers = [pointwise(cls, geometry["in_channels"], r_in, False, **kw),
                  cls(r_in, r_out, bias=False, **conv_arguments(geometry), **kw),
                  pointwise(cls, r_out, geometry["out_channels"], geometry["bias"], **kw)]
        return Factorized(*layers, method=self.name, rank=rank, geometry=geometry)

    def dense_weight(self, factors: list[torch.Tensor]) -> torch.Tensor:
        return decompose.reconstruct_tucker2(decompose.Tucker2Factors(*factors))

    def _options(self, config: MethodConfig) -> dict[str, Any]:
        assert isinstance(config, Tucker2Config)
        return {"n_iter_max": config.n_iter_max, "tol": config.tol, "seed": config.seed}

    def fit_weights(self, weight: torch.Tensor, rank: Any, config: MethodConfig) -> list[torch.Tensor]:
        return list(decompose.tucker2(weight, rank, **self._options(config)))

    def fit_activations(self, weight: torch.Tensor, rank: Any, config: MethodConfig, stats, *,
                        centered: bool, layer: str) -> list[torch.Tensor]:
        channel = statistics_of_kind(stats, "channel", weight.shape, layer=layer, method=self.name)
        whitened = channel.whitening(centered, max(config.damping, MIN_INVERSE_DAMPING))
        full = stats.moment(centered) if stats.kind == "full" else None
        return list(decompose.activation_tucker2(weight, whitened, rank, damping=config.damping, full_moment=full,
                                                 **self._options(config)))
