"""``forgetdiag features``: per-layer feature shifts and principal-component shifts."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, List, Optional

import typer

from forgetdiag.analyses.features import FeatureSettings, feature_shifts, parse_pairs
from forgetdiag.cli.app import app
from forgetdiag.cli.common import (HtmlOpt, JsonOpt, ModelOptions, QuietOpt, SeedOpt, command,
                                   model_options, print_renderable, progress_bar, warn)
from forgetdiag.render.features import features_table, write_features_html
from forgetdiag.render.output import STDOUT, guard_outputs, write_json

Opt = typer.Option


@command(app, "features")
@model_options
def features_cmd(
    checkpoints: Annotated[List[Path], typer.Argument(help="BEFORE AFTER [MORE...]: checkpoints in training order (a Trainer run directory expands to its checkpoint-N).", show_default=False)],
    probe: Annotated[Path, Opt("--probe", help="Prompts of the old task (JSONL, JSON or CSV with prompt, answer); answers are not used.", show_default=False)],
    k: Annotated[int, Opt("--k", min=1, help="Top principal components compared per layer; the probe needs more than k prompts.")] = 8,
    pairs: Annotated[Optional[str], Opt("--pairs", help="Checkpoint pairs to compare as I:J indices into the expanded list, e.g. 0:1,0:3. Default: consecutive ones.", show_default=False)] = None,
    pc_shift_min: Annotated[float, Opt("--pc-shift-min", help="A layer whose top-k PC subspace turns by at least this many degrees (mean principal angle) has shifted.")] = 10.0,
    cka_drop_min: Annotated[float, Opt("--cka-drop-min", help="A layer whose linear CKA drops by at least this much (1 - CKA) has shifted. The shift starts at the lowest layer clearing either threshold.")] = 0.05,
    max_points: Annotated[int, Opt("--max-points", min=0, help="Prompts per checkpoint in the HTML scatter (a seeded sample).")] = 500,
    seed: SeedOpt = 0,
    json_path: JsonOpt = None,
    html_path: HtmlOpt = None,
    options: ModelOptions = None,
    quiet: QuietOpt = False,
) -> None:
    """Where do the features shift? Per-layer PC angles, mean shift and CKA at the last prompt token.

    Runs every checkpoint on the probe's prompts, keeps the hidden state at the last prompt
    token of the embedding output and every layer, and compares consecutive checkpoints (or
    --pairs) layer by layer: angles between matching top PCs, principal angles between the
    top-k PC subspaces, the mean shift and its angle to the old PC1, and linear CKA. Reports the
    lowest layer where the shift starts. Checkpoints on disk are never modified.
    """
    guard_outputs([json_path, html_path], checkpoints)
    settings = FeatureSettings(k=k, pc_shift_min=pc_shift_min, cka_drop_min=cka_drop_min,
                               max_points=max_points, seed=seed)
    prompts = options.probe(probe)
    with progress_bar(quiet) as progress:
        result = feature_shifts(checkpoints, prompts, pairs=parse_pairs(pairs) if pairs else None,
                                settings=settings, runtime=options.runtime, progress=progress, warn=warn)
    if json_path is not None:
        write_json(json_path, result.to_dict())
    if html_path is not None:
        write_features_html(html_path, result)
    print_renderable(features_table(result), json_to_stdout=str(json_path) == STDOUT)
