"""Rendering of :class:`forgetdiag.analyses.features.FeaturesResult`: rich tables and HTML."""

from __future__ import annotations

import math
from pathlib import Path

from rich import box
from rich.console import Group
from rich.table import Table
from rich.text import Text

from forgetdiag.analyses.feature_stats import LayerShift
from forgetdiag.analyses.features import FeaturesResult, PairShift, summary_text
from forgetdiag.render import html
from forgetdiag.render.fmt import MISSING, deg, num

_COLORS = ("#2f6fb0", "#d64545", "#57ae5b", "#e6a700", "#7b5ea7", "#3e4c59", "#c2577a")
COLUMNS = ("layer", "PC1", "PCk avg", "95%", "null", "PCk max", "shift", "s∠PC1", "s∠PCk", "CKA", "k")
LEGEND = (
    "Angles in degrees. PC1: before vs after PC1 (|cos|, 0-90). PCk avg/max: principal angles "
    "between the before and after top-k PC subspaces. shift: ||mean after - mean before|| "
    "over the mean feature norm; s∠PC1, s∠PCk: its angle to the before PC1 and top-k "
    "subspace (a random direction's is in brackets); s∠prev: to the previous pair's shift "
    "(~180: it undoes it). k: PCs compared. 95%: bootstrap interval of PCk avg over prompts; "
    "null: PCk avg between two random halves of the before model's prompts (its 95% range): a "
    "shift counts only where its interval clears that range."
)


def _range(values) -> str:
    return MISSING if not values else f"{values[0]:.1f}-{values[1]:.1f}"


def layer_name(layer: int, n_layers: int) -> str:
    """``0`` -> ``0 emb``; the last index, after the final norm, -> ``N norm``."""
    return "0 emb" if layer == 0 else f"{layer} norm" if layer == n_layers else str(layer)


def layer_row(s: LayerShift, n_layers: int) -> list[str]:
    """The cells of one layer, as text (shared by the rich and HTML tables)."""
    sub = s.subspace_angles_deg
    mean, top = (deg(sum(sub) / len(sub)), deg(max(sub))) if sub else (MISSING, MISSING)
    return [
        layer_name(s.layer, n_layers),
        deg(s.pc1_angle_deg),
        mean,
        _range(s.intervals.get("pc_shift_deg")),
        MISSING if math.isnan(s.null_pc_angle_deg) else f"{s.null_pc_angle_deg:.1f} ({_range(s.null_pc_angle_range)})",
        top,
        num(s.mean_shift_rel),
        deg(s.mean_shift_pc1_angle_deg),
        deg(s.mean_shift_subspace_angle_deg)
        + ("" if math.isnan(s.mean_shift_baseline_deg) else f" [{s.mean_shift_baseline_deg:.0f}]"),
        num(s.cka, ".3f"),
        str(s.k),
    ]


def pair_rows(result: FeaturesResult, pair: PairShift) -> tuple[list[str], list[list[str]]]:
    """Columns and rows of one pair (s∠prev only for a pair chained to the previous one)."""
    chained = any(not math.isnan(s.shift_vs_previous_deg) for s in pair.layers)
    columns = list(COLUMNS) + (["s∠prev"] if chained else [])
    rows = [layer_row(s, result.n_layers) + ([deg(s.shift_vs_previous_deg)] if chained else []) for s in pair.layers]
    for s, row in zip(pair.layers, rows):
        row[0] = f"{'▶' if s.layer == pair.shift_start else ' '} {row[0]}"
    return columns, rows


def pair_table(result: FeaturesResult, pair: PairShift) -> Table:
    """One row per hidden-state index; the row where the shift starts is marked."""
    table = Table(
        box=box.SIMPLE_HEAD,
        title=f"{pair.before} -> {pair.after}",
        collapse_padding=True,
        title_justify="left",
        caption="▶ where the shift starts",
        caption_justify="left",
    )
    columns, rows = pair_rows(result, pair)
    for column in columns:
        table.add_column(
            column,
            justify="left" if column == "layer" else "right",
            no_wrap=True,
            min_width={"layer": 8, "k": 2}.get(column, max(len(column), 5)),
        )
    for s, row in zip(pair.layers, rows):
        table.add_row(*row, style="bold" if s.layer == pair.shift_start else None)
    return table


def features_table(result: FeaturesResult) -> Group:
    """Per pair: the summary line, then the per-layer table; then the notes."""
    parts = []
    for pair in result.pairs:
        parts.append(pair_table(result, pair))
        parts.append(Text(summary_text(result, pair), style="bold"))
    parts.append(
        Text(
            f"{result.n_prompts} prompts of {result.probe}, hidden state at the last "
            f"prompt token; layer 0 = embedding output, {result.n_layers} norm = after "
            f"the final norm. {LEGEND}",
            style="dim",
        )
    )
    parts.extend(Text(f"Note: {n}", style="yellow") for n in result.warnings)
    return Group(*parts)


