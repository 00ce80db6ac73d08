"""Reference models, the built-in registry and cache, and model SPEC loading."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import rankshrink.models as models
from rankshrink.errors import ConfigError, FileFormatError, UnsafeFileError
from rankshrink.files import save_tensors
from rankshrink.metrics import accuracy
from rankshrink.models import (
    BUILTIN_MODELS,
    CifarCNN,
    DigitsCNN,
    MnistMLP,
    builtin_weights_path,
    load_builtin,
    load_model_spec,
    load_weights,
)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache root shared by this module's tests, so the digits CNN trains once."""
    return tmp_path_factory.mktemp("models-cache")


@pytest.fixture(scope="module")
def trained_digits(cache: Path):
    return load_builtin("digits-cnn", cache_dir=cache, progress=False)


def _never_train(*args, **kwargs):
    raise AssertionError("training ran although the cache should have been used")


# --------------------------------------------------------------------------- architectures

def test_output_shapes() -> None:
    assert DigitsCNN()(torch.zeros(3, 1, 8, 8)).shape == (3, 10)
    assert CifarCNN()(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    assert CifarCNN((1, 28, 28))(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    mlp = MnistMLP()
    assert mlp(torch.zeros(4, 1, 28, 28)).shape == (4, 10)
    assert mlp(torch.zeros(4, 784)).shape == (4, 10)
    assert MnistMLP(num_features=64)(torch.zeros(5, 1, 8, 8)).shape == (5, 10)
    with pytest.raises(ConfigError):
        CifarCNN((3, 8, 8))


def test_qualified_layer_names() -> None:
    digits = dict(DigitsCNN().named_modules())
    assert isinstance(digits["features.0"], nn.Conv2d) and digits["features.0"].out_channels == 16
    assert isinstance(digits["features.2"], nn.Conv2d) and digits["features.2"].out_channels == 32
    assert isinstance(digits["classifier.1"], nn.Linear) and digits["classifier.1"].in_features == 32 * 4 * 4
    assert isinstance(digits["classifier.3"], nn.Linear) and digits["classifier.3"].out_features == 10
    cifar = dict(CifarCNN().named_modules())
    assert (cifar["conv1"].in_channels, cifar["conv1"].out_channels, cifar["conv1"].kernel_size) == (3, 6, (5, 5))
    assert (cifar["conv2"].in_channels, cifar["conv2"].out_channels) == (6, 16)
    assert [(cifar[n].in_features, cifar[n].out_features) for n in ("fc1", "fc2", "fc3")] == [
        (400, 120), (120, 84), (84, 10)]
    mlp = dict(MnistMLP().named_modules())
    assert [(mlp[n].in_features, mlp[n].out_features) for n in ("layers.0", "layers.2", "layers.4")] == [
        (784, 128), (128, 256), (256, 10)]


def test_registry_entries_build_for_their_example_shapes() -> None:
    assert set(BUILTIN_MODELS) == {"digits-cnn", "cifar-cnn", "mnist-mlp", "resnet8", "ds-cnn", "mobilenet-v1",
                                   "fc-autoencoder", "wide-mlp"}
    for entry in BUILTIN_MODELS.values():
        model = entry.create()
        assert model(torch.zeros(2, *entry.example_input_shape)).shape == (2, entry.num_classes)
    a, b = BUILTIN_MODELS["digits-cnn"].create(), BUILTIN_MODELS["digits-cnn"].create()
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert BUILTIN_MODELS["mnist-mlp"].create((1, 28, 28)).layers[0].in_features == 784


# --------------------------------------------------------------------------- built-in training and cache

def test_builtin_digits_cnn_trains_and_caches(trained_digits, cache: Path, monkeypatch) -> None:
    model, splits = trained_digits
    assert not model.training
    assert accuracy(model, splits.test) >= 0.95
    monkeypatch.setenv("RANKSHRINK_CACHE", str(cache))  # the default cache root, for the spec below
    path = builtin_weights_path("digits-cnn", splits.fingerprint)
    assert path.is_file() and path.parent == cache / "models"
    assert path.name == f"digits-cnn-{splits.fingerprint[:12]}-v1.safetensors"

    monkeypatch.setattr(models.builtin, "train_model", _never_train)
    again, _ = load_builtin("digits-cnn", progress=False)
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name
    via_spec = load_model_spec("builtin:digits-cnn")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), via_spec.state_dict().values()))


def test_builtin_cache_with_other_recipe_or_corrupt_file_retrains(trained_digits, cache: Path,
                                                                    monkeypatch, tmp_path: Path) -> None:
    model, splits = trained_digits
    calls = []

    def fake_train(*args, **kwargs):
        calls.append(kwargs)
        raise KeyboardInterrupt  # stop before real training; we only need to know it started

    monkeypatch.setattr(models.builtin, "train_model", fake_train)
    stale = builtin_weights_path("digits-cnn", splits.fingerprint, tmp_path)
    save_tensors(stale, model.state_dict(), metadata={"recipe": "{\"epochs\": 1}"})
    with pytest.raises(KeyboardInterrupt):
        load_builtin("digits-cnn", data=splits, cache_dir=tmp_path, progress=False)
    assert len(calls) == 1

    stale.write_bytes(b"garbage")
    with pytest.warns(RuntimeWarning, match="ignoring the cached weights"):
        with pytest.raises(KeyboardInterrupt):
            load_builtin("digits-cnn", data=splits, cache_dir=tmp_path, progress=False)
    assert len(calls) == 2


