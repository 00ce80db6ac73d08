"""Multi-file outputs as one verifiable set, and the rules for output directories.

The files are written into a sibling staging directory; a new or empty output directory is
then replaced by it in one rename, and a non-empty one (``force``) gets its files moved in
with ``summary.json`` last, from a staging directory marked complete first, so that a run
killed half-way is rolled forward by the next *writer* of that directory
(:func:`recover_output_dir`) rather than leaving a mix. ``summary.json`` records the sha256
and size of every other file of the set; :func:`verify_output_set` checks them.

Hostile folders (an archive with a planted staging sibling, a summary listing other paths):

* names read from a completion marker or a summary are data, never paths: only plain file
  names (letters, digits, ``._+-``; no separators, no ``..``) of regular files inside the
  set are moved or hashed, never symbolic links, FIFOs or devices, and a file is hashed
  only up to the size its summary records;
* a command that only reads a directory never writes to it: :func:`verify_output_set`
  rolls nothing forward and deletes nothing (it refuses a set whose replacement was cut short);
* one writer at a time: :func:`output_lock` takes an ``fcntl`` lock on a hidden sibling
  ``.<dir>.rankshrink-lock``; a second writer exits with "DIR is being written by another
  rankshrink (pid N)". The kernel drops the lock when a process dies, SIGKILL included.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import stat
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

from ..errors import ConfigError, DiskFullError, FileFormatError, OutputBusyError
from .atomic import atomic_write_json, fsync_dir, no_space_message, read_json
from .paths import path_kind

try:  # POSIX; elsewhere output directories are not locked
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

SUMMARY_FILE = "summary.json"
_STAGING_SUFFIX = ".rankshrink-staging"
_LOCK_SUFFIX = ".rankshrink-lock"
_COMMIT_MARKER = ".rankshrink-complete"
# Temporary files left by atomic_path when a process is killed: ".<name>.<8 random>.tmp".
_STALE_TEMP = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")
# What a name in a marker or summary may be: one plain file name, nothing a path could hide in.
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]{0,199}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
MAX_SUMMARY_BYTES = 64 << 20
_MAX_MARKER_BYTES = 1 << 20

__all__ = ["SUMMARY_FILE", "check_output_dir", "prepare_output_dir", "staging_path", "lock_path", "output_lock",
           "recover_output_dir", "output_set", "verify_output_set", "is_plain_name", "real_output_dir"]


def is_plain_name(name: Any) -> bool:
    """A plain file name of an output set: no separator, not '.' or '..', no leading dot, at most 200 characters."""
    return isinstance(name, str) and _PLAIN_NAME.fullmatch(name) is not None and ".." not in name


def real_output_dir(path: str | os.PathLike) -> Path:
    """Where an output directory really is: a symbolic link to it (or above it) resolved, even a dangling one."""
    return Path(os.path.realpath(os.path.abspath(os.fspath(path))))


def _lstat_kind(path: Path) -> str:
    """What ``path`` itself is (a symbolic link is not followed)."""
    try:
        mode = os.lstat(path).st_mode
    except OSError:  # missing, or below something that is not a directory
        return "missing"
    if stat.S_ISLNK(mode):
        return "symbolic link"
    return path_kind(path)


def check_output_dir(path: str | os.PathLike, *, force: bool = False) -> Path:
    """Refuse an output path that is a file, or a non-empty directory without ``force``.

    A symbolic link is judged by what it points to (a link to a missing directory is fine:
    the directory is created there). Creates nothing, so a command can check before it
    starts long work.
    """
    path = Path(path)
    real = real_output_dir(path)
    kind = path_kind(real)
    if kind not in ("missing", "directory"):
        raise ConfigError(f"output path '{path}' exists and is not a directory (it is a {kind}); "
                          "choose another --out.")
    # Temporary files a killed atomic write left behind do not count as contents.
    if kind == "directory" and not force and any(not _STALE_TEMP.match(p.name) for p in real.iterdir()):
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


def staging_path(directory: str | os.PathLike) -> Path:
    """Where :func:`output_set` stages the files of ``directory``: a hidden sibling of the real directory."""
    real = real_output_dir(directory)
    return real.parent / f".{real.name}{_STAGING_SUFFIX}"


def lock_path(directory: str | os.PathLike) -> Path:
    """The lock file of ``directory``'s writers: a hidden sibling of the real directory."""
    real = real_output_dir(directory)
    return real.parent / f".{real.name}{_LOCK_SUFFIX}"


