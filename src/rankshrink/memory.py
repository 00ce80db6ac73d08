"""Giving freed memory back to the operating system between the stages of a long run.

A forward pass of a transformer allocates and frees hundreds of megabytes of activations; glibc's
allocator keeps freed heap memory for reuse (its mmap threshold grows after the first large free),
so the process's resident size climbs stage after stage -- calibration, each evaluation, each probe --
although the live data stays small. ``malloc_trim(0)`` returns the free heap pages; calling it between
stages keeps the peak resident size near what is live plus one stage's activations. Written here
because neither torch nor Python exposes it; a no-op off glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import sys

__all__ = ["release_memory"]

_TRIM = None
if sys.platform.startswith("linux"):
    try:
        _TRIM = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
        _TRIM = None


def release_memory(collect: bool = False) -> None:
    """Return freed heap memory to the OS (glibc ``malloc_trim``); ``collect`` runs the garbage collector first."""
    if collect:
        gc.collect()
    if _TRIM is not None:
        _TRIM(0)
