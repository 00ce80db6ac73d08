"""Parameter checks with one message format: ``<name> must be <requirement>, got <value>.``

Used wherever a user-facing value is checked (API arguments, config dataclasses, CLI
options), so every refusal reads the same way and names the parameter. Each check
returns the value, converted where that is lossless (an int-valued float stays refused
for an int; ``"1%"``-style parsing is the CLI's job, not this module's).
"""

from __future__ import annotations

import math
from typing import Any, Iterable, TypeVar

from .errors import ConfigError

__all__ = ["check_int", "check_number", "check_choice", "check_bool", "check_optional_int"]

T = TypeVar("T")


def _fail(name: str, requirement: str, value: Any, error: type[Exception] = ConfigError) -> Exception:
    shown = repr(value) if not isinstance(value, (int, float)) or isinstance(value, bool) else f"{value!r}"
    if len(shown) > 60:
        shown = shown[:57] + "..."
    return error(f"{name} must be {requirement}, got {shown}.")


def _range_text(minimum, maximum, *, low_open: bool = False, high_open: bool = False) -> str:
    if minimum is not None and maximum is not None:
        lo = "(" if low_open else "["
        hi = ")" if high_open else "]"
        return f" in {lo}{minimum:g}, {maximum:g}{hi}"
    if minimum is not None:
        return f" {'>' if low_open else '>='} {minimum:g}"
    if maximum is not None:
        return f" {'<' if high_open else '<='} {maximum:g}"
    return ""


def check_int(value: Any, name: str, *, minimum: int | None = None, maximum: int | None = None,
              error: type[Exception] = ConfigError) -> int:
    """An ``int`` (not a bool) in ``[minimum, maximum]``."""
    ok = isinstance(value, int) and not isinstance(value, bool)
    if ok and ((minimum is not None and value < minimum) or (maximum is not None and value > maximum)):
        ok = False
    if not ok:
        if minimum is not None and maximum is not None:
            requirement = f"an integer in {minimum}..{maximum}"
        elif minimum is not None:
            requirement = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        else:
            requirement = "an integer" + _range_text(minimum, maximum)
        raise _fail(name, requirement, value, error)
    return int(value)


def check_optional_int(value: Any, name: str, *, minimum: int | None = None, maximum: int | None = None) -> int | None:
    """None, or what :func:`check_int` accepts."""
    return None if value is None else check_int(value, name, minimum=minimum, maximum=maximum)


def check_number(value: Any, name: str, *, minimum: float | None = None, maximum: float | None = None,
                 low_open: bool = False, high_open: bool = False, error: type[Exception] = ConfigError) -> float:
    """A finite real number (not a bool) in the given range (``*_open`` excludes that end)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        if minimum is not None and (value < minimum or (low_open and value == minimum)):
            ok = False
        if maximum is not None and (value > maximum or (high_open and value == maximum)):
            ok = False
    if not ok:
        raise _fail(name, "a finite number" + _range_text(minimum, maximum, low_open=low_open,
                                                            high_open=high_open), value, error)
    return float(value)


def check_choice(value: Any, name: str, choices: Iterable[T], *, error: type[Exception] = ConfigError) -> T:
    """One of ``choices`` (compared with ==)."""
    options = list(choices)
    if value not in options:
        raise _fail(name, "one of " + ", ".join(repr(c) if not isinstance(c, str) else c for c in options),
                    value, error)
    return value


def check_bool(value: Any, name: str, *, error: type[Exception] = ConfigError) -> bool:
    if not isinstance(value, bool):
        raise _fail(name, "True or False", value, error)
    return value
