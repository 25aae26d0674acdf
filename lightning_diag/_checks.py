"""Argument checks shared by every module, so each bad value gets the same kind of message."""

from __future__ import annotations

from typing import Any

__all__ = ["check_int"]


def check_int(name: str, value: Any, minimum: int, *, optional: bool = False) -> None:
    """Raise a ``ValueError`` naming ``name`` unless ``value`` is an int >= ``minimum`` (or None if ``optional``).

    ``bool`` is rejected although it is an ``int`` subclass: ``patience=True`` is a mistake.

    Example:
        >>> check_int("patience", 0, 1)
        Traceback (most recent call last):
        ...
        ValueError: `patience` must be an int >= 1, got 0
    """
    if optional and value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        allowed = f"None or an int >= {minimum}" if optional else f"an int >= {minimum}"
        raise ValueError(f"`{name}` must be {allowed}, got {value!r}")
