"""Deterministic, learnable synthetic sets shaped like the MLPerf Tiny tasks' inputs (offline stand-ins).

* ``mfcc`` (1, 49, 10), 12 classes: keyword spotting's 49 frames × 10 MFCCs. Each class is a
  smooth trajectory through cepstral space; a sample is it stretched in time (0.8–1.25×),
  shifted (±6 frames, silence-padded), scaled, with noise.
* ``vww`` (3, 96, 96), 2 classes: visual-wake-words-like. Every image is a smooth random
  colour texture; class 1 also holds a textured object (a ring in one of a few colours) at a
  random place and size, blended in at random strength.
* ``anomaly`` (640,), 2 classes (0 = normal, 1 = anomalous): anomaly detection's 5 frames × 128
  log-mel bins of machine sound (standardised). A normal sample is a positive mix of 6 smooth
  spectral templates drifting slowly over the frames; an anomaly adds a narrow-band tone or a
  broad bump of random place and strength.
* ``spectrum`` (8192,), 10 classes: the seeds' 8192 FFT coefficients. Each class has its own
  fundamental; a sample's magnitude spectrum holds its harmonics (fundamental jittered ±1.5%,
  random harmonic amplitudes) over a noise floor.

Each set is generated from ``seed`` alone (same numbers on every machine) and is
learnable but not trivially: compression has a visible cost.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from .splits import Splits, _make_splits

__all__ = ["SIGNAL_KINDS", "SIGNAL_SHAPES", "load_signal_synthetic"]


def _labels(total: int, num_classes: int, gen: torch.Generator) -> torch.Tensor:
    labels = torch.arange(total) % num_classes
    return labels[torch.randperm(total, generator=gen)]


def _mfcc(labels: torch.Tensor, num_classes: int, gen: torch.Generator) -> torch.Tensor:
    total, frames, coefficients = len(labels), 49, 10
    # Words share a common part (as real keywords share phonemes), so classes are close.
    coarse = torch.randn(1, 1, 8, coefficients, generator=gen) + 0.5 * torch.randn(num_classes, 1, 8, coefficients,
                                                                                    generator=gen)
    words = F.interpolate(coarse, size=(32, coefficients), mode="bicubic", align_corners=False)[:, 0]
    out = torch.zeros(total, frames, coefficients)
    stretch = 0.8 + 0.45 * torch.rand(total, generator=gen)
    lengths = (32 * stretch).round().long().clamp(max=frames)
    starts = (frames - lengths) // 2 + torch.randint(-6, 7, (total,), generator=gen)
    scale = 0.7 + 0.6 * torch.rand(total, generator=gen)
    for i in range(total):  # variable lengths: one resample per sample (1 ms each)
        length = int(lengths[i])
        word = F.interpolate(words[labels[i]].T[None], size=length, mode="linear", align_corners=False)[0].T
        start = int(starts[i])
        lo, hi = max(0, start), min(frames, start + length)
        out[i, lo:hi] = scale[i] * word[lo - start:hi - start]
    out += 1.2 * torch.randn(total, frames, coefficients, generator=gen)
    return out[:, None]


def _smooth_noise(count: int, channels: int, size: int, coarse: int, gen: torch.Generator) -> torch.Tensor:
    grid = torch.randn(count, channels, coarse, coarse, generator=gen)
    return F.interpolate(grid, size=(size, size), mode="bicubic", align_corners=False)


def _vww(labels: torch.Tensor, num_classes: int, gen: torch.Generator) -> torch.Tensor:
    total, size = len(labels), 96
    # Mostly grey clutter (luminance texture, a little colour), so the object's colour and shape carry the class.
    luminance = 0.2 * _smooth_noise(total, 1, size, 6, gen) + 0.1 * _smooth_noise(total, 1, size, 24, gen)
    images = 0.5 + luminance + 0.06 * _smooth_noise(total, 3, size, 6, gen)
    palette = torch.tensor([[0.9, 0.3, 0.2], [0.2, 0.8, 0.3], [0.25, 0.35, 0.9], [0.9, 0.85, 0.2]])
    centres = 16 + 64 * torch.rand(total, 2, generator=gen)
    radii = 8 + 14 * torch.rand(total, generator=gen)
    colours = palette[torch.randint(0, len(palette), (total,), generator=gen)]
    strength = 0.5 + 0.45 * torch.rand(total, generator=gen)
    positive = torch.nonzero(labels == 1).flatten()
    axis = torch.arange(size, dtype=torch.float32)
    dy = axis.view(1, -1, 1) - centres[positive, 0].view(-1, 1, 1)
    dx = axis.view(1, 1, -1) - centres[positive, 1].view(-1, 1, 1)
    distance = (dy ** 2 + dx ** 2).sqrt() / radii[positive].view(-1, 1, 1)
    ring = torch.exp(-((distance - 0.7) / 0.25) ** 2) * (1 + 0.3 * torch.cos(distance * 9))
    mask = (strength[positive].view(-1, 1, 1) * ring.clamp(0, 1))[:, None]
    images[positive] = images[positive] * (1 - mask) + colours[positive].view(-1, 3, 1, 1) * mask
    images += 0.08 * torch.randn(images.shape, generator=gen)
    return images.clamp_(0.0, 1.0)


def _anomaly(labels: torch.Tensor, num_classes: int, gen: torch.Generator) -> torch.Tensor:
    total, frames, mels = len(labels), 5, 128
    templates = F.interpolate(0.2 + torch.rand(1, 6, 12, generator=gen), size=mels, mode="linear",
                              align_corners=False)[0]                                  # (6, mels)
    weights = 0.2 + torch.rand(total, 6, generator=gen)
    drift = 1 + 0.1 * torch.randn(total, frames, 6, generator=gen)
    spectra = torch.einsum("nfk,km->nfm", weights[:, None, :] * drift, templates)
    bins = torch.arange(mels, dtype=torch.float32)
    place = mels * torch.rand(total, generator=gen)
    width = torch.where(torch.rand(total, generator=gen) < 0.5, torch.full((total,), 1.5),
                        4 + 8 * torch.rand(total, generator=gen))
    height = 0.3 + 1.2 * torch.rand(total, generator=gen)
    bump = height[:, None] * torch.exp(-((bins[None] - place[:, None]) / width[:, None]) ** 2)
    spectra = spectra + (labels == 1).float().view(-1, 1, 1) * bump[:, None, :]
    spectra = spectra * (1 + 0.03 * torch.randn(total, frames, mels, generator=gen))
    # Log energies standardised as a front end would (about zero mean, unit variance).
    return ((torch.log1p(spectra.clamp(min=0)) - 1.35) / 0.16).flatten(1)


def _spectrum(labels: torch.Tensor, num_classes: int, gen: torch.Generator) -> torch.Tensor:
    total, bins, harmonics = len(labels), 8192, 12
    fundamentals = 150 + 400 * torch.rand(num_classes, generator=gen)
    profiles = torch.rand(num_classes, harmonics, generator=gen)
    f0 = fundamentals[labels] * (1 + 0.03 * (torch.rand(total, generator=gen) - 0.5))
    amplitudes = profiles[labels] * (0.6 + 0.8 * torch.rand(total, harmonics, generator=gen))
    spectra = 0.3 * torch.rand(total, bins, generator=gen)
    # A Gaussian line per harmonic, 6 bins wide: added over ±24 bins around its centre only.
    centres = f0[:, None] * torch.arange(1, harmonics + 1)                        # (total, harmonics)
    index = centres.round().long()[:, :, None] + torch.arange(-24, 25)            # (total, harmonics, 49)
    lines = amplitudes[:, :, None] * torch.exp(-((index - centres[:, :, None]) / 6.0) ** 2)
    spectra.scatter_add_(1, index.clamp(0, bins - 1).flatten(1), lines.flatten(1))
    return spectra


SIGNAL_SHAPES: dict[str, tuple[int, ...]] = {"mfcc": (1, 49, 10), "vww": (3, 96, 96), "anomaly": (640,),
                                             "spectrum": (8192,)}
_GENERATORS: dict[str, Callable[[torch.Tensor, int, torch.Generator], torch.Tensor]] = {
    "mfcc": _mfcc, "vww": _vww, "anomaly": _anomaly, "spectrum": _spectrum}
_CLASSES = {"mfcc": 12, "vww": 2, "anomaly": 2, "spectrum": 10}
# Sample counts per kind (train, val, test): the 96×96 set is kept small (110 KB per image).
_SIZES = {"mfcc": (4000, 500, 500), "vww": (1200, 300, 300), "anomaly": (4000, 500, 500),
          "spectrum": (2000, 400, 400)}
SIGNAL_KINDS = tuple(SIGNAL_SHAPES)


def load_signal_synthetic(kind: str, *, n_train: int | None = None, n_val: int | None = None,
                          n_test: int | None = None, seed: int = 0) -> Splits:
    """The synthetic set ``kind`` (one of :data:`SIGNAL_KINDS`); sample counts default per kind."""
    default = _SIZES[kind]
    sizes = [d if n is None else n for n, d in zip((n_train, n_val, n_test), default)]
    total = sum(sizes)
    gen = torch.Generator().manual_seed(seed)
    num_classes = _CLASSES[kind]
    labels = _labels(total, num_classes, gen)
    x = _GENERATORS[kind](labels, num_classes, gen).float().contiguous()
    a, b = sizes[0], sizes[0] + sizes[1]
    return _make_splits(f"synthetic-{kind}", num_classes, (x[:a], labels[:a]), (x[a:b], labels[a:b]),
                        (x[b:], labels[b:]))
