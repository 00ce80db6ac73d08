"""Atomic writes: a reader (or a rerun after a crash, SIGKILL included) sees the old file or the new one.

Every output is written to a temporary file in the destination directory, flushed to
disk and renamed over the destination; the rename is flushed too.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch

from ..errors import ConfigError, DiskFullError, FileFormatError
from .paths import require_file


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it over ``path`` on success.

    On any exception the temporary file is removed and ``path`` is left untouched.
    """
    path = Path(path)
    _make_parent(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        try:
            yield tmp_path
            with open(tmp_path, "rb+") as handle:  # make the bytes durable before the rename
                os.fsync(handle.fileno())
            os.chmod(tmp_path, _file_mode(path))  # mkstemp makes 0600; give the usual permissions
            os.replace(tmp_path, path)
            fsync_dir(path.parent)  # make the rename itself durable
        except Exception as exc:
            if is_disk_full(exc, path.parent):  # judged before the partial file is removed and frees space
                raise DiskFullError(no_space_message(path.parent, path.name)) from None
            raise
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def no_space_message(directory: str | os.PathLike, name: str) -> str:
    return (f"no space left on {directory} (while writing {name}); free some space and rerun. "
            "Files written there before are intact.")


# Writers that do not pass errno on: safetensors ("... (os error 28)") and torch.save, whose zip
# writer only notices the short write later ("unexpected pos 576 vs 534", "file write failed").
_NO_SPACE_TEXT = ("No space left on device", "os error 28", "Disk quota exceeded", "os error 122")
_SHORT_WRITE_TEXT = ("unexpected pos", "file write failed")


def is_disk_full(exc: BaseException, directory: str | os.PathLike) -> bool:
    """Whether ``exc``, raised while writing into ``directory``, means the file system is full."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, DiskFullError):
            return True
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(text in str(seen) for text in _NO_SPACE_TEXT):
            return True
        seen = seen.__cause__ or seen.__context__
    if any(text in str(exc) for text in _SHORT_WRITE_TEXT):
        try:
            free = os.statvfs(directory)
        except OSError:
            return False
        return free.f_bavail * free.f_frsize < (1 << 20)
    return False


def _make_parent(path: Path) -> None:
    for ancestor in [path.parent, *path.parent.parents]:
        if ancestor.exists():
            if not ancestor.is_dir():
                raise ConfigError(f"cannot write '{path}': '{ancestor}' is a file, not a directory; "
                                  "choose another output path.")
            break
    path.parent.mkdir(parents=True, exist_ok=True)


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a directory's entries (renames, new files) to disk; a no-op where unsupported."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


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


def read_json(path: str | os.PathLike, what: str = "JSON file", *, max_bytes: int | None = None) -> Any:
    """Parse a JSON file; any problem (not a regular file, larger than ``max_bytes``, not UTF-8,
    not JSON, nested too deeply, a number too long) is a :class:`FileFormatError` naming it."""
    path = require_file(path, what)
    if max_bytes is not None and path.stat().st_size > max_bytes:
        raise FileFormatError(f"{what} '{path}' is {path.stat().st_size:,} bytes, more than the {max_bytes:,} "
                              "such a file can hold; it is not one rankshrink wrote.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise FileFormatError(f"{what} '{path}' is not valid JSON ({exc}).") from None
    return parse_json(text, f"{what} '{path}'")


def parse_json(text: str, source: str) -> Any:
    """``json.loads`` with every failure, the pathological ones included, as one :class:`FileFormatError`."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise FileFormatError(f"{source} is not valid JSON ({exc}).") from None
    except RecursionError:
        raise FileFormatError(f"{source} nests lists or objects too deeply to read; no file rankshrink reads "
                              "is nested more than a few levels.") from None
    except ValueError as exc:  # an integer of more than sys.get_int_max_str_digits() digits
        detail = str(exc).split(";")[0]
        raise FileFormatError(f"{source} holds a number too long to read ({detail}); no value rankshrink "
                              "reads is that long.") from None


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

    path = require_file(path, "weights file")
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise FileFormatError(
            f"'{path}' is not a readable safetensors file ({exc}); it may be truncated or "
            "of another format."
        ) from None



def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
