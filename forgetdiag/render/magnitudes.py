"""Rendering of :class:`forgetdiag.analyses.magnitudes.MagnitudesResult`: rich tables and HTML."""

from __future__ import annotations

import math
from pathlib import Path

from rich import box
from rich.console import Group
from rich.table import Table
from rich.text import Text

from forgetdiag.analyses.magnitudes import (
    TOKENS_USED,
    CheckpointOverlap,
    MagnitudesResult,
    pooled_chance,
    pooled_overlap,
    pooled_split_half,
    summary_text,
)
from forgetdiag.render import html
from forgetdiag.render.fmt import pct

_COLORS = ("#2f6fb0", "#d64545", "#57ae5b", "#e6a700", "#7b5ea7", "#3e4c59", "#c2577a")


def _layer_name(layer: int | None) -> str:
    return "other" if layer is None else str(layer)


def shown_pairs(result: MagnitudesResult) -> list[tuple[int, int]]:
    """The pairs tables show: a < b (overlap a -> b); JSON holds every ordered pair."""
    return [(a, b) for a, b in result.pairs() if a < b]


def pair_label(result: MagnitudesResult, a: int, b: int) -> str:
    return f"{result.tasks[a]} -> {result.tasks[b]}"


def letter(t: int) -> str:
    """Short task names for narrow terminal tables: A, B, ..., Z, T27, ..."""
    return chr(ord("A") + t) if t < 26 else f"T{t + 1}"


def value_columns(result: MagnitudesResult, *, short: bool = False) -> list[str]:
    """Headers of the numbers: every shown pair, the chance level, each task's split-half overlap."""
    if short:
        return (
            [f"{letter(a)}→{letter(b)}" for a, b in shown_pairs(result)]
            + ["chance"]
            + [f"{letter(t)}/{letter(t)}" for t in range(len(result.tasks))]
        )
    return (
        [pair_label(result, a, b) for a, b in shown_pairs(result)] + ["chance"] + [f"{t} halves" for t in result.tasks]
    )


def _cells(result: MagnitudesResult, modules) -> list[str]:
    pairs = shown_pairs(result)
    a, b = pairs[0]
    return (
        [pct(pooled_overlap(modules, x, y), 0) for x, y in pairs]
        + [pct(pooled_chance(modules, a, b), 0)]
        + [pct(pooled_split_half(modules, t), 0) for t in range(len(result.tasks))]
    )


def layer_rows(result: MagnitudesResult, point: CheckpointOverlap) -> list[list[str]]:
    """Per decoder layer (its linear layers pooled): the :func:`value_columns`."""
    return [
        [_layer_name(layer), str(len(modules)), *_cells(result, modules)] for layer, modules in point.layers().items()
    ]


def trend_rows(result: MagnitudesResult) -> list[list[str]]:
    """Per checkpoint (every linear layer pooled): the :func:`value_columns`."""
    return [[c.label, "" if c.step is None else str(c.step), *_cells(result, c.modules)] for c in result.checkpoints]


def _table(title: str, first: list[str], values: list[str], rows: list[list[str]]) -> Table:
    table = Table(box=box.SIMPLE_HEAD, title=title, title_justify="left")
    for k, column in enumerate([*first, *values]):
        table.add_column(column, justify="left" if k == 0 else "right", no_wrap=k == 0)
    for row in rows:
        table.add_row(*row)
    return table


def magnitudes_table(result: MagnitudesResult) -> Group:
    """The summary, the per-layer overlap of the last checkpoint, and the run's trend."""
    pairs = value_columns(result, short=True)  # letters keep the table narrow
    last = result.checkpoints[-1]
    legend = ", ".join(f"{letter(t)} = {name}" for t, name in enumerate(result.tasks))
    parts = [
        Text(summary_text(result), style="bold"),
        Text(f"Tasks: {legend}; X→Y is |S_X & S_Y| / |S_X|, X/X the overlap of X's two halves."),
        _table(
            f"Top-unit overlap |S_a & S_b| / |S_a| per layer, {last.label}",
            ["layer", "linears"],
            pairs,
            layer_rows(result, last),
        ),
    ]
    if len(result.checkpoints) > 1:
        parts.append(
            _table("Along the run (all linear layers pooled)", ["checkpoint", "step"], pairs, trend_rows(result))
        )
    parts.append(
        Text(
            f"Top set: units above the {result.quantile:g} quantile of sum |output| "
            f"over {TOKENS_USED}. Chance: the overlap of unrelated sets of these sizes; "
            "halves: the overlap of a task's two halves (split by group) with each other.",
            style="dim",
        )
    )
    parts.extend(Text(f"Note: {n}", style="yellow") for n in result.warnings)
    return Group(*parts)


