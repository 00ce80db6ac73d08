"""Training LoRA adapters with rankshrink's one training loop (:func:`rankshrink.train.train`).

Only the adapters' A and B matrices are handed to the optimizer; every base weight is
frozen for the run and comes out bit-identical. Progress, validation, early stopping
(``patience``), keep-best and resumable checkpoints are the loop's own.
"""

from __future__ import annotations

from typing import Any, Sequence

from torch import nn
from torch.utils.data import Dataset

from .model import adapter_parameters


def train_adapter(model: nn.Module, train_data: Dataset, *, adapter: str | Sequence[str] | None = None,
                  val_data: Dataset | None = None, epochs: int = 10, lr: float = 5e-3, **train_kwargs: Any):
    """Train adapter(s) ``adapter`` (default: the active ones) of ``model`` in place.

    ``model`` comes from :func:`rankshrink.lora.add_adapters` (or ``load_adapter(...,
    trainable=True)``). Other keywords go to :func:`rankshrink.train.train`
    (``batch_size``, ``optimizer``, ``schedule``, ``patience``, ``teacher``,
    ``checkpoint_dir``, ``progress``, ``seed``, ...). Returns its ``TrainResult``.
    The default learning rate, 5e-3, is the seeds' LoRA setting; adapters start at
    zero and usually want a larger step than full fine-tuning.
    """
    from ..train import train

    if "parameters" in train_kwargs:
        raise TypeError("train_adapter chooses the parameters itself (the adapters); pass adapter= instead.")
    params = adapter_parameters(model, adapter)
    for p in params:
        p.requires_grad_(True)
    return train(model, train_data, val_data=val_data, epochs=epochs, lr=lr, parameters=params, **train_kwargs)
