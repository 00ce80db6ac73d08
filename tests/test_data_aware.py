"""Data-aware factorization: calibration statistics, closed-form optimality, the digits CNN, bad input."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import TensorDataset

import rankshrink as rs
from rankshrink.calibration import Calibration, CalibrationWarning, calibrate, conv_patches
from rankshrink.decompose import activation as da
from rankshrink.decompose import (
    low_rank_factors,
    reconstruct_cp,
    reconstruct_spatial,
    reconstruct_tucker2,
    reconstruct_weight,
    spatial_svd,
    weight_svd,
)
from rankshrink.decompose.stats import InputStats, patch_moment_to_channel
from rankshrink.errors import DataError, LayerError, PlanError


def _correlated_rows(n: int, d: int, seed: int, decay: float = 3.0) -> torch.Tensor:
    """n rows of d-dimensional data with a steeply decaying, rotated spectrum (float64)."""
    gen = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    scales = torch.logspace(0, -decay, d, dtype=torch.float64)
    return (torch.randn(n, d, generator=gen, dtype=torch.float64) * scales) @ Q.T + 0.3


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-300)


# --------------------------------------------------------------------------- closed form (Linear)

@pytest.mark.parametrize("m,n,samples,rank", [(40, 30, 500, 1), (40, 30, 500, 6), (20, 50, 400, 10),
                                              (30, 30, 12, 5)])  # the last: C singular (12 < 30)
def test_activation_svd_reaches_the_closed_form_optimum(m, n, samples, rank):
    X = _correlated_rows(samples, n, seed=m + n)
    W = torch.randn(m, n, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    C = X.T @ X
    result = da.activation_svd(W, C, rank)
    achieved = ((W - result.left @ result.right) @ X.T).norm().item()
    optimum = da.optimal_activation_error(da.whitened_singular_values(W, C), rank)
    assert _rel(achieved, optimum) < 1e-6
    assert _rel(result.error(), optimum) < 1e-9
    left, right = low_rank_factors(W, rank)
    plain = ((W - left @ right) @ X.T).norm().item()
    assert achieved <= plain * (1 + 1e-12)
    assert result.left.shape == (m, rank) and result.right.shape == (rank, n)


def test_activation_svd_matches_the_whiten_unwhiten_formula_when_c_is_invertible():
    X = _correlated_rows(300, 12, seed=3, decay=1.0)
    W = torch.randn(9, 12, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    C = X.T @ X
    L = torch.linalg.cholesky(C)
    U, S, Vh = torch.linalg.svd(W @ L)
    expected = (U[:, :4] * S[:4]) @ Vh[:4] @ torch.linalg.inv(L)
    result = da.activation_svd(W, C, 4)
    assert torch.allclose(result.left @ result.right, expected, atol=1e-9)


@settings(max_examples=25, deadline=None)
@given(m=st.integers(2, 12), n=st.integers(2, 12), samples=st.integers(1, 40), data=st.data())
def test_activation_svd_is_optimal_and_never_worse_than_plain(m, n, samples, data):
    rank = data.draw(st.integers(1, min(m, n)))
    seed = data.draw(st.integers(0, 1000))
    X = _correlated_rows(samples, n, seed=seed, decay=data.draw(st.floats(0.0, 6.0)))
    W = torch.randn(m, n, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    C = X.T @ X
    result = da.activation_svd(W, C, rank)
    achieved = ((W - result.left @ result.right) @ X.T).norm().item()
    optimum = da.optimal_activation_error(da.whitened_singular_values(W, C), rank)
    scale = (W @ X.T).norm().item()
    assert abs(achieved - optimum) <= 1e-6 * optimum + 1e-7 * scale  # √ε-level floor for singular C
    left, right = low_rank_factors(W, rank)
    assert achieved <= ((W - left @ right) @ X.T).norm().item() + 1e-9 * scale
    assert torch.isfinite(result.left).all() and torch.isfinite(result.right).all()


def test_zero_statistics_and_damping_are_safe():
    W = torch.randn(6, 5, dtype=torch.float64)
    result = da.activation_svd(W, torch.zeros(5, 5, dtype=torch.float64), 2)
    assert torch.isfinite(result.left).all() and result.error() == 0.0
    # Huge damping turns the activation objective into the plain weight objective.
    X = _correlated_rows(100, 5, seed=0)
    damped = da.activation_svd(W, X.T @ X, 2, damping=1e9)
    left, right = low_rank_factors(W, 2)
    assert torch.allclose(damped.left @ damped.right, left @ right, atol=1e-6)
    with pytest.raises(ValueError, match="damping"):
        da.activation_svd(W, X.T @ X, 2, damping=-1.0)
    with pytest.raises(ValueError, match="dimensional"):
        da.activation_svd(W, torch.eye(4, dtype=torch.float64), 2)


# --------------------------------------------------------------------------- factorize on real layers

def _conv_stats(conv: nn.Module, x: torch.Tensor) -> InputStats:
    patches = conv_patches(conv, x).double()
    s = InputStats("full", patches.shape[1], kernel_size=tuple(conv.kernel_size))
    s.update(patches)
    return s


@pytest.mark.parametrize("bias_correction", [False, True])
def test_factorized_conv_output_error_equals_the_optimum(bias_correction):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 8, 3, padding=1, padding_mode="reflect").double()
    x = torch.nn.functional.avg_pool2d(torch.randn(16, 4, 14, 14, dtype=torch.float64), 3, 1, 1) + 0.5
    stats = _conv_stats(conv, x)
    block = rs.factorize(conv, "weight", 5, input_stats=stats, bias_correction=bias_correction)
    achieved = (conv(x) - block(x)).norm().item()
    moment = stats.scatter if bias_correction else stats.second_moment()
    optimum = da.optimal_activation_error(da.whitened_singular_values(conv.weight.reshape(8, -1), moment), 5)
    assert _rel(achieved, optimum) < 1e-6
    plain = (conv(x) - rs.factorize(conv, "weight", 5)(x)).norm().item()
    assert achieved < plain


def test_bias_correction_is_the_affine_optimum():
    torch.manual_seed(1)
    layer = nn.Linear(10, 6).double()
    x = _correlated_rows(200, 10, seed=5) + 2.0  # a large mean
    stats = InputStats("full", 10)
    stats.update(x)
    with_bias = (layer(x) - rs.factorize(layer, "svd", 3, input_stats=stats)(x)).norm().item()
    without = (layer(x) - rs.factorize(layer, "svd", 3, input_stats=stats, bias_correction=False)(x)).norm().item()
    optimum = da.optimal_activation_error(da.whitened_singular_values(layer.weight, stats.scatter), 3)
    assert _rel(with_bias, optimum) < 1e-6
    assert with_bias < without


def test_spatial_refit_and_tucker_cp_use_the_data():
    torch.manual_seed(2)
    conv = nn.Conv2d(6, 10, 3, padding=1, bias=False).double()
    x = torch.nn.functional.avg_pool2d(torch.rand(24, 6, 12, 12, dtype=torch.float64), 3, 1, 1)
    stats = _conv_stats(conv, x)
    C, K = stats.second_moment(), conv.weight.detach()
    no_refit = da.activation_error(K, reconstruct_spatial(da.activation_spatial_svd(K, C, 4, refit=False)), C)
    refit = da.activation_error(K, reconstruct_spatial(da.activation_spatial_svd(K, C, 4)), C)
    plain = da.activation_error(K, reconstruct_spatial(spatial_svd(K, 4)), C)
    assert refit <= no_refit * (1 + 1e-9) and refit < plain
    # Full rank stays exact.
    full = da.activation_spatial_svd(K, C, 18)
    assert torch.allclose(reconstruct_spatial(full), K, atol=1e-8)
    for method, rank, _rebuild in [("tucker2", (5, 3), reconstruct_tucker2), ("cp", 6, reconstruct_cp)]:
        plain_block = rs.factorize(conv, method, rank)
        data_block = rs.factorize(conv, method, rank, input_stats=stats)
        plain_err = (conv(x) - plain_block(x)).norm().item()
        data_err = (conv(x) - data_block(x)).norm().item()
        assert data_err < plain_err, method
        assert torch.allclose(data_block.dense_weight(), data_block.dense_weight())  # rebuilds
    # Channel-only statistics still drive Tucker-2 (no re-fit) and refuse SVD methods.
    channel = stats.to_channel()
    assert channel.dim == 6 and channel.count == stats.count * 9
    assert torch.allclose(channel.second_moment(), patch_moment_to_channel(C, (3, 3)), rtol=1e-10)
    rs.factorize(conv, "tucker2", (5, 3), input_stats=channel)
    with pytest.raises(LayerError, match="full input"):
        rs.factorize(conv, "weight", 3, input_stats=channel)


@pytest.mark.parametrize("method,rank", [("svd", 3), ("weight", 3), ("spatial", 3), ("tucker2", (4, 3)), ("cp", 5)])
def test_data_aware_factors_are_balanced_for_fine_tuning(method, rank):
    """Whitening would leave the first factor tiny (1/√count) and the others huge; factors are rebalanced."""
    torch.manual_seed(3)
    layer = nn.Linear(30, 12) if method == "svd" else nn.Conv2d(6, 10, 3, padding=1)
    x = torch.rand(400, 30) if method == "svd" else torch.rand(40, 6, 10, 10)
    stats = InputStats("full", 30) if method == "svd" else None
    if stats is not None:
        stats.update(x)
    else:
        stats = _conv_stats(layer, x)
    block = rs.factorize(layer, method, rank, input_stats=stats)
    largest = [float(row.weight.abs().max()) for row in block]
    assert max(largest) / min(largest) < 10, largest


def test_weight_svd_data_aware_matches_direct_maths():
    K = torch.randn(5, 3, 3, 3, dtype=torch.float64)
    X = _correlated_rows(400, 27, seed=9)
    f = da.activation_weight_svd(K, X.T @ X, 4)
    approx = reconstruct_weight(f)
    achieved = ((K.reshape(5, -1) - approx.reshape(5, -1)) @ X.T).norm().item()
    optimum = da.optimal_activation_error(da.whitened_singular_values(K.reshape(5, -1), X.T @ X), 4)
    assert _rel(achieved, optimum) < 1e-6
    assert achieved <= ((K - reconstruct_weight(weight_svd(K, 4))).reshape(5, -1) @ X.T).norm().item()


# --------------------------------------------------------------------------- calibration

_GEOMETRIES = [
    nn.Conv2d(3, 5, 3, padding=1),
    nn.Conv2d(3, 5, (2, 4), padding="same", padding_mode="reflect"),
    nn.Conv2d(3, 5, 3, stride=2, dilation=2, padding=2, padding_mode="circular"),
    nn.Conv2d(3, 5, (3, 2), stride=(2, 1), padding=(1, 0), padding_mode="replicate"),
    nn.Conv2d(3, 5, 3, padding="valid", bias=False),
    nn.Conv1d(3, 5, 4, padding="same", dilation=2),
    nn.Conv1d(3, 5, 3, stride=2, padding=1, padding_mode="reflect"),
]


@pytest.mark.parametrize("conv", _GEOMETRIES, ids=lambda c: repr(c))
def test_patches_reproduce_the_convolution(conv):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 9, 10) if isinstance(conv, nn.Conv2d) else torch.randn(2, 3, 11)
    y = conv(x)
    patches = conv_patches(conv, x)
    out = patches @ conv.weight.reshape(5, -1).T
    if conv.bias is not None:
        out = out + conv.bias
    assert torch.allclose(out.reshape(2, -1, 5).transpose(1, 2).reshape(y.shape), y, atol=1e-5)


class _TwoBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1, padding_mode="reflect")
        self.fc = nn.Linear(4 * 6 * 6, 7)
        self.unused = nn.Linear(7, 3)
        self.head = nn.Linear(7, 3)

    def forward(self, x):
        return self.head(torch.relu(self.fc(torch.relu(self.conv(x)).flatten(1))))


def _data(n=64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.rand(n, 2, 6, 6, generator=gen), torch.randint(0, 3, (n,), generator=gen))


def test_streaming_statistics_do_not_depend_on_batching():
    torch.manual_seed(0)
    model = _TwoBranch().train()
    data = _data(160)
    layers = ["conv", "fc", "head"]
    one = calibrate(model, data, layers, samples=None, batch_size=160)
    many = calibrate(model, data, layers, samples=None, batch_size=7)
    for name in layers:
        # The conv sees the data itself; later layers see float32 activations, whose last
        # bits depend on the batch size the convolution ran with.
        tol = 1e-10 if name == "conv" else 1e-5
        assert one[name].count == many[name].count
        assert torch.allclose(one[name].second_moment(), many[name].second_moment(), rtol=tol, atol=tol)
        assert torch.allclose(one[name].mean, many[name].mean, rtol=tol, atol=tol)
    # Direct computation for the conv layer.
    patches = conv_patches(model.conv, data.tensors[0]).double()
    assert torch.allclose(one["conv"].second_moment(), patches.T @ patches, rtol=1e-10)
    assert torch.allclose(one["conv"].mean, patches.mean(0), rtol=1e-10)
    assert one["conv"].count == 160 * 36 and one["conv"].samples == 160
    assert model.training  # mode restored; no hooks left behind
    assert not model.conv._forward_pre_hooks


class _Residual(nn.Module):
    """Four layers read one tensor: a 3×3 conv, a 1×1 shortcut, a strided 1×1 shortcut, and a 3×3 conv again."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.shortcut = nn.Conv2d(4, 4, 1)
        self.down = nn.Conv2d(4, 4, 1, stride=2)
        self.twin = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        h = self.stem(x)
        return (self.conv(h) + self.shortcut(h) + self.twin(h)).mean((2, 3)) + self.down(h).mean((2, 3))


