"""Safe file input/output: atomic writes and pickle-free weight loading.

Outputs are written to a temporary file in the destination directory, flushed to
disk and renamed over the destination, so a reader (or a rerun after a crash,
SIGKILL included) sees either the old complete file or the new complete one.
Weights are read with safetensors or ``torch.load(weights_only=True)``; full
pickles run code and are refused unless the caller passes ``trust_pickle=True``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch

from .errors import ConfigError, FileFormatError, UnsafeFileError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it over ``path`` on success.

    On any exception the temporary file is removed and ``path`` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as handle:  # make the bytes durable before the rename
            os.fsync(handle.fileno())
        os.chmod(tmp_path, _file_mode(path))  # mkstemp makes 0600; give the usual permissions
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _file_mode(path: Path) -> int:
    """The existing file's mode, or what a plain open() would give under the umask."""
    if path.exists():
        return path.stat().st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike, what: str = "JSON file") -> Any:
    path = Path(path)
    if not path.is_file():
        raise FileFormatError(f"{what} '{path}' does not exist.")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FileFormatError(f"{what} '{path}' is not valid JSON ({exc}).") from None


def save_tensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor],
                 metadata: Mapping[str, str] | None = None) -> None:
    """Write tensors as safetensors, atomically. Shared storage is cloned apart."""
    from safetensors.torch import save_file

    contiguous = {name: t.detach().contiguous().clone() for name, t in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(contiguous, str(tmp), metadata=dict(metadata) if metadata else None)


def load_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a safetensors file into CPU tensors, with a clear error if it is not one."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileFormatError(f"weights file '{path}' does not exist.")
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise FileFormatError(
            f"'{path}' is not a readable safetensors file ({exc}); it may be truncated or "
            "of another format."
        ) from None


def load_state_dict(path: str | os.PathLike, *, trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Load a state dict from ``.safetensors`` or a ``.pt``/``.pth`` file.

    ``.pt`` files are read with ``weights_only=True``; a file that needs full pickle
    (for example a whole pickled model) is refused unless ``trust_pickle`` is set.
    """
    path = Path(path)
    if not path.is_file():
        raise FileFormatError(f"weights file '{path}' does not exist.")
    if path.stat().st_size == 0:
        raise FileFormatError(f"weights file '{path}' is empty.")
    if path.suffix == ".safetensors":
        return load_tensors(path)
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError as exc:
        if trust_pickle:
            raise FileFormatError(f"'{path}' could not be unpickled ({exc}).") from None
        raise UnsafeFileError(
            f"'{path}' needs full pickle to load, which can run arbitrary code. Save a "
            "state_dict (torch.save(model.state_dict(), ...)) or a .safetensors file instead, "
            "or pass --trust-pickle (API: trust_pickle=True) if you trust where the file came from."
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as exc:
        raise FileFormatError(
            f"'{path}' is not a readable PyTorch weights file ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else 'no detail'}); it may be truncated or of "
            "another format."
        ) from None
    if isinstance(obj, torch.nn.Module):
        obj = obj.state_dict()
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise FileFormatError(
            f"'{path}' does not hold a state dict (a mapping of names to tensors); "
            f"found {type(obj).__name__}."
        )
    return dict(obj)


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_output_dir(path: str | os.PathLike, *, force: bool = False) -> Path:
    """Refuse an output path that is a file, or a non-empty directory without ``force``.

    Creates nothing, so a command can check before it starts long work.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"output path '{path}' exists and is not a directory; choose another --out.")
    if path.is_dir() and any(path.iterdir()) and not force:
        raise ConfigError(
            f"output directory '{path}' is not empty; pass --force (API: force=True) to replace "
            "rankshrink's own files in it, or choose another --out."
        )
    return path


def prepare_output_dir(path: str | os.PathLike, *, force: bool = False) -> Path:
    """:func:`check_output_dir`, then create the directory. With ``force`` only the files
    a command writes are replaced; everything else in the directory is left alone."""
    path = check_output_dir(path, force=force)
    path.mkdir(parents=True, exist_ok=True)
    return path


def user_cache_dir() -> Path:
    """rankshrink's cache root: $RANKSHRINK_CACHE, else $XDG_CACHE_HOME/rankshrink, else ~/.cache/rankshrink."""
    explicit = os.environ.get("RANKSHRINK_CACHE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "rankshrink"
