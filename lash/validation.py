"""Argument checks shared by every LASH entry point: each error names the field, the value and
the allowed range."""

from __future__ import annotations

import math
from numbers import Integral, Real


def check_int(name: str, value: object, low: int) -> None:
    """Raise ``ValueError`` unless ``value`` is an int (not a bool) >= ``low``."""
    if isinstance(value, bool) or not isinstance(value, Integral) or value < low:
        raise ValueError(f"{name}={value!r} must be an int >= {low}")


def check_real(
    name: str, value: object, low: float, high: float = math.inf, *, low_open: bool = False, high_open: bool = False
) -> None:
    """Raise ``ValueError`` unless ``value`` is a finite real number in the interval from ``low`` to ``high``."""
    high_open = high_open or not math.isfinite(high)
    allowed = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise ValueError(f"{name}={value!r} must be a finite number in {allowed}")
    if value < low or value > high or (low_open and value == low) or (high_open and value == high):
        raise ValueError(f"{name}={value} is outside {allowed}")
