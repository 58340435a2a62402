"""``forgetdiag advise``: which bottom layers to freeze during the next task."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, List, Optional

import typer

from forgetdiag.analyses.advise import AdviceSettings, advise
from forgetdiag.cli.app import app
from forgetdiag.cli.common import (HtmlOpt, JsonOpt, ModelOptions, QuietOpt, SeedOpt, command,
                                   model_options, print_renderable, progress_bar, warn)
from forgetdiag.cli.report import resolve_spec
from forgetdiag.errors import ForgetdiagError
from forgetdiag.render.advise import advice_renderable, write_advice_html
from forgetdiag.render.output import STDOUT, guard_outputs, write_json
from forgetdiag.runfile import find_run_file

Opt = typer.Option
PathOpt = Optional[Path]
DEFAULTS = AdviceSettings()


@command(app, "advise")
@model_options
def advise_cmd(
    run: Annotated[Optional[Path], typer.Argument(help="A run directory with forgetdiag.toml (or a .toml file).", show_default=False)] = None,
    before: Annotated[PathOpt, Opt("--before", help="Instead of a run file: the checkpoint that knew the old task.", show_default=False)] = None,
    after: Annotated[PathOpt, Opt("--after", help="Instead of a run file: the checkpoint after the new task.", show_default=False)] = None,
    probe: Annotated[PathOpt, Opt("--probe", help="Instead of a run file: the old task's probe.", show_default=False)] = None,
    restore_min: Annotated[float, Opt("--restore-min", help="Advise the smallest depth whose revert restores this share of the lost old-task accuracy.")] = DEFAULTS.restore_min,
    max_share: Annotated[float, Opt("--max-share", help="Never advise freezing more than this share of the layers.")] = DEFAULTS.max_share,
    eval_items: Annotated[int, Opt("--eval-items", min=1, help="Old-task probe rows scored per depth (a seeded sample).")] = DEFAULTS.eval_items,
    skip: Annotated[Optional[List[str]], Opt("--skip", help="Context analyses not to run (repeatable): angles, features.", show_default=False)] = None,
    json_path: JsonOpt = None,
    html_path: HtmlOpt = None,
    seed: SeedOpt = 0,
    options: ModelOptions = None,
    quiet: QuietOpt = False,
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
        raise ForgetdiagError(f"{run or 'no RUN'}: no run description (forgetdiag.toml); expected "
                              "RUN with forgetdiag.toml, or --before, --after and --probe")
    spec = resolve_spec(run, before, after, None, probe, None, None)
    old = spec.probes.get("old")
    if old is None:
        raise ForgetdiagError(f"{spec.path}: no old-task probe; expected [probes] old in the run file or --probe")
    guard_outputs([json_path, html_path], [p for p in (run, spec.before, spec.after) if p])
    settings = AdviceSettings(restore_min=restore_min, max_share=max_share, eval_items=eval_items,
                              seed=seed, skip=tuple(skip or ()))
    with progress_bar(quiet) as progress:
        advice = advise(spec, options.probe(old), settings=settings, runtime=options.runtime,
                        progress=progress, warn=warn)
    if json_path is not None:
        write_json(json_path, advice.to_dict())
    if html_path is not None:
        write_advice_html(html_path, advice)
    print_renderable(advice_renderable(advice), json_to_stdout=str(json_path) == STDOUT)
