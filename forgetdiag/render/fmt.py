"""Numbers as text, one rule for every table and page: a missing value (None, NaN, infinity)
is shown as ``MISSING``; everything else as the number computed, never rounded away to nothing."""

from __future__ import annotations

import math
from typing import Any

from rich import box
from rich.table import Table

MISSING = "–"


def missing(value: Any) -> bool:
    """None, or a float that is NaN or infinite."""
    return value is None or (isinstance(value, float) and not math.isfinite(value))


def num(value: Any, spec: str = ".4g") -> str:
    """``value`` formatted with ``spec`` (``.3f``, ``+.3f``, ``.4g``...)."""
    return MISSING if missing(value) else format(value, spec)


def pct(value: Any, digits: int = 1) -> str:
    """A share as a percentage: ``0.1234`` -> ``12.3%``."""
    return MISSING if missing(value) else f"{100 * value:.{digits}f}%"


def deg(value: Any, digits: int = 1) -> str:
    """An angle in degrees: ``27.46`` -> ``27.5``."""
    return MISSING if missing(value) else f"{value:.{digits}f}"


def interval(low: Any, high: Any, *, percent: bool = False, spec: str = ".3f") -> str:
    """A 95% interval: ``[0.812, 0.903]`` (or in percent)."""
    if missing(low) or missing(high):
        return MISSING
    if percent:
        return f"[{pct(low)}, {pct(high)}]"
    return f"[{format(low, spec)}, {format(high, spec)}]"


def human_bytes(n: int) -> str:
    """``1536`` -> ``1.5 KiB``."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def human_count(n: int) -> str:
    """``1_100_000`` -> ``1.10M``."""
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def simple_table(title: str, columns: list[str], rows: list[list[str]], *, left: int = 1) -> Table:
    """A terminal table: the first ``left`` columns left-aligned, the rest right-aligned (numbers);
    long cells wrap, never cut."""
    table = Table(box=box.SIMPLE_HEAD, title=title, title_justify="left")
    for k, column in enumerate(columns):
        table.add_column(column, justify="left" if k < left else "right", overflow="fold")
    for row in rows:
        table.add_row(*row)
    return table
