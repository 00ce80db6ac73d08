"""Hugging Face models and tokenizers from a local directory (model SPEC ``hf:DIR``; optional extra ``hf``).

``hf:DIR`` names a directory holding ``config.json`` and the weights (``model.safetensors`` or
``pytorch_model.bin``), as ``save_pretrained`` writes it or a model package ships it. The model is
built with ``transformers.AutoModel.from_pretrained(DIR, local_files_only=True)`` with
``HF_HUB_OFFLINE=1`` set for the call: nothing is ever downloaded, and a directory that lacks a
file fails with a message naming it. ``AutoModel`` gives the bare encoder (e.g. ``BertModel``), whose
output's ``last_hidden_state`` the label-free metrics mean-pool over the real tokens.

:func:`load_hf_tokenizer` reads the tokenizer in the same directory (what ``text:FILE`` data uses).
``rankshrink.load(lambda: load_hf_model(DIR), OUT)`` rebuilds a compressed model.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Iterator

from torch import nn

from ..errors import ConfigError, FileFormatError
from ._scoped import scoped_items

__all__ = ["load_hf_model", "load_hf_tokenizer", "hf_directory", "HF_PREFIX", "INSTALL_HINT"]

HF_PREFIX = "hf:"
INSTALL_HINT = "pip install 'rankshrink[hf]' (it installs transformers)"
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ConfigError(f"hf: models need the transformers package: {INSTALL_HINT}.") from None
    return transformers


@contextlib.contextmanager
def _offline() -> Iterator[None]:
    """HF_HUB_OFFLINE=1 and TRANSFORMERS_OFFLINE=1 for the block: transformers must not reach the network."""
    with scoped_items(os.environ, {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}):
        yield


def hf_directory(spec_or_dir: str | os.PathLike, *, need_weights: bool = True) -> Path:
    """The directory an ``hf:DIR`` spec (or a plain path) names, checked to hold a model."""
    from ..files import require_dir

    text = str(spec_or_dir)
    if text.startswith(HF_PREFIX):
        text = text[len(HF_PREFIX):]
    if not text.strip():
        raise ConfigError("hf: needs a directory, like hf:models/all-MiniLM-L6-v2 (with config.json and weights).")
    directory = require_dir(Path(text.strip()).expanduser(), "Hugging Face model directory",
                            hint="Pass a directory written by save_pretrained (config.json and weights).")
    if not (directory / "config.json").is_file():
        raise FileFormatError(f"Hugging Face model directory '{directory}' has no config.json; pass a directory "
                              "written by save_pretrained.")
    if need_weights and not any((directory / name).is_file() for name in _WEIGHT_FILES):
        raise FileFormatError(f"Hugging Face model directory '{directory}' has no weights "
                              f"({', '.join(_WEIGHT_FILES[::2])}); rankshrink never downloads them.")
    return directory


def load_hf_model(spec_or_dir: str | os.PathLike, **options: Any) -> nn.Module:
    """``AutoModel.from_pretrained(DIR, local_files_only=True)`` offline, in eval mode (float32 unless the
    config says otherwise). ``options`` go to ``from_pretrained``."""
    directory = hf_directory(spec_or_dir)
    transformers = _transformers()
    try:
        with _offline():
            model = transformers.AutoModel.from_pretrained(str(directory), local_files_only=True, **options)
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FileFormatError(f"Hugging Face model directory '{directory}' cannot be loaded offline: {first}") from None
    return model.eval()


def load_hf_tokenizer(spec_or_dir: Any):
    """The tokenizer saved in a model directory (``AutoTokenizer``, offline); a tokenizer object passes through."""
    if not isinstance(spec_or_dir, (str, os.PathLike)):
        if not callable(spec_or_dir):
            raise ConfigError(f"tokenizer must be a model directory or a tokenizer, got {type(spec_or_dir).__name__}.")
        return spec_or_dir
    directory = hf_directory(spec_or_dir, need_weights=False)
    transformers = _transformers()
    try:
        with _offline():
            return transformers.AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FileFormatError(f"the tokenizer in '{directory}' cannot be loaded offline: {first}") from None
