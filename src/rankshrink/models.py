"""The seeds' reference models, a registry of built-ins, and the one way to load a model SPEC.

A model SPEC is ``builtin:NAME`` (see :data:`BUILTIN_MODELS`) or ``path/to/file.py:factory``
(a Python file and a function in it that takes no arguments and returns an
``nn.Module``). Built-in models are trained on first use, deterministically, and cached
under ``user_cache_dir()/models/``; later loads read the cache.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .data import Splits, load_data
from .errors import ConfigError, FileFormatError
from .fileio import load_state_dict, load_tensors, save_tensors, user_cache_dir
from .metrics import accuracy
from .train import train as train_model

__all__ = [
    "DigitsCNN",
    "CifarCNN",
    "MnistMLP",
    "BuiltinModel",
    "BUILTIN_MODELS",
    "builtin_weights_path",
    "load_builtin",
    "load_weights",
    "load_model_spec",
    "check_finite",
]

_CACHE_VERSION = "v1"
_INIT_SEED = 0
_TRAIN_SEED = 0


class DigitsCNN(nn.Module):
    """Small CNN for 8×8 digits: two 3×3 convs, one 2×2 max-pool, two linear layers."""

    def __init__(self, input_shape: tuple[int, int, int] = (1, 8, 8), num_classes: int = 10) -> None:
        super().__init__()
        channels, height, width = input_shape
        if height < 2 or width < 2:
            raise ConfigError(f"DigitsCNN needs images of at least 2×2 pixels, got {height}×{width}.")
        self.features = nn.Sequential(
            nn.Conv2d(channels, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(32 * (height // 2) * (width // 2), 128), nn.ReLU(),
            nn.Linear(128, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class CifarCNN(nn.Module):
    """The seeds' Part II CIFAR network (LeNet-style): conv 3→6 5×5, conv 6→16 5×5, fc 400→120→84→10.

    The seeds keep these layers in a ModuleDict ``layers``; here they are direct
    attributes so their qualified names are simply ``conv1``, ``conv2``, ``fc1``..``fc3``.
    The pooling layer is shared, as in the seeds.
    """

    def __init__(self, input_shape: tuple[int, int, int] = (3, 32, 32), num_classes: int = 10) -> None:
        super().__init__()
        channels, height, width = input_shape
        out_h, out_w = ((height - 4) // 2 - 4) // 2, ((width - 4) // 2 - 4) // 2
        if out_h < 1 or out_w < 1:
            raise ConfigError(f"CifarCNN needs images of at least 14×14 pixels, got {height}×{width}.")
        self.conv1 = nn.Conv2d(channels, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * out_h * out_w, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


class MnistMLP(nn.Module):
    """The LoRA walkthrough's three-layer perceptron; linear layers are ``layers.0/2/4``.

    Inputs are flattened, so (N, 1, 28, 28) and (N, 784) both work; use
    ``num_features=64`` for 8×8 digits.
    """

    def __init__(self, num_features: int = 784, num_hidden_1: int = 128, num_hidden_2: int = 256,
                 num_classes: int = 10) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(num_features, num_hidden_1), nn.ReLU(),
            nn.Linear(num_hidden_1, num_hidden_2), nn.ReLU(),
            nn.Linear(num_hidden_2, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(torch.flatten(x, 1))


@dataclass(frozen=True)
class BuiltinModel:
    """A built-in model: how to build it, what data it trains on by default, how to train it.

    ``factory(input_shape, num_classes)`` builds an untrained model for the data's shapes.
    """

    name: str
    description: str
    factory: Callable[[tuple[int, ...], int], nn.Module]
    default_data: str
    example_input_shape: tuple[int, ...]
    num_classes: int
    training: Mapping[str, Any]

    def create(self, input_shape: tuple[int, ...] | None = None, num_classes: int | None = None) -> nn.Module:
        """Build the model with fixed initial weights (seed 0), leaving the global RNG alone."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_INIT_SEED)
            return self.factory(tuple(input_shape or self.example_input_shape),
                                num_classes or self.num_classes)


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "digits-cnn": BuiltinModel(
        name="digits-cnn",
        description="DigitsCNN on scikit-learn's 8×8 digits",
        factory=lambda shape, classes: DigitsCNN(shape, classes),
        default_data="builtin:digits",
        example_input_shape=(1, 8, 8),
        num_classes=10,
        training={"epochs": 20, "lr": 2e-3, "batch_size": 64, "optimizer": "adam"},
    ),
    "cifar-cnn": BuiltinModel(
        name="cifar-cnn",
        description="the seeds' Part II CIFAR CNN; trains on synthetic CIFAR-shaped data unless "
                    "given data=cifar10:DIR",
        factory=lambda shape, classes: CifarCNN(shape, classes),
        default_data="synthetic:cifar",
        example_input_shape=(3, 32, 32),
        num_classes=10,
        training={"epochs": 12, "lr": 2e-3, "batch_size": 64, "optimizer": "adam"},
    ),
    "mnist-mlp": BuiltinModel(
        name="mnist-mlp",
        description="the LoRA walkthrough's MLP; on digits by default (64 inputs), 784 with "
                    "data=mnist:DIR",
        factory=lambda shape, classes: MnistMLP(num_features=math.prod(shape), num_classes=classes),
        default_data="builtin:digits",
        example_input_shape=(1, 8, 8),
        num_classes=10,
        training={"epochs": 20, "lr": 5e-3, "batch_size": 64, "optimizer": "adam"},
    ),
}


