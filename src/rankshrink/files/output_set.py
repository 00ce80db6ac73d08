"""Multi-file outputs as one verifiable set, and the rules for output directories.

The files are written into a sibling staging directory; a new or empty output directory is
then replaced by it in one rename, and a non-empty one (``force``) gets its files moved in
with ``summary.json`` last, from a staging directory marked complete first, so that a run
killed half-way is rolled forward by :func:`recover_output_dir` (called by every writer and
reader) rather than leaving a mix. ``summary.json`` records the sha256 of every other file
of the set; :func:`verify_output_set` checks them.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

from ..errors import ConfigError, FileFormatError
from .atomic import atomic_write_json, file_sha256, fsync_dir, read_json

SUMMARY_FILE = "summary.json"
_STAGING_SUFFIX = ".rankshrink-staging"
_COMMIT_MARKER = ".rankshrink-complete"
# Temporary files left by atomic_path when a process is killed: ".<name>.<8 random>.tmp".
_STALE_TEMP = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")


def check_output_dir(path: str | os.PathLike, *, force: bool = False) -> Path:
    """Refuse an output path that is a file, or a non-empty directory without ``force``.

    Creates nothing, so a command can check before it starts long work.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"output path '{path}' exists and is not a directory; choose another --out.")
    # Temporary files a killed atomic write left behind do not count as contents.
    if path.is_dir() and any(not _STALE_TEMP.match(p.name) for p in path.iterdir()) and not force:
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
    """Where :func:`output_set` stages the files of ``directory``: a hidden sibling."""
    directory = Path(directory)
    return directory.parent / f".{directory.name}{_STAGING_SUFFIX}"


def recover_output_dir(directory: str | os.PathLike) -> bool:
    """Finish or discard what a killed :func:`output_set` left behind; True if it rolled forward.

    A staging directory marked complete is moved in (roll forward: the new set was fully
    on disk); one without the mark is removed (the old outputs were never touched). Stale
    temporary files of atomic writes in ``directory`` are removed too.
    """
    directory = Path(directory)
    staging = staging_path(directory)
    rolled = False
    if staging.is_dir():
        marker = staging / _COMMIT_MARKER
        if marker.is_file():
            try:
                order = json.loads(marker.read_text(encoding="utf-8"))["order"]
            except (OSError, ValueError, KeyError, TypeError):
                order = None
            if isinstance(order, list):
                _move_in(staging, directory, [str(name) for name in order])
                rolled = True
        shutil.rmtree(staging, ignore_errors=True)
    if directory.is_dir():
        for entry in directory.iterdir():
            if _STALE_TEMP.match(entry.name) and entry.is_file():
                try:
                    entry.unlink()
                except OSError:
                    pass
    return rolled


def _move_in(staging: Path, directory: Path, order: list[str]) -> None:
    """Move ``order``'s files from ``staging`` into ``directory``; the last one (the summary) last."""
    directory.mkdir(parents=True, exist_ok=True)
    last = order[-1] if order else None
    if last is not None and (staging / last).is_file() and (directory / last).exists():
        (directory / last).unlink()  # the old completion marker goes first: a mix is never marked complete
        fsync_dir(directory)
    for name in order:
        source = staging / name
        if source.is_file():  # files moved before an interruption are already in place
            os.replace(source, directory / name)
    fsync_dir(directory)


@contextlib.contextmanager
def output_set(directory: str | os.PathLike, *, force: bool = False,
               summary: Mapping[str, Any] | None = None, summary_name: str = SUMMARY_FILE) -> Iterator[Path]:
    """Write a set of output files into ``directory`` all-or-nothing.

    Yields an empty staging directory (a hidden sibling of ``directory``) to write the
    files into. On success, ``summary`` (if given) is written there as ``summary_name``
    with ``"files"``: the sha256 of every other file, and then:

    * a missing or empty ``directory`` is replaced by the staging directory in one
      rename: a reader sees no outputs or all of them;
    * a non-empty ``directory`` (only with ``force``) gets the staged files moved in,
      its other files untouched: the staging directory is first marked complete, the
      old summary is removed, the files are renamed one by one, the summary last. A run
      killed during the moves is finished by :func:`recover_output_dir`, which every
      writer and reader of output directories calls first.

    On an exception nothing in ``directory`` changes and the staging directory is removed.
    """
    directory = Path(directory)
    recover_output_dir(directory)
    check_output_dir(directory, force=force)
    staging = staging_path(directory)
    try:
        staging.mkdir(parents=True)
    except OSError as exc:
        raise ConfigError(f"cannot create output directory '{directory}' ({exc.strerror or exc}); "
                          "choose another --out.") from None
    try:
        yield staging
        names = sorted(p.name for p in staging.iterdir() if p.is_file())
        if summary is not None:
            names = [n for n in names if n != summary_name]
            record = dict(summary)
            record["files"] = {name: file_sha256(staging / name) for name in names}
            atomic_write_json(staging / summary_name, record)
            names.append(summary_name)
        for name in names:  # durable before anything is renamed into place
            with open(staging / name, "rb+") as handle:
                os.fsync(handle.fileno())
        fsync_dir(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if not directory.exists() or (directory.is_dir() and not any(directory.iterdir())):
        os.replace(staging, directory)  # rename(2) replaces an empty directory atomically
        fsync_dir(directory.parent)
        return
    atomic_write_json(staging / _COMMIT_MARKER, {"order": names})
    _move_in(staging, directory, names)
    shutil.rmtree(staging, ignore_errors=True)


def verify_output_set(directory: str | os.PathLike, *, summary_name: str = SUMMARY_FILE,
                      names: Iterable[str] | None = None) -> dict[str, Any] | None:
    """Check the files ``directory``'s summary lists against their recorded sha256.

    Rolls an interrupted :func:`output_set` forward first. Returns the summary, or None
    when there is none or it records no checksums (older outputs). Raises
    :class:`FileFormatError` naming the first file that is missing or differs; with
    ``names`` only those files are checked.
    """
    directory = Path(directory)
    recover_output_dir(directory)
    path = directory / summary_name
    if not path.is_file():
        return None
    summary = read_json(path, "summary file")
    files = summary.get("files") if isinstance(summary, dict) else None
    if not isinstance(files, dict):
        return None
    wanted = set(names) if names is not None else set(files)
    for name, digest in files.items():
        if name not in wanted:
            continue
        target = directory / name
        if not target.is_file():
            raise FileFormatError(f"'{target}' is missing although '{path}' lists it; the outputs in "
                                  f"'{directory}' are incomplete. Rerun the command that wrote them.")
        if file_sha256(target) != digest:
            raise FileFormatError(f"'{target}' does not match the checksum recorded in '{path}'; the outputs "
                                  f"in '{directory}' are not one complete set (modified or partly replaced). "
                                  "Rerun the command that wrote them.")
    return summary