# --------------------------------------------------------------------------- one writer at a time

_HELD: dict[str, list[int]] = {}  # real directory -> [lock fd, nesting depth] held by this process


@contextlib.contextmanager
def output_lock(directory: str | os.PathLike) -> Iterator[Path]:
    """Hold the writers' lock of ``directory`` (re-entrant within a process); yields the real directory.

    Raises :class:`OutputBusyError` at once when another process holds it.
    """
    real = real_output_dir(directory)
    key = str(real)
    if key in _HELD:
        _HELD[key][1] += 1
        try:
            yield real
        finally:
            _HELD[key][1] -= 1
        return
    fd = _acquire(real, Path(directory))
    _HELD[key] = [fd, 1]
    try:
        yield real
    finally:
        del _HELD[key]
        _release(real, fd)


def _remove_entry(path: Path) -> None:
    """Unlink a non-directory entry that has one of rankshrink's reserved names (never followed)."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _acquire(real: Path, shown: Path) -> int:
    lock = lock_path(real)
    blocker = next((a for a in real.parents if os.path.lexists(a)), None)
    if blocker is not None and not blocker.is_dir():
        raise ConfigError(f"cannot create output directory '{shown}' ({os.strerror(errno.ENOTDIR)}: '{blocker}' is "
                          f"a {path_kind(blocker)}); choose another --out.")
    try:
        real.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create output directory '{shown}' ({exc.strerror or exc}); "
                          "choose another --out.") from None
    if fcntl is None:  # pragma: no cover
        return -1
    for _ in range(8):
        if _lstat_kind(lock) == "directory":
            raise ConfigError(f"'{lock}' is a directory, but rankshrink keeps the lock of '{shown}' under that "
                              "name; remove it and rerun.")
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, 0o644)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.EISDIR, errno.ENXIO):  # a planted link or special file
                _remove_entry(lock)
                continue
            raise ConfigError(f"cannot create output directory '{shown}': its lock file '{lock}' cannot be "
                              f"created ({exc.strerror or exc}); choose another --out.") from None
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:  # a FIFO, or a hard link to someone's file
            os.close(fd)
            _remove_entry(lock)
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                os.close(fd)
                raise
            pid = _read_pid(fd)
            os.close(fd)
            raise OutputBusyError(f"'{shown}' is being written by another rankshrink (pid {pid}); wait for it to "
                                  "finish, or choose another --out.") from None
        try:  # the previous holder unlinks the file on release: make sure we locked the one in place
            now = os.lstat(lock)
        except FileNotFoundError:
            os.close(fd)
            continue
        if (now.st_ino, now.st_dev) != (info.st_ino, info.st_dev):
            os.close(fd)
            continue
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        return fd
    raise ConfigError(f"cannot lock output directory '{shown}' (its lock file '{lock}' keeps changing); rerun.")


def _read_pid(fd: int) -> str:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return "unknown"
    return text if text.isdigit() else "unknown"


def _release(real: Path, fd: int) -> None:
    if fd < 0:  # pragma: no cover
        return
    try:
        lock = lock_path(real)
        if os.lstat(lock).st_ino == os.fstat(fd).st_ino:
            os.unlink(lock)  # unlinked while still locked: a waiter re-checks the inode and retries
    except OSError:
        pass
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- writing

def _marker_order(staging: Path) -> list[str] | None:
    """The validated move order of a staging directory marked complete, or None when it is not one."""
    marker = staging / _COMMIT_MARKER
    if _lstat_kind(marker) != "file" or marker.stat().st_size > _MAX_MARKER_BYTES:
        return None
    try:
        order = json.loads(marker.read_text(encoding="utf-8"))["order"]
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        return None
    if not isinstance(order, list) or not order or len(set(map(str, order))) != len(order):
        return None
    if not all(is_plain_name(name) for name in order):
        return None  # a name that is a path: this was not written by rankshrink, roll nothing forward
    if not all(_lstat_kind(staging / name) in ("file", "missing") for name in order):
        return None
    return order


def _recover(directory: Path) -> bool:
    """:func:`recover_output_dir` for a writer that holds the lock."""
    staging = staging_path(directory)
    rolled = False
    kind = _lstat_kind(staging)
    if kind == "directory":
        order = _marker_order(staging)
        if order is not None:
            _move_in(staging, directory, order)
            rolled = True
        shutil.rmtree(staging, ignore_errors=True)  # never follows the symbolic links inside
    elif kind != "missing":
        _remove_entry(staging)  # a file or link under the staging name: removed, never followed
    if directory.is_dir():
        for entry in directory.iterdir():
            if _STALE_TEMP.match(entry.name) and _lstat_kind(entry) == "file":
                try:
                    entry.unlink()
                except OSError:
                    pass
    return rolled


def recover_output_dir(directory: str | os.PathLike) -> bool:
    """Finish or discard what a killed :func:`output_set` left behind; True if it rolled forward.

    For writers only (it takes the directory's lock). A staging directory marked complete
    is moved in (roll forward: the new set was fully on disk) when every name its marker
    lists is a plain file name of a regular file; anything else under the staging name is
    removed (the old outputs were never touched). Stale temporary files of atomic writes in
    ``directory`` are removed too.
    """
    with output_lock(directory) as real:
        return _recover(real)


def _check_targets(staging: Path, directory: Path, order: list[str]) -> None:
    for name in order:
        if (staging / name).is_file() and _lstat_kind(directory / name) == "directory":
            raise ConfigError(f"'{directory / name}' is a directory, but rankshrink writes a file of that name into "
                              f"'{directory}'; move it away and rerun.")


def _move_in(staging: Path, directory: Path, order: list[str]) -> None:
    """Move ``order``'s files from ``staging`` into ``directory``; the last one (the summary) last."""
    directory.mkdir(parents=True, exist_ok=True)
    _check_targets(staging, directory, order)
    last = order[-1]
    if _lstat_kind(staging / last) == "file" and os.path.lexists(directory / last):
        os.unlink(directory / last)  # the old completion marker goes first: a mix is never marked complete
        fsync_dir(directory)
    for name in order:
        source = staging / name
        if _lstat_kind(source) == "file":  # files moved before an interruption are already in place
            os.replace(source, directory / name)
    fsync_dir(directory)


def _file_sha256(path: Path, limit: int | None = None) -> str | None:
    """sha256 of a regular file (never a link, FIFO or device); None when it holds more than ``limit`` bytes."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
            raise FileFormatError(f"'{path}' is not a regular file.")
        digest = hashlib.sha256()
        read = 0
        for block in iter(lambda: handle.read(1 << 20), b""):
            read += len(block)
            if limit is not None and read > limit:
                return None
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def output_set(directory: str | os.PathLike, *, force: bool = False,
               summary: Mapping[str, Any] | None = None, summary_name: str = SUMMARY_FILE) -> Iterator[Path]:
    """Write a set of output files into ``directory`` all-or-nothing.

    Holds the directory's lock throughout (:func:`output_lock`). Yields an empty staging
    directory (a hidden sibling of ``directory``) to write the files into. On success,
    ``summary`` (if given) is written there as ``summary_name`` with ``"files"``: the sha256
    of every other file, and ``"sizes"``: their sizes; and then:

    * a missing or empty ``directory`` is replaced by the staging directory in one
      rename: a reader sees no outputs or all of them;
    * a non-empty ``directory`` (only with ``force``) gets the staged files moved in,
      its other files untouched: the staging directory is first marked complete, the
      old summary is removed, the files are renamed one by one, the summary last. A run
      killed during the moves is finished by the next writer (:func:`recover_output_dir`).

    On an exception nothing in ``directory`` changes and the staging directory is removed;
    a full disk raises :class:`DiskFullError` naming ``directory``.
    """
    shown = Path(directory)
    with output_lock(directory) as real:
        _recover(real)
        check_output_dir(shown, force=force)
        staging = staging_path(real)
        try:
            staging.mkdir(parents=True)
        except OSError as exc:
            raise ConfigError(f"cannot create output directory '{shown}' ({exc.strerror or exc}); "
                              "choose another --out.") from None
        try:
            yield staging
            names = sorted(p.name for p in staging.iterdir() if _lstat_kind(p) == "file")
            unplain = [name for name in names if not is_plain_name(name)]
            if unplain:  # a set must be verifiable: its readers accept plain names only
                raise ConfigError(f"output file name {_shown_name(unplain[0])} is not a plain file name (letters, "
                                  "digits and ._+-, not starting with a dot); an output set cannot hold it.")
            if summary is not None:
                names = [n for n in names if n != summary_name]
                record = dict(summary)
                record["files"] = {name: _file_sha256(staging / name) for name in names}
                record["sizes"] = {name: (staging / name).stat().st_size for name in names}
                atomic_write_json(staging / summary_name, record)
                names.append(summary_name)
            for name in names:  # durable before anything is renamed into place
                with open(staging / name, "rb+") as handle:
                    os.fsync(handle.fileno())
            fsync_dir(staging)
            if not real.exists() or (real.is_dir() and not any(real.iterdir())):
                os.replace(staging, real)  # rename(2) replaces an empty directory atomically
                fsync_dir(real.parent)
                return
            _check_targets(staging, real, names)
            atomic_write_json(staging / _COMMIT_MARKER, {"order": names})
        except DiskFullError:
            shutil.rmtree(staging, ignore_errors=True)
            raise DiskFullError(no_space_message(shown, "its output files")) from None
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        _move_in(staging, real, names)
        shutil.rmtree(staging, ignore_errors=True)


# --------------------------------------------------------------------------- reading

def _interrupted(directory: Path) -> bool:
    """A writer marked a replacement of ``directory`` complete and did not finish moving it in."""
    staging = staging_path(directory)
    return _lstat_kind(staging) == "directory" and _lstat_kind(staging / _COMMIT_MARKER) == "file"


def _shown_name(name: Any) -> str:
    text = repr(name)
    return text if len(text) <= 80 else text[:60] + "…" + text[-12:]


def verify_output_set(directory: str | os.PathLike, *, summary_name: str = SUMMARY_FILE,
                      names: Iterable[str] | None = None) -> dict[str, Any] | None:
    """Check the files ``directory``'s summary lists against their recorded size and sha256.

    Only reads: nothing is rolled forward or removed. Returns the summary, or None when
    there is none or it records no checksums (older outputs). Raises :class:`FileFormatError`
    naming the first file that is missing or differs, a name that is not a plain file name
    inside the set, a file that is not a regular file (a symbolic link, FIFO, device), and a
    set whose replacement was interrupted (rerun the writer to finish it). With ``names``
    only those files are checked.
    """
    directory = Path(directory)
    path = directory / summary_name
    kind = _lstat_kind(path)
    if kind == "missing":
        if _interrupted(directory):
            raise FileFormatError(f"the outputs in '{directory}' are incomplete: a rankshrink run replacing them "
                                  "was interrupted. Rerun the command that writes that directory to finish it.")
        return None
    if kind != "file":
        raise FileFormatError(f"'{path}' is a {kind}, not a regular file; an output set holds regular files only. "
                              f"Rerun the command that wrote '{directory}'.")
    summary = read_json(path, "summary file", max_bytes=MAX_SUMMARY_BYTES)
    files = summary.get("files") if isinstance(summary, dict) else None
    if not isinstance(files, dict):
        return None
    sizes = summary.get("sizes") if isinstance(summary.get("sizes"), dict) else {}
    wanted = set(names) if names is not None else set(files)
    for name, digest in files.items():
        if name not in wanted:
            continue
        if not is_plain_name(name):
            raise FileFormatError(f"'{path}' lists {_shown_name(name)}, which is not the name of a file inside "
                                  f"'{directory}'; rankshrink never follows names from a summary as paths. The "
                                  "summary was not written by rankshrink: rerun the command that writes it.")
        if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
            raise FileFormatError(f"'{path}' records no valid sha256 for '{name}'; rerun the command that wrote "
                                  f"'{directory}'.")
        target = directory / name
        kind = _lstat_kind(target)
        if kind == "missing":
            raise FileFormatError(f"'{target}' is missing although '{path}' lists it; the outputs in "
                                  f"'{directory}' are incomplete. Rerun the command that wrote them.")
        if kind != "file":
            raise FileFormatError(f"'{target}' is a {kind}, not a regular file; an output set holds regular files "
                                  f"only. Rerun the command that wrote '{directory}'.")
        size = sizes.get(name)
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 0):
            raise FileFormatError(f"'{path}' records an invalid size for '{name}'; rerun the command that wrote "
                                  f"'{directory}'.")
        if (size is not None and target.stat().st_size != size) or _file_sha256(target, size) != digest:
            raise FileFormatError(f"'{target}' does not match the checksum recorded in '{path}'; the outputs "
                                  f"in '{directory}' are not one complete set (modified or partly replaced). "
                                  "Rerun the command that wrote them.")
    return summary
