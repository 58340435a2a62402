"""``forgetdiag tokens``: how hard the new task's answer tokens are for the old model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from forgetdiag.analyses.tokens import DEFAULT_THRESHOLD, token_difficulty
from forgetdiag.cli.app import app
from forgetdiag.cli.common import (HtmlOpt, JsonOpt, ModelOptions, QuietOpt, command,
                                   model_options, print_renderable, progress_bar, warn)
from forgetdiag.render.output import STDOUT, guard_outputs, write_json
from forgetdiag.render.tokens import tokens_table, write_mask, write_tokens_html

Opt = typer.Option


@command(app, "tokens")
@model_options
def tokens_cmd(
    old: Annotated[Path, typer.Argument(help="The model before fine-tuning on the new data (one checkpoint).", show_default=False)],
    data: Annotated[Path, Opt("--data", help="The new task's rows (JSONL, JSON or CSV with prompt, answer); the answers' tokens are scored.", show_default=False)],
    threshold: Annotated[float, Opt("--threshold", "-p", help="A token is hard when the old model gives it a probability below this.")] = DEFAULT_THRESHOLD,
    top: Annotated[int, Opt("--top", "-k", min=1, help="Hardest tokens, examples and token strings listed.")] = 10,
    mask_path: Annotated[Optional[Path], Opt("--write-mask", help="Write a JSONL with, per row, input_ids, tokens, log-probs, keep flags and ready labels (hard tokens dropped, -100).", show_default=False)] = None,
    json_path: JsonOpt = None,
    html_path: HtmlOpt = None,
    options: ModelOptions = None,
    quiet: QuietOpt = False,
) -> None:
    """Which tokens of the new data does the old model find hard? Per-token log-probabilities.

    Scores every answer token (and the EOS after it) of the new task's data under the OLD
    model, teacher forced; reports the share below --threshold, the hardest tokens and
    examples with what the old model expected instead, and with --write-mask a per-token
    keep/drop mask for training that skips the hardest tokens. Checkpoints are never modified.
    """
    guard_outputs([json_path, html_path, mask_path], [old])
    rows = options.probe(data)
    with progress_bar(quiet) as progress:
        result = token_difficulty(old, rows, threshold=threshold, top=top, runtime=options.runtime,
                                  progress=progress, warn=warn)
    if mask_path is not None:
        write_mask(mask_path, result)
    if json_path is not None:
        write_json(json_path, result.to_dict())
    if html_path is not None:
        write_tokens_html(html_path, result)
    print_renderable(tokens_table(result), json_to_stdout=str(json_path) == STDOUT)