def test_layers_reading_other_rows_of_one_tensor_get_their_own_statistics():
    # Summaries are shared between layers fed the same tensor only where they read the same rows from it.
    torch.manual_seed(0)
    model = _Residual().eval()
    x = torch.randn(20, 1, 6, 6)
    found = calibrate(model, x, samples=None, batch_size=8)
    with torch.no_grad():
        h = model.stem(x)
    for name in ("conv", "shortcut", "down", "twin"):
        patches = conv_patches(model.get_submodule(name), h).double()
        assert torch.allclose(found[name].second_moment(), patches.T @ patches, rtol=1e-9, atol=1e-9), name
        assert found[name].count == patches.shape[0]


def test_channel_statistics_from_a_plan_match_the_derived_ones():
    model = _TwoBranch()
    data = _data(30)
    full = calibrate(model, data, ["conv"])
    channel = calibrate(model, data, rs.Plan.from_mapping({"conv": ("tucker2", 2)}))
    assert channel["conv"].kind == "channel" and channel["conv"].dim == 2
    derived = full["conv"].to_channel()
    assert torch.allclose(channel["conv"].second_moment(), derived.second_moment(), rtol=1e-10)
    assert torch.allclose(channel["conv"].input_mean(), full["conv"].mean, rtol=1e-10)


