"""Setting entries of a mapping (``os.environ``, ``sys.modules``) for the length of a block."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, MutableMapping


@contextlib.contextmanager
def scoped_items(mapping: MutableMapping[str, Any], values: dict[str, Any]) -> Iterator[None]:
    """``mapping`` holds ``values`` inside the block; afterwards each key is back to what it was (removed if it
    was absent). Only these keys are restored: what the block adds under other keys stays."""
    saved = {key: mapping.get(key) for key in values}
    mapping.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                mapping.pop(key, None)
            else:
                mapping[key] = value
