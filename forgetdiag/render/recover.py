"""Rendering of :class:`forgetdiag.analyses.recovery.RecoveryResult`: rich tables and HTML."""

from __future__ import annotations

from pathlib import Path

from rich import box
from rich.console import Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from forgetdiag.analyses.recovery_result import RecoveryResult, summary_text
from forgetdiag.render import html
from forgetdiag.render.fmt import MISSING, interval, num, pct

VERDICT_STYLE = {"spurious": "green", "real": "red", "mixed": "yellow", "none": "blue"}
_COLOURS = {
    "before": "#3e4c59",
    "before_recovered": "#616e7c",
    "after": "#d64545",
    "recovered": "#57ae5b",
    "control": "#9aa5b1",
    "control_recovered": "#7b8794",
}
_ROWS = (
    ("before", "before"),
    ("before_recovered", "before, recovered"),
    ("after", "after"),
    ("recovered", "after, recovered"),
    ("control", "control"),
    ("control_recovered", "control, recovered"),
)


def score_columns(result: RecoveryResult) -> list[str]:
    """Headers of :func:`scores_rows`: the probe's two metrics (the verdict's interval after the first)."""
    first, second = _metrics(result)
    return ["model", first.replace("_", " "), "95% interval", second.replace("_", " "), "answer loss"]


def _metrics(result: RecoveryResult) -> tuple[str, str]:
    return ("acc", "acc_norm") if result.metric in ("acc", "acc_norm") else ("exact_match", "first_token")


def scores_rows(result: RecoveryResult) -> list[list[str]]:
    """Rows of (model, the probe's first metric, the verdict metric's 95% interval, its second
    metric, answer loss)."""
    first, second = _metrics(result)
    rows = []
    for key, label in _ROWS:
        s = result.scores.get(key)
        if s is None:
            continue
        rows.append(
            [
                label,
                pct(s.value(first)),
                f"{pct(s.ci_low)}–{pct(s.ci_high)}",
                pct(s.value(second)),
                f"{s.answer_loss:.3f}",
            ]
        )
    return rows


def _interval(d, name: str) -> str:
    low_high = d.intervals.get(name)
    return interval(*low_high) if low_high else MISSING


def numbers_rows(result: RecoveryResult) -> list[list[str]]:
    """Rows of (quantity, value, 95% interval)."""
    d = result.decision
    ref = "before, recovered" if d.reference == "before_recovered" else "before"
    return [
        ["forgetting (before - after)", num(d.forgetting, "+.3f"), _interval(d, "forgetting")],
        ["alignment loss (recovered - after)", num(d.alignment_loss, "+.3f"), _interval(d, "alignment_loss")],
        [f"knowledge loss ({ref} - recovered)", num(d.knowledge_loss, "+.3f"), _interval(d, "knowledge_loss")],
        ["control gain (what recovery teaches alone)", num(d.control_gain, "+.3f"), _interval(d, "control_gain")],
        ["spurious fraction", num(d.spurious_fraction, ".2f"), _interval(d, "spurious_fraction")],
        [
            "spurious fraction without the control's correction",
            num(d.spurious_fraction_uncorrected, ".2f"),
            _interval(d, "spurious_fraction_uncorrected"),
        ],
        [f"drop test (exact McNemar, {result.n_eval} paired items)", f"p = {d.p_value:.3g}", ""],
    ]


def recover_table(result: RecoveryResult) -> Group:
    """The verdict panel, the scores, the numbers behind the verdict, and the sequence."""
    scores = Table(
        box=box.SIMPLE_HEAD,
        title=f"Old-task accuracy on {result.n_eval} evaluation items ({result.metric.replace('_', ' ')} decides)",
        title_justify="left",
    )
    for column in score_columns(result):
        scores.add_column(column, justify="left" if column == "model" else "right")
    for row in scores_rows(result):
        scores.add_row(*row)
    numbers = Table(box=box.SIMPLE_HEAD)
    numbers.add_column("quantity", justify="left")
    numbers.add_column("value", justify="right")
    numbers.add_column("95% interval (paired bootstrap)", justify="right")
    for row in numbers_rows(result):
        numbers.add_row(*row)
    style = VERDICT_STYLE[result.verdict]
    panel = Panel(
        Text(summary_text(result)), title=f"verdict: {result.verdict}", title_align="left", border_style=style
    )
    parts = [panel, scores, numbers]
    if result.sequence:
        parts.append(sequence_table(result))
    budget = (
        f"Recovery: {result.n_recovery} examples, {result.steps} steps at lr {result.lr:g}"
        f"{' (LoRA)' if result.settings.lora else ''}, seed {result.settings.seed}"
        + (f", {result.settings.seeds} seeds." if result.settings.seeds > 1 else ".")
    )
    parts.append(Text(budget, style="dim"))
    parts.extend(Text(f"Note: {n}", style="yellow") for n in result.warnings)
    return Group(*parts)


