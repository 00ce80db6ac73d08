"""The built-in models: a registry of architectures with their default data, trained once and cached.

Built-in models are trained on first use, deterministically, and cached under
``user_cache_dir()/models/``; later loads read the cache.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from ..data import Splits, _dataset_len, load_data
from ..errors import ConfigError, DiskFullError, FileFormatError
from ..files import load_tensors, path_kind, save_tensors, user_cache_dir
from ..fingerprint import state_fingerprint
from ..metrics import accuracy
from ..train import CHECKPOINT_NAME
from ..train import train as train_model
from .architectures import CifarCNN, DigitsCNN, MnistMLP
from .tiny import DSCNN, AnomalyDetector, MobileNetV1, ResNet8, WideMLP
from .weights import apply_state, check_finite

__all__ = ["BuiltinModel", "BUILTIN_MODELS", "builtin_entry", "builtin_weights_path", "load_builtin"]

_CACHE_VERSION = "v1"
_INIT_SEED = 0
_TRAIN_SEED = 0


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


def _image_shape(shape: tuple[int, ...]) -> tuple[int, int, int]:
    channels, height, width = shape  # the CNNs take (C, H, W) images; other shapes fail here as they did inside
    return channels, height, width


def _anomaly_detector(shape: tuple[int, ...], classes: int) -> nn.Module:
    if classes != 2:
        raise ConfigError(f"fc-autoencoder scores anomalies: it needs data with 2 classes (normal, anomalous), "
                          f"got {classes}.")
    return AnomalyDetector(math.prod(shape))


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "digits-cnn": BuiltinModel(
        name="digits-cnn",
        description="DigitsCNN on scikit-learn's 8×8 digits",
        factory=lambda shape, classes: DigitsCNN(_image_shape(shape), classes),
        default_data="builtin:digits",
        example_input_shape=(1, 8, 8),
        num_classes=10,
        training={"epochs": 20, "lr": 2e-3, "batch_size": 64, "optimizer": "adam"},
    ),
    "cifar-cnn": BuiltinModel(
        name="cifar-cnn",
        description="the seeds' Part II CIFAR CNN; trains on synthetic CIFAR-shaped data unless "
                    "given data=cifar10:DIR",
        factory=lambda shape, classes: CifarCNN(_image_shape(shape), classes),
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
    # Embedded-sized models shaped like the MLPerf Tiny reference networks, trained briefly on
    # offline synthetic stand-ins for their tasks' data (rankshrink.data.synthetic).
    "resnet8": BuiltinModel(
        name="resnet8",
        description="MLPerf Tiny's ResNet-8 (32×32×3 image classification, 12.5 M MACs); trains on synthetic "
                    "CIFAR-shaped data unless given data=cifar10:DIR",
        factory=lambda shape, classes: ResNet8(_image_shape(shape), classes),
        default_data="synthetic:cifar",
        example_input_shape=(3, 32, 32),
        num_classes=10,
        training={"epochs": 3, "lr": 3e-3, "batch_size": 64, "optimizer": "adam"},
    ),
    "ds-cnn": BuiltinModel(
        name="ds-cnn",
        description="DS-CNN-S keyword spotting (49×10 MFCCs, 1 channel, 12 classes, 2.7 M MACs) on synthetic "
                    "MFCC-like data",
        factory=lambda shape, classes: DSCNN(_image_shape(shape), classes),
        default_data="synthetic:mfcc",
        example_input_shape=(1, 49, 10),
        num_classes=12,
        training={"epochs": 4, "lr": 3e-3, "batch_size": 64, "optimizer": "adam"},
    ),
    "mobilenet-v1": BuiltinModel(
        name="mobilenet-v1",
        description="MobileNetV1-0.25 visual wake words (96×96×3, 2 classes, 7.5 M MACs) on synthetic data",
        factory=lambda shape, classes: MobileNetV1(_image_shape(shape), classes),
        default_data="synthetic:vww",
        example_input_shape=(3, 96, 96),
        num_classes=2,
        training={"epochs": 6, "lr": 3e-3, "batch_size": 32, "optimizer": "adam"},
    ),
    "fc-autoencoder": BuiltinModel(
        name="fc-autoencoder",
        description="MLPerf Tiny's anomaly-detection autoencoder (640→128×4→8→128×4→640) with its "
                    "reconstruction-error score as (normal, anomalous) logits, on synthetic log-mel frames",
        factory=lambda shape, classes: _anomaly_detector(shape, classes),
        default_data="synthetic:anomaly",
        example_input_shape=(640,),
        num_classes=2,
        training={"epochs": 30, "lr": 3e-3, "batch_size": 64, "optimizer": "adam"},
    ),
    "wide-mlp": BuiltinModel(
        name="wide-mlp",
        description="the seeds' wide MLP (8192 FFT coefficients → 128 → 10, 1.05 M MACs) on synthetic spectra",
        factory=lambda shape, classes: WideMLP(math.prod(shape), num_classes=classes),
        default_data="synthetic:spectrum",
        example_input_shape=(8192,),
        num_classes=10,
        training={"epochs": 5, "lr": 1e-3, "batch_size": 64, "optimizer": "adam"},
    ),
}


def builtin_entry(name: str) -> BuiltinModel:
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

    The cache is trusted-user storage (whoever can write it decides what loads), but it is
    checked: a cached file must record the model, the data fingerprint and recipe it was
    trained for, the sha256 of its tensors, finite weights and the validation accuracy it
    scores; a file that fails is refused with :class:`FileFormatError` naming it (delete it
    to train again). Training checkpoints after every epoch next to the cache file, so an
    interrupted first run (Ctrl-C, SIGKILL) resumes where it stopped. A cache that cannot be
    written gives one warning and the model is used uncached.
    """
    entry = builtin_entry(name)
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
            metadata = _cache_metadata(path)
        except FileFormatError as exc:
            warnings.warn(f"ignoring the cached weights ({exc}); training {name} again.",
                          RuntimeWarning, stacklevel=2)
        else:
            if metadata.get("recipe") == recipe and "sha256" in metadata:
                return _verified(model, path, name, splits, metadata).eval(), splits
    checkpoint = path.parent / f".{path.stem}-{hashlib.sha256(recipe.encode()).hexdigest()[:8]}.training"
    writable = _writable(checkpoint, path)
    if writable and (checkpoint / CHECKPOINT_NAME).is_file() and progress:
        from tqdm.auto import tqdm

        tqdm.write(f"resuming the training of {name} from its checkpoint in '{checkpoint}'", file=sys.stderr)
    try:
        result = train_model(model, splits.train, val_data=splits.val, seed=_TRAIN_SEED, progress=progress,
                             checkpoint_dir=checkpoint if writable else None, **dict(entry.training))
    except DiskFullError as exc:  # the checkpoint no longer fits: train again without checkpoints
        _cache_warning(path, exc)
        writable = False
        shutil.rmtree(checkpoint, ignore_errors=True)
        model = entry.create(splits.input_shape, splits.num_classes)
        result = train_model(model, splits.train, val_data=splits.val, seed=_TRAIN_SEED, progress=progress,
                             **dict(entry.training))
    state = result.model.state_dict()
    if writable:
        try:
            save_tensors(path, state, metadata={
                "rankshrink_model": name,
                "recipe": recipe,
                "data": splits.name,
                "data_fingerprint": splits.fingerprint,
                "val_accuracy": f"{accuracy(result.model, splits.val):.6f}",
                "best_epoch": str(result.best_epoch),
                "sha256": state_fingerprint(state, sort=True),
            })
        except (OSError, ConfigError) as exc:  # disk full, an entry that is a directory: go on uncached
            _cache_warning(path, exc)
        shutil.rmtree(checkpoint, ignore_errors=True)
    return result.model.eval(), splits