def _task_heatmaps(result: MagnitudesResult, point: CheckpointOverlap):
    """One task x task heatmap per decoder layer (pooled over its linear layers)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    layers = point.layers()
    cols = min(len(layers), 6)
    rows = math.ceil(len(layers) / cols)
    fig = make_subplots(
        rows=rows,
        cols=cols,
        subplot_titles=[f"layer {_layer_name(l)}" for l in layers],
        horizontal_spacing=0.04,
        vertical_spacing=0.12 / max(rows, 1) + 0.04,
    )
    n = len(result.tasks)
    for k, modules in enumerate(layers.values()):
        z = [
            [pooled_overlap(modules, a, b) if a != b else pooled_split_half(modules, a) for b in range(n)]
            for a in range(n)
        ]  # (tasks, tasks), split-half on the diagonal
        fig.add_trace(
            go.Heatmap(
                z=z,
                x=list(result.tasks),
                y=list(result.tasks),
                zmin=0,
                zmax=1,
                colorscale="Viridis",
                showscale=k == 0,
                texttemplate="%{z:.2f}",
                hovertemplate="S_%{y} & S_%{x} / S_%{y}: %{z:.3f}<extra></extra>",
            ),
            row=k // cols + 1,
            col=k % cols + 1,
        )
    fig.update_yaxes(autorange="reversed")
    fig.update_layout(
        title=f"Top-unit overlap per layer, {point.label}: row a, column b; diagonal: the task's two halves",
        template="plotly_white",
        height=260 * rows + 80,
    )
    return fig


def _module_heatmap(result: MagnitudesResult, a: int, b: int):
    """Linear layer x checkpoint heatmap of the overlap a -> b."""
    import plotly.graph_objects as go

    modules = result.checkpoints[0].modules
    names = [f"{_layer_name(m.layer)} {m.component}" for m in modules]
    by_name = [{m.module: m for m in c.modules} for c in result.checkpoints]
    z = [
        [(c[m.module].overlap(a, b) if m.module in c else None) for c in by_name] for m in modules
    ]  # (linear layers, checkpoints)
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=[c.label for c in result.checkpoints],
            y=names,
            zmin=0,
            zmax=1,
            colorscale="Viridis",
            customdata=[[m.module] * len(result.checkpoints) for m in modules],
            hovertemplate="%{customdata} at %{x}: %{z:.3f}<extra></extra>",
        )
    )
    fig.update_yaxes(autorange="reversed", type="category", tickmode="array", tickvals=names)
    fig.update_xaxes(type="category")
    fig.update_layout(
        title=f"Overlap {pair_label(result, a, b)} per linear layer and checkpoint",
        template="plotly_white",
        height=max(320, 18 * len(names) + 140),
    )
    return fig


def _trend(result: MagnitudesResult):
    import plotly.graph_objects as go

    fig = go.Figure()
    x = [c.label for c in result.checkpoints]
    for k, (a, b) in enumerate(shown_pairs(result)):
        color = _COLORS[k % len(_COLORS)]
        fig.add_scatter(
            x=x,
            y=[pooled_overlap(c.modules, a, b) for c in result.checkpoints],
            name=pair_label(result, a, b),
            mode="lines+markers",
            line={"color": color},
        )
        fig.add_scatter(
            x=x,
            y=[pooled_chance(c.modules, a, b) for c in result.checkpoints],
            name=f"chance {pair_label(result, a, b)}",
            mode="lines",
            line={"color": color, "dash": "dot"},
        )
        fig.add_scatter(
            x=x,
            y=[pooled_split_half(c.modules, a) for c in result.checkpoints],
            name=f"{result.tasks[a]} halves",
            mode="lines",
            line={"color": color, "dash": "dash"},
        )
    fig.update_layout(
        title="Top-unit overlap along the run (all linear layers pooled)",
        yaxis={"range": [0, 1.02], "title": "|S_a & S_b| / |S_a|"},
        xaxis={"type": "category"},
        template="plotly_white",
    )
    return fig


def magnitudes_sections(result: MagnitudesResult) -> list[html.Section]:
    """HTML sections (also used by ``forgetdiag report``)."""
    last = result.checkpoints[-1]
    pairs = value_columns(result)
    main = html.Section(
        "Top-unit overlap (MIGU)",
        [
            html.banner(summary_text(result), "info"),
            html.paragraph(
                f"Per linear layer and output unit, n = sum of |output| over {TOKENS_USED}. "
                f"A task's top set holds the units above the {result.quantile:g} quantile "
                "of n; the overlap of a with b is |S_a & S_b| / |S_a|, next to the overlap "
                "two unrelated sets of these sizes have by chance, and to the split-half "
                "overlap: each task's items split in two halves by group, the halves' top "
                "sets compared (what a task shares with itself). Tasks: "
                + ", ".join(f"{t} ({n} items)" for t, n in zip(result.tasks, result.n_items))
                + ".",
                cls="note",
            ),
            html.figure(_task_heatmaps(result, last)),
            html.table(["layer", "linear layers", *pairs], layer_rows(result, last)),
        ],
    )
    sections = [main]
    along = [html.figure(_module_heatmap(result, a, b)) for a, b in shown_pairs(result)]
    if len(result.checkpoints) > 1:
        along = [
            html.figure(_trend(result), height=400),
            html.table(["checkpoint", "step", *pairs], trend_rows(result)),
            *along,
        ]
    sections.append(
        html.Section("Overlap per linear layer" if len(result.checkpoints) == 1 else "Overlap along the run", along)
    )
    if result.warnings:
        sections.append(html.Section("Notes", [html.paragraph(n, cls="note") for n in result.warnings]))
    return sections


def write_magnitudes_html(path: str | Path, result: MagnitudesResult) -> Path:
    return html.write_page(
        path,
        "forgetdiag magnitudes",
        magnitudes_sections(result),
        subtitle=f"{', '.join(result.tasks)} on {', '.join(c.label for c in result.checkpoints)}",
    )
