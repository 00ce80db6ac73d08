"""Safe file input/output: atomic writes and pickle-free weight loading.

Outputs are written to a temporary file in the destination directory, flushed to
disk and renamed over the destination, so a reader (or a rerun after a crash,
SIGKILL included) sees either the old complete file or the new complete one.
Weights are read with safetensors or ``torch.load(weights_only=True)``; full
pickles run code and are refused unless the caller passes ``trust_pickle=True``.

Multi-file outputs (weights + plan + summary) go through :func:`output_set`: the files
are written into a sibling staging directory; a new or empty output directory is then
replaced by it in one rename, and a non-empty one (``force``) gets its files moved in
with ``summary.json`` last, from a staging directory marked complete first, so that a
run killed half-way is rolled forward by :func:`recover_output_dir` (called by every
writer and reader) rather than leaving a mix. ``summary.json`` records the sha256 of
every other file of the set; :func:`verify_output_set` checks them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import re
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import torch

from .errors import ConfigError, FileFormatError, UnsafeFileError


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
        yield tmp_path
        with open(tmp_path, "rb+") as handle:  # make the bytes durable before the rename
            os.fsync(handle.fileno())
        os.chmod(tmp_path, _file_mode(path))  # mkstemp makes 0600; give the usual permissions
        os.replace(tmp_path, path)
        fsync_dir(path.parent)  # make the rename itself durable
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


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


def load_state_dict(path: str | os.PathLike, *, trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Load a state dict from a safetensors or PyTorch (``.pt``/``.pth``) file.

    The format is judged from the file's contents, not its name. PyTorch files are read
    with ``weights_only=True``; a file that needs full pickle (for example a whole pickled
    model) is refused with :class:`UnsafeFileError` unless ``trust_pickle`` is set.
    Missing, empty, truncated, corrupt or foreign files raise :class:`FileFormatError`
    naming the file.
    """
    path = Path(path)
    if path.is_dir():
        raise FileFormatError(
            f"weights path '{path}' is a directory; pass a .safetensors or .pt file (a directory written by "
            "'rankshrink apply'/'compress' is read by finetune, lora and 'export --compressed').")
    if not path.is_file():
        raise FileFormatError(f"weights file '{path}' does not exist.")
    if path.stat().st_size == 0:
        raise FileFormatError(f"weights file '{path}' is empty (0 bytes); it was probably not written completely.")
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


def user_cache_dir() -> Path:
    """rankshrink's cache root: $RANKSHRINK_CACHE, else $XDG_CACHE_HOME/rankshrink, else ~/.cache/rankshrink."""
    explicit = os.environ.get("RANKSHRINK_CACHE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "rankshrink"


# --------------------------------------------------------------------------- multi-file outputs

SUMMARY_FILE = "summary.json"
_STAGING_SUFFIX = ".rankshrink-staging"
_COMMIT_MARKER = ".rankshrink-complete"
# Temporary files left by atomic_path when a process is killed: ".<name>.<8 random>.tmp".
_STALE_TEMP = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")


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
