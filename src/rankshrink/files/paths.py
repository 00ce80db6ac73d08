"""What a path is, in words, so a refusal says "is a FIFO" rather than "does not exist".

Every input a command reads is checked with :func:`require_file` or :func:`require_dir`
before it is opened: opening a FIFO blocks, ``/dev/zero`` never ends, and a directory
given as a file (or the reverse) deserves its own message.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from ..errors import FileFormatError, RankshrinkError

__all__ = ["path_kind", "require_file", "require_dir", "is_regular_file"]


def path_kind(path: str | os.PathLike) -> str:
    """'missing', 'file', 'directory', 'FIFO (named pipe)', 'character device', 'block device', 'socket',
    'broken symbolic link' or 'special file' (symbolic links are followed)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "broken symbolic link" if os.path.islink(path) else "missing"
    except NotADirectoryError:
        return "missing"
    except OSError as exc:
        return f"unreadable path ({exc.strerror or exc})"
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "directory"
    if stat.S_ISFIFO(mode):
        return "FIFO (named pipe)"
    if stat.S_ISCHR(mode):
        return "character device"
    if stat.S_ISBLK(mode):
        return "block device"
    if stat.S_ISSOCK(mode):
        return "socket"
    return "special file"


def is_regular_file(path: str | os.PathLike) -> bool:
    """A regular file, and not a symbolic link (for names read from files, which must stay in their directory)."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def _article(kind: str) -> str:
    return "an" if kind[0] in "aeiou" else "a"


def require_file(path: str | os.PathLike, what: str, *, hint: str = "",
                 error: type[RankshrinkError] = FileFormatError) -> Path:
    """``path`` if it is (a link to) a regular file; else ``error``: "<what> '<path>' does not exist" or
    "... is a <kind>, not a file", followed by ``hint``."""
    path = Path(path)
    kind = path_kind(path)
    if kind == "file":
        return path
    tail = f" {hint}" if hint else ""
    if kind == "missing":
        raise error(f"{what} '{path}' does not exist.{tail}")
    raise error(f"{what} '{path}' is {_article(kind)} {kind}, not a regular file.{tail}")


def require_dir(path: str | os.PathLike, what: str, *, hint: str = "",
                error: type[RankshrinkError] = FileFormatError) -> Path:
    """``path`` if it is (a link to) a directory; else ``error`` saying what it is instead."""
    path = Path(path)
    kind = path_kind(path)
    if kind == "directory":
        return path
    tail = f" {hint}" if hint else ""
    if kind == "missing":
        raise error(f"{what} '{path}' does not exist.{tail}")
    raise error(f"{what} '{path}' is {_article(kind)} {kind}, not a directory.{tail}")