def sequence_table(result: RecoveryResult) -> Table:
    table = Table(box=box.SIMPLE_HEAD, title="Along the run", title_justify="left")
    for column in ("checkpoint", "step", "accuracy", "recovered", "spurious fraction", "verdict"):
        table.add_column(column, justify="left" if column in ("checkpoint", "verdict") else "right")
    for p in result.sequence:
        m = result.metric
        table.add_row(
            p.label,
            "" if p.step is None else str(p.step),
            pct(p.after.value(m)),
            pct(p.recovered.value(m)),
            num(p.decision.spurious_fraction, ".2f"),
            Text(p.decision.verdict, style=VERDICT_STYLE[p.decision.verdict]),
        )
    return table


def _bars(result: RecoveryResult):
    import plotly.graph_objects as go

    keys = [(k, label) for k, label in _ROWS if result.scores.get(k) is not None]
    values = [result.scores[k].value(result.metric) for k, _ in keys]
    lows = [result.scores[k].ci_low for k, _ in keys]
    highs = [result.scores[k].ci_high for k, _ in keys]
    fig = go.Figure(
        go.Bar(
            x=[label for _, label in keys],
            y=values,
            error_y={
                "type": "data",
                "symmetric": False,
                "array": [h - v for h, v in zip(highs, values)],
                "arrayminus": [v - lo for v, lo in zip(values, lows)],
            },
            marker_color=[_COLOURS[k] for k, _ in keys],
        )
    )
    fig.update_layout(
        title="Old-task accuracy (95% Wilson intervals)",
        yaxis={"range": [0, 1.05], "title": result.metric.replace("_", " ")},
        template="plotly_white",
    )
    return fig


def _curve(result: RecoveryResult):
    import plotly.graph_objects as go

    x = [p.step if p.step is not None else k for k, p in enumerate(result.sequence)]
    text = [p.label for p in result.sequence]
    m = result.metric
    fig = go.Figure()
    fig.add_scatter(
        x=x, y=[p.after.value(m) for p in result.sequence], name="accuracy", mode="lines+markers", text=text
    )
    fig.add_scatter(
        x=x,
        y=[p.recovered.value(m) for p in result.sequence],
        name="recovered accuracy",
        mode="lines+markers",
        line={"dash": "dash"},
        text=text,
    )
    before = result.scores["before"].value(m)
    fig.add_hline(y=before, line={"dash": "dot", "color": "gray"}, annotation_text="before")
    control = result.scores.get("control_recovered")
    if control is not None:
        fig.add_hline(
            y=control.value(m), line={"dash": "dot", "color": "#9aa5b1"}, annotation_text="control, recovered"
        )
    fig.update_layout(
        title="Old-task accuracy along the run, and after recovery",
        xaxis_title="step",
        yaxis={"range": [0, 1.05], "title": m.replace("_", " ")},
        template="plotly_white",
    )
    return fig


def recover_sections(result: RecoveryResult) -> list[html.Section]:
    """HTML sections (also used by ``forgetdiag report``)."""
    main = html.Section(
        "Recovery probe",
        [
            html.banner(summary_text(result), result.verdict),
            html.table(score_columns(result), scores_rows(result)),
            html.table(["quantity", "value", "95% interval"], numbers_rows(result)),
            html.figure(_bars(result), height=380),
            html.paragraph(
                f"Checkpoints: before = {result.before}, after = {result.after}, control = "
                f"{result.control or 'none'}. Probe {result.probe}: {result.n_recovery} "
                f"recovery and {result.n_eval} evaluation items. Recovery: {result.steps} "
                f"steps, lr {result.lr:g}, batch {result.settings.batch_size}, seed "
                f"{result.settings.seed}{', LoRA' if result.settings.lora else ''}.",
                cls="note",
            ),
        ],
    )
    sections = [main]
    if result.sequence:
        rows = [
            [
                p.label,
                p.step,
                pct(p.after.value(result.metric)),
                pct(p.recovered.value(result.metric)),
                p.decision.verdict,
            ]
            for p in result.sequence
        ]
        sections.append(
            html.Section(
                "Recovery along the run",
                [
                    html.figure(_curve(result), height=420),
                    html.table(["checkpoint", "step", "accuracy", "recovered", "verdict"], rows),
                ],
            )
        )
    if result.examples:
        sections.append(
            html.Section(
                f"What {result.after} says",
                [
                    html.paragraph(
                        f"{'Likeliest choices' if result.metric in ('acc', 'acc_norm') else 'Greedy answers'} "
                        f"of the headline after-checkpoint, {result.after}, and of its recovered copy, "
                        "on the first evaluation items.",
                        cls="note",
                    ),
                    html.table(
                        ["prompt", "expected", f"{result.after} says", "recovered says"],
                        [[e.prompt, e.answer, e.after_says, e.recovered_says] for e in result.examples],
                        left=4,
                    ),
                ],
            )
        )
    return sections


def write_recover_html(path: str | Path, result: RecoveryResult) -> Path:
    return html.write_page(
        path,
        f"forgetdiag recover: {result.verdict}",
        recover_sections(result),
        subtitle=f"{result.before} -> {result.after}",
    )
