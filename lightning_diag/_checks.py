"""Argument checks shared by every module, so each bad value gets the same kind of message."""

from __future__ import annotations

import math
from typing import Any

__all__ = ["check_bool", "check_callable", "check_int", "check_number"]


def check_int(name: str, value: Any, minimum: int, *, optional: bool = False, maximum: int | None = None) -> None:
    """Raise a ``ValueError`` naming ``name`` unless ``value`` is an int >= ``minimum`` (and <= ``maximum``
    if given; or None if ``optional``).

    ``bool`` is rejected although it is an ``int`` subclass: ``patience=True`` is a mistake.

    Example:
        >>> check_int("patience", 0, 1)
        Traceback (most recent call last):
        ...
        ValueError: `patience` must be an int >= 1, got 0
    """
    if optional and value is None:
        return
    if (not isinstance(value, int) or isinstance(value, bool) or value < minimum
            or (maximum is not None and value > maximum)):  # fmt: skip
        allowed = f"an int >= {minimum}" + (f" and <= {maximum}" if maximum is not None else "")
        raise ValueError(f"`{name}` must be {'None or ' if optional else ''}{allowed}, got {value!r}")


def check_number(
    name: str,
    value: Any,
    low: float = -math.inf,
    high: float = math.inf,
    *,
    low_open: bool = True,
    high_open: bool = True,
    optional: bool = False,
) -> None:
    """Raise a ``ValueError`` naming ``name`` unless ``value`` is a real number in the interval from
    ``low`` to ``high`` (open ends by default; NaN is never inside), or None if ``optional``.

    ``bool`` is rejected (``factor=True`` is a mistake), and so are strings.

    Example:
        >>> check_number("lr_factor", 0.5, 0.0, 1.0)
        >>> check_number("lr_factor", 1.0, 0.0, 1.0)
        Traceback (most recent call last):
        ...
        ValueError: `lr_factor` must be a number in (0, 1), got 1.0
        >>> check_number("factor", None, 1.0, optional=True)
    """
    if optional and value is None:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)
    if ok:
        ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        if high == math.inf:
            allowed = f"a number {'>' if low_open else '>='} {low:g}"
        elif low == -math.inf:
            allowed = f"a number {'<' if high_open else '<='} {high:g}"
        else:
            allowed = f"a number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ValueError(f"`{name}` must be {'None or ' if optional else ''}{allowed}, got {value!r}")


def check_bool(name: str, value: Any) -> None:
    """Raise a ``ValueError`` naming ``name`` unless ``value`` is ``True`` or ``False`` (a string is not a boolean).

    Example:
        >>> check_bool("per_layer", "no")
        Traceback (most recent call last):
        ...
        ValueError: `per_layer` must be True or False, got 'no'
    """
    if not isinstance(value, bool):
        raise ValueError(f"`{name}` must be True or False, got {value!r}")


def check_callable(name: str, value: Any, *, optional: bool = False) -> None:
    """Raise a ``TypeError`` naming ``name`` unless ``value`` is callable (or None if ``optional``).

    Example:
        >>> check_callable("input_fn", 3)
        Traceback (most recent call last):
        ...
        TypeError: `input_fn` must be a callable, got 3
    """
    if not (callable(value) or (optional and value is None)):
        raise TypeError(f"`{name}` must be {'None or ' if optional else ''}a callable, got {value!r}")
