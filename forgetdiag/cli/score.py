"""``forgetdiag score``: every checkpoint on every probe, no training."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from forgetdiag.cli.app import app
from forgetdiag.cli.common import HtmlOpt, JsonOpt, QuietOpt, command, emit, progress_bar, warn, with_runtime
from forgetdiag.errors import ForgetdiagError
from forgetdiag.probes import ProbeFields, load_probe
from forgetdiag.render.output import guard_outputs
from forgetdiag.runfile import find_run_file, load_run
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
        list[Path] | None,
        typer.Option(
            "--probe",
            help="A probe: JSONL, JSON or CSV of prompt/answer or multiple-choice rows, or an lm-eval task .yaml (repeatable). Default: the probes of a run directory's forgetdiag.toml.",
            show_default=False,
        ),
    ] = None,
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
    if not probe:
        checkpoints, probe = from_run_file(checkpoints)
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


def from_run_file(checkpoints: list[Path]) -> tuple[list[Path], list[Path]]:
    """Without --probe, one RUN with a forgetdiag.toml: its before checkpoint (if any), then its
    run (or after), scored on its probes."""
    if len(checkpoints) != 1 or find_run_file(checkpoints[0]) is None:
        raise ForgetdiagError(
            "no --probe given; expected --probe FILE, or a single run directory with a forgetdiag.toml"
        )
    spec = load_run(checkpoints[0])
    if not spec.probes:
        raise ForgetdiagError(f"{spec.path}: no [probes]; expected --probe FILE or probes in the run file")
    watched = [p for p in (spec.run or spec.after,) if p is not None]
    return [*([spec.before] if spec.before is not None else []), *watched], list(spec.probes.values())
