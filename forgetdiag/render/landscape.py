"""Rendering of :class:`forgetdiag.analyses.landscape.LandscapeResult`: a rich table and HTML.

The HTML page draws one contour plot per probe (and their mean), with the trajectory and the
anchors on it; the top and right axes give the parameter-space distance along d_x and d_y.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from rich import box
from rich.console import Group
from rich.table import Table
from rich.text import Text

from forgetdiag.analyses.landscape import LandscapeResult
from forgetdiag.analyses.plane import RAW
from forgetdiag.render import html
from forgetdiag.render.fmt import MISSING, num


def describe_plane(result: LandscapeResult) -> str:
    """One sentence: what the directions are, how long, the angle between them, the grid."""
    p = result.plane
    if p.mode == RAW:
        dirs = f"d_x = X_END - ORIGIN (|d_x| = {p.norm_x:.4g}), d_y = Y_END - X_END (|d_y| = {p.norm_y:.4g})"
    else:
        dirs = f"filter-normalized random directions, seed {p.seed} (|d_x| = {p.norm_x:.4g}, |d_y| = {p.norm_y:.4g})"
    return (
        f"{dirs}, {p.angle_deg:.1f} degrees apart, over {p.n_params:,} parameters "
        f"(|theta_0| = {p.origin_norm:.4g}); grid {len(result.alphas)} x {len(result.betas)} over "
        f"alpha {result.alphas[0]:g}..{result.alphas[-1]:g}, beta {result.betas[0]:g}..{result.betas[-1]:g}; "
        f"{result.dtype} on {result.device}"
    )


def _lowest(result: LandscapeResult, name: str) -> str:
    surface = result.surfaces[name]
    if not np.isfinite(surface).any():
        return MISSING
    i, j = np.unravel_index(np.nanargmin(np.where(np.isfinite(surface), surface, np.nan)), surface.shape)
    return f"{surface[i, j]:.4g} at ({result.alphas[j]:g}, {result.betas[i]:g})"


def landscape_table(result: LandscapeResult) -> Group:
    """Anchor losses per probe, the lowest grid point, and the trajectory's coordinates."""
    names = [p.name for p in result.probes]
    lines: list = [Text(describe_plane(result))]
    anchors = Table(box=box.SIMPLE_HEAD, pad_edge=False, title="Loss at the anchor points", title_justify="left")
    for column in ("point", "checkpoint", "alpha", "beta", *names):
        left = column in ("point", "checkpoint")
        anchors.add_column(column, justify="left" if left else "right", no_wrap=left)
    for a in result.anchors:
        anchors.add_row(a.point, a.checkpoint, f"{a.alpha:g}", f"{a.beta:g}", *(num(a.losses.get(n)) for n in names))
    lines.append(anchors)
    lines.append(Text("Lowest grid point: " + "; ".join(f"{n} {_lowest(result, n)}" for n in names)))
    if result.trajectory:
        lines.append(trajectory_table(result))
    done, total = int(result.computed.sum()), result.computed.size
    status = (
        f"{total} grid points, {result.evaluated} evaluated now"
        if result.complete
        else f"grid incomplete: {done} of {total} points (rerun with --resume to finish)"
    )
    lines.append(Text(f"{status}; {sum(result.timings.values()):.1f} s.", style=None if result.complete else "yellow"))
    lines.extend(Text(f"Warning: {w}", style="yellow") for w in result.warnings)
    lines.extend(Text(f"Note: {n}", style="dim") for n in result.warnings)
    return Group(*lines)


def _coord(value: float) -> str:
    text = f"{value:.4f}"
    return "0.0000" if text == "-0.0000" else text


def trajectory_table(result: LandscapeResult) -> Table:
    """Each trajectory checkpoint's coordinates and off-plane residual."""
    table = Table(
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        title_justify="left",
        title="Trajectory on the plane (least squares over all parameters)",
        caption="distance = |theta - theta_0|; residual = distance from the plane; relative = residual / distance",
        caption_justify="left",
    )
    for column in ("checkpoint", "step", "alpha", "beta", "distance", "residual", "relative"):
        table.add_column(column, justify="left" if column == "checkpoint" else "right", no_wrap=column == "checkpoint")
    for t in result.trajectory:
        table.add_row(
            t.checkpoint,
            "" if t.step is None else str(t.step),
            _coord(t.alpha),
            _coord(t.beta),
            f"{t.distance:.4g}",
            f"{t.residual:.4g}",
            f"{t.relative_residual:.3f}",
        )
    return table


