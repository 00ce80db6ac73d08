"""Pure factorization maths: rankshrink.decompose (tensors in, factors out)."""

import math

import pytest
import torch

from rankshrink.decompose import (
    CPFactors,
    choose_svd_method,
    cp,
    cp_max_rank,
    energy_kept,
    low_rank_factors,
    reconstruct_cp,
    reconstruct_spatial,
    reconstruct_tucker2,
    reconstruct_weight,
    singular_values,
    spatial_full_rank,
    spatial_svd,
    tail_energy,
    truncated_svd,
    tucker2,
    tucker2_ranks,
    weight_full_rank,
    weight_svd,
)
from rankshrink.decompose.svd import DEFAULT_OVERSAMPLE, RANDOMIZED_MIN_DIM
from rankshrink.errors import ConfigError

F64 = torch.float64


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def rel(a, b):
    return float((a - b).norm() / b.norm())


def decaying_matrix(m, n, *, exponent=1.5, noise=1e-4, seed=0, dtype=F64):
    """U diag(i^-exponent) V^T plus Gaussian noise: a 'trained-like' spectrum."""
    g = gen(seed)
    k = min(m, n)
    U, _ = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=F64))
    V, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=F64))
    s = torch.arange(1, k + 1, dtype=F64) ** -exponent
    A = (U * s) @ V.T + noise * torch.randn(m, n, generator=g, dtype=F64)
    return A.to(dtype)


# ---------------------------------------------------------------- truncated SVD

@pytest.mark.parametrize("shape", [(30, 20), (20, 30), (25, 25)])
def test_truncated_svd_error_is_tail_energy(shape):
    A = torch.randn(*shape, generator=gen(1), dtype=F64)
    sv = singular_values(A)
    for rank in (1, 3, 10, min(shape) - 1, min(shape)):
        U, S, Vh = truncated_svd(A, rank, method="exact")
        assert U.shape == (shape[0], rank) and S.shape == (rank,) and Vh.shape == (rank, shape[1])
        err2 = float(((A - (U * S) @ Vh) ** 2).sum())
        expected = tail_energy(sv, rank)
        assert err2 == pytest.approx(expected, rel=1e-10, abs=1e-20 * float((A ** 2).sum()))
        left, right = low_rank_factors(A, rank, method="exact")
        assert torch.allclose(left @ right, (U * S) @ Vh, rtol=0, atol=1e-12)


def test_low_rank_factors_split_singular_values_evenly():
    A = torch.randn(12, 9, generator=gen(2), dtype=F64)
    left, right = low_rank_factors(A, 4)
    # Columns of left and rows of right carry sqrt(sigma) each.
    assert torch.allclose(left.norm(dim=0), right.norm(dim=1), rtol=1e-10)
    assert torch.allclose(left.norm(dim=0) ** 2, singular_values(A)[:4], rtol=1e-10)


def test_full_rank_svd_reproduces_matrix():
    A = torch.randn(7, 11, generator=gen(3), dtype=F64)
    left, right = low_rank_factors(A, 7)
    assert rel(left @ right, A) < 1e-13


def test_randomized_svd_close_to_exact_on_decaying_spectrum():
    # 2000×1500 with σ_i = i^-1.5 plus a small noise floor on 300 random orthonormal directions:
    # the exact rank-50 error is known from the spectrum, no big SVD needed to check against.
    g = gen(0)
    k, rank = 300, 50
    U, _ = torch.linalg.qr(torch.randn(2000, k, generator=g, dtype=F64))
    V, _ = torch.linalg.qr(torch.randn(1500, k, generator=g, dtype=F64))
    s = torch.arange(1, k + 1, dtype=F64) ** -1.5 + 1e-3 * torch.randn(k, generator=g, dtype=F64).abs()
    s = s.sort(descending=True).values
    A = ((U * s) @ V.T).float()
    exact_err = math.sqrt(tail_energy(s, rank))
    out = truncated_svd(A, rank, method="randomized", seed=0)
    assert out.U.dtype == out.S.dtype == out.Vh.dtype == torch.float32
    rand_err = float((A.double() - (out.U.double() * out.S.double()) @ out.Vh.double()).norm())
    assert exact_err * 0.999 <= rand_err <= exact_err * 1.01  # never better than Eckart-Young
    assert torch.allclose(out.S.double(), s[:rank], rtol=1e-2)
    again = truncated_svd(A, rank, method="randomized", seed=0)
    assert all(torch.equal(x, y) for x, y in zip(out, again))


