"""Argument helpers and table printing shared by the command modules."""

from __future__ import annotations

import argparse
import re
import sys
from typing import Any, Sequence

from ..errors import ConfigError

_BYTE_UNITS = {"": 1, "B": 1, "KB": 1000, "MB": 1000**2, "GB": 1000**3,
               "KIB": 1024, "MIB": 1024**2, "GIB": 1024**3}


def parse_ratio(text: str, what: str = "ratio") -> float:
    """'0.5' or '50%' -> 0.5; must lie in (0, 1]."""
    raw = text.strip()
    try:
        value = float(raw[:-1]) / 100 if raw.endswith("%") else float(raw)
    except ValueError:
        raise ConfigError(f"{what} must be a number like 0.5 or 50%, got {text!r}.") from None
    if not 0 < value <= 1:
        raise ConfigError(f"{what} must be in (0, 1] (or 0%..100%), got {text!r}.")
    return value


def parse_bytes(text: str, what: str = "size") -> int:
    """'256KB', '1.5MB', '4096', '2MiB' -> bytes (KB = 1000, KiB = 1024)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).upper() if match else None
    if not match or unit not in _BYTE_UNITS:
        raise ConfigError(f"{what} must be a size like 4096, 256KB, 1.5MB or 2MiB, got {text!r}.")
    value = int(float(match.group(1)) * _BYTE_UNITS[unit])
    if value <= 0:
        raise ConfigError(f"{what} must be positive, got {text!r}.")
    return value


def add_model_arguments(parser: argparse.ArgumentParser, *, model_default: str | None = None) -> None:
    parser.add_argument("--model", default=model_default, required=model_default is None,
                        help="builtin:digits-cnn | builtin:cifar-cnn | builtin:mnist-mlp | path/to/file.py:factory")
    parser.add_argument("--weights", help="state dict as .safetensors or .pt (loaded with weights_only=True)")
    parser.add_argument("--trust-pickle", action="store_true",
                        help="allow .pt files that need full pickle (runs code from the file: only for files you "
                             "trust)")


def add_layer_arguments(parser: argparse.ArgumentParser) -> None:
    """``--layers`` / ``--exclude``: glob patterns over qualified layer names (comma-separated or repeated)."""
    parser.add_argument("--layers", action="append", metavar="PATTERNS",
                        help="only these layers: glob patterns over qualified names, comma-separated or repeated "
                             "(features.*,classifier.1)")
    parser.add_argument("--exclude", action="append", metavar="PATTERNS",
                        help="leave these layers alone: glob patterns over qualified names (e.g. '*.downsample.*')")


def layer_patterns(args: argparse.Namespace) -> tuple[list[str] | None, list[str] | None]:
    """(include, exclude) pattern lists from ``--layers`` / ``--exclude`` (None when not given)."""
    def split(values):
        if not values:
            return None
        patterns = [part.strip() for value in values for part in value.split(",") if part.strip()]
        if not patterns:
            raise ConfigError("--layers/--exclude need at least one pattern, like features.* or classifier.1.")
        return patterns

    return split(getattr(args, "layers", None)), split(getattr(args, "exclude", None))


def format_count(value: float) -> str:
    """1234567 -> '1.23M'."""
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= size:
            return f"{value / size:.2f}{unit}"
    return f"{value:g}" if isinstance(value, float) else str(value)


def format_bytes(value: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if value >= size:
            return f"{value / size:.2f} {unit}"
    return f"{int(value)} B"


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], file=None) -> None:
    """A plain aligned text table (numbers right-aligned)."""
    file = file or sys.stdout
    cells = [[str(c) for c in headers]] + [["" if v is None else str(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    numeric = [all(_is_number(r[i]) for r in cells[1:] if r[i]) for i in range(len(headers))]

    def line(row):
        return "  ".join(c.rjust(w) if num else c.ljust(w) for c, w, num in zip(row, widths, numeric)).rstrip()

    print(line(cells[0]), file=file)
    print("  ".join("-" * w for w in widths), file=file)
    for row in cells[1:]:
        print(line(row), file=file)


def _is_number(text: str) -> bool:
    return bool(re.fullmatch(r"-?[0-9.,]+[kMG%x]?", text))
