"""A resumable on-disk cache of metric evaluations.

Each evaluation is stored as one small JSON file, written atomically (temporary
file, fsync, rename), under ``<root>/evaluations/<key[:2]>/<key>.json``. The key is
the sha256 of everything the value depends on:

* the model fingerprint (:func:`rankshrink.fingerprint.module_fingerprint`: sha256 over
  every state-dict tensor's name, shape, dtype and bytes),
* the plan (:meth:`rankshrink.plan.Plan.key`, the canonical text of its layers),
* the metric (its key, e.g. 'accuracy') and the data fingerprint,
* the factorization options (fit, calibration fingerprint, seed, ...).

Every entry carries a checksum of its key, value and what it was computed for (``bound``:
the model and data fingerprints, the plan, the metric and the options; the reader checks
those against what it is evaluating now), and of the per-sample predictions it stores for
metrics that are functions of them, from which bootstrap intervals are computed (see
:func:`encode_predictions`). An entry that cannot be parsed, whose checksum, key or binding
does not match, is reported with a
:class:`CacheWarning`, deleted and recomputed. A process killed at any point leaves
complete entries (or none): a rerun resumes with every finished evaluation. A cache that
cannot be written (a full disk, an entry path that is a directory) gives one warning and
the search goes on without storing.

The cache is trusted-user storage: its entries decide what a search believes about a
plan, so keep it where only you can write (the default is under your home directory).
The checks above catch damage and entries moved or copied between keys, not a forger
who can write the directory and recompute the checksums.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..files import atomic_write_text, user_cache_dir
from ..fingerprint import jsonable, object_fingerprint

__all__ = ["CacheWarning", "EvaluationCache", "cache_key", "default_cache_dir", "encode_predictions",
           "decode_predictions"]

_FORMAT = "rankshrink-evaluation"
_VERSION = 4  # 3: entries are bound to what they were computed for; 4: per-sample predictions stored too


class CacheWarning(UserWarning):
    """A cache entry was corrupt and has been dropped (it will be recomputed)."""


def default_cache_dir() -> Path:
    """``user_cache_dir()/search`` (honours $RANKSHRINK_CACHE and $XDG_CACHE_HOME)."""
    return user_cache_dir() / "search"


def cache_key(model_fp: str, plan_key: str, metric_key: str, data_fp: str, options_fp: str) -> str:
    """The entry key: sha256 of the five parts."""
    return object_fingerprint({"format": _FORMAT, "version": _VERSION, "model": model_fp, "plan": plan_key,
                               "metric": metric_key, "data": data_fp, "factorize": options_fp})


def _checksum(key: str, value: float, bound: Any = None, predictions: str | None = None) -> str:
    parts: list[Any] = [key, repr(float(value)), bound]
    if predictions is not None:
        parts.append(predictions)
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def encode_predictions(predictions: Any) -> str:
    """Per-sample class predictions as compact text: base64 of zlib-compressed little-endian int32."""
    import base64
    import zlib

    import numpy as np

    data = np.ascontiguousarray(np.asarray(predictions).reshape(-1), dtype="<i4").tobytes()
    return base64.b64encode(zlib.compress(data, 6)).decode("ascii")


def decode_predictions(text: str) -> Any:
    """The int64 numpy array :func:`encode_predictions` stored."""
    import base64
    import zlib

    import numpy as np

    try:
        data = zlib.decompress(base64.b64decode(text.encode("ascii"), validate=True))
    except zlib.error as exc:
        raise ValueError(f"corrupt predictions ({exc})") from None
    if len(data) % 4:
        raise ValueError("corrupt predictions (not a whole number of int32 values)")
    return np.frombuffer(data, dtype="<i4").astype(np.int64)


def _body_checksum(key: str, body: Any) -> str:
    return hashlib.sha256(json.dumps([key, body], sort_keys=True).encode()).hexdigest()


class EvaluationCache:
    """Evaluation values on disk, one atomic JSON file per entry.

    ``EvaluationCache(None)`` or ``EvaluationCache.disabled()`` stores nothing.
    ``hits``/``writes``/``dropped`` count what this instance did.
    """

    def __init__(self, root: str | os.PathLike | None = ...):  # type: ignore[assignment]
        if root is ...:
            root = default_cache_dir()
        self.root = Path(root) if root is not None else None
        self.hits = 0
        self.writes = 0
        self.dropped = 0
        self.unwritable = False

    @classmethod
    def disabled(cls) -> "EvaluationCache":
        return cls(None)

    @property
    def enabled(self) -> bool:
        return self.root is not None

    def path(self, key: str) -> Path:
        assert self.root is not None
        return self.root / "evaluations" / key[:2] / f"{key}.json"

    def get(self, key: str, *, bound: Any = None) -> dict[str, Any] | None:
        """The stored entry (``value``, ``seconds``, ...) or None; corrupt entries are dropped.

        ``bound``: what the entry must have been computed for (as given to :meth:`put`).
        """
        if self.root is None:
            return None
        path = self.path(key)
        text = self._read(path)
        if text is None:
            return None
        expected = jsonable(bound)
        try:
            entry = json.loads(text)
            predictions = entry.get("predictions") if isinstance(entry, dict) else None
            ok = (isinstance(entry, dict) and entry.get("format") == _FORMAT and entry.get("key") == key
                  and isinstance(entry.get("value"), (int, float)) and not isinstance(entry.get("value"), bool)
                  and math.isfinite(entry["value"]) and (predictions is None or isinstance(predictions, str))
                  and entry.get("checksum") == _checksum(key, entry["value"], entry.get("bound"), predictions))
            if ok and predictions is not None:
                entry["predictions"] = decode_predictions(predictions)
        except (json.JSONDecodeError, UnicodeDecodeError, TypeError, ValueError, RecursionError):
            ok = False
        if not ok:
            self._drop(path, "corrupt (bad JSON, key or checksum)")
            return None
        if entry.get("bound") != expected:
            self._drop(path, "for another model, data set or plan than its key says")
            return None
        self.hits += 1
        return entry

    def _read(self, path: Path) -> str | None:
        try:
            if path.is_symlink() or (path.exists() and not path.is_file()):
                raise IsADirectoryError(f"'{path}' is not a regular file")
            return path.read_text(encoding="utf-8")
        except (FileNotFoundError, NotADirectoryError):  # no entry (or no directory of entries) yet
            return None
        except OSError as exc:
            self._drop(path, f"unreadable ({exc})")
            return None

    def put(self, key: str, value: float, *, bound: Any = None, predictions: Any = None, **info: Any) -> None:
        """Store ``value`` (JSON-friendly ``info``, per-sample ``predictions``) under ``key``, atomically,
        bound to ``bound``."""
        if self.root is None or self.unwritable:
            return
        bound = jsonable(bound)
        text = None if predictions is None else encode_predictions(predictions)
        entry = {"format": _FORMAT, "version": _VERSION, "key": key, "value": float(value), **jsonable(info),
                 **({} if text is None else {"predictions": text}), "bound": bound,
                 "checksum": _checksum(key, value, bound, text)}
        self._write(self.path(key), json.dumps(entry, sort_keys=True) + "\n")
        self.writes += 1

    def _write(self, path: Path, text: str) -> None:
        """Write an entry; a cache that cannot be written warns once and is not written again."""
        try:
            atomic_write_text(path, text)
        except (OSError, ConfigError) as exc:  # disk full, read-only, an entry path that is a directory
            self.unwritable = True
            warnings.warn(f"cannot write the evaluation cache in '{self.root}' ({exc}); going on without storing "
                          "evaluations (an interrupted search will not resume them).", CacheWarning, stacklevel=4)

    # Small JSON documents besides evaluations (e.g. the distortion proxies of a layer's
    # candidates), stored and checked the same way under ``<root>/<namespace>/``.
    def get_json(self, namespace: str, key: str) -> Any | None:
        if self.root is None:
            return None
        path = self.root / namespace / key[:2] / f"{key}.json"
        text = self._read(path)
        if text is None:
            return None
        try:
            entry = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, ValueError):
            self._drop(path, "corrupt (bad JSON)")
            return None
        body = entry.get("body") if isinstance(entry, dict) else None
        if (not isinstance(entry, dict) or entry.get("key") != key
                or entry.get("checksum") != _body_checksum(key, body)):
            self._drop(path, "corrupt (bad key or checksum)")
            return None
        return body

    def put_json(self, namespace: str, key: str, body: Any) -> None:
        if self.root is None or self.unwritable:
            return
        body = jsonable(body)
        path = self.root / namespace / key[:2] / f"{key}.json"
        self._write(path, json.dumps({"key": key, "body": body, "checksum": _body_checksum(key, body)},
                                     sort_keys=True) + "\n")

    def _drop(self, path: Path, why: str) -> None:
        warnings.warn(f"evaluation cache entry '{path}' is {why}; it was removed and will be recomputed.",
                      CacheWarning, stacklevel=3)
        self.dropped += 1
        try:
            if path.is_dir() and not path.is_symlink():
                return  # an entry path that is a directory: left alone, and the entry is not stored
            path.unlink()
        except OSError:
            pass

    def __repr__(self) -> str:
        return f"EvaluationCache({str(self.root) if self.root else 'disabled'})"