def test_apply_with_calibration_and_round_trip(tmp_path):
    torch.manual_seed(0)
    model = _TwoBranch().eval()
    data = _data(80)
    with pytest.warns(CalibrationWarning, match="unused"):
        cal = calibrate(model, data)  # all layers: the unused branch is dropped with a warning
    assert "unused" not in cal and "fc" in cal
    plan = rs.Plan.from_mapping({"conv": ("weight", 3), "fc": ("svd", 4)})
    small = rs.apply(model, plan, calibration=cal, fit="activations")
    direct = rs.factorize(model.fc, "svd", 4, input_stats=cal["fc"])
    assert torch.equal(small.fc[0].weight, direct[0].weight)
    plain = rs.apply(model, plan, calibration=cal, fit="weights")
    assert torch.equal(plain.fc[0].weight, rs.apply(model, plan).fc[0].weight)
    x = data.tensors[0]
    assert (small(x) - model(x)).norm() < (plain(x) - model(x)).norm()
    cal.save(tmp_path / "cal.safetensors")
    again = Calibration.load(tmp_path / "cal.safetensors")
    assert again.summary() == cal.summary() and again.samples == cal.samples
    assert torch.equal(rs.apply(model, plan, calibration=again, fit="activations").fc[0].weight, small.fc[0].weight)


