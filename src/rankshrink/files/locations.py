"""Where rankshrink keeps its caches."""

from __future__ import annotations

import os
from pathlib import Path


def user_cache_dir() -> Path:
    """rankshrink's cache root: $RANKSHRINK_CACHE, else $XDG_CACHE_HOME/rankshrink, else ~/.cache/rankshrink."""
    explicit = os.environ.get("RANKSHRINK_CACHE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "rankshrink"


