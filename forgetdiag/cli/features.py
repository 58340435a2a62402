"""``forgetdiag features``: per-layer feature shifts and principal-component shifts."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from forgetdiag.cli.app import app
from forgetdiag.cli.common import (
    HtmlOpt,
    JsonOpt,
    QuietOpt,
    SeedOpt,
    command,
    emit,
    progress_bar,
    warn,
    with_runtime,
)
from forgetdiag.probes import ProbeFields, load_probe
from forgetdiag.render.output import guard_outputs
from forgetdiag.runtime import Runtime
from forgetdiag.settings import FeatureSettings
from forgetdiag.settings.weights import parse_pairs

Opt = typer.Option
DEFAULTS = FeatureSettings()


@command(app, "features")
@with_runtime(probe_fields=True)
def features_cmd(
    checkpoints: Annotated[
        list[Path],
        typer.Argument(
            help="BEFORE AFTER [MORE...]: checkpoints in training order (a Trainer run directory expands to its checkpoint-N).",
            show_default=False,
        ),
    ],
    probe: Annotated[
        Path,
        Opt(
            "--probe",
            help="Prompts of the old task (JSONL, JSON or CSV with prompt, answer); answers are not used.",
            show_default=False,
        ),
    ],
    k: Annotated[
        int, Opt("--k", min=1, help="Top principal components compared per layer; the probe needs more than k prompts.")
    ] = DEFAULTS.k,
    pairs: Annotated[
        str | None,
        Opt(
            "--pairs",
            help="Checkpoint pairs to compare as I:J indices into the expanded list, e.g. 0:1,0:3. Default: consecutive ones.",
            show_default=False,
        ),
    ] = None,
    pc_shift_min: Annotated[
        float,
        Opt(
            "--pc-shift-min",
            help="A layer whose top-k PC subspace turns by at least this many degrees (mean principal angle) has shifted.",
        ),
    ] = DEFAULTS.pc_shift_min,
    cka_drop_min: Annotated[
        float,
        Opt(
            "--cka-drop-min",
            help="A layer whose linear CKA drops by at least this much (1 - CKA) has shifted. The shift starts at the lowest layer clearing either threshold.",
        ),
    ] = DEFAULTS.cka_drop_min,
    max_points: Annotated[
        int, Opt("--max-points", min=0, help="Prompts per checkpoint in the HTML scatter (a seeded sample).")
    ] = DEFAULTS.max_points,
    bootstrap: Annotated[
        int,
        Opt(
            "--bootstrap",
            min=0,
            help="Bootstrap replicates over prompts for every statistic's 95% interval (0: none). A shift counts only where its interval clears the split-half null's.",
        ),
    ] = DEFAULTS.bootstrap,
    seed: SeedOpt = 0,
    json_path: JsonOpt = None,
    html_path: HtmlOpt = None,
    quiet: QuietOpt = False,
    runtime: Runtime = None,
    fields: ProbeFields = None,
) -> None:
    """Where do the features shift? Per-layer PC angles, mean shift and CKA at the last prompt token.

    Runs every checkpoint on the probe's prompts, keeps the hidden state at the last prompt
    token of the embedding output and every layer, and compares consecutive checkpoints (or
    --pairs) layer by layer: angles between matching top PCs, principal angles between the
    top-k PC subspaces, the mean shift and its angle to the old PC1, and linear CKA. Reports the
    lowest layer where the shift starts beyond sampling noise (bootstrap intervals over prompts
    against the split-half null of the before model). Checkpoints on disk are never modified.
    """
    settings = FeatureSettings(
        pairs=parse_pairs(pairs) if pairs else None,
        k=k,
        pc_shift_min=pc_shift_min,
        cka_drop_min=cka_drop_min,
        max_points=max_points,
        seed=seed,
        bootstrap=bootstrap,
    )
    guard_outputs({"--json": json_path, "--html": html_path}, [*checkpoints, probe, runtime.base, runtime.tokenizer])
    from forgetdiag.analyses.features import feature_shifts
    from forgetdiag.render.features import features_table, write_features_html

    prompts = load_probe(probe, fields=fields)
    with progress_bar(quiet) as progress:
        result = feature_shifts(checkpoints, prompts, settings=settings, runtime=runtime, progress=progress, warn=warn)
    emit(result, json=json_path, html=html_path, table=features_table, page=write_features_html)
