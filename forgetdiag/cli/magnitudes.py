"""``forgetdiag magnitudes``: which output units each task drives, and how much tasks share (MIGU)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, List

import typer

from forgetdiag.analyses.magnitudes import magnitude_overlap
from forgetdiag.cli.app import app
from forgetdiag.cli.common import (HtmlOpt, JsonOpt, ModelOptions, QuietOpt, command,
                                   model_options, print_renderable, progress_bar, warn)
from forgetdiag.render.magnitudes import magnitudes_table, write_magnitudes_html
from forgetdiag.render.output import STDOUT, guard_outputs, write_json

Opt = typer.Option


@command(app, "magnitudes")
@model_options
def magnitudes_cmd(
    checkpoints: Annotated[List[Path], typer.Argument(help="Checkpoint(s) to measure; several, or a Trainer run directory (expands to its checkpoint-N), show how the overlap moves along the run.", show_default=False)],
    probes: Annotated[List[Path], Opt("--probe", help="One probe file per task (JSONL, JSON or CSV with prompt, answer); repeat for every task, at least two. The task's name is the file's stem.", show_default=False)],
    quantile: Annotated[float, Opt("--quantile", "-T", help="A task's top set: units whose summed |output| lies above this quantile of the layer's (0.7 keeps about the top 30%, as in MIGU).")] = 0.7,
    include_head: Annotated[bool, Opt("--include-head", help="Also measure the output head (lm_head), whose units are vocabulary entries; computes full logits.")] = False,
    json_path: JsonOpt = None,
    html_path: HtmlOpt = None,
    options: ModelOptions = None,
    quiet: QuietOpt = False,
) -> None:
    """Do the tasks drive the same units? Per-layer top-unit overlap of activation magnitudes (MIGU).

    For every linear layer and output unit, sums |output| over the prompt + answer + EOS tokens
    of each task's probe items (padding masked), keeps each task's top units (above the
    --quantile), and reports |S_a & S_b| / |S_a| per layer for every pair of tasks, next to its
    chance level; across checkpoints, how it moves. Checkpoints on disk are never modified.
    """
    guard_outputs([json_path, html_path], checkpoints)
    tasks = [options.probe(p) for p in probes]
    with progress_bar(quiet) as progress:
        result = magnitude_overlap(checkpoints, tasks, quantile=quantile, include_head=include_head,
                                   runtime=options.runtime, progress=progress, warn=warn)
    if json_path is not None:
        write_json(json_path, result.to_dict())
    if html_path is not None:
        write_magnitudes_html(html_path, result)
    print_renderable(magnitudes_table(result), json_to_stdout=str(json_path) == STDOUT)