def _curves(result: FeaturesResult):
    from plotly.subplots import make_subplots

    panels = (
        ("PC1 angle (deg)", lambda s: s.pc1_angle_deg, "pc1_angle_deg"),
        ("PC shift: mean principal angle of the top-k PCs (deg)", lambda s: s.pc_shift_deg, "pc_shift_deg"),
        ("linear CKA", lambda s: s.cka, "cka"),
        ("mean shift / feature norm", lambda s: s.mean_shift_rel, "mean_shift_rel"),
    )
    fig = make_subplots(
        rows=2, cols=2, subplot_titles=[p[0] for p in panels], horizontal_spacing=0.09, vertical_spacing=0.14
    )
    for k, pair in enumerate(result.pairs):
        color = _COLORS[k % len(_COLORS)]
        x = [s.layer for s in pair.layers]
        for n, (_, value, key) in enumerate(panels):
            y = [_none(value(s)) for s in pair.layers]
            bars = [s.intervals.get(key) for s in pair.layers]  # 95% bootstrap intervals
            fig.add_scatter(
                x=x,
                y=y,
                error_y={
                    "type": "data",
                    "symmetric": False,
                    "array": [None if b is None or v is None else b[1] - v for b, v in zip(bars, y)],
                    "arrayminus": [None if b is None or v is None else v - b[0] for b, v in zip(bars, y)],
                },
                mode="lines+markers",
                name=f"{pair.before} -> {pair.after}",
                legendgroup=str(k),
                showlegend=n == 0,
                line={"color": color},
                row=n // 2 + 1,
                col=n % 2 + 1,
            )
        nulls = [_none(s.null_pc_angle_deg) for s in pair.layers]
        if any(v is not None for v in nulls):
            fig.add_scatter(
                x=x,
                y=nulls,
                mode="lines",
                name=f"split-half null ({pair.before})",
                line={"color": color, "dash": "dash"},
                row=1,
                col=2,
            )
        if pair.shift_start is not None:
            for n in range(4):
                fig.add_vline(x=pair.shift_start, line={"dash": "dot", "color": color}, row=n // 2 + 1, col=n % 2 + 1)
    fig.update_xaxes(dtick=1 if result.n_layers <= 24 else None)
    fig.update_xaxes(title_text="layer (0 = embedding output)", row=2)
    fig.update_layout(
        title="Per-layer shifts (dotted: where the shift starts)",
        template="plotly_white",
        legend={"orientation": "h", "y": -0.15},
    )
    return fig


def _none(x: float) -> float | None:
    return None if math.isnan(x) else x


def _scatter(result: FeaturesResult, pair: PairShift):
    """Before/after points per layer on (before PC1, mean-shift direction); a menu picks the layer."""
    import plotly.graph_objects as go

    fig = go.Figure()
    shown = pair.shift_start if pair.shift_start is not None else result.n_layers
    layers = [p.layer for p in pair.projections]
    default = layers.index(shown) if shown in layers else len(layers) - 1
    for n, p in enumerate(pair.projections):  # SVG traces: a report of many pairs would run out of WebGL contexts
        for label, points, color in (("before", p.before, "#2f6fb0"), ("after", p.after, "#d64545")):
            fig.add_scatter(
                x=points[:, 0],
                y=points[:, 1],
                mode="markers",
                name=label,
                marker={"size": 5, "opacity": 0.6, "color": color},
                visible=n == default,
                showlegend=True,
            )
    buttons = []
    for n, p in enumerate(pair.projections):
        visible = [m == n for m in range(len(pair.projections)) for _ in range(2)]
        buttons.append(
            {
                "label": f"layer {layer_name(p.layer, result.n_layers)}",
                "method": "update",
                "args": [{"visible": visible}, {"yaxis.title.text": _y_title(p.y_axis)}],
            }
        )
    y_axis = pair.projections[default].y_axis if pair.projections else "mean shift"
    fig.update_layout(
        title=f"{pair.before} -> {pair.after}: prompts at the last token, centred on the before mean",
        xaxis_title="before PC1",
        yaxis_title=_y_title(y_axis),
        template="plotly_white",
        updatemenus=[
            {"buttons": buttons, "active": default, "x": 1.0, "xanchor": "right", "y": 1.12, "yanchor": "top"}
        ],
    )
    return fig


def _y_title(y_axis: str) -> str:
    return "mean-shift direction (orthogonal to PC1)" if y_axis == "mean shift" else y_axis


def features_sections(result: FeaturesResult) -> list[html.Section]:
    """HTML sections (also used by ``forgetdiag report``)."""
    parts = [html.banner(summary_text(result, pair), "info") for pair in result.pairs]
    parts.append(html.figure(_curves(result), height=640))
    parts.append(
        html.paragraph(
            f"{result.n_prompts} prompts of {result.probe}, hidden state at the last prompt token; "
            f"layer 0 = embedding output, layer {result.n_layers} = after the final norm; k = "
            f"{result.settings.k}. ▶ marks where the shift starts: the lowest layer whose top-k PC "
            f"subspace turns by >= {result.settings.pc_shift_min:g} deg (PCk avg) or whose linear "
            f"CKA drops by >= "
            f"{result.settings.cka_drop_min:g}. {LEGEND}",
            cls="note",
        )
    )
    parts.extend(html.paragraph(f"Note: {n}", cls="note") for n in result.warnings)
    sections = [html.Section("Feature shifts", parts)]
    for pair in result.pairs:
        body = [html.table(*pair_rows(result, pair))]
        if pair.projections:
            body.append(html.figure(_scatter(result, pair), height=520))
        sections.append(html.Section(f"Feature shifts {pair.before} -> {pair.after}", body))
    return sections


def write_features_html(path: str | Path, result: FeaturesResult) -> Path:
    title = "forgetdiag features"
    return html.write_page(path, title, features_sections(result), subtitle=" -> ".join(result.checkpoints))