def test_builtin_without_training_is_untrained_and_leaves_cache_alone(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(models.builtin, "train_model", _never_train)
    model, splits = load_builtin("mnist-mlp", train=False, cache_dir=tmp_path)
    assert model.layers[0].in_features == 64 and splits.name == "digits"
    assert not (tmp_path / "models").exists()
    with pytest.raises(ConfigError, match="digits-cnn"):
        load_builtin("resnet-9000")


# --------------------------------------------------------------------------- model specs

FACTORY = """
import torch
from torch import nn
from helper_for_factory import WIDTH

def make():
    return nn.Sequential(nn.Flatten(), nn.Linear(64, WIDTH), nn.ReLU(), nn.Linear(WIDTH, 10))

def not_a_model():
    return 42

def needs_args(width):
    return nn.Linear(width, 2)

NUMBER = 3
"""


@pytest.fixture
def factory_file(tmp_path: Path) -> Path:
    (tmp_path / "helper_for_factory.py").write_text("WIDTH = 12\n")
    path = tmp_path / "my_model.py"
    path.write_text(textwrap.dedent(FACTORY))
    return path


def test_user_file_spec(factory_file: Path) -> None:
    model = load_model_spec(f"{factory_file}:make")
    assert isinstance(model, nn.Sequential) and not model.training
    assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 10)


def test_user_file_spec_errors(factory_file: Path, tmp_path: Path) -> None:
    with pytest.raises(FileFormatError, match="does not exist"):
        load_model_spec(f"{tmp_path / 'absent.py'}:make")
    with pytest.raises(ConfigError, match="no attribute 'missing'.*make"):
        load_model_spec(f"{factory_file}:missing")
    with pytest.raises(ConfigError, match="returned a int"):
        load_model_spec(f"{factory_file}:not_a_model")
    with pytest.raises(ConfigError, match="no arguments"):
        load_model_spec(f"{factory_file}:needs_args")
    with pytest.raises(ConfigError, match="not a function"):
        load_model_spec(f"{factory_file}:NUMBER")
    broken = tmp_path / "broken.py"
    broken.write_text("import this_module_does_not_exist\n")
    with pytest.raises(ConfigError, match="importing model file .*broken.py.* failed"):
        load_model_spec(f"{broken}:make")
    for spec in ("my_model.py", "resnet", f"{factory_file}:", "builtin:nope"):
        with pytest.raises(ConfigError):
            load_model_spec(spec)


def test_weights_loading_and_mismatches(factory_file: Path, tmp_path: Path) -> None:
    source = load_model_spec(f"{factory_file}:make")
    with torch.no_grad():
        for p in source.parameters():
            p.add_(1.0)
    good = tmp_path / "good.safetensors"
    save_tensors(good, source.state_dict())
    loaded = load_model_spec(f"{factory_file}:make", weights=good)
    assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), loaded.state_dict().values()))
    assert not loaded.training

    pt = tmp_path / "good.pt"
    torch.save(source.state_dict(), pt)
    assert torch.equal(load_model_spec(f"{factory_file}:make", weights=pt)[1].weight, source[1].weight)

    state = source.state_dict()
    missing = tmp_path / "missing.safetensors"
    save_tensors(missing, {k: v for k, v in state.items() if k != "3.bias"})
    with pytest.raises(FileFormatError, match=r"missing\.safetensors.*lacks key '3\.bias'"):
        load_model_spec(f"{factory_file}:make", weights=missing)
    extra = tmp_path / "extra.safetensors"
    save_tensors(extra, {**state, "4.weight": torch.zeros(1)})
    with pytest.raises(FileFormatError, match="unexpected key '4.weight'"):
        load_model_spec(f"{factory_file}:make", weights=extra)
    wrong = tmp_path / "wrong.safetensors"
    save_tensors(wrong, {**state, "1.weight": torch.zeros(12, 63)})
    with pytest.raises(FileFormatError, match=r"'1\.weight' has shape \(12, 63\) in the file but \(12, 64\) in the "
                                               "model"):
        load_model_spec(f"{factory_file}:make", weights=wrong)

    pickled = tmp_path / "whole.pt"
    torch.save(source, pickled)
    with pytest.raises(UnsafeFileError):
        load_model_spec(f"{factory_file}:make", weights=pickled)


def test_builtin_spec_with_weights(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(models.builtin, "train_model", _never_train)
    mlp = MnistMLP(num_features=64)
    path = tmp_path / "mlp.safetensors"
    save_tensors(path, mlp.state_dict())
    loaded = load_model_spec("builtin:mnist-mlp", weights=path)
    assert torch.equal(loaded.layers[4].weight, mlp.layers[4].weight)
    big = tmp_path / "mlp784.safetensors"
    save_tensors(big, MnistMLP().state_dict())
    with pytest.raises(FileFormatError, match=r"layers\.0\.weight"):
        load_weights(MnistMLP(num_features=64), big)