def _ticks(lo: float, hi: float) -> list[float]:
    """Loss values 1, 2, 5 x 10^k between ``lo`` and ``hi`` (colour-bar ticks of a log scale)."""
    out = []
    for k in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1):
        out += [m * 10.0**k for m in (1, 2, 5) if lo <= m * 10.0**k <= hi]
    return out or [lo, hi]


def _nice(lo: float, hi: float, n: int = 5) -> list[float]:
    """About ``n`` round tick values (1, 2 or 5 times a power of ten apart) within [lo, hi]."""
    if not hi > lo:
        return [lo]
    step = 10.0 ** math.floor(math.log10((hi - lo) / n))
    step *= next(m for m in (1, 2, 5, 10) if (hi - lo) / (m * step) <= n)
    return [round(k * step, 12) for k in range(math.ceil(lo / step), math.floor(hi / step) + 1)]


def contour_figure(result: LandscapeResult, surface: np.ndarray, title: str):
    """A plotly contour of ``surface`` with the anchors, the trajectory and distance axes."""
    import plotly.graph_objects as go

    finite = surface[np.isfinite(surface) & (surface > 0)]
    log = finite.size > 0 and finite.max() / finite.min() > 10  # colour by log10(loss)
    z = np.log10(np.where(surface > 0, surface, np.nan)) if log else surface
    colorbar = {"title": {"text": "loss"}, "x": 1.14}
    if log:
        ticks = _ticks(float(finite.min()), float(finite.max()))
        colorbar.update(tickvals=[math.log10(t) for t in ticks], ticktext=[f"{t:g}" for t in ticks])
    text = [[f"loss {num(v)}" for v in row] for row in surface]
    fig = go.Figure(
        go.Contour(
            x=list(result.alphas),
            y=list(result.betas),
            z=np.where(np.isfinite(z), z, None).tolist(),
            text=text,
            colorscale="Viridis",
            ncontours=24,
            colorbar=colorbar,
            connectgaps=False,
            hovertemplate="alpha %{x:.3g}, beta %{y:.3g}<br>%{text}<extra></extra>",
        )
    )
    _trajectory_traces(fig, result)
    _distance_axes(fig, result)
    fig.update_layout(
        title={"text": title},
        height=560,
        margin={"l": 70, "r": 150, "t": 90, "b": 60},
        legend={"orientation": "h", "y": -0.15},
    )
    return fig


def _trajectory_traces(fig, result: LandscapeResult) -> None:
    import plotly.graph_objects as go

    if result.trajectory:
        t = result.trajectory
        fig.add_trace(
            go.Scatter(
                x=[p.alpha for p in t],
                y=[p.beta for p in t],
                mode="lines+markers",
                name="trajectory",
                line={"color": "white", "width": 2},
                marker={"size": 7, "color": "white", "line": {"color": "black", "width": 1}},
                text=[
                    f"{p.checkpoint}<br>residual {p.residual:.3g} ({p.relative_residual:.1%} of |theta - theta_0|)"
                    for p in t
                ],
                hovertemplate="%{text}<br>alpha %{x:.3f}, beta %{y:.3f}<extra></extra>",
            )
        )
    a = result.anchors
    fig.add_trace(
        go.Scatter(
            x=[p.alpha for p in a],
            y=[p.beta for p in a],
            mode="markers+text",
            name="anchors",
            text=[p.point for p in a],
            textposition="top center",
            textfont={"color": "white"},
            marker={"symbol": "star", "size": 14, "color": "#ffb000", "line": {"color": "black", "width": 1}},
            hovertemplate="%{text}<extra></extra>",
        )
    )


