"""Data-free rank estimates: EVBMF (planted ranks), energy thresholds, floors and break-even caps."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rankshrink.cost import break_even_rank
from rankshrink.errors import ConfigError
from rankshrink.ranks import (
    conv_evbmf_ranks,
    energy_rank,
    estimate_rank,
    evb_tau,
    evbmf,
    evbmf_rank,
    layer_estimates,
    unfold,
)


def planted(m: int, n: int, rank: int, *, sigma: float = 1.0, strength: float = 2.0, seed: int = 0):
    """A rank-``rank`` signal whose singular values sit ``strength``-4x above the noise edge, plus noise."""
    gen = torch.Generator().manual_seed(seed)
    edge = sigma * (math.sqrt(m) + math.sqrt(n))
    U = torch.linalg.qr(torch.randn(m, rank, generator=gen, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(n, rank, generator=gen, dtype=torch.float64))[0]
    s = torch.linspace(2 * strength, strength, rank, dtype=torch.float64) * edge
    return U @ torch.diag(s) @ V.T + sigma * torch.randn(m, n, generator=gen, dtype=torch.float64)


def test_evb_tau_solves_its_equation_and_matches_the_square_constant():
    assert evb_tau(1.0) == pytest.approx(2.5129, abs=1e-4)
    for alpha in (1.0, 0.5, 0.1, 0.01):
        tau = evb_tau(alpha)
        assert math.log1p(tau) + alpha * math.log1p(tau / alpha) - tau == pytest.approx(0.0, abs=1e-9)
        assert math.sqrt(alpha) < tau <= 2.5129 * math.sqrt(alpha) + 0.05


@pytest.mark.parametrize("m,n,rank,sigma", [(200, 100, 5, 1.0), (100, 200, 5, 0.1), (64, 64, 3, 1.0),
                                            (300, 40, 8, 0.5), (50, 50, 1, 2.0), (128, 64, 10, 1.0)])
def test_evbmf_recovers_a_planted_rank(m, n, rank, sigma):
    result = evbmf(planted(m, n, rank, sigma=sigma, seed=rank))
    assert result.rank == rank
    assert result.sigma2 == pytest.approx(sigma ** 2, rel=0.1)
    # EVB shrinks every kept singular value, never inflates it.
    assert torch.all(result.shrunk < result.singular[:rank])


def test_evbmf_with_known_noise_and_float32_input():
    Y = planted(120, 80, 4, sigma=0.5, seed=3)
    assert evbmf(Y, sigma2=0.25).rank == 4
    assert evbmf_rank(Y.float()) == 4


def test_pure_noise_and_zero_matrices_floor_at_one():
    noise = torch.randn(100, 80, generator=torch.Generator().manual_seed(1))
    assert evbmf(noise).rank == 0
    assert evbmf_rank(noise) == 1
    assert evbmf(torch.zeros(5, 7)).rank == 0
    assert evbmf_rank(torch.zeros(5, 7)) == 1
    assert evbmf_rank(torch.ones(1, 9)) == 1


def test_evbmf_rejects_bad_input():
    with pytest.raises(ConfigError):
        evbmf(torch.ones(3))
    with pytest.raises(ConfigError):
        evbmf(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]))
    with pytest.raises(ConfigError):
        evbmf(torch.ones(3, 3), sigma2=-1.0)


def test_energy_rank():
    s = torch.tensor([3.0, 2.0, 1.0, 0.0])  # energies 9, 4, 1: 64%, 93%, 100%
    assert energy_rank(s, 0.5) == 1
    assert energy_rank(s, 0.9) == 2
    assert energy_rank(s, 0.99) == 3
    assert energy_rank(s, 1.0) == 3
    assert energy_rank(torch.zeros(4), 0.9) == 1
    with pytest.raises(ConfigError):
        energy_rank(s, 0.0)


def test_conv_unfoldings_recover_planted_mode_ranks():
    gen = torch.Generator().manual_seed(0)
    core = torch.randn(3, 2, 3, 3, generator=gen, dtype=torch.float64)
    A = torch.linalg.qr(torch.randn(24, 3, generator=gen, dtype=torch.float64))[0]
    B = torch.linalg.qr(torch.randn(16, 2, generator=gen, dtype=torch.float64))[0]
    kernel = torch.einsum("to,oikl,si->tskl", A, core, B) * 50
    kernel = kernel + 0.01 * torch.randn(kernel.shape, generator=gen, dtype=torch.float64)
    assert unfold(kernel, 0).shape == (24, 16 * 9)
    assert unfold(kernel, 1).shape == (16, 24 * 9)
    assert conv_evbmf_ranks(kernel) == (3, 2)
    assert estimate_rank(kernel, "tucker2") == (3, 2)
    assert estimate_rank(kernel, "cp") == 3
    # spatial SVD factorizes the kernel as an (S·kh) × (T·kw) matrix: keeping all energy is its rank
    spatial_matrix = kernel.permute(1, 2, 0, 3).reshape(16 * 3, 24 * 3)
    full = int(torch.linalg.matrix_rank(spatial_matrix))
    assert estimate_rank(kernel, "spatial", estimator="energy", keep=1.0) == full


def test_estimates_floor_at_one_and_cap_at_break_even():
    W = planted(40, 30, 25, sigma=0.01, seed=2)          # rank 25 > break-even 17
    cap = (40 * 30 - 1) // (40 + 30)
    # With unknown noise EVBMF cannot see ranks above ~LM/(L+M) (about the break-even rank);
    # with the noise level given it finds all 25.
    assert evbmf(W, sigma2=1e-4).rank == 25
    assert 1 <= estimate_rank(W, "svd", cap=cap) <= cap
    assert estimate_rank(W, "svd", estimator="energy", keep=1.0, cap=cap) == cap
    assert estimate_rank(W, "svd", cap=0) == 1                 # never 0, even with no cheaper rank
    # A tucker2 pair is scaled down until it fits under the cap.
    kernel = torch.randn(32, 16, 3, 3, generator=torch.Generator().manual_seed(0))
    assert max(estimate_rank(kernel, "tucker2", estimator="energy", keep=1.0, cap=4)) <= 4


def test_layer_estimates_respect_each_methods_break_even():
    geometry = {"type": "Conv2d", "in_channels": 16, "out_channels": 32, "kernel_size": [3, 3], "stride": [1, 1],
                "padding": [1, 1], "dilation": [1, 1], "padding_mode": "zeros", "bias": True}
    kernel = torch.randn(32, 16, 3, 3, generator=torch.Generator().manual_seed(0))
    estimates = layer_estimates(kernel, geometry, input_size=(8, 8), by="macs", estimator="energy", keep=1.0)
    assert set(estimates) == {"spatial", "weight", "tucker2", "cp"}
    for method, est in estimates.items():
        assert est.break_even == break_even_rank(geometry, method, (8, 8), by="macs")
        rank = max(est.rank) if isinstance(est.rank, tuple) else est.rank
        assert 1 <= rank <= max(est.break_even, 1)
        assert est.to_dict()["method"] == method
    tiny = {"type": "Linear", "in_features": 2, "out_features": 2, "bias": False}
    est = layer_estimates(torch.eye(2), tiny)["svd"]
    assert est.break_even == 0 and est.dense_is_cheaper and est.rank == 1


@settings(max_examples=25, deadline=None)
@given(m=st.integers(1, 40), n=st.integers(1, 40), cap=st.integers(0, 30), seed=st.integers(0, 1000),
       estimator=st.sampled_from(["evbmf", "energy"]))
def test_estimates_always_between_one_and_the_cap(m, n, cap, seed, estimator):
    W = torch.randn(m, n, generator=torch.Generator().manual_seed(seed))
    rank = estimate_rank(W, "svd", estimator=estimator, cap=cap)
    assert 1 <= rank <= max(cap, 1)
    assert 1 <= estimate_rank(W, "svd", estimator=estimator) <= min(m, n)
