"""``forgetdiag report``: every analysis of one run on one offline HTML page."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, List, Optional

import typer

from forgetdiag.analyses.recovery import RecoverySettings
from forgetdiag.analyses.report import ANALYSES, ReportSettings, build_report, spec_from_options
from forgetdiag.cli.app import app
from forgetdiag.cli.common import (JsonOpt, ModelOptions, QuietOpt, SeedOpt, command, command_line,
                                   model_options, print_renderable, progress_bar, warn)
from forgetdiag.cli.recover import ControlOpt, LrOpt, MinStepsOpt, RecoveryProbeOpt, ShotsOpt
from forgetdiag.errors import ForgetdiagError
from forgetdiag.render.output import STDOUT, guard_outputs, write_json
from forgetdiag.render.report import report_summary, write_report_html
from forgetdiag.runfile import find_run_file, load_run

Opt = typer.Option
PathOpt = Optional[Path]


def resolve_spec(run: Path | None, before, after, control, probe, recovery_probe, new_probe):
    """The run file of RUN, or a run described by the options (these win when given)."""
    if run is not None and find_run_file(run) is not None and not any((before, after, probe)):
        return load_run(run)
    if before is None or probe is None:
        raise ForgetdiagError(f"{run or 'no RUN'}: no run description (forgetdiag.toml); "
                              "expected RUN with forgetdiag.toml, or --before, --probe and an "
                              "--after or a Trainer RUN directory")
    is_trainer_run = run is not None and find_run_file(run) is None
    return spec_from_options(before=before, after=after, control=control,
                             run=run if is_trainer_run else None, probe=probe,
                             recovery_probe=recovery_probe, new_probe=new_probe,
                             name=(run or after or before).name)


@command(app, "report")
@model_options
def report_cmd(
    ctx: typer.Context,
    run: Annotated[Optional[Path], typer.Argument(help="A run directory with forgetdiag.toml (or a .toml file); with --before/--probe, a Trainer output directory.", show_default=False)] = None,
    out: Annotated[PathOpt, Opt("--out", "-o", help="HTML report path. Default: <run name>-report.html in the current directory.", show_default=False)] = None,
    json_path: JsonOpt = None,
    before: Annotated[PathOpt, Opt("--before", help="Instead of a run file: the checkpoint that knew the old task.", show_default=False)] = None,
    after: Annotated[PathOpt, Opt("--after", help="Instead of a run file: the checkpoint after the new task.", show_default=False)] = None,
    control: ControlOpt = None,
    probe: Annotated[PathOpt, Opt("--probe", help="Instead of a run file: the old task's probe.", show_default=False)] = None,
    recovery_probe: RecoveryProbeOpt = None,
    new_probe: Annotated[PathOpt, Opt("--new-probe", help="The new task's probe (a second loss surface).", show_default=False)] = None,
    skip: Annotated[Optional[List[str]], Opt("--skip", help=f"Analyses not to run (repeatable): {', '.join(ANALYSES)}.", show_default=False)] = None,
    grid: Annotated[int, Opt("--grid", min=2, help="Points per side of the loss surface.")] = ReportSettings.grid,
    landscape_items: Annotated[int, Opt("--landscape-items", min=1, help="Probe items per loss surface (a seeded sample).")] = ReportSettings.landscape_items,
    feature_items: Annotated[int, Opt("--feature-items", min=2, help="Probe prompts for the feature shifts (a seeded sample).")] = ReportSettings.feature_items,
    shots: ShotsOpt = None,
    lr: LrOpt = None,
    min_steps: MinStepsOpt = RecoverySettings.min_steps,
    seed: SeedOpt = 0,
    options: ModelOptions = None,
    quiet: QuietOpt = False,
) -> None:
    """Run every analysis (recover, angles, landscape, features) on one run and write one self-contained HTML report.

    The page opens offline: a verdict banner in plain words, then one section per analysis with
    its plots and tables, the exact command and settings, and the checkpoints' fingerprints.
    Analyses whose inputs are missing are skipped with a note.
    """
    unknown = sorted(set(skip or ()) - set(ANALYSES))
    if unknown:
        raise ForgetdiagError(f"--skip {unknown[0]}: expected one of {', '.join(ANALYSES)}")
    spec = resolve_spec(run, before, after, control, probe, recovery_probe, new_probe)
    out = out or Path(f"{spec.name}-report.html")
    inputs = [p for p in (run, spec.before, spec.after, spec.control, spec.run, *spec.landscape) if p]
    guard_outputs([out, json_path], inputs)
    settings = ReportSettings(recovery=RecoverySettings(shots=shots, lr=lr, min_steps=min_steps, seed=seed), grid=grid,
                              landscape_items=landscape_items, feature_items=feature_items,
                              skip=tuple(skip or ()), seed=seed)
    with progress_bar(quiet) as progress:
        result = build_report(spec, settings=settings, runtime=options.runtime, fields=options.fields, command=command_line(ctx),
                              progress=progress, warn=warn)
    write_report_html(out, result)
    if json_path is not None:
        write_json(json_path, result.to_dict())
    print_renderable(report_summary(result, out), json_to_stdout=str(json_path) == STDOUT)
