"""Rich rendering of :class:`forgetdiag.analyses.inspect.InspectResult`."""

from __future__ import annotations

from rich.console import Group
from rich.table import Table
from rich.text import Text

from forgetdiag.analyses.inspect import InspectResult


def human_bytes(n: int) -> str:
    """``1536`` -> ``1.5 KiB``."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"  # pragma: no cover


def human_count(n: int) -> str:
    """``1_100_000`` -> ``1.10M``."""
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def inspect_table(result: InspectResult) -> Group:
    """One row per checkpoint in sequence order, then what the sequence shares."""
    table = Table(title="Checkpoints, in sequence order", title_justify="left")
    for column, justify in (("#", "right"), ("checkpoint", "left"), ("format", "left"),
                            ("architecture", "left"), ("layers", "right"), ("hidden", "right"),
                            ("params", "right"), ("dtype", "left"), ("size", "right"),
                            ("tokenizer", "left"), ("components", "left")):
        table.add_column(column, justify=justify, overflow="fold")
    for k, c in enumerate(result.checkpoints):
        fmt = c.format if c.lora is None else f"lora r={c.lora['rank']} ({c.lora['targets']} targets)"
        components = " ".join(c.components)
        if c.unrecognised:
            components += f" (+{c.unrecognised} not recognised)"
        table.add_row(str(k), c.label, fmt, c.architecture, str(c.n_layers), str(c.hidden_size),
                      human_count(c.n_params), ",".join(c.dtypes), human_bytes(c.size_bytes),
                      "yes" if c.tokenizer else "no", components)
    lines = []
    if len(result.checkpoints) > 1:
        lines.append(Text(f"Compatible: one architecture, {result.shared_tensors} shared tensors.",
                          style="green"))
    checked = all(c.values_checked for c in result.checkpoints)
    lines.append(Text("All weights finite (every tensor read once)." if checked
                      else "Weights not read (--no-check-values)."))
    lines.extend(Text(f"Note: {n}", style="yellow") for n in result.notes)
    return Group(table, *lines)
