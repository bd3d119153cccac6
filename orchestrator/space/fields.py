"""Checks of single values of a search space, shared by the parsers of its sections: each raises a
`ConfigError` that names the dotted field and says what to write instead."""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable
from typing import Any

from pxd.errors import ConfigError

__all__ = ["check_known", "finite_float", "whole_number", "finite_number", "number_above"]


def check_known(key: Any, known: Iterable[str], prefix: str, what: str) -> None:
    """`key` is one of `known`; else a ConfigError on `<prefix><key>` suggesting the closest known one."""
    known = tuple(known)
    if key in known:
        return
    close = difflib.get_close_matches(str(key), known, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise ConfigError(f"{prefix}{key}", f"unknown {what}; {hint}known: {', '.join(known)}")


def finite_float(value: Any) -> float | None:
    """`value` as a finite float, or None if it is not one (booleans are not numbers here)."""
    if isinstance(value, str):  # YAML 1.1 reads `1e-3` (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def whole_number(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(name, f"must be a whole number ≥ {minimum}, got {value!r}")
    return value


def finite_number(value: Any, name: str, requirement: str = "") -> float:
    number = finite_float(value)
    if number is None:
        raise ConfigError(name, f"must be a finite number{requirement}, got {value!r}")
    return number


def number_above(value: Any, name: str, *, low: float = 0.0, low_inclusive: bool = False) -> float:
    """A finite number above `low` (or at it, with `low_inclusive`)."""
    bound = f" ≥ {low:g}" if low_inclusive else f" > {low:g}"
    number = finite_number(value, name, bound)
    if number < low or (number == low and not low_inclusive):
        raise ConfigError(name, f"must be a finite number{bound}, got {value!r}")
    return number
