"""``forgetdiag samples build``: rebuild the sample checkpoints from seeds."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

import typer
from rich import box
from rich.table import Table

from forgetdiag.cli.app import app
from forgetdiag.cli.common import QuietOpt, SeedOpt, command, progress_bar, stdout
from forgetdiag.samples.build import SampleConfig, build_samples
from forgetdiag.samples.measure import Truth

samples_app = typer.Typer(
    name="samples", no_args_is_help=True, help="The sample checkpoints: runs whose forgetting is known."
)
app.add_typer(samples_app, name="samples")


@command(samples_app, "build")
def build_cmd(
    out: Annotated[
        Path, typer.Option("--out", help="Directory to create (must not exist, or be empty).", show_default=False)
    ],
    seed: SeedOpt = 0,
    freeze: Annotated[
        int | None,
        typer.Option(
            "--freeze",
            min=0,
            help="Train task 1 with the input embedding and the bottom N layers frozen (the remedy forgetdiag advise suggests).",
            show_default=False,
        ),
    ] = None,
    quiet: QuietOpt = False,
) -> None:
    """Rebuild every sample from seeds on the CPU: pretrain a tiny Llama on synthetic
    biographies, teach it QA (task 0), run a `spurious` and a `real` task 1, train a control,
    write the probes and run descriptions, then measure the truths each run carries.

    Takes about 15 minutes on one CPU core. The tree is built next to --out and renamed at
    the end; seed 0 gives the shipped sample_checkpoints/.
    """
    start = time.perf_counter()
    with progress_bar(quiet) as progress:
        truths = build_samples(out, SampleConfig(seed=seed, freeze_layers=freeze), progress=progress)
    stdout.print(truths_table(truths))
    frozen = "" if freeze is None else f", task 1 with the embedding and {freeze} bottom layers frozen"
    stdout.print(f"built {out} (seed {seed}{frozen}) in {time.perf_counter() - start:.0f} s")


def truths_table(truths: Sequence[Truth]) -> Table:
    """One row per checkpoint: old-task accuracy, recovered accuracy, new-task accuracy
    (first-token accuracy too in measurements.json)."""
    table = Table(
        title="Old task (held-out people of group A), greedy exact match", box=box.SIMPLE_HEAD, pad_edge=False
    )
    for header in ("run", "checkpoint", "accuracy", "answer\nloss", "recovered", "verdict", "new\ntask"):
        table.add_column(header, justify="left" if header in ("run", "checkpoint") else "right", no_wrap=True)
    for t in truths:
        table.add_row(
            t.run,
            "-" if t.step is None else f"checkpoint-{t.step}",
            f"{t.accuracy:.3f}",
            f"{t.answer_loss:.3f}",
            f"{t.recovered:.3f}",
            t.verdict or "-",
            "-" if t.new_task is None else f"{t.new_task:.3f}",
        )
    return table
