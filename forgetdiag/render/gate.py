"""Rendering of :class:`forgetdiag.analyses.gate.GateResult`: a rich table and Markdown."""

from __future__ import annotations

from rich import box
from rich.console import Group
from rich.table import Table
from rich.text import Text

from forgetdiag.analyses.gate import Check, GateResult
from forgetdiag.render.fmt import pct


def _value(c: Check) -> str:
    return "not measured" if c.detail == "not measured" else f"{c.value:.4f}"


def gate_table(result: GateResult) -> Group:
    table = Table(box=box.SIMPLE_HEAD, title=f"Gate ({result.source})", title_justify="left")
    for column in ("check", "value", "threshold", "result", "detail"):
        table.add_column(column, justify="right" if column in ("value", "threshold") else "left")
    for c in result.checks:
        table.add_row(
            c.name,
            _value(c),
            f"{c.op} {c.threshold:g}",
            Text("pass", style="green") if c.passed else Text("FAIL", style="bold red"),
            c.detail,
        )
    verdict = result.numbers.get("verdict") if result.numbers else None
    head = Text(
        "PASSED" if result.passed else f"FAILED: {len(result.failed)} of {len(result.checks)} thresholds broken",
        style="bold green" if result.passed else "bold red",
    )
    lines = [table, head]
    if verdict:
        lines.append(Text(f"Recovery verdict: {verdict}"))
    lines.extend(Text(f"Note: {n}", style="yellow") for n in result.warnings)
    return Group(*lines)


def failure_lines(result: GateResult) -> list[str]:
    """One line per broken threshold, with its numbers (printed on stderr by the CLI)."""
    return [
        f"{c.name} = {_value(c)} breaks {c.op} {c.threshold:g}"
        + (f" ({c.detail})" if c.detail and c.detail != "not measured" else "")
        for c in result.failed
    ]


def _md(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def gate_markdown(result: GateResult) -> str:
    """A Markdown summary fit for a CI job summary (e.g. $GITHUB_STEP_SUMMARY)."""
    status = "✅ passed" if result.passed else f"❌ failed ({len(result.failed)} of {len(result.checks)})"
    lines = [
        f"## forgetdiag gate: {status}",
        "",
        f"Source: {_md(result.source)}",
        "",
        "| check | value | threshold | result | detail |",
        "| --- | ---: | ---: | --- | --- |",
    ]
    for c in result.checks:
        lines.append(
            f"| {_md(c.name)} | {_value(c)} | {c.op} {c.threshold:g} | "
            f"{'pass' if c.passed else '**FAIL**'} | {_md(c.detail)} |"
        )
    numbers = result.numbers or {}
    if numbers.get("verdict"):
        acc = numbers.get("accuracy") or {}
        lines += [
            "",
            f"Recovery verdict: **{_md(numbers['verdict'])}**: old-task accuracy before "
            f"{pct(acc.get('before'))}, after {pct(acc.get('after'))}, after recovery "
            f"{pct(acc.get('recovered'))}, control after recovery {pct(acc.get('control_recovered'))}.",
        ]
    lines += [f"- {_md(n)}" for n in result.warnings]
    return "\n".join(lines) + "\n"