def _cache_warning(path: Path, exc: BaseException) -> None:
    warnings.warn(f"cannot write the built-in model cache '{path}' ({exc}); going on without caching (the model is "
                  "trained again next time).", RuntimeWarning, stacklevel=3)


def _writable(checkpoint: Path, path: Path) -> bool:
    """Whether the cache can take a checkpoint and the trained file; warns once when it cannot."""
    try:
        if path.exists() and not path.is_file():
            raise IsADirectoryError(f"'{path}' is a {path_kind(path)}")
        checkpoint.mkdir(parents=True, exist_ok=True)
        probe = checkpoint / ".probe"
        probe.write_bytes(b"")
        probe.unlink()
        return True
    except OSError as exc:
        _cache_warning(path, exc)
        return False


def _verified(model: nn.Module, path: Path, name: str, splits: Splits, metadata: Mapping[str, str]) -> nn.Module:
    """The cached weights in ``model``, or :class:`FileFormatError` naming the file to delete."""
    delete = f"Delete '{path}' and rerun to train {name} again."
    if metadata.get("rankshrink_model") != name or metadata.get("data_fingerprint") != splits.fingerprint:
        made_for = f"{metadata.get('rankshrink_model')!r} on {metadata.get('data_fingerprint', '?')[:12]}"
        raise FileFormatError(f"the built-in model cache '{path}' was made for another model or data set "
                              f"({made_for}); {delete}")
    state = load_tensors(path)
    if state_fingerprint(state, sort=True) != metadata.get("sha256"):
        raise FileFormatError(f"the built-in model cache '{path}' does not match its checksum (modified or damaged). "
                              f"{delete}")
    apply_state(model, state, path)
    check_finite(model, f"the built-in model cache '{path}'", fix=delete)
    try:
        recorded = float(metadata.get("val_accuracy", "nan"))
    except ValueError:
        recorded = math.nan
    measured = accuracy(model, splits.val)
    # The same file on the same data scores the same; allow one sample for another machine's arithmetic.
    if not abs(measured - recorded) * _dataset_len(splits.val) <= 1.5:
        raise FileFormatError(f"the built-in model cache '{path}' records validation accuracy "
                              f"{metadata.get('val_accuracy')!r} but scores {measured:.6f}; it was modified or "
                              f"damaged. {delete}")
    return model


def _cache_metadata(path: Path) -> dict[str, str]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except (SafetensorError, OSError, ValueError) as exc:
        raise FileFormatError(f"'{path}' is not a readable safetensors file ({exc})") from None