def test_randomized_svd_deterministic_and_leaves_global_rng_alone():
    A = torch.randn(300, 200, generator=gen(4))
    state = torch.random.get_rng_state()
    a = truncated_svd(A, 10, method="randomized", seed=7)
    b = truncated_svd(A, 10, method="randomized", seed=7)
    assert torch.equal(torch.random.get_rng_state(), state)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@pytest.mark.parametrize("shape", [(40, 300), (300, 40)])
def test_randomized_svd_wide_and_tall(shape):
    A = decaying_matrix(*shape, seed=5)
    rank = 8
    U, S, Vh = truncated_svd(A, rank, method="randomized")
    assert U.shape == (shape[0], rank) and Vh.shape == (rank, shape[1])
    exact = math.sqrt(tail_energy(singular_values(A), rank))
    assert float((A - (U * S) @ Vh).norm()) <= exact * 1.01


def test_choose_svd_method_randomized_only_for_large_matrices():
    big = RANDOMIZED_MIN_DIM
    assert choose_svd_method((4096, 4096), 64) == "randomized"
    assert choose_svd_method((2000, 1500), 50) == "randomized"
    assert choose_svd_method((big - 1, 4096), 8) == "exact"       # one side too small
    assert choose_svd_method((8192, 128), 64) == "exact"          # tall and skinny
    assert choose_svd_method((500, 500), 10) == "exact"
    assert choose_svd_method((4096, 4096), 2000) == "exact"       # rank too large a fraction
    assert choose_svd_method((big, big), big // 4 - DEFAULT_OVERSAMPLE) == "randomized"
    assert choose_svd_method((big, big), big // 4 - DEFAULT_OVERSAMPLE + 1) == "exact"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_truncated_svd_half_precision_returns_input_dtype(dtype):
    A = torch.randn(20, 10, generator=gen(6)).to(dtype)
    for method in ("exact", "randomized"):
        U, S, Vh = truncated_svd(A, 10, method=method)
        assert U.dtype == S.dtype == Vh.dtype == dtype
        assert rel((U.float() * S.float()) @ Vh.float(), A.float()) < 2e-2


@pytest.mark.parametrize("bad", [0, -1, 11, 2.0, True, None, "3"])
def test_truncated_svd_rejects_bad_rank(bad):
    with pytest.raises(ConfigError, match="rank"):
        truncated_svd(torch.randn(10, 12), bad)


def test_truncated_svd_rejects_bad_input():
    with pytest.raises(ConfigError, match="2-D"):
        truncated_svd(torch.randn(3, 4, 5), 2)
    A = torch.randn(5, 5)
    A[1, 2] = float("nan")
    with pytest.raises(ConfigError, match="NaN"):
        truncated_svd(A, 2)
    with pytest.raises(ConfigError, match="unknown SVD method"):
        truncated_svd(torch.randn(5, 5), 2, method="lanczos")


def test_energy_helpers():
    s = torch.tensor([3.0, 2.0, 1.0])
    assert tail_energy(s, 1) == pytest.approx(5.0)
    assert tail_energy(s, 3) == 0.0
    assert energy_kept(s, 1) == pytest.approx(9 / 14)
    assert energy_kept(s, 3) == 1.0
    assert energy_kept(torch.zeros(4), 1) == 1.0
    sv = singular_values(torch.randn(6, 4, generator=gen(8)))
    assert sv.dtype == F64 and sv.shape == (4,) and bool((sv[:-1] >= sv[1:]).all())


# ---------------------------------------------------------------- conv kernels

def kernel(*shape, seed=0):
    return torch.randn(*shape, generator=gen(seed), dtype=F64)


@pytest.mark.parametrize("shape", [(6, 4, 3, 3), (5, 3, 1, 1), (4, 7, 2, 5), (9, 2, 3, 1)])
def test_spatial_svd_full_rank_and_shapes(shape):
    K = kernel(*shape)
    T, S, kh, kw = shape
    full = spatial_full_rank(shape)
    assert full == min(S * kh, T * kw)
    f = spatial_svd(K, full)
    assert f.vertical.shape == (full, S, kh, 1) and f.horizontal.shape == (T, full, 1, kw)
    assert rel(reconstruct_spatial(f), K) < 1e-12


def test_spatial_svd_error_is_eckart_young_of_reshaped_kernel():
    K = kernel(6, 4, 3, 3, seed=1)
    matrix = K.permute(1, 2, 0, 3).reshape(4 * 3, 6 * 3)
    sv = singular_values(matrix)
    for rank in (1, 4, 8):
        err2 = float(((reconstruct_spatial(spatial_svd(K, rank)) - K) ** 2).sum())
        assert err2 == pytest.approx(tail_energy(sv, rank), rel=1e-10)


@pytest.mark.parametrize("shape", [(6, 4, 3, 3), (8, 3, 1, 1), (3, 5, 2, 4), (7, 4, 3), (4, 9, 1)])
def test_weight_svd_full_rank_and_shapes(shape):
    K = kernel(*shape)
    full = weight_full_rank(shape)
    assert full == min(shape[0], math.prod(shape[1:]))
    f = weight_svd(K, full)
    ones = (1,) * (len(shape) - 2)
    assert f.spatial.shape == (full, *shape[1:]) and f.pointwise.shape == (shape[0], full, *ones)
    assert rel(reconstruct_weight(f), K) < 1e-12
    sv = singular_values(K.reshape(shape[0], -1))
    err2 = float(((reconstruct_weight(weight_svd(K, 1)) - K) ** 2).sum())
    assert err2 == pytest.approx(tail_energy(sv, 1), rel=1e-10)


@pytest.mark.parametrize("shape", [(6, 4, 3, 3), (8, 2, 1, 1), (2, 8, 1, 1), (5, 3, 2, 4), (7, 4, 3), (9, 2, 1)])
def test_tucker2_full_rank_is_exact(shape):
    # Includes T > S·k (a mode's unfolding has lower rank than the requested basis width).
    K = kernel(*shape, seed=2)
    T, S = shape[:2]
    f = tucker2(K, (T, S))
    ones = (1,) * (len(shape) - 2)
    assert f.first.shape == (S, S, *ones) and f.core.shape == (T, S, *shape[2:]) and f.last.shape == (T, T, *ones)
    assert rel(reconstruct_tucker2(f), K) < 1e-12
    assert rel(reconstruct_tucker2(tucker2(K, max(T, S))), K) < 1e-12  # int rank = (min(r,T), min(r,S))


def test_tucker2_no_warning_at_full_rank(recwarn):
    tucker2(kernel(8, 2, 1, 1), (8, 2))
    assert not [w for w in recwarn if "n_eigenvecs" in str(w.message)]


def test_tucker2_ranks_normalisation_and_errors():
    assert tucker2_ranks((8, 4, 3, 3), 6) == (6, 4)
    assert tucker2_ranks((8, 4, 3, 3), (3, 2)) == (3, 2)
    assert tucker2_ranks((8, 4, 3, 3), [3, 2]) == (3, 2)
    for bad in [0, 9, (0, 2), (9, 2), (3, 5), (3,), (3, 2, 1), 2.5, True, (True, 2), "3"]:
        with pytest.raises(ConfigError, match="tucker2"):
            tucker2_ranks((8, 4, 3, 3), bad)


def test_tucker2_error_non_increasing_in_rank():
    K = kernel(10, 8, 3, 3, seed=3)
    errors = [rel(reconstruct_tucker2(tucker2(K, r)), K) for r in range(1, 11)]
    assert all(b <= a + 1e-9 for a, b in zip(errors, errors[1:]))
    assert errors[-1] < 1e-12


def planted_cp(shape, rank, seed=0):
    """A kernel of CP rank ``rank``, well conditioned (orthonormal channel factors)."""
    g = gen(seed)
    factors = []
    for d in shape:
        f = torch.randn(d, rank, generator=g, dtype=F64)
        factors.append(torch.linalg.qr(f)[0] if d >= rank else f)
    factors[0] = factors[0] * torch.linspace(3, 1, rank, dtype=F64)
    letters = "tsij"[:len(shape)]
    return torch.einsum(",".join(f"{c}r" for c in letters) + "->" + letters, *factors)


@pytest.mark.parametrize("method", ["als", "compressed", "auto"])
@pytest.mark.parametrize("shape,rank", [((6, 5, 3, 3), 4), ((10, 12, 3, 2), 5), ((8, 6, 3), 3)])
def test_cp_recovers_planted_low_rank_kernel(shape, rank, method):
    K = planted_cp(shape, rank)
    f = cp(K, rank, method=method)
    assert isinstance(f, CPFactors)
    assert f.first.shape[:2] == (rank, shape[1]) and f.last.shape[:2] == (shape[0], rank)
    if len(shape) == 4:
        assert f.depthwise[0].shape == (rank, 1, shape[2], 1) and f.depthwise[1].shape == (rank, 1, 1, shape[3])
    else:
        assert len(f.depthwise) == 1 and f.depthwise[0].shape == (rank, 1, shape[2])
    assert rel(reconstruct_cp(f), K) < 1e-5


def test_cp_balances_factor_scales_and_is_deterministic():
    K = planted_cp((6, 5, 3, 3), 4, seed=1)
    f = cp(K, 4, seed=3)
    norms = torch.stack([f.last.reshape(6, 4).norm(dim=0), f.first.reshape(4, 5).norm(dim=1),
                         f.depthwise[0].reshape(4, 3).norm(dim=1), f.depthwise[1].reshape(4, 3).norm(dim=1)])
    assert torch.allclose(norms, norms[:1].expand_as(norms), rtol=1e-8)
    g = cp(K, 4, seed=3)
    assert torch.equal(reconstruct_cp(f), reconstruct_cp(g))


def test_cp_keeps_float32_dtype_and_rejects_bad_input():
    K = planted_cp((6, 5, 3, 3), 2).float()
    f = cp(K, 2)
    assert f.first.dtype == torch.float32
    with pytest.raises(ConfigError, match="CP rank"):
        cp(K, 0)
    with pytest.raises(ConfigError, match="CP rank"):
        cp(K, cp_max_rank(K.shape) + 1)
    with pytest.raises(ConfigError, match="unknown CP method"):
        cp(K, 2, method="hals")


def test_kernel_checks():
    with pytest.raises(ConfigError, match="kernel"):
        weight_svd(torch.randn(4, 4), 2)
    with pytest.raises(ConfigError, match="Conv2d"):
        spatial_svd(torch.randn(4, 3, 3), 2)
    bad = torch.randn(4, 3, 3, 3)
    bad[0, 0, 0, 0] = float("inf")
    with pytest.raises(ConfigError, match="NaN or Inf"):
        tucker2(bad, 2)
    with pytest.raises(ConfigError, match="spatial SVD rank"):
        spatial_svd(torch.randn(4, 3, 3, 3), spatial_full_rank((4, 3, 3, 3)) + 1)
    with pytest.raises(ConfigError, match="weight SVD rank"):
        weight_svd(torch.randn(4, 3, 3, 3), 5)


def trained_like_kernel(T, S, seed=0):
    """Power-law decay along both channel modes plus 5% noise (as in benchmarks/decompose.py)."""
    g = gen(seed)
    U, _ = torch.linalg.qr(torch.randn(T, T, generator=g, dtype=F64))
    V, _ = torch.linalg.qr(torch.randn(S, S, generator=g, dtype=F64))
    decay = torch.arange(1, max(T, S) + 1, dtype=F64) ** -0.8
    core = torch.randn(T, S, 3, 3, generator=g, dtype=F64) * decay[:T, None, None, None] * decay[None, :S, None, None]
    K = torch.einsum("ta,abij,sb->tsij", U, core, V)
    return K + 0.05 * K.std() * torch.randn(K.shape, generator=g, dtype=F64)


@pytest.mark.parametrize("T,S,rank", [(32, 32, 8), (48, 32, 12), (24, 40, 16)])
def test_cp_compressed_as_accurate_as_plain_als_on_noisy_kernel(T, S, rank):
    K = trained_like_kernel(T, S)
    compressed = rel(reconstruct_cp(cp(K, rank, method="compressed")), K)
    als = rel(reconstruct_cp(cp(K, rank, method="als")), K)
    assert compressed <= als * 1.02
    # More refinement sweeps never hurt: ALS decreases the error monotonically.
    assert rel(reconstruct_cp(cp(K, rank, method="compressed", refine_iters=50)), K) <= compressed + 1e-12
