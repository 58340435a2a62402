"""Tables and the HTML page of ``forgetdiag score``."""

from __future__ import annotations

from pathlib import Path

from rich import box
from rich.console import Group
from rich.table import Table

from forgetdiag.analyses.score import METRIC_NAMES, ProbeSummary, ScoreRecord, ScoreResult
from forgetdiag.render import html
from forgetdiag.render.fmt import MISSING, interval, missing, num


def cell(record: ScoreRecord) -> str:
    """``0.940 [0.93, 0.95]``: the value, then its interval (two decimals keep a row narrow)."""
    if missing(record.value):
        return MISSING
    return f"{num(record.value, '.3f')} {interval(record.ci_low, record.ci_high, spec='.2f')}"


WIDTH = 80  # the terminal the tables must fit


def short_labels(labels: tuple[str, ...]) -> list[str]:
    """Checkpoint labels without the directory prefix they all share (labels are paths when two
    runs have a checkpoint of the same name: ``runs/a/checkpoint-5`` -> ``a/checkpoint-5``)."""
    parts = [label.split("/") for label in labels]
    if len(parts) < 2 or any(len(p) < 2 for p in parts):
        return list(labels)
    shared = 0
    while all(len(p) > shared + 1 and p[shared] == parts[0][shared] for p in parts):
        shared += 1
    return ["/".join(p[shared:]) for p in parts]


def probe_rows(result: ScoreResult, probe: ProbeSummary, metrics: tuple[str, ...] | None = None) -> list[list[str]]:
    """One row per checkpoint: its label, then each metric (default: all the probe's) with its interval."""
    metrics = probe.metrics if metrics is None else metrics
    return [
        [shown, *(cell(result.value(label, probe.name, m)) for m in metrics)]
        for label, shown in zip(result.checkpoints, short_labels(result.checkpoints))
    ]


def _chunks(result: ScoreResult, probe: ProbeSummary) -> list[tuple[str, ...]]:
    """The probe's metrics in groups narrow enough for :data:`WIDTH` columns next to the labels.

    Without edge padding a table is as wide as its columns plus 3 per column (padding and
    separator) less 1; a label is never narrower than 10 (it folds beyond its width)."""
    label = max(10, *(len(s) for s in short_labels(result.checkpoints)))
    widths = {
        m: max(len(METRIC_NAMES[m]), *(len(cell(result.value(c, probe.name, m))) for c in result.checkpoints))
        for m in probe.metrics
    }
    chunks, current, used = [], [], label + 2
    for m in probe.metrics:
        if current and used + widths[m] + 3 > WIDTH:
            chunks.append(tuple(current))
            current, used = [], label + 2
        current.append(m)
        used += widths[m] + 3
    return [*chunks, tuple(current)]


def score_table(result: ScoreResult) -> Group:
    """Tables of checkpoints (down) by metrics (across), one per probe, each narrow enough for an
    80-column terminal: a probe's metrics go into several tables when the labels are long (number
    columns never wrap; a label wider than the room left folds)."""
    tables = []
    for probe in result.probes:
        for part, metrics in enumerate(_chunks(result, probe)):
            title = f"{probe.name}: {probe.n} {probe.kind} items, 95% intervals"
            table = Table(
                title=title if part == 0 else f"{probe.name}, continued",
                title_justify="left",
                box=box.SIMPLE_HEAD,
                pad_edge=False,
            )
            table.add_column("checkpoint", justify="left", overflow="fold", min_width=10)
            for metric in metrics:
                table.add_column(METRIC_NAMES[metric], justify="right", no_wrap=True)
            for row in probe_rows(result, probe, metrics):
                table.add_row(*row)
            tables.append(table)
    return Group(*tables)


def _x(result: ScoreResult) -> tuple[list, str]:
    """The run's axis: steps when every checkpoint has one, else the checkpoints in order."""
    steps = [
        r.step for r in result.scores if r.probe == result.probes[0].name and r.metric == result.probes[0].metrics[0]
    ]
    if all(s is not None for s in steps) and len(set(steps)) == len(steps):
        return steps, "step"
    return list(result.checkpoints), "checkpoint"


def _figure(result: ScoreResult, probes: list[ProbeSummary], metric_of, title: str, y_title: str, unit_range: bool):
    import plotly.graph_objects as go

    x, x_title = _x(result)
    fig = go.Figure()
    for probe in probes:
        metric = metric_of(probe)
        curve = result.curve(probe.name, metric)
        values = [r.value for r in curve]
        fig.add_scatter(
            x=x,
            y=values,
            name=f"{probe.name} ({METRIC_NAMES[metric]})",
            mode="lines+markers",
            text=[r.checkpoint for r in curve],
            error_y={
                "type": "data",
                "symmetric": False,
                "array": [r.ci_high - r.value for r in curve],
                "arrayminus": [r.value - r.ci_low for r in curve],
            },
        )
    layout = {"title": y_title}
    if unit_range:
        layout["range"] = [0, 1.05]
    fig.update_layout(title=title, xaxis_title=x_title, yaxis=layout, template="plotly_white")
    return fig


def score_sections(result: ScoreResult) -> list[html.Section]:
    probes = list(result.probes)
    parts = [
        html.banner(result.summary(), "info"),
        html.figure(
            _figure(
                result,
                probes,
                lambda p: p.metrics[0],
                "Each probe's accuracy along the run (95% Wilson intervals)",
                "accuracy",
                True,
            ),
            height=420,
        ),
    ]
    with_loss = [p for p in probes if "answer_loss" in p.metrics]
    if with_loss:
        parts.append(
            html.figure(
                _figure(
                    result,
                    with_loss,
                    lambda p: "answer_loss",
                    "Answer loss along the run (nats per token, 95% intervals)",
                    "answer loss",
                    False,
                ),
                height=380,
            )
        )
    sections = [html.Section("Scores along the run", parts)]
    for probe in probes:
        sections.append(
            html.Section(
                f"Probe {probe.name}",
                [
                    html.paragraph(
                        f"{probe.n} {probe.kind} items" + (f" from {probe.path}" if probe.path else "") + ".",
                        cls="note",
                    ),
                    html.table(
                        ["checkpoint", *(f"{METRIC_NAMES[m]} [95%]" for m in probe.metrics)], probe_rows(result, probe)
                    ),
                ],
            )
        )
    sections.append(html.Section("Intervals", [html.paragraph(result.interval, cls="note")]))
    return sections


def write_score_html(path: str | Path, result: ScoreResult) -> Path:
    return html.write_page(
        path,
        "forgetdiag score",
        score_sections(result),
        subtitle=f"{len(result.checkpoints)} checkpoints, probes: {', '.join(p.name for p in result.probes)}",
    )
