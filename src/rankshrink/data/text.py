"""Text data: ``text:FILE``, one sample per line, tokenized with a model's own tokenizer.

Each non-empty line of the (UTF-8) file is one sample. The lines are tokenized with the tokenizer of
the model directory (``hf:DIR``: the CLI passes it; the API takes ``tokenizer=`` a directory or a
tokenizer), truncated to ``max_length`` tokens (default 128) and padded to the longest line kept, so
every sample has the same shape; each batch is cut after its own longest line when it runs.
The samples are unlabelled dict inputs -- ``input_ids`` and
``attention_mask``, plus ``token_type_ids`` when the tokenizer produces them for its model -- passed
to the model as keyword arguments; the attention mask keeps padding out of calibration statistics,
out of the label-free metrics' mean pooling and out of distillation. The lines are split
deterministically into train, validation and test parts (``fractions``, default 0.8/0.1/0.1, seeded).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from ..errors import ConfigError, DataError, FileFormatError
from .splits import DEFAULT_FRACTIONS, Splits, split_data

__all__ = ["load_text", "TEXT_PREFIX", "DEFAULT_MAX_LENGTH", "read_lines", "tokenize_lines"]

TEXT_PREFIX = "text:"
DEFAULT_MAX_LENGTH = 128
_TOKEN_KEYS = ("input_ids", "attention_mask", "token_type_ids")


def read_lines(path: str | Path) -> list[str]:
    """The non-empty lines of a UTF-8 text file, stripped."""
    from ..files import require_file

    path = require_file(Path(path).expanduser(), "text data file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise FileFormatError(f"text data file '{path}' is not UTF-8 text (byte {exc.start}); save it as UTF-8, "
                              "one sample per line.") from None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) < 2:
        raise DataError(f"text data file '{path}' has {len(lines)} non-empty line(s); it needs one sample per line "
                        "and at least two (a training and a validation part).")
    return lines


def tokenize_lines(lines: Sequence[str], tokenizer: Any,
                   max_length: int = DEFAULT_MAX_LENGTH) -> dict[str, torch.Tensor]:
    """``tokenizer(lines)`` padded to the longest kept line (at most ``max_length`` tokens), as int64 tensors."""
    from ..validation import check_int

    check_int(max_length, "max_length", minimum=2)
    try:
        encoded = tokenizer(list(lines), padding="longest", truncation=True, max_length=max_length,
                            return_tensors="pt")
    except Exception as exc:  # a tokenizer is third-party code: any failure is a data problem to name
        raise DataError(f"the tokenizer failed on the text: {type(exc).__name__}: {exc}") from None
    wanted = getattr(tokenizer, "model_input_names", None) or list(_TOKEN_KEYS)
    inputs = {key: torch.as_tensor(encoded[key]).to(torch.int64).contiguous()
              for key in _TOKEN_KEYS if key in encoded and key in wanted}
    if "input_ids" not in inputs or "attention_mask" not in inputs:
        raise DataError("the tokenizer returned no input_ids/attention_mask; text: data needs a Hugging Face "
                        "tokenizer.")
    return inputs


def load_text(path: str | Path, tokenizer: Any = None, *, max_length: int = DEFAULT_MAX_LENGTH,
              fractions: Sequence[float] = DEFAULT_FRACTIONS, seed: int = 0) -> Splits:
    """Splits of the lines of ``path`` tokenized by ``tokenizer`` (a model directory or a tokenizer object)."""
    if tokenizer is None:
        raise ConfigError(f"text data '{path}' needs a tokenizer: use it with an hf:DIR model (whose tokenizer is "
                          "used), or pass tokenizer= (a model directory or a tokenizer).")
    from ..models.hf import load_hf_tokenizer

    lines = read_lines(path)
    inputs = tokenize_lines(lines, load_hf_tokenizer(tokenizer), max_length)
    return split_data(inputs, None, fractions=fractions, seed=seed, name=f"text:{Path(path).name}",
                      trim_key="attention_mask")
