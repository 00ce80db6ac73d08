"""Pure factorization maths: tensors in, factors out. No ``nn.Module`` here."""

from .conv import (CPFactors, SpatialFactors, Tucker2Factors, WeightFactors, cp, cp_max_rank,
                   reconstruct_cp, reconstruct_spatial, reconstruct_tucker2, reconstruct_weight,
                   spatial_full_rank, spatial_svd, tucker2, tucker2_ranks, weight_full_rank, weight_svd)
from .data_aware import (ActivationSVD, InputStats, Whitening, activation_cp, activation_error,
                         activation_low_rank_factors, activation_spatial_svd, activation_svd,
                         activation_tucker2, activation_weight_svd, bias_shift, optimal_activation_error,
                         relative_activation_error, whitened_singular_values, whitening)
from .svd import (SVDResult, choose_svd_method, energy_kept, low_rank_factors, singular_values,
                  tail_energy, truncated_svd)

__all__ = [
    "CPFactors", "SpatialFactors", "Tucker2Factors", "WeightFactors", "SVDResult",
    "cp", "cp_max_rank", "spatial_svd", "spatial_full_rank", "tucker2", "tucker2_ranks",
    "weight_svd", "weight_full_rank", "truncated_svd", "low_rank_factors", "singular_values",
    "tail_energy", "energy_kept", "choose_svd_method",
    "reconstruct_cp", "reconstruct_spatial", "reconstruct_tucker2", "reconstruct_weight",
    "ActivationSVD", "InputStats", "Whitening", "activation_cp", "activation_error",
    "activation_low_rank_factors", "activation_spatial_svd", "activation_svd", "activation_tucker2",
    "activation_weight_svd", "bias_shift", "optimal_activation_error", "relative_activation_error",
    "whitened_singular_values", "whitening",
]