def test_shared_module_is_calibrated_once_under_every_name():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(5, 5)
            self.b = self.a

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    model = Shared()
    cal = calibrate(model, torch.rand(20, 5), ["a"])
    assert cal["a"].count == 40 and cal["a"].samples == 20 and cal["b"] is cal["a"]
    small = rs.apply(model, rs.Plan.from_mapping({"a": ("svd", 2)}), calibration=cal, fit="activations")
    assert small.a is small.b


# --------------------------------------------------------------------------- bad input

def test_bad_calibration_input_is_named():
    model = _TwoBranch()
    with pytest.raises(DataError, match="never reached layer.*'unused'"):
        calibrate(model, _data(10), ["fc", "unused"])
    with pytest.raises(DataError, match=r"does not fit the model: layer 'conv' \(Conv2d, expects \(batch, 2, …, …\) "
                                        r"inputs\) got \(4, 3, 6, 6\)"):
        calibrate(model, torch.rand(4, 3, 6, 6), ["fc"])
    bad = torch.rand(8, 2, 6, 6)
    bad[5, 0, 0, 0] = float("nan")
    with pytest.raises(DataError, match="layer 'conv' received NaN or Inf inputs in calibration batch 2"):
        calibrate(model, bad, ["conv", "fc"], batch_size=4)
    with pytest.warns(CalibrationWarning, match=r"layer 'fc': only 5 input vectors \(from 5 calibration samples\) "
                                                 "for 144"):
        calibrate(model, torch.rand(5, 2, 6, 6), ["fc"])
    with pytest.raises(PlanError, match="does not exist"):
        calibrate(model, _data(4), ["nope"])
    with pytest.raises(DataError, match="empty"):
        calibrate(model, TensorDataset(torch.rand(0, 2, 6, 6), torch.zeros(0, dtype=torch.long)))
    with pytest.raises(ValueError, match="samples"):
        calibrate(model, _data(4), samples=0)


