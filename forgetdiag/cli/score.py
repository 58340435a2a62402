"""``forgetdiag score``: every checkpoint on every probe, no training."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from forgetdiag.cli.app import app
from forgetdiag.cli.common import HtmlOpt, JsonOpt, QuietOpt, command, emit, progress_bar, warn, with_runtime
from forgetdiag.probes import ProbeFields, load_probe
from forgetdiag.render.output import guard_outputs
from forgetdiag.runtime import Runtime
from forgetdiag.settings import ScoreSettings


@command(app, "score")
@with_runtime(probe_fields=True)
def score_cmd(
    checkpoints: Annotated[
        list[Path],
        typer.Argument(
            help="Checkpoints and Trainer run directories, in order (a run expands to its checkpoint-N by step).",
            show_default=False,
        ),
    ],
    probe: Annotated[
        list[Path],
        typer.Option(
            "--probe",
            help="A probe: JSONL, JSON or CSV of prompt/answer or multiple-choice rows, or an lm-eval task .yaml (repeatable).",
            show_default=False,
        ),
    ],
    json_path: JsonOpt = None,
    html_path: HtmlOpt = None,
    quiet: QuietOpt = False,
    runtime: Runtime = None,
    fields: ProbeFields = None,
) -> None:
    """How well does each checkpoint do each task? Scores, no training.

    Every checkpoint on every probe, one teacher-forced pass each: exact match, first token and
    answer loss for prompt/answer probes; acc and acc_norm (lm-evaluation-harness's multiple
    choice) for multiple-choice probes; each with a 95% interval. Checkpoints on disk are never
    modified.
    """
    settings = ScoreSettings()
    guard_outputs({"--json": json_path, "--html": html_path}, [*checkpoints, *probe, runtime.base, runtime.tokenizer])
    from forgetdiag.analyses.gate import probe_names
    from forgetdiag.analyses.score import score_checkpoints
    from forgetdiag.render.score import score_table, write_score_html

    loaded = [load_probe(path, fields=fields, name=name) for name, path in zip(probe_names(probe), probe)]
    with progress_bar(quiet) as progress:
        result = score_checkpoints(
            checkpoints, loaded, settings=settings, runtime=runtime, progress=progress, warn=warn
        )
    emit(result, json=json_path, html=html_path, table=score_table, page=write_score_html)
