"""Checks that settings run when they are made: one error type, one wording.

Every settings dataclass calls these from ``__post_init__``, so a bad value fails where it is
defined, in the Python API as on the command line, before any checkpoint is read. Names are
given as the CLI spells them (``--lr``): settings fields are the CLI options of the same names.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, get_args

from forgetdiag.errors import ForgetdiagError


def choices(literal: Any) -> tuple[Any, ...]:
    """The values a ``Literal[...]`` type allows."""
    return get_args(literal)


def check_choice(name: str, value: Any, allowed: Iterable[Any]) -> None:
    """``value`` must be one of ``allowed`` (a misspelling is an error, never another choice)."""
    allowed = tuple(allowed)
    if value not in allowed:
        raise ForgetdiagError(f"{name} {value!r}: expected one of {', '.join(map(str, allowed))}")


def check_number(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    integer: bool = False,
    optional: bool = False,
) -> None:
    """``value`` must be a finite number (an int if ``integer``) within the bounds given.

    Args:
        low, high: bounds, inclusive unless ``low_open`` / ``high_open``.
        optional: None is allowed (the setting's "automatic" value).
    """
    if value is None and optional:
        return
    kind = "an integer" if integer else "a number"
    shown = f"{value:g}" if isinstance(value, float) else repr(value)
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type or (not integer and not math.isfinite(value)):
        raise ForgetdiagError(f"{name} {shown}: expected {kind}" + _bounds(low, high, low_open, high_open))
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        raise ForgetdiagError(f"{name} {shown}: expected {kind}" + _bounds(low, high, low_open, high_open))


def _bounds(low, high, low_open, high_open) -> str:
    if low is not None and high is not None:
        excluded = [f"{v:g}" for v, is_open in ((low, low_open), (high, high_open)) if is_open]
        note = ", both excluded" if len(excluded) == 2 else "".join(f", {v} excluded" for v in excluded)
        return f" between {low:g} and {high:g}{note}"
    if low is not None:
        return f" {'>' if low_open else '>='} {low:g}"
    if high is not None:
        return f" {'<' if high_open else '<='} {high:g}"
    return ""


# Seeds feed torch.Generator.manual_seed, which takes 64-bit values.
SEED_MAX = 2**63 - 1


def check_seed(name: str, value: Any) -> None:
    check_number(name, value, low=0, high=SEED_MAX, integer=True)
