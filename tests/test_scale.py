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