def _distance_axes(fig, result: LandscapeResult) -> None:
    """Top and right axes in parameter-space distance (alpha |d_x|, beta |d_y|)."""
    import plotly.graph_objects as go

    a0, a1, b0, b1 = result.alphas[0], result.alphas[-1], result.betas[0], result.betas[-1]
    nx, ny = result.plane.norm_x, result.plane.norm_y
    # an invisible trace makes plotly draw the overlaying axes
    fig.add_trace(
        go.Scatter(
            x=[a0 * nx, a1 * nx],
            y=[b0 * ny, b1 * ny],
            xaxis="x2",
            yaxis="y2",
            mode="markers",
            marker={"opacity": 0},
            hoverinfo="skip",
            showlegend=False,
        )
    )
    fig.update_layout(
        xaxis={"title": {"text": "alpha (units of d_x)"}, "range": [a0, a1]},
        yaxis={"title": {"text": "beta (units of d_y)"}, "range": [b0, b1]},
        xaxis2={
            "title": {"text": f"distance along d_x (|d_x| = {nx:.3g})"},
            "overlaying": "x",
            "side": "top",
            "range": [a0 * nx, a1 * nx],
            "showgrid": False,
            "tickvals": _nice(a0 * nx, a1 * nx),
        },
        yaxis2={
            "title": {"text": f"distance along d_y (|d_y| = {ny:.3g})"},
            "overlaying": "y",
            "side": "right",
            "range": [b0 * ny, b1 * ny],
            "showgrid": False,
            "tickvals": _nice(b0 * ny, b1 * ny),
        },
    )


def _tables(result: LandscapeResult) -> list[str]:
    names = [p.name for p in result.probes]
    anchor_rows = [
        (a.point, a.checkpoint, f"{a.alpha:g}", f"{a.beta:g}", *(a.losses.get(n) for n in names))
        for a in result.anchors
    ]
    parts = [html.table(("point", "checkpoint", "alpha", "beta", *(f"loss: {n}" for n in names)), anchor_rows, left=2)]
    if result.trajectory:
        parts.append(
            html.paragraph(
                "Trajectory: every checkpoint placed by least squares over all "
                "parameters; the residual is its distance from the plane."
            )
        )
        parts.append(
            html.table(
                ("checkpoint", "step", "alpha", "beta", "|theta - theta_0|", "residual", "relative residual"),
                [
                    (t.checkpoint, t.step, _coord(t.alpha), _coord(t.beta), t.distance, t.residual, t.relative_residual)
                    for t in result.trajectory
                ],
            )
        )
    return parts


def landscape_page_sections(result: LandscapeResult) -> list[html.Section]:
    """The page's sections: the plane and its tables, then one contour per probe and the mean."""
    plane = html.Section("Plane", [html.paragraph(describe_plane(result)), *_tables(result)])
    if result.plane.line_angle_deg < 60:
        plane.parts.append(
            html.paragraph(
                f"d_x and d_y are {result.plane.angle_deg:.1f} degrees apart, but the plots draw them "
                "at right angles: distances are exact along each axis only.",
                cls="note",
            )
        )
    plane.parts += [html.paragraph(f"Warning: {w}", cls="note") for w in result.warnings]
    plane.parts += [html.paragraph(f"Note: {n}", cls="note") for n in result.warnings]
    if not result.complete:
        plane.parts.append(
            html.banner(f"Grid incomplete: {int(result.computed.sum())} of {result.computed.size} points.", "mixed")
        )
    surfaces: Sequence[tuple[str, np.ndarray]] = [(p.name, result.surfaces[p.name]) for p in result.probes]
    if len(result.probes) > 1:
        surfaces = [*surfaces, ("mean of the probes", result.mean_surface())]
    sections = [plane]
    for name, surface in surfaces:
        fig = contour_figure(result, surface, f"Answer-token loss: {name}")
        sections.append(html.Section(f"Surface: {name}", [html.figure(fig)]))
    return sections


def write_landscape_html(path: str | Path, result: LandscapeResult) -> Path:
    """Write the self-contained (offline) HTML page of a landscape."""
    names = ", ".join(a.checkpoint for a in result.anchors)
    return html.write_page(
        path, "forgetdiag landscape", landscape_page_sections(result), subtitle=f"Loss surfaces on the plane of {names}"
    )
