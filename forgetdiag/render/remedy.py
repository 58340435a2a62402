"""Rendering of the ``remedy`` commands' results: the data file they write and a short table."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from rich.console import Group
from rich.text import Text

from forgetdiag.analyses.replay import ReplayResult
from forgetdiag.analyses.self_output import SelfOutputResult
from forgetdiag.render.fmt import pct, simple_table
from forgetdiag.render.output import write_atomic

EXAMPLES = 5


def write_rows(path: str | Path, rows: Iterable) -> Path:
    """Rows (each with ``to_dict()``) as JSONL, one object per line, written atomically."""
    return write_atomic(path, "".join(json.dumps(r.to_dict(), ensure_ascii=False) + "\n" for r in rows))


def _notes(result) -> list[Text]:
    return [Text(w, style="yellow") for w in result.warnings]


def replay_table(result: ReplayResult) -> Group:
    """The summary and the counts behind it."""
    rows = [
        [f"new rows ({result.new})", str(result.n_new)],
        [f"old rows ({result.old})", str(result.n_old)],
        ["left out by --exclude" + (f" ({result.exclude})" if result.exclude else ""), str(result.n_excluded)],
        ["old rows replayed", f"{result.n_replayed} from {result.replayed_groups} groups"],
        ["rows written", str(len(result.rows))],
        ["old share of the output", f"{pct(result.share, 2)} (--ratio {result.settings.ratio:g})"],
    ]
    return Group(Text(result.summary(), style="bold"), simple_table("Replay mix", ["", "rows"], rows), *_notes(result))


def self_output_table(result: SelfOutputResult) -> Group:
    """The summary, the count of each outcome and a few rows the old model answers otherwise."""
    c = result.counts()
    counts = [
        ["the old model already says the target (kept as is)", str(c["same"])],
        ["restated by the old model (--rewrite-prompt)", str(c["restated"])],
        ["  of which in other words than the target", str(result.n_rewritten)],
        ["keep the target", str(c["target"])],
    ]
    differ = [r for r in result.rows if r.outcome != "same"][:EXAMPLES]
    examples = [[r.prompt, r.target, r.self_output, r.answer] for r in differ]
    parts = [
        Text(result.summary(), style="bold"),
        simple_table(f"Rows of {result.data} ({len(result.rows)})", ["", "rows"], counts),
    ]
    if examples:
        columns = ["prompt", "target", "old model says", "trained on"]
        parts.append(simple_table("Rows where the old model says something else", columns, examples, left=4))
    return Group(*parts, *_notes(result))
