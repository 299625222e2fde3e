"""Argument checks shared by every module: one definition of "an integer", "a number" and their messages.

Integers are Python ``int`` or numpy integers, never ``bool``; numbers are integers or floats (numpy ones
too), never ``bool``. A check returns the problem as a sentence (rule, value and, where it helps, the
fix) or None, so that callers can collect every problem before raising one error.
"""

from __future__ import annotations

import math
from numbers import Integral, Real

__all__ = ["is_int", "is_number", "is_finite", "int_problem", "number_problem"]


def is_int(value) -> bool:
    """True for ``int`` and numpy integers; False for ``bool`` and everything else."""
    return isinstance(value, Integral) and not isinstance(value, bool)


def is_number(value) -> bool:
    """True for ints, floats and their numpy kinds; False for ``bool`` and everything else."""
    return isinstance(value, Real) and not isinstance(value, bool)


def is_finite(value) -> bool:
    """A number that is neither NaN nor infinite."""
    return is_number(value) and math.isfinite(value)


def int_problem(name: str, value, *, minimum: int | None = None) -> str | None:
    """``"<name> must be an integer >= <minimum>, but got <name>=<value>."`` or None when it is one."""
    if is_int(value) and (minimum is None or value >= minimum):
        return None
    rule = "an integer" if minimum is None else f"an integer >= {minimum}"
    return f"{name} must be {rule}, but got {name}={value!r}."


def number_problem(name: str, value, *, minimum: float | None = None, finite: bool = True) -> str | None:
    """``"<name> must be a (finite) number >= <minimum>, but got ..."`` or None when it is one."""
    ok = (is_finite(value) if finite else is_number(value)) and (minimum is None or value >= minimum)
    if ok:
        return None
    rule = ("a finite number" if finite else "a number") + ("" if minimum is None else f" >= {minimum}")
    return f"{name} must be {rule}, but got {name}={value!r}."
