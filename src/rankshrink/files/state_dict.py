"""Loading a state dict from a user's weights file, judged by its content, never by its name.

safetensors, or ``torch.load(weights_only=True)``; a file that needs full pickle runs
code and is refused unless the caller passes ``trust_pickle=True``.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Mapping

import torch

from ..errors import FileFormatError, UnsafeFileError
from .atomic import load_tensors
from .paths import require_file


def sniff_weights_format(path: str | os.PathLike) -> str:
    """What a weights file holds, judged by its first bytes (never by its name).

    'safetensors', 'torch-zip' (``torch.save``'s default format), 'pickle' (a legacy
    ``torch.save`` file or a plain pickle) or 'unknown'.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(9)
    if head[:4] == b"PK\x03\x04":
        return "torch-zip"
    if head[:1] == b"\x80":
        return "pickle"
    if len(head) == 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") <= size - 8:
        return "safetensors"
    return "unknown"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    if not text:
        return type(exc).__name__
    line = text.splitlines()[0]
    sentence = line.split(". ")[0].rstrip(".")
    return sentence[:300]


def check_weights_path(path: str | os.PathLike) -> Path:
    """``path`` if it is a non-empty regular file (what :func:`load_state_dict` reads), checked before any work."""
    path = Path(path)
    if path.is_dir():
        raise FileFormatError(
            f"weights path '{path}' is a directory; pass a .safetensors or .pt file (a directory written by "
            "'rankshrink apply'/'compress' is read by finetune, lora and 'export --compressed').")
    require_file(path, "weights file", hint="Pass a .safetensors or .pt file.")
    if path.stat().st_size == 0:
        raise FileFormatError(f"weights file '{path}' is empty (0 bytes); it was probably not written completely.")
    return path


def _nested_state_dict(obj: Mapping) -> str | None:
    """The key under which a checkpoint dict (``{'model': state_dict, 'epoch': 3}``) keeps a state dict."""
    for key, value in obj.items():
        if (isinstance(value, Mapping) and value and all(isinstance(v, torch.Tensor) for v in value.values())
                and all(isinstance(k, str) for k in value)):
            return str(key)
    return None


def load_state_dict(path: str | os.PathLike, *, trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Load a state dict from a safetensors or PyTorch (``.pt``/``.pth``) file.

    The format is judged from the file's contents, not its name. PyTorch files are read
    with ``weights_only=True``; a file that needs full pickle (for example a whole pickled
    model) is refused with :class:`UnsafeFileError` unless ``trust_pickle`` is set.
    Missing, empty, truncated, corrupt or foreign files raise :class:`FileFormatError`
    naming the file.
    """
    path = check_weights_path(path)
    kind = sniff_weights_format(path)
    if kind == "safetensors" or (kind == "unknown" and path.suffix == ".safetensors"):
        return load_tensors(path)
    if kind == "unknown":
        with open(path, "rb") as handle:
            head = handle.read(16)
        raise FileFormatError(
            f"'{path}' is neither a safetensors file nor a PyTorch weights file (it starts with {head!r}); "
            "pass a state dict saved with safetensors or torch.save(model.state_dict(), ...).")
    try:
        with open(path, "rb") as handle:  # a handle, so torch.load never goes by the file's name
            obj = torch.load(handle, map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError as exc:
        if trust_pickle:
            raise FileFormatError(f"'{path}' could not be unpickled ({_first_line(exc)}).") from None
        raise UnsafeFileError(
            f"'{path}' needs full pickle to load, which can run arbitrary code. Save a "
            "state_dict (torch.save(model.state_dict(), ...)) or a .safetensors file instead, "
            "or pass --trust-pickle (API: trust_pickle=True) if you trust where the file came from."
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as exc:
        raise FileFormatError(
            f"'{path}' is not a readable PyTorch weights file ({type(exc).__name__}: {_first_line(exc)}); "
            "it may be truncated or corrupt."
        ) from None
    except Exception as exc:  # trusted full pickle: any error of the pickled code
        if not trust_pickle:
            raise
        raise FileFormatError(f"'{path}' could not be loaded even with --trust-pickle "
                              f"({type(exc).__name__}: {_first_line(exc)}).") from None
    if isinstance(obj, torch.nn.Module):
        obj = obj.state_dict()
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if isinstance(obj, Mapping) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        inner = _nested_state_dict(obj)
        if inner is not None:
            keys = ", ".join(repr(str(k)) for k in list(obj)[:6]) + (", ..." if len(obj) > 6 else "")
            raise FileFormatError(
                f"'{path}' holds a checkpoint dict (keys {keys}), not a state dict; the state dict is under "
                f"{inner!r}. Extract it with: python -c \"import torch; torch.save(torch.load('{path}', "
                f"weights_only=True)[{inner!r}], 'state_dict.pt')\" and pass state_dict.pt.")
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise FileFormatError(
            f"'{path}' does not hold a state dict (a mapping of names to tensors); "
            f"found {type(obj).__name__}."
        )
    return dict(obj)

