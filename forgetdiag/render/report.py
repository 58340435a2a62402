"""The one-page report: verdict banner, every analysis's sections, provenance."""

from __future__ import annotations

from pathlib import Path

from rich import box
from rich.console import Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from forgetdiag.analyses.report import ReportResult
from forgetdiag.render import html
from forgetdiag.render.fmt import MISSING, human_bytes
from forgetdiag.render.recover import VERDICT_STYLE, recover_table
from forgetdiag.settings import ANALYSES


def _timing_rows(result: ReportResult) -> list[list[str]]:
    rows = []
    for name in ANALYSES:
        if name in result.timings:
            rows.append([name, f"{result.timings[name]:.1f} s", "ran"])
        else:
            rows.append([name, MISSING, f"skipped: {result.skipped.get(name, '')}"])
    total = sum(result.timings.get(name, 0.0) for name in ANALYSES)
    rows.append(["total", f"{total:.1f} s", ""])
    wall = result.timings.get("total")
    if wall is not None and wall < 0.95 * total:
        rows.append(["wall clock", f"{wall:.1f} s", "recover ran alongside the others"])
    return rows


def report_summary(result: ReportResult, out: Path | None = None) -> Group:
    """What the terminal shows: the verdict, the recovery table, timings, where the page is."""
    kind = result.verdict or "none"
    parts = [
        Panel(
            Text(f"{result.headline()}\n{result.advice()}"),
            border_style=VERDICT_STYLE.get(kind, "blue"),
            title=f"{result.spec.name}: {result.verdict or 'no verdict'}",
            title_align="left",
        )
    ]
    if result.recovery is not None and result.recovery.sequence:
        from forgetdiag.render.recover import sequence_table

        parts.append(sequence_table(result.recovery))
    table = Table(box=box.SIMPLE_HEAD, title="Time by analysis", title_justify="left")
    for column in ("analysis", "time", "status"):
        table.add_column(column)
    for row in _timing_rows(result):
        table.add_row(*row)
    parts.append(table)
    if out is not None:
        parts.append(Text(f"Report written to {out} (self-contained: open it in any browser, offline)."))
    return Group(*parts)


def _provenance(result: ReportResult) -> html.Section:
    fingerprints = [
        [
            f["label"],
            f["path"],
            f["format"],
            human_bytes(f["size_bytes"]),
            f["index_sha256"],
            f["sample_sha256"],
            f["config_sha256"] or MISSING,
        ]
        for f in result.fingerprints
    ]
    s = result.settings
    settings = (
        f"recovery: shots {s.recovery.shots or 'half'}, epochs {s.recovery.epochs}, "
        f"min steps {s.recovery.min_steps}, lr {s.recovery.lr or 'by model size'}, "
        f"seed {s.recovery.seed}, metric {result.recovery.metric if result.recovery else s.recovery.metric or 'the probe default'}; verdict thresholds: "
        f"spurious >= {s.recovery.thresholds.spurious_min}, real <= {s.recovery.thresholds.real_max}; "
        f"landscape grid {s.grid}x{s.grid} on up to {s.landscape_items} items per probe; "
        f"features on up to {s.feature_items} prompts; angles rank {s.rank}; seed {s.seed}"
    )
    return html.Section(
        "Provenance",
        [
            html.paragraph("Command:"),
            html.code(result.command or "(Python API)"),
            html.paragraph(f"Settings: {settings}."),
            html.paragraph(f"Run file: {result.spec.path}. forgetdiag {result.version}."),
            html.table(
                ["checkpoint", "path", "format", "size", "index sha256", "sample sha256", "config sha256"],
                fingerprints,
                left=3,
            ),
            html.table(["analysis", "time", "status"], _timing_rows(result)),
            *[html.paragraph(f"Note: {n}", cls="note") for n in result.warnings],
        ],
    )


def report_sections(result: ReportResult) -> list[html.Section]:
    """Every analysis's own sections, in the order of the argument."""
    sections: list[html.Section] = []
    if result.recovery is not None:
        from forgetdiag.render.recover import recover_sections

        sections += recover_sections(result.recovery)
    if result.angles is not None:
        from forgetdiag.render.angles import angles_sections

        sections += angles_sections(result.angles)
    if result.landscape is not None:
        from forgetdiag.render.landscape import landscape_page_sections

        sections += landscape_page_sections(result.landscape)
    if result.features is not None:
        from forgetdiag.render.features import features_sections

        sections += features_sections(result.features)
    skipped = [html.paragraph(f"{name}: skipped: {why}", cls="note") for name, why in result.skipped.items()]
    if skipped:
        sections.append(html.Section("Skipped analyses", skipped))
    sections.append(_provenance(result))
    return sections


def write_report_html(path: str | Path, result: ReportResult) -> Path:
    kind = result.verdict or "info"
    header = [html.banner(result.headline(), kind), html.paragraph(result.advice())]
    if result.spec.description:
        header.insert(0, html.paragraph(result.spec.description, cls="sub"))
    return html.write_page(
        path,
        f"forgetdiag report: {result.spec.name}",
        report_sections(result),
        subtitle=f"verdict: {result.verdict or 'none given'}",
        header=header,
    )


__all__ = ["report_summary", "report_sections", "write_report_html", "recover_table"]
