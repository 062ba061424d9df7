"""Argument checks shared by the constructors and entry points of the package.

Each check returns the value in its canonical type (``float``, ``int`` or a ``(low, high)`` tuple of floats) or
raises ``ValueError`` with a message that names the argument, says what was expected and shows what came, e.g.
``noise must be a finite number >= 0, got -1.0``. ``bool`` is never accepted as a number.

Layering: imports nothing from the package.
"""

from __future__ import annotations

import math
import numbers
from typing import Iterable

__all__ = ["finite", "positive", "nonnegative", "count", "finite_range", "one_of"]


def _real(value, name: str, expected: str) -> float:
    """``value`` as a float if it is a finite real number (``numbers.Real``, not ``bool``), else the error."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        number = float(value)
        if math.isfinite(number):
            return number
        raise ValueError(f"{name} must be {expected}, got {number!r}")
    raise ValueError(f"{name} must be {expected}, got {value!r}")


def finite(value, name: str) -> float:
    """A finite real number."""
    return _real(value, name, "a finite number")


def positive(value, name: str) -> float:
    """A finite real number ``> 0``."""
    number = _real(value, name, "a finite number > 0")
    if not number > 0.0:
        raise ValueError(f"{name} must be a finite number > 0, got {number!r}")
    return number


def nonnegative(value, name: str) -> float:
    """A finite real number ``>= 0``."""
    number = _real(value, name, "a finite number >= 0")
    if not number >= 0.0:
        raise ValueError(f"{name} must be a finite number >= 0, got {number!r}")
    return number


def count(value, name: str, minimum: int = 1) -> int:
    """An integer (``numbers.Integral``, not ``bool``) ``>= minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def finite_range(pair, name: str) -> tuple[float, float]:
    """A ``(low, high)`` pair of finite real numbers with ``high >= low``."""
    try:
        low, high = pair
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a (low, high) pair of finite numbers, got {pair!r}") from None
    bounds = []
    for value in (low, high):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise ValueError(f"{name} must be a (low, high) pair of finite numbers, got {pair!r}")
        bounds.append(float(value))
    low, high = bounds
    if not high >= low:
        raise ValueError(f"{name} must have high >= low, got ({low}, {high})")
    return low, high


def one_of(value, name: str, options: Iterable):
    """One of ``options`` (compared with ``==``)."""
    options = list(options)
    if value not in options:
        raise ValueError(f"{name} must be one of {options}, got {value!r}")
    return value
