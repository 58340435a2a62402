"""``forgetdiag report``: every analysis of one run on one offline HTML page."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from forgetdiag.cli.app import app
from forgetdiag.cli.common import (
    JsonOpt,
    QuietOpt,
    SeedOpt,
    command,
    command_line,
    emit,
    progress_bar,
    warn,
    with_runtime,
)
from forgetdiag.cli.recover import ControlOpt, LrOpt, MetricOpt, MinStepsOpt, RecoveryProbeOpt, ShotsOpt
from forgetdiag.probes import ProbeFields
from forgetdiag.render.output import guard_outputs
from forgetdiag.runfile import resolve_spec, spec_inputs
from forgetdiag.runtime import Runtime
from forgetdiag.settings import ANALYSES, RecoverySettings, ReportSettings

Opt = typer.Option
PathOpt = Path | None
DEFAULTS = ReportSettings()


@command(app, "report")
@with_runtime(probe_fields=True)
def report_cmd(
    ctx: typer.Context,
    run: Annotated[
        Path | None,
        typer.Argument(
            help="A run directory with forgetdiag.toml (or a .toml file); with --before/--probe, a Trainer output directory.",
            show_default=False,
        ),
    ] = None,
    out: Annotated[
        PathOpt,
        Opt(
            "--out",
            "-o",
            help="HTML report path. Default: <run name>-report.html in the current directory.",
            show_default=False,
        ),
    ] = None,
    json_path: JsonOpt = None,
    before: Annotated[
        PathOpt,
        Opt("--before", help="Instead of a run file: the checkpoint that knew the old task.", show_default=False),
    ] = None,
    after: Annotated[
        PathOpt, Opt("--after", help="Instead of a run file: the checkpoint after the new task.", show_default=False)
    ] = None,
    control: ControlOpt = None,
    probe: Annotated[
        PathOpt, Opt("--probe", help="Instead of a run file: the old task's probe.", show_default=False)
    ] = None,
    recovery_probe: RecoveryProbeOpt = None,
    new_probe: Annotated[
        PathOpt, Opt("--new-probe", help="The new task's probe (a second loss surface).", show_default=False)
    ] = None,
    skip: Annotated[
        list[str] | None,
        Opt("--skip", help=f"Analyses not to run (repeatable): {', '.join(ANALYSES)}.", show_default=False),
    ] = None,
    grid: Annotated[int, Opt("--grid", min=2, help="Points per side of the loss surface.")] = DEFAULTS.grid,
    landscape_items: Annotated[
        int, Opt("--landscape-items", min=1, help="Probe items per loss surface (a seeded sample).")
    ] = DEFAULTS.landscape_items,
    feature_items: Annotated[
        int, Opt("--feature-items", min=2, help="Probe prompts for the feature shifts (a seeded sample).")
    ] = DEFAULTS.feature_items,
    shots: ShotsOpt = None,
    lr: LrOpt = None,
    min_steps: MinStepsOpt = RecoverySettings.min_steps,
    metric: MetricOpt = None,
    seed: SeedOpt = 0,
    quiet: QuietOpt = False,
    runtime: Runtime = None,
    fields: ProbeFields = None,
) -> None:
    """Run every analysis (recover, angles, landscape, features) on one run and write one self-contained HTML report.

    The page opens offline: a verdict banner in plain words, then one section per analysis with
    its plots and tables, the exact command and settings, and the checkpoints' fingerprints.
    Analyses whose inputs are missing are skipped with a note.
    """
    settings = ReportSettings(
        recovery=RecoverySettings(shots=shots, lr=lr, min_steps=min_steps, metric=metric, seed=seed),
        grid=grid,
        landscape_items=landscape_items,
        feature_items=feature_items,
        skip=tuple(skip or ()),
        seed=seed,
        probe_fields=fields,
    )
    spec = resolve_spec(
        run,
        before=before,
        after=after,
        control=control,
        probe=probe,
        recovery_probe=recovery_probe,
        new_probe=new_probe,
    )
    derived = () if out is not None else ("--out",)
    out = out or Path(f"{spec.name}-report.html")
    guard_outputs(
        {"--out": out, "--json": json_path}, [run, *spec_inputs(spec), runtime.base, runtime.tokenizer], derived=derived
    )
    from forgetdiag.analyses.report import build_report
    from forgetdiag.render.report import report_summary, write_report_html

    with progress_bar(quiet) as progress:
        result = build_report(
            spec, settings=settings, runtime=runtime, command=command_line(ctx), progress=progress, warn=warn
        )
    emit(result, json=json_path, html=out, page=write_report_html, table=lambda r: report_summary(r, out))