def _builtin_entry(name: str) -> BuiltinModel:
    try:
        return BUILTIN_MODELS[name]
    except KeyError:
        raise ConfigError(f"unknown built-in model {name!r}; choose one of "
                          f"{', '.join(sorted(BUILTIN_MODELS))}.") from None


def builtin_weights_path(name: str, fingerprint: str, cache_dir: str | Path | None = None) -> Path:
    """Where trained weights of built-in ``name`` on data ``fingerprint`` are cached."""
    root = Path(cache_dir) if cache_dir is not None else user_cache_dir()
    return root / "models" / f"{name}-{fingerprint[:12]}-{_CACHE_VERSION}.safetensors"


def load_builtin(name: str, *, data: str | Splits | None = None, train: bool = True,
                 cache_dir: str | Path | None = None, progress: bool = True) -> tuple[nn.Module, Splits]:
    """Build built-in model ``name`` and its data; return (model in eval mode, splits).

    ``data`` is a data SPEC or :class:`Splits` (default: the model's own). With
    ``train`` the weights come from the cache (``cache_dir`` replaces
    ``user_cache_dir()``; file ``models/<name>-<fingerprint[:12]>-v1.safetensors``) or,
    when absent, unreadable or made with another training recipe, are trained deterministically on ``splits.train`` (the
    best validation epoch is kept) and cached atomically. ``train=False`` returns the
    untrained model with its fixed initial weights and leaves the cache alone.
    """
    entry = _builtin_entry(name)
    splits = data if isinstance(data, Splits) else load_data(data or entry.default_data)
    model = entry.create(splits.input_shape, splits.num_classes)
    if not train:
        return model.eval(), splits
    path = builtin_weights_path(name, splits.fingerprint, cache_dir)
    # The recipe is stored with the weights so a changed recipe retrains instead of
    # silently reusing weights that a fresh cache would no longer reproduce.
    recipe = json.dumps({"seed": _TRAIN_SEED, **dict(entry.training)}, sort_keys=True)
    if path.is_file():
        try:
            if _cache_recipe(path) == recipe:
                return _apply_state(model, load_tensors(path), path).eval(), splits
        except FileFormatError as exc:
            warnings.warn(f"ignoring the cached weights ({exc}); training {name} again.",
                          RuntimeWarning, stacklevel=2)
            model = entry.create(splits.input_shape, splits.num_classes)
    result = train_model(model, splits.train, val_data=splits.val, seed=_TRAIN_SEED,
                         progress=progress, **dict(entry.training))
    save_tensors(path, result.model.state_dict(), metadata={
        "rankshrink_model": name,
        "recipe": recipe,
        "data": splits.name,
        "data_fingerprint": splits.fingerprint,
        "val_accuracy": f"{accuracy(result.model, splits.val):.6f}",
        "best_epoch": str(result.best_epoch),
    })
    return result.model.eval(), splits


def _cache_recipe(path: Path) -> str | None:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return (handle.metadata() or {}).get("recipe")
    except (SafetensorError, OSError, ValueError) as exc:
        raise FileFormatError(f"'{path}' is not a readable safetensors file ({exc})") from None


def _shape(shape: torch.Size) -> tuple[int, ...]:
    return tuple(int(d) for d in shape)


def _apply_state(model: nn.Module, state: Mapping[str, torch.Tensor], source: str | Path) -> nn.Module:
    """Load ``state`` strictly, naming the first mismatch and ``source`` when it does not fit."""
    expected = model.state_dict()
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]

    def more(items: list[str]) -> str:
        return f" (and {len(items) - 1} more)" if len(items) > 1 else ""

    if missing:
        raise FileFormatError(f"weights file '{source}' does not fit the model: it lacks key "
                              f"'{missing[0]}'{more(missing)}.")
    if unexpected:
        raise FileFormatError(f"weights file '{source}' does not fit the model: it has unexpected key "
                              f"'{unexpected[0]}'{more(unexpected)}.")
    for key, tensor in expected.items():
        if _shape(state[key].shape) != _shape(tensor.shape):
            raise FileFormatError(
                f"weights file '{source}' does not fit the model: '{key}' has shape "
                f"{_shape(state[key].shape)} in the file but {_shape(tensor.shape)} in the model."
            )
    model.load_state_dict(state, strict=True)
    return model


