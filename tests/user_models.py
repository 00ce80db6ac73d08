"""Models a user would bring, built in the tests (also usable as CLI model SPECs: ``tests/user_models.py:NAME``).

Each takes scikit-learn's 8×8 digits in some form:

* :class:`ResNetish` -- BatchNorm, residual additions, a stride-2, a depthwise and a dilated conv;
* :class:`KeywordSpotter` -- the image rows as a 1-D signal: Conv1d ``padding='same'``, a
  strided Conv1d and a GRU;
* :class:`TiedMLP` -- first and last Linear share one weight, the middle layer is called twice;
* :class:`ImageAndSide` -- an image plus a side feature vector, as two arguments or one dict;
* :class:`Attention` -- token ids through an Embedding, ``MultiheadAttention``, a functional
  ``scaled_dot_product_attention`` and ``matmul``s.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ResNetish(nn.Module):
    def __init__(self, width: int = 8, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.conv1 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=2, dilation=2)
        self.bn2 = nn.BatchNorm2d(width)
        self.down = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)
        self.depthwise = nn.Conv2d(2 * width, 2 * width, 3, padding=1, groups=2 * width)
        self.bn3 = nn.BatchNorm2d(2 * width)
        self.head = nn.Linear(2 * width, classes)

    def forward(self, x):
        x = self.stem(x)
        x = F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))  # residual
        x = F.relu(self.bn3(self.depthwise(F.relu(self.down(x)))))
        return self.head(x.mean((2, 3)))


class KeywordSpotter(nn.Module):
    """The 64 pixels of a digit as a 1-channel signal of length 64."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv1d(1, 16, 5, padding="same")
        self.conv2 = nn.Conv1d(16, 32, 3, stride=2, padding=1)
        self.conv3 = nn.Conv1d(32, 32, 3, stride=2, padding=1)
        self.gru = nn.GRU(32, 24, batch_first=True)
        self.head = nn.Linear(24, classes)

    def forward(self, x):
        h = F.relu(self.conv3(F.relu(self.conv2(F.relu(self.conv1(x.reshape(len(x), 1, -1)))))))
        out, _ = self.gru(h.transpose(1, 2))
        return self.head(out.mean(1))


class TiedMLP(nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()
        self.first = nn.Linear(64, 64)
        self.middle = nn.Linear(64, 64)
        self.last = nn.Linear(64, 64)
        self.last.weight = self.first.weight  # tied
        self.head = nn.Linear(64, classes)

    def forward(self, x):
        h = F.relu(self.first(x.flatten(1)))
        h = F.relu(self.middle(h))
        h = F.relu(self.middle(h))  # the same layer twice
        return self.head(F.relu(self.last(h)))


class ImageAndSide(nn.Module):
    """forward(image, side): an (N, 1, 8, 8) image and an (N, 4) vector of side features."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.conv = nn.Conv2d(1, 12, 3, padding=1)
        self.bn = nn.BatchNorm2d(12)
        self.conv2 = nn.Conv2d(12, 16, 3, padding=1)
        self.side = nn.Linear(4, 8)
        self.fc = nn.Linear(16 * 16 + 8, 48)
        self.head = nn.Linear(48, classes)

    def forward(self, image, side):
        h = F.max_pool2d(F.relu(self.conv2(F.relu(self.bn(self.conv(image))))), 2).flatten(1)
        return self.head(F.relu(self.fc(torch.cat([h, F.relu(self.side(side))], 1))))


class Attention(nn.Module):
    """forward(ids): token ids (N, L) -> logits, through attention of three kinds."""

    def __init__(self, vocab: int = 17, dim: int = 16, classes: int = 10):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.attn = nn.MultiheadAttention(dim, 4, batch_first=True)
        self.query = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, ids):
        h = self.embed(ids)
        h = h + self.attn(h, h, h)[0]
        q = self.query(h)
        h = h + F.scaled_dot_product_attention(q.unsqueeze(1), h.unsqueeze(1), h.unsqueeze(1)).squeeze(1)
        scores = torch.softmax(torch.matmul(q, h.transpose(1, 2)) / 4.0, -1)
        return self.head((scores @ h).mean(1))


def side_features(images: torch.Tensor) -> torch.Tensor:
    """Four cheap features of each (N, 1, 8, 8) digit: mean, spread, centre and top-row ink."""
    flat = images.flatten(1)
    return torch.stack([flat.mean(1), flat.std(1), images[:, 0, 3:5, 3:5].mean((1, 2)), images[:, 0, 0].mean(1)], 1)


def _seeded(cls):
    def make():
        torch.manual_seed(0)
        return cls().eval()
    make.__name__ = f"make_{cls.__name__}"
    return make


make_resnetish = _seeded(ResNetish)
make_keyword_spotter = _seeded(KeywordSpotter)
make_tied = _seeded(TiedMLP)
make_image_and_side = _seeded(ImageAndSide)
make_attention = _seeded(Attention)
