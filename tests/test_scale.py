"""The large-layer paths of the search: the Gram-matrix activation SVD equals the whitened one."""

from __future__ import annotations

import pytest
import torch

from rankshrink.decompose import activation_svd
from rankshrink.decompose.activation import gram_activation_svd, gram_singular_values
from rankshrink.decompose.stats import whitening


@pytest.mark.parametrize("shape", [(120, 400), (400, 120)])  # fewer outputs than inputs, and more
@pytest.mark.parametrize("damping", [0.0, 0.01])
def test_gram_activation_svd_equals_the_whitened_svd(shape, damping):
    torch.manual_seed(0)
    out, inn = shape
    W = torch.randn(out, inn, dtype=torch.float64)
    X = torch.randn(2000, inn, dtype=torch.float64) @ (torch.randn(inn, inn, dtype=torch.float64)
                                                       * torch.logspace(-2, 0, inn, dtype=torch.float64))
    C = X.T @ X
    rank = 17
    exact = activation_svd(W, whitening(C, damping), rank, method="exact")
    gram = gram_activation_svd(W, C, rank, damping=damping)
    scale = float(exact.singular[0])
    assert torch.allclose(gram.singular[:rank], exact.singular[:rank], rtol=1e-7, atol=1e-9 * scale)
    assert gram.total == pytest.approx(exact.total, rel=1e-9)
    # The same factorization W' = U_r U_rᵀ W (factor signs and balance may differ).
    assert torch.allclose(gram.left @ gram.right, exact.left @ exact.right, atol=1e-7 * float(W.abs().max()))
    assert torch.allclose(gram_singular_values(W, C, damping)[:rank], exact.singular[:rank], rtol=1e-7,
                          atol=1e-9 * scale)


def test_the_gram_spectrum_cache_never_serves_another_weight():
    torch.manual_seed(0)
    C = (lambda x: x.T @ x)(torch.randn(500, 300, dtype=torch.float64))
    first = torch.randn(100, 300, dtype=torch.float64)
    a = gram_activation_svd(first, C, 5)
    second = first.clone()
    second[0, 0] += 1.0  # another weight of the same shape with the same statistics
    b = gram_activation_svd(second, C, 5)
    first.mul_(2.0)  # the same tensor changed in place
    c = gram_activation_svd(first, C, 5)
    assert not torch.allclose(a.left @ a.right, b.left @ b.right)
    assert torch.allclose(c.left @ c.right, 2 * (a.left @ a.right))


def test_wide_statistics_are_stored_packed_and_stream_exactly(tmp_path):
    from rankshrink.calibration import Calibration
    from rankshrink.decompose.stats import PACK_MIN_DIM, InputStats

    torch.manual_seed(0)
    dim = PACK_MIN_DIM + 3
    X = torch.randn(900, dim, dtype=torch.float64) + 0.5
    stats = InputStats("full", dim)
    for chunk in X.split(250):
        stats.update(chunk)
    assert stats.scatter.shape == (dim * (dim + 1) // 2,)  # the upper triangle only
    assert stats.nbytes() < 0.51 * dim * dim * 8
    assert torch.allclose(stats.second_moment(), X.T @ X, rtol=1e-10, atol=1e-8)
    centred = X - X.mean(dim=0)
    assert torch.allclose(stats.moment(centered=True), centred.T @ centred, rtol=1e-10, atol=1e-8)
    assert torch.equal(stats.input_mean(), stats.mean)
    stats.samples = 900
    Calibration({"layer": stats}, 900).save(tmp_path / "cal.safetensors")
    again = Calibration.load(tmp_path / "cal.safetensors")["layer"]
    assert torch.equal(again.second_moment(), stats.second_moment()) and again.count == 900


def test_the_final_build_copies_no_replaced_weight_and_shares_nothing_with_the_original():
    from torch import nn

    from rankshrink.plan import Plan
    from rankshrink.search.evaluate import Factorizer
    from rankshrink.surgery import _replaced_tensors

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 16))
    tied = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 10, bias=False))
    tied[1].weight = tied[0].weight
    plan = Plan.from_mapping({"0": ("svd", 4), "2": ("svd", 8)})
    owned = _replaced_tensors(model, plan)
    assert set(owned) == {id(t) for t in (model[0].weight, model[0].bias, model[2].weight, model[2].bias)}
    assert _replaced_tensors(tied, Plan.from_mapping({"0": ("embedding", 4)})) == {}  # tied: still used

    x = torch.randn(5, 16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    factorizer = Factorizer(model)
    evaluated = factorizer.build(plan)(x)  # a shared-weights build for evaluation memoises the blocks
    final = factorizer.build(plan, share=False)
    assert torch.allclose(final(x), evaluated)
    originals = {t.data_ptr() for t in (*model.parameters(), *model.buffers())}
    assert not any(t.data_ptr() in originals for t in final.parameters())
    with torch.no_grad():
        for p in final.parameters():
            p.add_(1.0)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert factorizer.build(plan, share=False) is not final  # handed over blocks are rebuilt when asked again


def test_the_factorizer_keeps_recent_plans_blocks_and_a_bounded_whitening_cache(monkeypatch):
    from torch import nn

    from rankshrink.calibration import calibrate
    from rankshrink.plan import Plan
    from rankshrink.search import evaluate

    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(24, 24) for _ in range(4)]).eval()
    calibration = calibrate(model, torch.randn(200, 24), samples=200)
    stats = [calibration.get(str(i)) for i in range(4)]
    one = stats[0].whitening(False, 0.0)
    monkeypatch.setattr(evaluate, "WHITENING_CACHE_BYTES", 2 * stats[0].cache_nbytes())  # two layers' worth
    stats[0].clear_cache()
    factorizer = evaluate.Factorizer(model, calibration=calibration, fit="activations")
    plans = [Plan.from_mapping({str(i): factorizer.config("svd", rank) for i in range(4)}) for rank in (4, 8, 12)]
    x = torch.randn(7, 24)
    first = factorizer.build(plans[0])(x)
    assert [s.cache_nbytes() > 0 for s in stats] == [False, False, True, True]  # the two built last
    for plan in plans[1:]:
        factorizer.build(plan)
    assert len(factorizer._memo) == 8  # the last two plans' blocks, 4 layers each
    assert {entry.rank for _, entry in factorizer._memo} == {8, 12}
    # A forgotten block is rebuilt identically (its whitening recomputed).
    assert torch.equal(factorizer.build(plans[0])(x), first)
    assert torch.equal(stats[0].whitening(False, 0.0).Q, one.Q)
