"""``forgetdiag inspect``: what forgetdiag understands of a run."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, List

import typer

from forgetdiag.analyses.inspect import inspect_checkpoints
from forgetdiag.cli.app import app
from forgetdiag.cli.common import (AllowPickleOpt, BaseOpt, JsonOpt, QuietOpt, command,
                                   print_renderable, progress_bar)
from forgetdiag.render.inspect import inspect_table
from forgetdiag.render.output import STDOUT, guard_outputs, write_json


@command(app, "inspect")
def inspect_cmd(
    paths: Annotated[List[Path], typer.Argument(help="Model, adapter or Trainer output directories (one sequence, in order).", show_default=False)],
    json_path: JsonOpt = None,
    check_values: Annotated[bool, typer.Option("--check-values/--no-check-values", help="Read every tensor once and refuse NaN/Inf.")] = True,
    allow_pickle: AllowPickleOpt = False,
    base: BaseOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Show each checkpoint found (architecture, layers, parameters, dtype, size, tokenizer)
    and, for a sequence, its order and whether the checkpoints are compatible.

    Run this first: it is how you check that forgetdiag understands your run.
    """
    guard_outputs([json_path], paths)
    with progress_bar(quiet) as progress:
        result = inspect_checkpoints(paths, allow_pickle=allow_pickle, base=base,
                                     check_values=check_values, progress=progress)
    if json_path is not None:
        write_json(json_path, result.to_dict())
    print_renderable(inspect_table(result), json_to_stdout=str(json_path) == STDOUT)
