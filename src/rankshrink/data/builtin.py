"""Data that needs no files: scikit-learn's bundled digits, and deterministic synthetic sets."""

from __future__ import annotations

import numpy as np
import torch

from ..errors import ConfigError, DataError
from .splits import Splits, _make_splits
from .synthetic import SIGNAL_KINDS, SIGNAL_SHAPES, load_signal_synthetic

# train / validation / test sizes of the built-in digits split (1797 images).
DIGITS_SPLIT = (1078, 360, 359)


def load_digits_splits(seed: int = 0) -> Splits:
    """scikit-learn's bundled 8×8 digits (1797 images, offline), as (1, 8, 8) in [0, 1].

    Split deterministically for ``seed``, stratified by class: ``train`` 1078 images
    (60%), ``val`` 360 and ``test`` 359 (the held-out 40%, halved). Train is what models
    train on, validation sets rank-search tolerances and early stopping, test is only
    reported. Validation gets a fifth of the images, not a tenth, because every
    tolerance decision is made on it: one image is 1/360 = 0.28 accuracy points there
    (it would be 0.56 points on 180 images, as large as half a 1-point tolerance).
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = (bunch.data.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8)
    y = bunch.target.astype(np.int64)
    index = np.arange(len(y))
    train_idx, held_idx = train_test_split(index, test_size=DIGITS_SPLIT[1] + DIGITS_SPLIT[2], stratify=y,
                                           random_state=seed)
    val_idx, test_idx = train_test_split(held_idx, test_size=DIGITS_SPLIT[2], stratify=y[held_idx],
                                         random_state=seed)
    # Sorted indices keep the stored order independent of sklearn's shuffling details.
    train_idx, val_idx, test_idx = np.sort(train_idx), np.sort(val_idx), np.sort(test_idx)
    return _make_splits("digits", 10, (x[train_idx], y[train_idx]), (x[val_idx], y[val_idx]),
                        (x[test_idx], y[test_idx]))


_SYNTHETIC_SHAPES: dict[str, tuple[int, ...]] = {"cifar": (3, 32, 32), "mnist": (1, 28, 28), **SIGNAL_SHAPES}


def load_synthetic(kind: str = "cifar", *, n_train: int | None = None, n_val: int | None = None,
                   n_test: int | None = None, num_classes: int = 10, seed: int = 0) -> Splits:
    """A deterministic, learnable stand-in with CIFAR-10 or MNIST shapes (4000 / 500 / 500 samples),
    or one of the MLPerf Tiny-shaped sets of :mod:`.synthetic` (``mfcc``, ``vww``, ``anomaly``,
    ``spectrum``: their own class counts and default sizes; ``num_classes`` applies to cifar/mnist).

    Each class has a smooth random template; a sample is its class template, randomly
    shifted by up to 4 pixels, blended with a second class's template and Gaussian
    noise, clipped to [0, 1]. A small CNN learns it well but not perfectly, so
    compression has a visible accuracy cost (the
    seeds' CIFAR CNN reaches about 90% test accuracy on ``synthetic:cifar``).
    """
    if kind not in _SYNTHETIC_SHAPES:
        raise DataError(f"unknown synthetic data set {kind!r}; choose one of {sorted(_SYNTHETIC_SHAPES)}.")
    if min(n for n in (n_train, n_val, n_test, 1) if n is not None) < 1 or num_classes < 2:
        raise ConfigError("synthetic data needs at least one sample per split and two classes.")
    if kind in SIGNAL_KINDS:
        return load_signal_synthetic(kind, n_train=n_train, n_val=n_val, n_test=n_test, seed=seed)
    n_train, n_val, n_test = n_train or 4000, n_val or 500, n_test or 500
    channels, height, width = _SYNTHETIC_SHAPES[kind]
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.randn(num_classes, channels, 6, 6, generator=gen)
    templates = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bicubic",
                                                align_corners=False)
    templates = templates / templates.flatten(1).std(dim=1).view(-1, 1, 1, 1)
    total = n_train + n_val + n_test
    labels = torch.arange(total) % num_classes
    labels = labels[torch.randperm(total, generator=gen)]
    others = (labels + torch.randint(1, num_classes, (total,), generator=gen)) % num_classes
    mix = 0.8 * torch.rand(total, generator=gen)
    base = templates[labels] + mix.view(-1, 1, 1, 1) * templates[others]
    shifts = torch.randint(-4, 5, (total, 2), generator=gen)
    # Per-sample torch.roll as one gather: out[..., i, j] = base[..., (i - dy) % H, (j - dx) % W].
    rows = (torch.arange(height).view(1, -1) - shifts[:, :1]) % height
    cols = (torch.arange(width).view(1, -1) - shifts[:, 1:]) % width
    shifted = base[torch.arange(total).view(-1, 1, 1, 1), torch.arange(channels).view(1, -1, 1, 1),
                   rows.view(total, 1, height, 1), cols.view(total, 1, 1, width)]
    noise = torch.randn(total, channels, height, width, generator=gen)
    # Faint templates under strong noise: the CIFAR CNN reaches about 90%, not 100%.
    x = (0.5 + 0.08 * shifted + 0.3 * noise).clamp_(0.0, 1.0)
    a, b = n_train, n_train + n_val
    return _make_splits(f"synthetic-{kind}", num_classes, (x[:a], labels[:a]), (x[a:b], labels[a:b]),
                        (x[b:], labels[b:]))
