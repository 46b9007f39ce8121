"""Argument checks shared by the op families."""

from __future__ import annotations

import math
import numbers


def check_flags(**flags: object) -> None:
    """Each keyword must be a bool: a string such as ``"no"`` would otherwise count as true."""
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise TypeError(f"{name}: expected a bool, got {type(value).__name__}")


def check_real(name: str, value: object, *, finite: bool = False) -> None:
    """``value`` must be a real number (not a bool): TypeError otherwise; NaN (and, with ``finite``,
    an infinity) is a ValueError, as any other out-of-range value."""
    if type(value) is not float and type(value) is not int and (  # (the common types first: an ABC check is slow)
        isinstance(value, bool) or not isinstance(value, numbers.Real)
    ):
        raise TypeError(f"{name}: expected {'a finite' if finite else 'a'} number, got {value!r}")
    if value != value or (finite and not math.isfinite(value)):
        raise ValueError(f"{name}: expected {'a finite' if finite else 'a'} number, got {value!r}")