def test_bad_factorize_and_apply_input_is_named():
    model = _TwoBranch()
    cal = calibrate(model, _data(40), ["fc"])
    plan = rs.Plan.from_mapping({"conv": ("weight", 2)})
    with pytest.raises(DataError, match="no statistics for layer 'conv'.*calibrated layers: fc"):
        rs.apply(model, plan, calibration=cal, fit="activations")
    with pytest.raises(PlanError, match="needs calibration"):
        rs.apply(model, plan, fit="activations")
    with pytest.raises(LayerError, match="fit must be one of"):
        rs.factorize(model.fc, "svd", 2, input_stats=cal["fc"], fit="outputs")
    with pytest.raises(LayerError, match="layer 'head'.*144-dimensional"):
        rs.factorize(model.head, "svd", 2, input_stats=cal["fc"], name="layer 'head'")


# --------------------------------------------------------------------------- the digits CNN

@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    from rankshrink.models import load_builtin

    model, splits = load_builtin("digits-cnn", progress=False, cache_dir=tmp_path_factory.mktemp("models"))
    return model, splits


def test_digits_cnn_activation_error_is_at_most_half_of_plain_svd(digits):
    """On held-out data, at the ranks a search picks, data-aware error ≤ ½ plain SVD's error.

    Ranks: a quarter to a half of full for features.2 and classifier.1, 6 and 8 of 10
    for classifier.3 (at ranks 1-4 of that 10-output layer the ratio is 0.7-1.0).
    """
    model, splits = digits
    cal = calibrate(model, splits.train)
    held_out = calibrate(model, splits.val, samples=None, layers=["features.2", "classifier.1", "classifier.3"])
    cases = [("features.2", "weight", 8), ("features.2", "weight", 16), ("features.2", "spatial", 4),
             ("features.2", "spatial", 8), ("classifier.1", "svd", 8), ("classifier.1", "svd", 16),
             ("classifier.3", "svd", 6), ("classifier.3", "svd", 8)]
    for name, method, rank in cases:
        layer = model.get_submodule(name)
        moment = held_out[name].second_moment()
        errors = []
        for objective in ("weights", "activations"):
            block = rs.factorize(layer, method, rank, input_stats=cal[name], fit=objective,
                                 bias_correction=False)
            errors.append(da.activation_error(layer.weight, block.dense_weight(), moment))
        assert errors[1] <= 0.5 * errors[0], (name, method, rank, errors)
    # The first conv sees 9-pixel patches of a one-channel image: smaller but real gains.
    layer = model.features[0]
    for rank in range(1, 9):
        errs = [da.activation_error(layer.weight, rs.factorize(layer, "weight", rank, input_stats=cal["features.0"],
                                                               fit=o, bias_correction=False).dense_weight(),
                                    cal["features.0"].second_moment()) for o in ("weights", "activations")]
        assert errs[1] <= 0.8 * errs[0]


def test_digits_cnn_rank_7_first_linear_keeps_accuracy(digits):
    """The issue's headline: plain SVD of classifier.1 at rank 7 loses accuracy, data-aware keeps it.

    Measured on the 1078/360/359 split: validation 97.50% original, 69.72% plain, 95.83% data-aware.
    """
    from rankshrink.metrics import accuracy

    model, splits = digits
    base = accuracy(model, splits.val)
    plan = rs.Plan.from_mapping({"classifier.1": ("svd", 7)})
    plain = accuracy(rs.apply(model, plan), splits.val)
    cal = calibrate(model, splits.train, ["classifier.1"])
    aware = accuracy(rs.apply(model, plan, calibration=cal, fit="activations"), splits.val)
    assert aware >= base - 0.02
    assert aware - plain >= 0.05


def test_svd_options_reach_the_data_aware_path():
    """svd_method/seed work with calibration statistics too (and unknown options are refused)."""
    import rankshrink as rs
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 24))
    inputs = torch.randn(400, 32) @ torch.randn(32, 32)
    cal = rs.calibrate(model, inputs)
    exact = rs.factorize(model[0], "svd", 6, input_stats=cal["0"], algorithm="exact")
    randomized = rs.factorize(model[0], "svd", 6, input_stats=cal["0"], algorithm="randomized", seed=3)
    x = inputs[:50]
    err_exact = (model(x) - exact(x)).norm()
    err_randomized = (model(x) - randomized(x)).norm()
    assert err_randomized <= err_exact * 1.01
    with pytest.raises(rs.LayerError, match="Linear: unknown factorization option"):
        rs.factorize(model[0], "svd", 6, input_stats=cal["0"], not_an_option=1)
