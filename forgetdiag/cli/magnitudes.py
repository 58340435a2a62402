"""``forgetdiag magnitudes``: which output units each task drives, and how much tasks share (MIGU)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from forgetdiag.cli.app import app
from forgetdiag.cli.common import HtmlOpt, JsonOpt, QuietOpt, command, emit, progress_bar, warn, with_runtime
from forgetdiag.probes import ProbeFields, load_probe
from forgetdiag.render.output import guard_outputs
from forgetdiag.runtime import Runtime
from forgetdiag.settings import MagnitudeSettings

Opt = typer.Option
DEFAULTS = MagnitudeSettings()


@command(app, "magnitudes")
@with_runtime(probe_fields=True)
def magnitudes_cmd(
    checkpoints: Annotated[
        list[Path],
        typer.Argument(
            help="Checkpoint(s) to measure; several, or a Trainer run directory (expands to its checkpoint-N), show how the overlap moves along the run.",
            show_default=False,
        ),
    ],
    probes: Annotated[
        list[Path],
        Opt(
            "--probe",
            help="One probe file per task (JSONL, JSON or CSV with prompt, answer); repeat for every task, at least two. The task's name is the file's stem.",
            show_default=False,
        ),
    ],
    quantile: Annotated[
        float,
        Opt(
            "--quantile",
            "-T",
            help="A task's top set: units whose summed |output| lies above this quantile of the layer's (0.7 keeps about the top 30%, as in MIGU).",
        ),
    ] = DEFAULTS.quantile,
    include_head: Annotated[
        bool,
        Opt(
            "--include-head",
            help="Also measure the output head (lm_head), whose units are vocabulary entries; computes full logits.",
        ),
    ] = False,
    json_path: JsonOpt = None,
    html_path: HtmlOpt = None,
    quiet: QuietOpt = False,
    runtime: Runtime = None,
    fields: ProbeFields = None,
) -> None:
    """Do the tasks drive the same units? Per-layer top-unit overlap of activation magnitudes (MIGU).

    For every linear layer and output unit, sums |output| over the prompt + answer + EOS tokens
    of each task's probe items (padding masked), keeps each task's top units (above the
    --quantile), and reports |S_a & S_b| / |S_a| per layer for every pair of tasks, next to its
    chance level; across checkpoints, how it moves. Checkpoints on disk are never modified.
    """
    settings = MagnitudeSettings(quantile=quantile, include_head=include_head)
    guard_outputs({"--json": json_path, "--html": html_path}, [*checkpoints, *probes, runtime.base, runtime.tokenizer])
    from forgetdiag.analyses.magnitudes import magnitude_overlap
    from forgetdiag.render.magnitudes import magnitudes_table, write_magnitudes_html

    tasks = [load_probe(p, fields=fields) for p in probes]
    with progress_bar(quiet) as progress:
        result = magnitude_overlap(checkpoints, tasks, settings=settings, runtime=runtime, progress=progress, warn=warn)
    emit(result, json=json_path, html=html_path, table=magnitudes_table, page=write_magnitudes_html)
