"""Images in class folders: ``imagefolder:DIR`` (``DIR/<class>/<image>``), read with Pillow.

Classes are the subfolder names in sorted order (as torchvision's ``ImageFolder`` does);
label ``i`` is the ``i``-th. A folder holding ``train/`` and ``val/`` (and optionally
``test/``), each with the same class folders, gives those parts as they are; otherwise the
images are split deterministically, stratified by class. Images are resized to
``input_shape`` = (channels, height, width) -- 1 channel reads them as grayscale, 3 as RGB, 4
as RGBA -- or, without it, must all have the first image's size; pixels become float32 in
[0, 1]. Pillow is an optional dependency: ``pip install 'rankshrink[images]'``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..errors import ConfigError, DataError, FileFormatError
from .splits import DEFAULT_FRACTIONS, Splits, split_data, splits_from

__all__ = ["IMAGE_SUFFIXES", "load_image_folder"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
_MODES = {1: "L", 3: "RGB", 4: "RGBA"}
_PARTS = ("train", "val", "test")


def _pillow():
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:
        raise ConfigError("imagefolder: data needs Pillow: pip install 'rankshrink[images]' (or pip install "
                          "pillow).") from None
    return Image, UnidentifiedImageError


def _classes(root: Path) -> list[str]:
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"image folder '{root}' has no class subfolders; expected {root}/<class>/<image>.png.")
    return classes


def _files(root: Path, classes: list[str]) -> tuple[list[Path], list[int]]:
    files, labels = [], []
    for label, name in enumerate(classes):
        found = sorted(p for p in (root / name).iterdir()
                       if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES)
        if not found:
            raise DataError(f"class folder '{root / name}' holds no images ({', '.join(IMAGE_SUFFIXES)}).")
        files += found
        labels += [label] * len(found)
    return files, labels


def _read(files: list[Path], shape: tuple[int, int, int] | None) -> tuple[np.ndarray, tuple[int, int, int]]:
    Image, Unidentified = _pillow()
    arrays = []
    for path in files:
        try:
            with Image.open(path) as image:
                if shape is None:
                    channels = 1 if image.mode in ("L", "1", "I", "I;16", "F") else 4 if "A" in image.mode else 3
                    shape = (channels, image.height, image.width)
                channels, height, width = shape
                image = image.convert(_MODES[channels])
                if (image.height, image.width) != (height, width):
                    image = image.resize((width, height), Image.BILINEAR)
                array = np.asarray(image, dtype=np.float32) / 255.0
        except (Unidentified, OSError, ValueError, SyntaxError) as exc:
            raise FileFormatError(f"image '{path}' cannot be read ({type(exc).__name__}: {exc}); remove or replace "
                                  "it.") from None
        arrays.append(array.reshape(height, width, channels).transpose(2, 0, 1))
    assert shape is not None
    return np.stack(arrays), shape


def _check_shape(input_shape: Sequence[int] | None) -> tuple[int, int, int] | None:
    if input_shape is None:
        return None
    shape = tuple(int(d) for d in input_shape)
    if len(shape) != 3 or shape[0] not in _MODES or min(shape) < 1:
        raise ConfigError(f"imagefolder: --input-shape must be CHANNELS,HEIGHT,WIDTH with 1, 3 or 4 channels, got "
                          f"{','.join(map(str, shape))}.")
    return shape


def _sizes_agree(files: list[Path]) -> None:
    """Without --input-shape every image must have the first one's size (nothing is resized silently)."""
    Image, Unidentified = _pillow()
    first = None
    for path in files:
        try:
            with Image.open(path) as image:
                size = image.size
        except (Unidentified, OSError, ValueError, SyntaxError) as exc:
            raise FileFormatError(f"image '{path}' cannot be read ({type(exc).__name__}: {exc}); remove or replace "
                                  "it.") from None
        if first is None:
            first = (path, size)
        elif size != first[1]:
            raise DataError(f"images differ in size ('{first[0]}' is {first[1][0]}×{first[1][1]}, '{path}' is "
                            f"{size[0]}×{size[1]}); pass --input-shape C,H,W (API: input_shape=) to resize them all.")


def load_image_folder(directory: str | Path, *, input_shape: Sequence[int] | None = None,
                      fractions: Sequence[float] = DEFAULT_FRACTIONS, seed: int = 0) -> Splits:
    """Splits of the images under ``directory`` (see the module notes)."""
    root = Path(directory).expanduser()
    if not root.is_dir():
        raise DataError(f"image folder '{root}' does not exist or is not a directory.")
    shape = _check_shape(input_shape)
    subdirs = {p.name for p in root.iterdir() if p.is_dir()}
    if {"train", "val"} <= subdirs:
        parts = [p for p in _PARTS if p in subdirs]
        classes = _classes(root / "train")
        for part in parts[1:]:
            if _classes(root / part) != classes:
                raise DataError(f"image folder '{root / part}' has other class folders than '{root / 'train'}' "
                                f"({', '.join(_classes(root / part))} vs {', '.join(classes)}).")
        listed = {part: _files(root / part, classes) for part in parts}
        if shape is None:
            _sizes_agree([f for files, _ in listed.values() for f in files])
        data = {}
        for part, (files, labels) in listed.items():
            images, shape = _read(files, shape)
            data[part] = (torch.from_numpy(images), torch.tensor(labels, dtype=torch.long))
        return splits_from(data["train"], data["val"], data.get("test"), num_classes=len(classes), name=root.name)
    classes = _classes(root)
    files, labels = _files(root, classes)
    if shape is None:
        _sizes_agree(files)
    images, _ = _read(files, shape)
    return split_data(torch.from_numpy(images), torch.tensor(labels, dtype=torch.long), fractions=fractions, seed=seed,
                      num_classes=len(classes), name=root.name)
