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
