"""``forgetdiag advise``: which bottom layers to freeze during the next task."""

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
from forgetdiag.errors import ForgetdiagError
from forgetdiag.probes import ProbeFields, load_probe
from forgetdiag.render.output import guard_outputs
from forgetdiag.runfile import find_run_file, resolve_spec, spec_inputs
from forgetdiag.runtime import Runtime
from forgetdiag.settings import AdviceSettings

Opt = typer.Option
PathOpt = Path | None
DEFAULTS = AdviceSettings()


@command(app, "advise")
@with_runtime(probe_fields=True)
def advise_cmd(
    run: Annotated[
        Path | None, typer.Argument(help="A run directory with forgetdiag.toml (or a .toml file).", show_default=False)
    ] = None,
    before: Annotated[
        PathOpt,
        Opt("--before", help="Instead of a run file: the checkpoint that knew the old task.", show_default=False),
    ] = None,
    after: Annotated[
        PathOpt, Opt("--after", help="Instead of a run file: the checkpoint after the new task.", show_default=False)
    ] = None,
    probe: Annotated[
        PathOpt, Opt("--probe", help="Instead of a run file: the old task's probe.", show_default=False)
    ] = None,
    restore_min: Annotated[
        float,
        Opt(
            "--restore-min",
            help="Advise the smallest depth whose revert restores this share of the lost old-task accuracy.",
        ),
    ] = DEFAULTS.restore_min,
    max_share: Annotated[
        float, Opt("--max-share", help="Never advise freezing more than this share of the layers.")
    ] = DEFAULTS.max_share,
    eval_items: Annotated[
        int, Opt("--eval-items", min=1, help="Old-task probe rows scored per depth (a seeded sample).")
    ] = DEFAULTS.eval_items,
    skip: Annotated[
        list[str] | None,
        Opt("--skip", help="Context analyses not to run (repeatable): angles, features.", show_default=False),
    ] = None,
    json_path: JsonOpt = None,
    html_path: HtmlOpt = None,
    seed: SeedOpt = 0,
    quiet: QuietOpt = False,
    runtime: Runtime = None,
    fields: ProbeFields = None,
) -> None:
    """How many bottom layers (and the input embedding) to freeze during the next task, with the evidence and code to paste.

    Revert test: the after checkpoint with the input embedding and its bottom d layers put back
    to the before weights (d = 0, 1, ...) is scored on the old task; the smallest d that restores
    --restore-min of the lost accuracy is advised. Per-layer update angles (early vs late task
    update) and feature shifts are shown next to it. Prints a requires_grad_(False) loop over
    your model's own parameter names and the PEFT and Trainer equivalents; says so when the
    evidence does not support a freeze. Checkpoints are never modified.
    """
    if (run is None or find_run_file(run) is None) and not (before and after and probe):
        raise ForgetdiagError(
            f"{run or 'no RUN'}: no run description (forgetdiag.toml); expected "
            "RUN with forgetdiag.toml, or --before, --after and --probe"
        )
    settings = AdviceSettings(
        restore_min=restore_min, max_share=max_share, eval_items=eval_items, seed=seed, skip=tuple(skip or ())
    )
    spec = resolve_spec(run, before=before, after=after, probe=probe)
    old = spec.probes.get("old")
    if old is None:
        raise ForgetdiagError(f"{spec.path}: no old-task probe; expected [probes] old in the run file or --probe")
    guard_outputs(
        {"--json": json_path, "--html": html_path}, [run, *spec_inputs(spec), runtime.base, runtime.tokenizer]
    )
    from forgetdiag.analyses.advise import advise
    from forgetdiag.render.advise import advice_renderable, write_advice_html

    with progress_bar(quiet) as progress:
        advice = advise(
            spec, load_probe(old, fields=fields), settings=settings, runtime=runtime, progress=progress, warn=warn
        )
    emit(advice, json=json_path, html=html_path, table=advice_renderable, page=write_advice_html)
