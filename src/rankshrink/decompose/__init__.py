"""Pure factorization maths: tensors in, factors out. No ``nn.Module`` here.

* :mod:`.svd` -- exact and randomized truncated SVD, spectra and energies.
* :mod:`.conv` -- kernel factorizations: spatial SVD, weight SVD, Tucker-2 and CP (TensorLy underneath).
* :mod:`.stats` -- streaming input statistics of a layer and their whitening.
* :mod:`.activation` -- activation-optimal versions of the above, from input statistics.
"""

from .activation import (
                         ActivationSVD,
                         activation_cp,
                         activation_error,
                         activation_low_rank_factors,
                         activation_spatial_svd,
                         activation_svd,
                         activation_tucker2,
                         activation_weight_svd,
                         bias_shift,
                         diagonal_activation_svd,
                         optimal_activation_error,
                         relative_activation_error,
                         tail_errors,
                         whitened_singular_values,
)
from .conv import (
                         CPFactors,
                         SpatialFactors,
                         Tucker2Factors,
                         WeightFactors,
                         cp,
                         cp_max_rank,
                         reconstruct_cp,
                         reconstruct_spatial,
                         reconstruct_tucker2,
                         reconstruct_weight,
                         spatial_full_rank,
                         spatial_svd,
                         tucker2,
                         tucker2_ranks,
                         weight_full_rank,
                         weight_svd,
)
from .stats import DiagonalStats, InputStats, Whitening, statistics_of_kind, whitening
from .svd import (
                         SVDResult,
                         choose_svd_method,
                         energy_kept,
                         low_rank_factors,
                         singular_values,
                         tail_energy,
                         truncated_svd,
)

__all__ = [
    "CPFactors", "SpatialFactors", "Tucker2Factors", "WeightFactors", "SVDResult",
    "cp", "cp_max_rank", "spatial_svd", "spatial_full_rank", "tucker2", "tucker2_ranks",
    "weight_svd", "weight_full_rank", "truncated_svd", "low_rank_factors", "singular_values",
    "tail_energy", "energy_kept", "choose_svd_method",
    "reconstruct_cp", "reconstruct_spatial", "reconstruct_tucker2", "reconstruct_weight",
    "ActivationSVD", "DiagonalStats", "InputStats", "Whitening", "diagonal_activation_svd", "tail_errors",
    "activation_cp", "activation_error",
    "activation_low_rank_factors", "activation_spatial_svd", "activation_svd", "activation_tucker2",
    "activation_weight_svd", "bias_shift", "optimal_activation_error", "relative_activation_error",
    "statistics_of_kind", "whitened_singular_values", "whitening",
]
