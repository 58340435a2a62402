"""``forgetdiag tokens``: how hard the new task's answer tokens are for the old model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from forgetdiag.cli.app import app
from forgetdiag.cli.common import HtmlOpt, JsonOpt, QuietOpt, command, emit, progress_bar, warn, with_runtime
from forgetdiag.probes import ProbeFields, load_probe
from forgetdiag.render.output import guard_outputs
from forgetdiag.runtime import Runtime
from forgetdiag.settings import TokenSettings

Opt = typer.Option
DEFAULTS = TokenSettings()


@command(app, "tokens")
@with_runtime(probe_fields=True)
def tokens_cmd(
    old: Annotated[
        Path, typer.Argument(help="The model before fine-tuning on the new data (one checkpoint).", show_default=False)
    ],
    data: Annotated[
        Path,
        Opt(
            "--data",
            help="The new task's rows (JSONL, JSON or CSV with prompt, answer); the answers' tokens are scored.",
            show_default=False,
        ),
    ],
    threshold: Annotated[
        float, Opt("--threshold", "-p", help="A token is hard when the old model gives it a probability below this.")
    ] = DEFAULTS.threshold,
    top: Annotated[
        int, Opt("--top", "-k", min=1, help="Hardest tokens, examples and token strings listed.")
    ] = DEFAULTS.top,
    mask_path: Annotated[
        Path | None,
        Opt(
            "--write-mask",
            help="Write a JSONL with, per row, input_ids, tokens, log-probs, keep flags and ready labels (hard tokens dropped, -100).",
            show_default=False,
        ),
    ] = None,
    json_path: JsonOpt = None,
    html_path: HtmlOpt = None,
    quiet: QuietOpt = False,
    runtime: Runtime = None,
    fields: ProbeFields = None,
) -> None:
    """Which tokens of the new data does the old model find hard? Per-token log-probabilities.

    Scores every answer token (and the EOS after it) of the new task's data under the OLD
    model, teacher forced; reports the share below --threshold, the hardest tokens and
    examples with what the old model expected instead, and with --write-mask a per-token
    keep/drop mask for training that skips the hardest tokens. Checkpoints are never modified.
    """
    settings = TokenSettings(threshold=threshold, top=top)
    guard_outputs(
        {"--json": json_path, "--html": html_path, "--write-mask": mask_path},
        [old, data, runtime.base, runtime.tokenizer],
    )
    from forgetdiag.analyses.tokens import token_difficulty
    from forgetdiag.render.tokens import tokens_table, write_mask, write_tokens_html

    rows = load_probe(data, fields=fields)
    with progress_bar(quiet) as progress:
        result = token_difficulty(old, rows, settings=settings, runtime=runtime, progress=progress, warn=warn)
    if mask_path is not None:
        write_mask(mask_path, result)
    emit(result, json=json_path, html=html_path, table=tokens_table, page=write_tokens_html)
