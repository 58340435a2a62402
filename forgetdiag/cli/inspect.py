"""``forgetdiag inspect``: what forgetdiag understands of a run."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from forgetdiag.cli.app import app
from forgetdiag.cli.common import JsonOpt, QuietOpt, command, emit, progress_bar, warn, with_runtime
from forgetdiag.render.output import guard_outputs
from forgetdiag.runtime import Runtime
from forgetdiag.settings import InspectSettings


@command(app, "inspect")
@with_runtime("allow_pickle", "base", "ray")
def inspect_cmd(
    paths: Annotated[
        list[Path],
        typer.Argument(
            help="Model, adapter or Trainer output directories (one sequence, in order).", show_default=False
        ),
    ],
    json_path: JsonOpt = None,
    check_values: Annotated[
        bool, typer.Option("--check-values/--no-check-values", help="Read every tensor once and refuse NaN/Inf.")
    ] = InspectSettings.check_values,
    quiet: QuietOpt = False,
    runtime: Runtime = None,
) -> None:
    """Show each checkpoint found (architecture, layers, parameters, dtype, size, tokenizer)
    and, for a sequence, its order and whether the checkpoints are compatible.

    Run this first: it is how you check that forgetdiag understands your run.
    """
    guard_outputs({"--json": json_path}, [*paths, runtime.base])
    from forgetdiag.analyses.inspect import inspect_checkpoints
    from forgetdiag.render.inspect import inspect_table

    with progress_bar(quiet) as progress:
        result = inspect_checkpoints(
            paths, settings=InspectSettings(check_values=check_values), runtime=runtime, progress=progress, warn=warn
        )
    emit(result, json=json_path, table=inspect_table)
