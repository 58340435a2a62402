"""``forgetdiag angles``: per-layer subspace angles between weight updates."""

from __future__ import annotations

import dataclasses
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
from forgetdiag.settings import AngleSettings

Opt = typer.Option
DEFAULTS = AngleSettings()


@command(app, "angles")
@with_runtime(*(f.name for f in dataclasses.fields(Runtime)), probe_fields=True)  # --ray too
def angles_cmd(
    paths: Annotated[
        list[Path],
        typer.Argument(
            help="Checkpoints C0 C1 C2 ... in training order (model, adapter or Trainer run directories; a run expands to its checkpoints).",
            show_default=False,
        ),
    ],
    compare: Annotated[
        str | None,
        Opt(
            "--compare",
            help="Updates to compare, A:B comma-separated; an update is i-j (C(j) - C(i)) or k (C(k+1) - C(k)). E.g. 0-1:1-2 or 0-1:1-3. Default: consecutive updates, 0:1,1:2,...",
            show_default=False,
        ),
    ] = None,
    rank: Annotated[
        int | None,
        Opt(
            "--rank",
            help="Keep the top K directions of each update (randomized SVD). Default: 32 unless --energy.",
            show_default=False,
        ),
    ] = None,
    energy: Annotated[
        float | None,
        Opt(
            "--energy",
            help="Instead keep the directions holding this share of ||dW||^2, e.g. 0.99 (the paper's rule; exact SVD, slower).",
            show_default=False,
        ),
    ] = None,
    rtol: Annotated[
        float, Opt("--rtol", help="Drop directions with singular value <= rtol x the largest.")
    ] = DEFAULTS.rtol,
    min_update: Annotated[
        float,
        Opt(
            "--min-update", help="An update whose RMS entry is at most this is 'no update' (0: only unchanged weights)."
        ),
    ] = DEFAULTS.min_update,
    standardize: Annotated[
        bool, Opt("--standardize", help="Standardise each update by its scalar mean and std first, as the paper did.")
    ] = DEFAULTS.standardize,
    far: Annotated[
        float, Opt("--far", help="Mark mean angles further than this many degrees from their null baseline.")
    ] = DEFAULTS.far_deg,
    probe: Annotated[
        Path | None,
        Opt(
            "--probe",
            help="Probe (JSONL, JSON or CSV with prompt, answer) whose tokens give each layer's inputs: adds the data-informed null, the angle unrelated updates X^T G make in the subspace the inputs occupy (one forward pass per checkpoint where an update B starts).",
            show_default=False,
        ),
    ] = None,
    null_run: Annotated[
        list[Path] | None,
        Opt(
            "--null-run",
            help="Checkpoints of a second run (another seed or data) of the same model: adds the angle of each pair with update B taken from that run. Repeat for several paths.",
            show_default=False,
        ),
    ] = None,
    json_path: JsonOpt = None,
    html_path: HtmlOpt = None,
    seed: SeedOpt = DEFAULTS.seed,
    quiet: QuietOpt = False,
    runtime: Runtime = None,
    fields: ProbeFields = None,
) -> None:
    """Which directions did two weight updates share? Subspace angles per layer and component.

    Update i is C(i+1) - C(i). For every weight matrix (true q/k/v parts, MLP, embedding,
    lm_head unless tied) it compares the hidden-side singular subspaces of two updates: the
    paper's angle of each direction of the later update to the earlier update's subspace, and
    the principal angles, each next to the angle unrelated subspaces already give. Updates of
    a layer live where its inputs do, so random subspaces are far apart by construction: with
    --probe each angle also gets the data-informed null, and only that null calls alignment.
    """
    settings = AngleSettings(
        compare=compare,
        rank=rank,
        energy=energy,
        rtol=rtol,
        min_update=min_update,
        standardize=standardize,
        seed=seed,
        far_deg=far,
    )
    inputs = [*paths, *(null_run or []), probe, runtime.base, runtime.tokenizer]
    guard_outputs({"--json": json_path, "--html": html_path}, [p for p in inputs if p is not None])
    from forgetdiag.analyses.angles import compute_angles
    from forgetdiag.render.angles import angles_table, write_angles_html

    items = None if probe is None else load_probe(probe, fields=fields)
    with progress_bar(quiet) as progress:
        result = compute_angles(
            paths,
            probe=items,
            null_run=null_run or None,
            settings=settings,
            runtime=runtime,
            progress=progress,
            warn=warn,
        )
    emit(result, json=json_path, html=html_path, table=angles_table, page=write_angles_html)
