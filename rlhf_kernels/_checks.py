"""Argument checks shared by the op families."""

from __future__ import annotations


def check_flags(**flags: object) -> None:
    """Each keyword must be a bool: a string such as ``"no"`` would otherwise count as true."""
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise TypeError(f"{name}: expected a bool, got {type(value).__name__}")
