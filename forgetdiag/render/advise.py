"""Rendering of :class:`forgetdiag.analyses.advise.Advice`: rich output and an offline HTML page."""

from __future__ import annotations

from pathlib import Path

from rich import box
from rich.console import Group
from rich.syntax import Syntax
from rich.table import Table
from rich.text import Text

from forgetdiag.analyses.advise import EMBEDDING, Advice
from forgetdiag.render import html
from forgetdiag.render.fmt import num

COLUMNS = [
    "depth",
    "reverted up to it: old-task acc.",
    "share of loss restored [95%]",
    "early/late angle ÷ isotropic null",
    "feature PC shift (°)",
    "CKA",
    "freeze",
]
CODE_TITLES = {
    "torch": "PyTorch (any training loop)",
    "trainer": "Hugging Face Trainer",
    "peft": "PEFT LoRA (leave the bottom layers out)",
}


def evidence_rows(advice: Advice) -> list[list[str]]:
    """One row per depth: the revert test, the angle departure, the feature shift."""
    return [
        [
            "input embedding" if e.layer == EMBEDDING else f"layer {e.layer}",
            num(e.reverted_accuracy, ".1%"),
            num(e.restored, ".0%")
            + ("" if e.restored_interval is None else f" [{e.restored_interval[0]:.0%}, {e.restored_interval[1]:.0%}]"),
            num(e.departure, ".2f"),
            num(e.pc_shift_deg, ".1f"),
            num(e.cka, ".2f"),
            "yes" if e.frozen else "",
        ]
        for e in advice.evidence
    ]


def headline(advice: Advice) -> str:
    return advice.reason[0].upper() + advice.reason[1:] + "."


def frozen_line(advice: Advice) -> str:
    if not advice.advised:
        return ""
    share = advice.frozen_params / advice.total_params if advice.total_params else 0.0
    return (
        f"{len(advice.frozen_names)} tensors, {advice.frozen_params:,} parameters "
        f"({share:.1%} of the model) stay frozen."
    )


FOOTNOTE = (
    "Revert test: the after checkpoint with the input embedding and every layer up to the "
    "row's put back to the before weights, scored on the old task (greedy exact match). "
    "Freezing is the remedy for spurious forgetting (check with forgetdiag recover); "
    "knowledge that is really overwritten needs replay."
)

# What the other remedies did on the spurious sample run (bench/remedies.py; the table is in
# docs/remedy.md): shown next to a freeze advice, and worded no wider than that one setting
ALTERNATIVES = (
    "Alternatives measured on forgetdiag's tiny spurious sample run only (3 training seeds; "
    "docs/remedy.md): this freeze kept 0.64 of the old task against 0.16 as shipped; replaying "
    "10% old-task rows (forgetdiag remedy replay) kept as much (0.66) at less cost to the new "
    "task; LoRA at the same learning rate kept 0.90 but learned the new task about as little as "
    "the freeze; token masking and self-output did not help there."
)


def advice_renderable(advice: Advice) -> Group:
    """The advice in words, the per-depth evidence table and the code to paste."""
    style = "bold green" if advice.advised else "bold yellow"
    table = Table(
        box=box.SIMPLE_HEAD,
        title=(
            f"Evidence: {advice.before} -> {advice.after} on "
            f"{advice.probe} ({advice.n_eval} items; old-task "
            f"accuracy {advice.accuracy_before:.1%} -> "
            f"{advice.accuracy_after:.1%})"
        ),
        title_justify="left",
    )
    for k, column in enumerate(COLUMNS):
        table.add_column(column, justify="left" if k == 0 else "right")
    for row in evidence_rows(advice):
        table.add_row(*row)
    parts = [Text(headline(advice), style=style), table]
    if advice.advised:
        parts += [Text(frozen_line(advice)), Text(ALTERNATIVES)]
        for key, title in CODE_TITLES.items():
            parts += [Text(title, style="bold"), Syntax(advice.code[key], "python", theme="ansi_dark")]
    parts += [Text(n, style="yellow") for n in advice.warnings]
    parts.append(Text(FOOTNOTE, style="dim"))
    return Group(*parts)


def _restore_figure(advice: Advice):
    import plotly.graph_objects as go

    rows = [e for e in advice.evidence if e.restored is not None]
    labels = ["embedding" if e.layer == EMBEDDING else f"+ layer {e.layer}" for e in rows]
    fig = go.Figure(
        go.Bar(
            x=labels,
            y=[100 * e.restored for e in rows],
            marker_color=["#2f8f5b" if e.frozen else "#8aa4c8" for e in rows],
            hovertemplate="%{x}: %{y:.1f}% of the loss restored<extra></extra>",
        )
    )
    fig.add_hline(
        y=100 * advice.settings.restore_min,
        line={"dash": "dash", "color": "#d64545"},
        annotation_text=f"advice threshold {advice.settings.restore_min:.0%}",
    )
    fig.update_layout(
        title="Share of the old task's lost accuracy restored by reverting the bottom",
        xaxis_title="reverted to the before weights (cumulative)",
        yaxis_title="% of the loss restored",
        template="plotly_white",
    )
    return fig


def write_advice_html(path: str | Path, advice: Advice) -> Path:
    """A self-contained page: the advice, the revert-test plot, the evidence table, the code."""
    kind = "spurious" if advice.advised else "mixed"  # green: advice given; amber: none
    main = html.Section("Advice", [html.banner(headline(advice), kind)])
    if advice.advised:
        main.parts += [html.paragraph(frozen_line(advice)), html.paragraph(ALTERNATIVES, cls="note")]
    evidence = html.Section(
        "Evidence per depth",
        [
            html.figure(_restore_figure(advice), height=380),
            html.table(COLUMNS, evidence_rows(advice)),
            html.paragraph(FOOTNOTE, cls="note"),
            *[html.paragraph(n, cls="note") for n in advice.warnings],
        ],
    )
    sections = [main, evidence]
    if advice.advised:
        sections.append(
            html.Section(
                "Code",
                [
                    part
                    for key, title in CODE_TITLES.items()
                    for part in (html.paragraph(title), html.code(advice.code[key]))
                ],
            )
        )
    subtitle = (
        f"{advice.before} -> {advice.after}, probe {advice.probe}: old-task accuracy "
        f"{advice.accuracy_before:.1%} -> {advice.accuracy_after:.1%}"
    )
    return html.write_page(path, "forgetdiag advise", sections, subtitle=subtitle)
