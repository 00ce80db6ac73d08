"""The embedded-sized built-ins (MLPerf Tiny-shaped) and their synthetic data."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from rankshrink.cost import count
from rankshrink.data import load_data, load_synthetic
from rankshrink.errors import ConfigError
from rankshrink.models import (
    BUILTIN_MODELS,
    DSCNN,
    AnomalyDetector,
    FCAutoencoder,
    MobileNetV1,
    ResNet8,
    WideMLP,
    load_builtin,
)
from rankshrink.train import train

TINY = ("resnet8", "ds-cnn", "mobilenet-v1", "fc-autoencoder", "wide-mlp")


def _flop_counter_macs(model: nn.Module, x: torch.Tensor) -> int:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model.eval()(x)
    return counter.get_total_flops() // 2  # one multiply-accumulate = two FLOPs


# MACs per sample by hand from the MLPerf Tiny layer lists (convolutions: positions × out × in/groups × kernel).
def _resnet8_macs() -> int:
    stem = 32 * 32 * 16 * 27
    stack1 = 2 * 32 * 32 * 16 * 16 * 9
    stack2 = 16 * 16 * 32 * 16 * 9 + 16 * 16 * 32 * 32 * 9 + 16 * 16 * 32 * 16
    stack3 = 8 * 8 * 64 * 32 * 9 + 8 * 8 * 64 * 64 * 9 + 8 * 8 * 64 * 32
    return stem + stack1 + stack2 + stack3 + 64 * 10


def _dscnn_macs() -> int:
    return 25 * 5 * 64 * 40 + 4 * (25 * 5 * 64 * 9 + 25 * 5 * 64 * 64) + 64 * 12


def _mobilenet_macs() -> int:
    total, size, cin = 48 * 48 * 8 * 27, 48, 8
    for cout, stride in ((16, 1), (32, 2), (32, 1), (64, 2), (64, 1), (128, 2), *[(128, 1)] * 5, (256, 2), (256, 1)):
        size //= stride
        total += size * size * cin * 9 + size * size * cin * cout
        cin = cout
    return total + 256 * 2


@pytest.mark.parametrize("model, shape, macs", [
    (ResNet8(), (3, 32, 32), _resnet8_macs()),
    (DSCNN(), (1, 49, 10), _dscnn_macs()),
    (MobileNetV1(), (3, 96, 96), _mobilenet_macs()),
    (FCAutoencoder(), (640,), 640 * 128 + 3 * 128 * 128 + 128 * 8 + 8 * 128 + 3 * 128 * 128 + 128 * 640),
    (WideMLP(), (8192,), 8192 * 128 + 128 * 10),
], ids=["resnet8", "ds-cnn", "mobilenet-v1", "fc-autoencoder", "wide-mlp"])
def test_macs_match_the_hand_count_and_flop_counter(model, shape, macs) -> None:
    x = torch.randn(2, *shape)
    assert count(model, x).macs == macs
    assert _flop_counter_macs(model, x) == 2 * macs  # FlopCounterMode counts the whole batch of 2


def test_sizes_are_embedded_sized() -> None:
    # The MLPerf Tiny reference sizes: ResNet-8 12.5 M MACs, DS-CNN-S 2.7 M, MobileNetV1-0.25 7.5 M.
    assert 12.0e6 < _resnet8_macs() < 13.0e6
    assert 2.5e6 < _dscnn_macs() < 2.8e6
    assert 7.0e6 < _mobilenet_macs() < 8.0e6


def test_output_shapes_and_layer_structure() -> None:
    assert ResNet8()(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    assert DSCNN()(torch.zeros(2, 1, 49, 10)).shape == (2, 12)
    assert MobileNetV1()(torch.zeros(2, 3, 96, 96)).shape == (2, 2)
    assert FCAutoencoder()(torch.zeros(3, 640)).shape == (3, 640)
    assert AnomalyDetector()(torch.zeros(3, 640)).shape == (3, 2)
    assert WideMLP()(torch.zeros(2, 8192)).shape == (2, 10)
    # DS-CNN's stem maps 49×10 to 25×5 like Keras 'same' with stride 2.
    assert DSCNN().stem(torch.zeros(1, 1, 49, 10)).shape == (1, 64, 25, 5)
    dims = [(m.in_features, m.out_features) for m in FCAutoencoder().modules() if isinstance(m, nn.Linear)]
    assert dims == [(640, 128), (128, 128), (128, 128), (128, 128), (128, 8),
                    (8, 128), (128, 128), (128, 128), (128, 128), (128, 640)]
    # Depthwise convolutions are counted (as other MACs) but are not factorization candidates.
    cost = count(MobileNetV1(), torch.zeros(1, 3, 96, 96))
    assert cost.other_multiplies > 0 and all(row.geometry["type"] in ("Conv2d", "Linear") for row in cost.layers)
    with pytest.raises(ConfigError):
        MobileNetV1((3, 16, 16))


def test_anomaly_score_is_the_reconstruction_error() -> None:
    torch.manual_seed(0)
    detector = AnomalyDetector().eval()
    x = torch.randn(4, 640)
    with torch.no_grad():
        error = (detector.autoencoder(x) - x).pow(2).mean(dim=1)
        z = detector.scale * (torch.log(error + 1e-8) - detector.threshold)
        torch.testing.assert_close(detector(x), torch.stack((-z / 2, z / 2), dim=1))


def test_registry_entries_build_for_their_default_data_shapes() -> None:
    for name in TINY:
        entry = BUILTIN_MODELS[name]
        model = entry.create()
        assert model(torch.zeros(2, *entry.example_input_shape)).shape == (2, entry.num_classes)
    with pytest.raises(ConfigError, match="2 classes"):
        BUILTIN_MODELS["fc-autoencoder"].create((640,), 10)


@pytest.mark.parametrize("kind, shape, classes", [("mfcc", (1, 49, 10), 12), ("anomaly", (640,), 2),
                                                  ("spectrum", (8192,), 10), ("vww", (3, 96, 96), 2)])
def test_synthetic_sets_are_deterministic_and_shaped(kind, shape, classes) -> None:
    a = load_synthetic(kind, n_train=40, n_val=10, n_test=10)
    b = load_synthetic(kind, n_train=40, n_val=10, n_test=10)
    assert a.fingerprint == b.fingerprint and a.input_shape == shape and a.num_classes == classes
    assert load_synthetic(kind, n_train=40, n_val=10, n_test=10, seed=1).fingerprint != a.fingerprint
    assert torch.isfinite(a.train.tensors[0]).all()
    assert set(a.train.tensors[1].tolist()) <= set(range(classes))


@pytest.mark.parametrize("kind, above", [("mfcc", 0.35), ("spectrum", 0.9)])
def test_synthetic_sets_are_learnable(kind, above) -> None:
    # The nearest class mean of 600 samples beats chance (1/12, 1/10) clearly; the networks do much better.
    data = load_synthetic(kind, n_train=600, n_val=10, n_test=300)
    x, y = (t.flatten(1) if t.dim() > 1 else t for t in data.train.tensors)
    xt, yt = (t.flatten(1) if t.dim() > 1 else t for t in data.test.tensors)
    means = torch.stack([x[y == c].mean(0) for c in range(data.num_classes)])
    assert (torch.cdist(xt, means).argmin(1) == yt).float().mean() > above


def test_anomalies_stand_out_from_a_low_dimensional_normal_set() -> None:
    # What the autoencoder relies on: normal samples lie near a low-dimensional subspace,
    # so the reconstruction error through 16 principal directions of normal data ranks anomalies high.
    from sklearn.metrics import roc_auc_score

    data = load_synthetic("anomaly", n_train=800, n_val=10, n_test=400)
    x, y = data.train.tensors
    normal = x[y == 0]
    mean = normal.mean(0)
    basis = torch.linalg.svd(normal - mean, full_matrices=False).Vh[:16]
    xt, yt = data.test.tensors
    centred = xt - mean
    error = (centred - centred @ basis.T @ basis).pow(2).mean(1)
    assert roc_auc_score(yt.numpy(), error.numpy()) > 0.9


def test_data_specs_name_the_new_sets() -> None:
    assert load_data("synthetic:anomaly").input_shape == (640,)


def test_one_epoch_on_a_subset_trains_ds_cnn() -> None:
    data = load_synthetic("mfcc", n_train=256, n_val=64, n_test=8)
    model = BUILTIN_MODELS["ds-cnn"].create(data.input_shape, data.num_classes)
    result = train(model, data.train, val_data=data.val, epochs=1, lr=3e-3, batch_size=64, progress=False)
    assert result.epochs_run == 1 and result.history[0]["train_loss"] < 2.6  # ln 12 ≈ 2.48 at chance


@pytest.mark.slow
def test_wide_mlp_trains_and_caches(tmp_path) -> None:
    model, splits = load_builtin("wide-mlp", cache_dir=tmp_path, progress=False)
    from rankshrink.metrics import accuracy

    assert accuracy(model, splits.test) > 0.9
    again, _ = load_builtin("wide-mlp", cache_dir=tmp_path, progress=False)
    assert all(torch.equal(p, q) for p, q in zip(model.state_dict().values(), again.state_dict().values()))
