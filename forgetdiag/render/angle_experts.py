"""The routed experts of ``forgetdiag angles``, summarised: per layer and component the median and
range of the experts' mean angles, their null baseline, and the experts that moved most.

A 64-expert model has 192 expert matrices per layer: one column each would be unreadable, so the
table shows one row per (layer, component) and the page one heatmap cell per (layer, expert);
the JSON keeps every expert's record.
"""

from __future__ import annotations

from rich import box
from rich.table import Table
from rich.text import Text

from forgetdiag.analyses.angle_pairs import PairSpec
from forgetdiag.analyses.angle_records import ExpertSummary, summarize_experts
from forgetdiag.analyses.angles import AnglesResult
from forgetdiag.render.fmt import MISSING, deg, pct

BELOW, ABOVE = "▼", "▲"


def _marker(summary: ExpertSummary, far_deg: float) -> tuple[str, str]:
    if summary.median_deg is None or abs(summary.baseline_deg - summary.median_deg) <= far_deg:
        return "", ""
    return (BELOW, "bold cyan") if summary.median_deg < summary.baseline_deg else (ABOVE, "bold magenta")


def _range(summary: ExpertSummary) -> str:
    if summary.min_deg is None:
        return MISSING
    return f"{deg(summary.min_deg)}–{deg(summary.max_deg)}"


def _moved(summary: ExpertSummary) -> str:
    if not summary.moved_most:
        return "no update"
    return " ".join(str(e) for e in summary.moved_most) + f" ({pct(summary.norm_share, 0)})"


def experts_table(result: AnglesResult, pair: PairSpec) -> Table | None:
    """One row per (layer, component) of routed experts: the median of the experts' mean angles
    with its marker, their range, the median null baseline, how many changed in both updates,
    and the experts with the largest update B (and their share of its squared norm)."""
    summaries = summarize_experts(result.for_pair(pair))
    if not summaries:
        return None
    far = result.settings.far_deg
    table = Table(
        box=box.SIMPLE_HEAD,
        title=Text(f"Routed experts, pair {pair.label}"),
        title_justify="left",
        pad_edge=False,
        caption=Text(
            "median and range of the experts' mean angles (deg); changed: experts with an update "
            "in A and B; moved most: largest update B, with their share of its ||dW||²",
            style="dim",
        ),
        caption_justify="left",
    )
    for column in ("layer", "part", "median", "range", "null", "changed", "moved most"):
        table.add_column(column, justify="left" if column in ("part", "moved most") else "right")
    for s in summaries:
        mark, style = _marker(s, far)
        table.add_row(
            str(s.layer),
            s.component,
            Text.assemble(deg(s.median_deg), (mark, style)),
            _range(s),
            Text(deg(s.baseline_deg), style="dim"),
            f"{s.n_ok}/{s.n_experts}",
            _moved(s),
        )
    return table


EXPERT_COLUMNS = ["layer", "part", "experts changed", "median", "min", "max", "baseline", "moved most"]


def expert_rows(result: AnglesResult, pair: PairSpec) -> list[list]:
    """The experts table as rows for an HTML table (:data:`EXPERT_COLUMNS`)."""

    def f(x):
        return None if x is None else round(x, 2)

    return [
        [
            s.layer,
            s.component,
            f"{s.n_ok}/{s.n_experts}",
            f(s.median_deg),
            f(s.min_deg),
            f(s.max_deg),
            f(s.baseline_deg),
            _moved(s),
        ]
        for s in summarize_experts(result.for_pair(pair))
    ]


def expert_figure(result: AnglesResult, pair: PairSpec):
    """One heatmap per expert component: the mean angle of every expert (columns) in every
    layer (rows), or None for a model without routed experts."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    records = [r for r in result.for_pair(pair) if r.expert is not None]
    if not records:
        return None
    components = list(dict.fromkeys(r.component for r in records))
    layers = sorted({r.layer for r in records})
    n_experts = max(r.expert for r in records) + 1
    fig = make_subplots(rows=len(components), cols=1, subplot_titles=components, vertical_spacing=0.08)
    for k, component in enumerate(components):
        z = [[None] * n_experts for _ in layers]
        text = [[""] * n_experts for _ in layers]
        for r in records:
            if r.component != component:
                continue
            row = layers.index(r.layer)
            z[row][r.expert] = r.angle_deg if r.ok else None
            text[row][r.expert] = (
                f"layer {r.layer} expert {r.expert} {component}: "
                + (f"{r.angle_deg:.1f}° (baseline {r.baseline_deg:.1f}°)" if r.ok else r.status.replace("_", " "))
                + f"<br>|dW| A {r.norm_a:.3g}, B {r.norm_b:.3g}"
            )
        fig.add_trace(
            go.Heatmap(
                z=z,
                x=list(range(n_experts)),
                y=[str(layer) for layer in layers],
                zmin=0,
                zmax=90,
                colorscale="Viridis",
                text=text,
                hovertemplate="%{text}<extra></extra>",
                showscale=k == 0,
            ),
            row=k + 1,
            col=1,
        )
    fig.update_yaxes(title_text="layer", type="category")
    fig.update_xaxes(title_text="expert")
    fig.update_layout(template="plotly_white", title=f"Mean angle of every routed expert, pair {pair.label}")
    return fig
