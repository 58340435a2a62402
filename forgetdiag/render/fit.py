"""Tables that fit the terminal: a table too wide for the console is shown as several tables, each
with the row labels and as many of the columns as fit, so that no name or number is ever cut."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from rich.console import Console, ConsoleOptions, RenderResult
from rich.measure import Measurement
from rich.table import Table


class FitColumns:
    """A table whose data columns are spread over as many tables as the console width needs.

    ``build(columns, first)`` makes the table holding the row labels and the data columns of
    the given indices (``first``: the first of the tables, which carries the title). Columns
    keep their order; a column too wide on its own gets a table to itself.
    """

    def __init__(self, build: Callable[[Sequence[int], bool], Table], n_columns: int) -> None:
        self.build = build
        self.n_columns = n_columns

    def groups(self, console: Console, width: int) -> list[list[int]]:
        """The column indices of each table, for a console ``width`` wide."""
        options = console.options.update_width(1 << 16)  # measure unconstrained: get() clamps to the width
        groups: list[list[int]] = []
        current: list[int] = []
        for k in range(self.n_columns):
            trial = [*current, k]
            table = self.build(trial, not groups)
            if current and Measurement.get(console, options, table).maximum > width:
                groups.append(current)
                current = [k]
            else:
                current = trial
        if current or not groups:
            groups.append(current)
        return groups

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        for k, columns in enumerate(self.groups(console, options.max_width)):
            yield self.build(columns, k == 0)
