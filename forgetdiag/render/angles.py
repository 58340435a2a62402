"""Rendering of :class:`forgetdiag.analyses.angles.AnglesResult`: rich tables and HTML.

Every angle is shown next to its null baseline (the angle unrelated subspaces of the same
dimensions already give), and a matrix that did not change says "no update", never 0 or 90.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from rich import box
from rich.console import Group
from rich.table import Table
from rich.text import Text

from forgetdiag.analyses.angle_pairs import PairSpec
from forgetdiag.analyses.angles import AngleRecord, AnglesResult
from forgetdiag.analyses.inspect import component_order
from forgetdiag.render import html
from forgetdiag.render.angle_experts import EXPERT_COLUMNS, expert_figure, expert_rows, experts_table
from forgetdiag.render.fit import FitColumns
from forgetdiag.render.fmt import MISSING

BELOW, ABOVE = "▼", "▲"
_NO_UPDATE = {"no_update": "no update", "no_update_a": "no upd. A", "no_update_b": "no upd. B"}


def marker(record: AngleRecord, far_deg: float) -> str:
    """``▼`` aligned beyond chance, ``▲`` less aligned than chance, else ''. Only the
    data-informed null (``--probe``) calls it: real updates sit below the isotropic null by
    construction, so without it no cell is marked (``far_deg`` is kept for callers)."""
    if not record.ok or record.chance is None:
        return ""
    return {"beyond chance": BELOW, "less aligned than chance": ABOVE}.get(record.chance, "")


def cell_text(record: AngleRecord | None, far_deg: float, *, shown_baseline: float | None = None) -> Text:
    """``62.1▼``: mean per-direction angle and marker, with ``(82.8)``, its null baseline, unless
    that is ``shown_baseline`` (the column's, printed once); or "no update"."""
    if record is None:
        return Text("")
    if not record.ok:
        return Text(_NO_UPDATE[record.status], style="dim")
    mark = marker(record, far_deg)
    own = shown_baseline is None or abs(record.baseline_deg - shown_baseline) > 0.05
    data = "" if record.baseline_data_deg is None else f" [{record.baseline_data_deg:.1f}]"
    return Text.assemble(
        f"{record.angle_deg:.1f}",
        (f" ({record.baseline_deg:.1f})" if own else "", "dim"),
        (data, "dim"),
        (mark, "bold cyan" if mark == BELOW else "bold magenta"),
    )


def column_baseline(records: list[AngleRecord | None]) -> float | None:
    """The baseline most cells of a column share (printed once in the "null" row), or None."""
    values = [round(r.baseline_deg, 1) for r in records if r is not None and r.ok]
    return statistics.mode(values) if values else None


def layer_grid(records: list[AngleRecord]) -> tuple[list[int], list[str], dict]:
    """(layers, components in forward order, {(layer, component): record}) of the layer
    matrices that are not routed experts (those are summarised by :mod:`.angle_experts`)."""
    grid = {(r.layer, r.component): r for r in records if r.layer is not None and r.expert is None}
    layers = sorted({layer for layer, _ in grid})
    components = sorted({c for _, c in grid}, key=component_order)
    return layers, components, grid


def global_records(records: list[AngleRecord]) -> list[AngleRecord]:
    """Records of matrices outside the layers (embeddings, lm_head), in forward order."""
    return [r for r in records if r.layer is None]


def pair_title(result: AnglesResult, pair: PairSpec) -> str:
    names = result.checkpoints
    return (
        f"Pair {pair.label}: update {pair.a.label} ({names[pair.a.i]} → {names[pair.a.j]}) "
        f"vs update {pair.b.label} ({names[pair.b.i]} → {names[pair.b.j]})"
    )


def pair_table(result: AnglesResult, pair: PairSpec) -> FitColumns:
    """Layers as rows, components as columns; each cell the mean angle (baseline) and marker.
    Shown as several tables side by side in time when the console is too narrow for all."""
    records = result.for_pair(pair)
    layers, components, grid = layer_grid(records)
    far = result.settings.far_deg
    shown = [column_baseline([grid.get((layer, c)) for layer in layers]) for c in components]

    def build(columns, first: bool) -> Table:
        title = Text(pair_title(result, pair)) if first else None
        table = Table(box=box.SIMPLE_HEAD, title=title, title_justify="left", pad_edge=False)
        table.add_column("layer", justify="right", no_wrap=True, min_width=5)
        for k in columns:
            table.add_column(components[k], justify="right", no_wrap=True)
        table.add_row(
            Text("null", style="dim"),
            *(Text("" if shown[k] is None else f"({shown[k]:.1f})", style="dim") for k in columns),
            end_section=True,
        )
        for layer in layers:
            cells = [cell_text(grid.get((layer, components[k])), far, shown_baseline=shown[k]) for k in columns]
            table.add_row(str(layer), *cells)
        return table

    return FitColumns(build, len(components))


def globals_line(result: AnglesResult, pair: PairSpec) -> Text | None:
    """``embed 71.3 (82.8)▼   lm_head 45.2 (82.8)▼``: the matrices outside the layers."""
    records = global_records(result.for_pair(pair))
    if not records:
        return None
    line = Text()
    for k, record in enumerate(records):
        line.append(("   " if k else "") + f"{record.component} ")
        line.append_text(cell_text(record, result.settings.far_deg))
    return line


def rank_summary(records: list[AngleRecord]) -> str:
    """Ranks kept and energy held by update A and B's bases, as min/median/max."""
    parts = []
    for side in ("a", "b"):
        ranks = [getattr(r, f"rank_{side}") for r in records if getattr(r, f"rank_{side}") is not None]
        energy = [getattr(r, f"energy_{side}") for r in records if getattr(r, f"energy_{side}") is not None]
        if not ranks:
            parts.append(f"update {side.upper()}: no update anywhere")
            continue
        parts.append(
            f"update {side.upper()}: rank {_spread(ranks, '.0f')}, energy held "
            f"{_spread([100 * e for e in energy], '.0f')}%"
        )
    missing = sum(not r.ok for r in records)
    return "; ".join(parts) + (f"; {missing} matrices without an update in A or B" if missing else "")


def _spread(values: list[float], fmt: str) -> str:
    lo, mid, hi = (format(v, fmt) for v in (min(values), statistics.median(values), max(values)))
    return lo if lo == hi else f"{lo}–{hi} (median {mid})"


def legend(result: AnglesResult) -> str:
    s = result.settings
    methods = {m for r in result.records for m in (r.method_a, r.method_b) if m is not None}
    how = " and ".join(sorted(methods)) + " SVD" if methods else "SVD"
    basis = (
        f"top {s.top_k} directions per update ({how})"
        if s.mode == "rank"
        else f"directions holding {100 * s.energy:g}% of ||dW||² ({how})"
    )
    return (
        f"Cells: mean angle (deg) of each kept direction of the later update to the earlier "
        f"update's subspace. Row 'null' and (brackets): the mean angle unrelated subspaces of "
        f"those dimensions give, its isotropic null (real updates sit below it by construction). "
        f"[Square brackets]: the data-informed null (--probe), the angle unrelated updates X^T G "
        f"make where the layer's inputs live; {BELOW} aligned beyond chance (> 3 spreads of that "
        f"null and 1° below it), {ABOVE} less aligned than chance; without --probe nothing is "
        f"marked. Bases: {basis}, directions below {s.rtol:g} x the largest "
        f"singular value dropped{'; updates standardised' if s.standardize else ''}."
    )


def angles_table(result: AnglesResult) -> Group:
    """One table per pair, each with its ranks line, then the legend and notes."""
    parts: list = []
    for pair in result.pairs:
        parts.append(pair_table(result, pair))
        line = globals_line(result, pair)
        if line is not None:
            parts.append(line)
        experts = experts_table(result, pair)
        if experts is not None:
            parts.append(experts)
        parts.append(Text(rank_summary(result.for_pair(pair)), style="dim"))
    parts.append(Text(legend(result), style="dim"))
    parts.append(
        Text(
            f"{result.architecture} ({result.family} family), {len(result.checkpoints)} "
            f"checkpoints, {sum(result.timings.values()):.1f} s on {result.device} with "
            f"{result.workers} thread{'s' if result.workers != 1 else ''}.",
            style="dim",
        )
    )
    parts.extend(Text(f"Note: {n}", style="yellow") for n in result.warnings)
    return Group(*parts)


# --- HTML ------------------------------------------------------------------------------------


def _hover(r: AngleRecord | None) -> str:
    if r is None:
        return ""
    if not r.ok:
        return f"{r.param}{'[' + r.part + ']' if r.part else ''}: {_NO_UPDATE[r.status]}"
    return (
        f"{r.param}{'[' + r.part + ']' if r.part else ''}<br>mean angle {r.angle_deg:.1f}° "
        f"(isotropic {r.baseline_deg:.1f}°{_data_hover(r)})<br>energy overlap {_share(r.energy_overlap)}"
        f"<br>principal mean {r.principal_mean_deg:.1f}° "
        f"(baseline {r.principal_baseline_mean_deg:.1f}°)<br>ranks {r.rank_a} / {r.rank_b}, "
        f"energy {100 * r.energy_a:.0f}% / {100 * r.energy_b:.0f}%"
    )


def heatmaps(result: AnglesResult, pair: PairSpec):
    """Mean angle, and mean angle minus its baseline, per layer x component."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    layers, components, grid = layer_grid(result.for_pair(pair))
    cells = [[grid.get((layer, c)) for c in components] for layer in layers]
    angle = [[r.angle_deg if r is not None and r.ok else None for r in row] for row in cells]
    gap = [[-r.gap_deg if r is not None and r.ok else None for r in row] for row in cells]
    text = [[_hover(r) for r in row] for row in cells]
    y = [str(layer) for layer in layers]
    fig = make_subplots(
        rows=1,
        cols=2,
        horizontal_spacing=0.12,
        subplot_titles=("mean angle (deg)", "mean angle minus null baseline (deg; < 0: shared directions)"),
    )
    fig.add_trace(
        go.Heatmap(
            z=angle,
            x=components,
            y=y,
            zmin=0,
            zmax=90,
            colorscale="Viridis",
            text=text,
            hovertemplate="%{text}<extra></extra>",
            colorbar={"x": 0.44, "len": 0.9},
        ),
        row=1,
        col=1,
    )
    fig.add_trace(
        go.Heatmap(
            z=gap, x=components, y=y, zmid=0, colorscale="RdBu", text=text, hovertemplate="%{text}<extra></extra>"
        ),
        row=1,
        col=2,
    )
    fig.update_yaxes(title_text="layer", autorange=True, type="category")
    fig.update_layout(template="plotly_white", title=pair_title(result, pair))
    return fig


def distributions(result: AnglesResult, pair: PairSpec):
    """Per-layer box plots of every per-direction angle (all components pooled), with the
    mean null baseline of each layer as a marker."""
    import plotly.graph_objects as go

    by_row: dict[str, tuple[list[float], list[float]]] = {}
    for r in result.for_pair(pair):
        if r.ok:
            angles, baselines = by_row.setdefault(str(r.layer) if r.layer is not None else r.component, ([], []))
            angles.extend(r.direction_deg)
            baselines.append(r.baseline_deg)
    fig = go.Figure()
    for row, (angles, _) in by_row.items():
        fig.add_trace(go.Box(y=angles, name=row, boxpoints=False, marker_color="#3e4c59", showlegend=False))
    fig.add_trace(
        go.Scatter(
            x=list(by_row),
            y=[sum(b) / len(b) for _, b in by_row.values()],
            mode="markers",
            name="null baseline",
            marker={"symbol": "line-ew-open", "size": 18, "color": "#d64545"},
        )
    )
    fig.update_layout(
        template="plotly_white",
        yaxis={"range": [0, 90], "title": "angle (deg)"},
        xaxis={"title": "layer", "type": "category"},
        title="Angle of each kept direction of the later update to the earlier "
        "update's subspace, per layer (all components)",
    )
    return fig


def principal_curve(result: AnglesResult, pair: PairSpec):
    """Mean principal angle per layer (averaged over components) next to its baseline."""
    import plotly.graph_objects as go

    layers, _, grid = layer_grid(result.for_pair(pair))
    means, nulls = [], []
    for layer in layers:
        ok = [r for (k, _), r in grid.items() if k == layer and r.ok]
        means.append(sum(r.principal_mean_deg for r in ok) / len(ok) if ok else None)
        nulls.append(sum(r.principal_baseline_mean_deg for r in ok) / len(ok) if ok else None)
    fig = go.Figure()
    fig.add_scatter(x=layers, y=means, mode="lines+markers", name="mean principal angle")
    fig.add_scatter(x=layers, y=nulls, mode="lines", name="null baseline", line={"dash": "dot"})
    fig.update_layout(
        template="plotly_white",
        yaxis={"range": [0, 90], "title": "angle (deg)"},
        xaxis_title="layer",
        title="Principal angles per layer (mean over components)",
    )
    return fig


def _share(x: float | None) -> str:
    return MISSING if x is None else f"{100 * x:.0f}%"


def _data_hover(r: AngleRecord) -> str:
    if r.baseline_data_deg is None:
        return ""
    return f", data-informed {r.baseline_data_deg:.1f}° ± {r.baseline_data_sd_deg:.1f}: {r.chance}"


def _rows(records: list[AngleRecord]) -> list[list]:
    def f(x):
        return None if x is None else round(x, 2)

    return [
        [
            r.layer if r.layer is not None else MISSING,
            r.component,
            r.param,
            _NO_UPDATE.get(r.status, "ok"),
            r.rank_a,
            r.rank_b,
            None if r.energy_a is None else f"{100 * r.energy_a:.1f}%",
            None if r.energy_b is None else f"{100 * r.energy_b:.1f}%",
            f(r.angle_deg),
            f(r.baseline_deg),
            f(r.baseline_data_deg),
            r.chance or MISSING,
            f(r.energy_overlap),
            f(r.baseline_data_energy_overlap),
            f(r.baseline_run_deg),
            f(r.principal_mean_deg),
            f(r.principal_baseline_mean_deg),
        ]
        for r in records
    ]


def angles_sections(result: AnglesResult) -> list[html.Section]:
    """HTML sections, one per pair plus settings (also used by ``forgetdiag report``)."""
    sections = []
    columns = [
        "layer",
        "component",
        "tensor",
        "status",
        "rank A",
        "rank B",
        "energy A",
        "energy B",
        "mean angle",
        "isotropic null",
        "data-informed null",
        "against it",
        "energy overlap",
        "its null",
        "second-run null",
        "principal mean",
        "principal baseline",
    ]
    for pair in result.pairs:
        records = result.for_pair(pair)
        parts = [
            html.paragraph(pair_title(result, pair)),
            html.paragraph(rank_summary(records), cls="note"),
            html.figure(heatmaps(result, pair), height=max(360, 24 * (len(layer_grid(records)[0]) + 6))),
        ]
        experts = expert_figure(result, pair)
        if experts is not None:
            n_parts = len({r.component for r in records if r.expert is not None})
            n_layers = len({r.layer for r in records if r.expert is not None})
            parts += [
                html.figure(experts, height=max(360, n_parts * (24 * n_layers + 120))),
                html.paragraph(
                    "Routed experts per layer and component: the median and range of the experts' "
                    "mean angles, and the experts with the largest update B (share of its ||dW||²). "
                    "The JSON holds every expert's record.",
                    cls="note",
                ),
                html.table(EXPERT_COLUMNS, expert_rows(result, pair), left=2),
            ]
        parts += [
            html.figure(distributions(result, pair), height=420),
            html.figure(principal_curve(result, pair), height=360),
            html.table(columns, _rows([r for r in records if r.expert is None]), left=4),
        ]
        sections.append(html.Section(f"Weight-update angles, pair {pair.label}", parts))
    notes = [
        html.paragraph(legend(result), cls="note"),
        html.paragraph(
            f"{result.architecture} ({result.family} family); checkpoints: "
            + ", ".join(f"C{k} = {c}" for k, c in enumerate(result.checkpoints))
            + f". {sum(result.timings.values()):.1f} s on {result.device}.",
            cls="note",
        ),
    ]
    notes.extend(html.paragraph(f"Note: {n}", cls="note") for n in result.warnings)
    sections.append(html.Section("Angle settings", notes))
    return sections


def write_angles_html(path: str | Path, result: AnglesResult) -> Path:
    """A self-contained page with every pair's heatmaps, distributions and table."""
    return html.write_page(
        path,
        "forgetdiag angles: weight-update subspaces",
        angles_sections(result),
        subtitle=f"{len(result.pairs)} pair(s) of updates over {len(result.checkpoints)} checkpoints",
    )