def load_weights(model: nn.Module, weights: str | Path, *, trust_pickle: bool = False) -> nn.Module:
    """Load a state dict file (.safetensors, or .pt/.pth without pickle unless trusted) strictly."""
    return _apply_state(model, load_state_dict(weights, trust_pickle=trust_pickle), weights)


def _import_factory(file_part: str, attr: str) -> nn.Module:
    path = Path(file_part).expanduser()
    if not path.is_file():
        raise FileFormatError(f"model file '{path}' does not exist.")
    module_name = "rankshrink_user_model_" + hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise FileFormatError(f"model file '{path}' cannot be imported as a Python module.")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses and pickling look modules up here
    # The file may import helpers that sit next to it.
    sys.path.insert(0, str(path.parent.resolve()))
    try:
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            sys.modules.pop(module_name, None)
            raise ConfigError(f"importing model file '{path}' failed: {type(exc).__name__}: {exc}") from exc
        factory = getattr(module, attr, None)
        if factory is None:
            callables = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
            raise ConfigError(f"model file '{path}' has no attribute '{attr}'; callables in it: "
                              f"{', '.join(callables) or 'none'}.")
        if not callable(factory):
            raise ConfigError(f"'{attr}' in model file '{path}' is a {type(factory).__name__}, not a "
                              "function; name a function that returns the model.")
        try:
            model = factory()
        except Exception as exc:
            raise ConfigError(f"calling {attr}() from '{path}' failed: {type(exc).__name__}: {exc} "
                              "(the factory must take no arguments and return an nn.Module).") from exc
    finally:
        try:
            sys.path.remove(str(path.parent.resolve()))
        except ValueError:
            pass
    if not isinstance(model, nn.Module):
        raise ConfigError(f"{attr}() from '{path}' returned a {type(model).__name__}, not a "
                          "torch.nn.Module.")
    return model


def check_finite(model: nn.Module, source: str | None = None) -> None:
    """Refuse a model whose parameters hold NaN or Inf, naming the first such layer.

    ``source`` says where the weights came from (e.g. "weights file 'x.pt'").
    Buffers are not checked (masks may hold -inf on purpose).
    """
    from .errors import LayerError

    for name, param in model.named_parameters():
        bad = int((~torch.isfinite(param.detach())).sum())
        if bad:
            layer, _, _ = name.rpartition(".")
            kind = type(model.get_submodule(layer)).__name__ if layer else type(model).__name__
            where = str(source) if source is not None else "the model"
            raise LayerError(f"{where}: parameter '{name}' of layer '{layer or '(root)'}' ({kind}) holds {bad} "
                             f"NaN/Inf value(s) of {param.numel()}; rankshrink refuses models with non-finite "
                             "weights. Fix or retrain that layer first.")


def load_model_spec(spec: str, weights: str | Path | None = None, *,
                    trust_pickle: bool = False) -> nn.Module:
    """Build the model a SPEC names, load ``weights`` strictly if given, return it in eval mode.

    ``builtin:NAME`` without weights returns the cached trained model (training it on
    first use); with weights, the model is built for its default data's shapes.
    ``FILE.py:FACTORY`` imports the file by path and calls ``FACTORY()``.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError("a model spec must be a non-empty string such as builtin:digits-cnn or "
                          "model.py:make_model.")
    spec = spec.strip()
    if spec.startswith("builtin:"):
        name = spec[len("builtin:"):]
        entry = _builtin_entry(name)
        if weights is None:
            return load_builtin(name)[0]
        model = entry.create()
    else:
        file_part, sep, attr = spec.rpartition(":")
        if not sep or not file_part.endswith(".py") or not attr.isidentifier():
            raise ConfigError(
                f"model spec {spec!r} is not understood; use builtin:NAME (one of "
                f"{', '.join(sorted(BUILTIN_MODELS))}) or path/to/file.py:factory."
            )
        model = _import_factory(file_part, attr)
    if weights is not None:
        load_weights(model, weights, trust_pickle=trust_pickle)
    check_finite(model, f"weights file '{weights}'" if weights is not None else f"model '{spec}'")
    return model.eval()
