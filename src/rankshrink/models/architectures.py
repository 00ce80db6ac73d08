"""The reference architectures: the seeds' CIFAR CNN, the LoRA walkthrough's MLP, and a digits CNN."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError

__all__ = ["DigitsCNN", "CifarCNN", "MnistMLP"]


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
