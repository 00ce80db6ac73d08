"""Embedded-sized reference networks, shaped like the MLPerf Tiny reference models.

* :class:`ResNet8` -- image classification, 32×32×3 (MLPerf Tiny's ResNet-8: three residual
  stacks of 16/32/64 filters; about 12.5 M MACs).
* :class:`DSCNN` -- keyword spotting, 49×10 MFCCs, 1 channel (DS-CNN-S: a 10×4 stride-2 conv and
  four depthwise-separable blocks of 64 channels; about 2.7 M MACs).
* :class:`MobileNetV1` -- visual wake words, 96×96×3, width 0.25 (about 7.5 M MACs).
* :class:`FCAutoencoder` -- anomaly detection, 640 inputs: 640→128×4→8→128×4→640 dense layers with
  batch norm (about 0.26 M MACs); :class:`AnomalyDetector` puts a score head on it.
* :class:`WideMLP` -- the seeds' wide MLP, 8192 FFT coefficients → 128 → 10 (about 1.05 M MACs).

The layer structure follows the MLPerf Tiny reference code (Keras ``padding='same'`` becomes
the symmetric padding that gives the same output size); weights are trained here on offline data.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError

__all__ = ["ResNet8", "DSCNN", "MobileNetV1", "FCAutoencoder", "AnomalyDetector", "WideMLP"]


def _conv_bn(cin: int, cout: int, kernel, stride=1, padding=0, groups: int = 1, relu: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, groups=groups,
                                         bias=False), nn.BatchNorm2d(cout)]
    if relu:
        layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class _ResidualStack(nn.Module):
    """conv3×3 (stride s) → BN → ReLU → conv3×3 → BN, plus the input (a strided 1×1 conv when the shape changes)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = _conv_bn(cin, cout, 3, stride, 1)
        self.conv2 = _conv_bn(cout, cout, 3, 1, 1, relu=False)
        self.shortcut = nn.Conv2d(cin, cout, 1, stride=stride) if stride != 1 or cin != cout else nn.Identity()
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.shortcut(x) + self.conv2(self.conv1(x)))


class ResNet8(nn.Module):
    """MLPerf Tiny's ResNet-8 for 32×32 images: stem conv 16, stacks of 16, 32 (stride 2), 64 (stride 2), pool, fc."""

    def __init__(self, input_shape: tuple[int, int, int] = (3, 32, 32), num_classes: int = 10) -> None:
        super().__init__()
        channels, height, width = input_shape
        if height < 4 or width < 4:
            raise ConfigError(f"ResNet8 needs images of at least 4×4 pixels, got {height}×{width}.")
        self.stem = _conv_bn(channels, 16, 3, 1, 1)
        self.stack1 = _ResidualStack(16, 16, 1)
        self.stack2 = _ResidualStack(16, 32, 2)
        self.stack3 = _ResidualStack(32, 64, 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stack3(self.stack2(self.stack1(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


def _separable(cin: int, cout: int, stride: int) -> nn.Sequential:
    """Depthwise 3×3 (stride) → BN → ReLU → pointwise 1×1 → BN → ReLU."""
    return nn.Sequential(_conv_bn(cin, cin, 3, stride, 1, groups=cin), _conv_bn(cin, cout, 1))


class DSCNN(nn.Module):
    """DS-CNN-S for keyword spotting on (1, 49, 10) MFCCs: conv 64 (10×4, stride 2), 4 separable blocks, pool, fc."""

    def __init__(self, input_shape: tuple[int, int, int] = (1, 49, 10), num_classes: int = 12,
                 filters: int = 64) -> None:
        super().__init__()
        channels, height, width = input_shape
        if height < 10 or width < 4:
            raise ConfigError(f"DSCNN needs inputs of at least 10×4 (frames × coefficients), got {height}×{width}.")
        # Keras 'same' with a 10×4 kernel and stride 2: 49×10 → 25×5; padding (5, 1) gives that size.
        self.stem = nn.Sequential(_conv_bn(channels, filters, (10, 4), 2, (5, 1)), nn.Dropout(0.2))
        self.blocks = nn.Sequential(*[_separable(filters, filters, 1) for _ in range(4)])
        self.head = nn.Sequential(nn.Dropout(0.4), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(filters, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.head(self.blocks(self.stem(x))))


# (output channels at width 1.0, stride) of MobileNetV1's 13 separable blocks
_MOBILENET_BLOCKS = ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), (512, 1), (512, 1), (512, 1),
                     (512, 1), (512, 1), (1024, 2), (1024, 1))


class MobileNetV1(nn.Module):
    """MobileNetV1 at width ``alpha`` (0.25 as in MLPerf Tiny's visual wake words, on 96×96×3)."""

    def __init__(self, input_shape: tuple[int, int, int] = (3, 96, 96), num_classes: int = 2,
                 alpha: float = 0.25) -> None:
        super().__init__()
        channels, height, width = input_shape
        if height < 32 or width < 32:
            raise ConfigError(f"MobileNetV1 halves the image 5 times; it needs at least 32×32 pixels, got "
                              f"{height}×{width}.")
        widths = [max(8, int(c * alpha)) for c, _ in _MOBILENET_BLOCKS]
        first = max(8, int(32 * alpha))
        self.stem = _conv_bn(channels, first, 3, 2, 1)
        blocks, cin = [], first
        for cout, (_, stride) in zip(widths, _MOBILENET_BLOCKS):
            blocks.append(_separable(cin, cout, stride))
            cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.blocks(self.stem(x))), 1))


def _dense_bn(n_in: int, n_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(n_in, n_out), nn.BatchNorm1d(n_out), nn.ReLU())


class FCAutoencoder(nn.Module):
    """MLPerf Tiny's anomaly-detection autoencoder: 640→128×4→8→128×4→640 (dense, batch norm, ReLU)."""

    def __init__(self, num_features: int = 640, hidden: int = 128, bottleneck: int = 8) -> None:
        super().__init__()
        self.encoder = nn.Sequential(_dense_bn(num_features, hidden), *[_dense_bn(hidden, hidden) for _ in range(3)],
                                     _dense_bn(hidden, bottleneck))
        self.decoder = nn.Sequential(_dense_bn(bottleneck, hidden), *[_dense_bn(hidden, hidden) for _ in range(3)],
                                     nn.Linear(hidden, num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(torch.flatten(x, 1)))


class AnomalyDetector(nn.Module):
    """An :class:`FCAutoencoder` with its anomaly score as two logits (normal, anomalous).

    The score is the log of the mean squared reconstruction error; ``logits = (−z/2, z/2)``
    with ``z = scale·(log error − threshold)`` (``scale`` and ``threshold`` learnt), so the
    detector trains, is measured and is compressed like a classifier, and its ONNX graph
    ends in the score a device thresholds.
    """

    def __init__(self, num_features: int = 640) -> None:
        super().__init__()
        self.autoencoder = FCAutoencoder(num_features)
        self.scale = nn.Parameter(torch.tensor(2.0))
        self.threshold = nn.Parameter(torch.tensor(-3.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(x, 1)
        error = (self.autoencoder(x) - x).pow(2).mean(dim=1)
        z = self.scale * (torch.log(error + 1e-8) - self.threshold)
        return torch.stack((-0.5 * z, 0.5 * z), dim=1)


class WideMLP(nn.Module):
    """The seeds' wide MLP: 8192 FFT coefficients → 128 → classes (inputs are flattened)."""

    def __init__(self, num_features: int = 8192, hidden: int = 128, num_classes: int = 10) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(num_features, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(torch.flatten(x, 1))
