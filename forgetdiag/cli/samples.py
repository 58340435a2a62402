"""``forgetdiag samples build``: rebuild the sample checkpoints from seeds."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich import box
from rich.console import Group
from rich.table import Table

from forgetdiag.cli.app import app
from forgetdiag.cli.common import JsonOpt, QuietOpt, SeedOpt, command, print_renderable, progress_bar, stdout
from forgetdiag.render.output import STDOUT, guard_outputs, write_json
from forgetdiag.settings import REMEDIES

if TYPE_CHECKING:
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
    remedy: Annotated[
        str,
        typer.Option(
            "--remedy",
            help=f"Train the spurious run's task 1 with this remedy: {', '.join(REMEDIES)} (docs/remedy.md).",
        ),
    ] = "none",
    freeze: Annotated[
        int | None,
        typer.Option(
            "--freeze",
            min=0,
            help="Depth of --remedy freeze: the input embedding and the bottom N layers (default 1, what forgetdiag advise suggests); alone it means --remedy freeze.",
            show_default=False,
        ),
    ] = None,
    quiet: QuietOpt = False,
) -> None:
    """Rebuild every sample from seeds on the CPU: pretrain a tiny Llama on synthetic
    biographies, teach it QA (task 0), run a `spurious` and a `real` task 1, train a control,
    write the probes and run descriptions, then measure the truths each run carries.

    Takes about 15 minutes on one CPU core. The tree is built next to --out and renamed at
    the end; seed 0 gives the shipped sample_checkpoints/. --remedy changes one thing of the
    spurious run's task 1 (the same base, steps and data order otherwise).
    """
    from forgetdiag.samples.build import SampleConfig, build_samples

    start = time.perf_counter()
    config = SampleConfig(seed=seed, remedy=remedy, freeze_layers=freeze)
    with progress_bar(quiet) as progress:
        truths = build_samples(out, config, progress=progress)
    stdout.print(truths_table(truths))
    how = "" if config.remedy == "none" else f", the spurious run's task 1 with --remedy {config.remedy}"
    if config.remedy == "freeze":
        how += f" (the embedding and {config.freeze_layers} bottom layers frozen)"
    stdout.print(f"built {out} (seed {seed}{how}) in {time.perf_counter() - start:.0f} s")


@command(samples_app, "measure")
def measure_cmd(
    root: Annotated[
        Path, typer.Argument(help="A samples directory (as `samples build` writes it).", show_default=False)
    ] = Path("sample_checkpoints"),
    json_path: JsonOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Measure the truths of an existing samples directory again (no training of the samples):
    every checkpoint's old-task accuracy, its recovery and forgetdiag's verdict with its
    statistics, as the build does."""
    guard_outputs({"--json": json_path}, [root])
    from forgetdiag.samples.measure import measure_samples

    with progress_bar(quiet) as progress:
        truths = measure_samples(root, progress=progress)
    if json_path is not None:
        write_json(json_path, {"truths": [t.to_dict() for t in truths]})
    print_renderable(truths_table(truths), json_to_stdout=str(json_path) == STDOUT)


def truths_table(truths: Sequence[Truth]) -> Group:
    """Two tables, each narrow enough for an 80-column terminal: per checkpoint, the old-task
    numbers (accuracy, answer loss, recovered accuracy, the run's own new task), then the
    verdict with its spurious fraction (95% interval) and the drop's p-value."""

    def step(t: Truth) -> str:
        return "-" if t.step is None else f"checkpoint-{t.step}"

    numbers = Table(title="Old task (held-out people of group A), greedy exact match", box=box.SIMPLE_HEAD)
    for header in ("run", "checkpoint", "accuracy", "answer loss", "recovered", "new task"):
        numbers.add_column(header, justify="left" if header in ("run", "checkpoint") else "right", no_wrap=True)
    verdicts = Table(title="forgetdiag's verdict against checkpoint-0, with the control", box=box.SIMPLE_HEAD)
    for header in ("run", "checkpoint", "verdict", "spurious fraction [95%]", "drop p"):
        verdicts.add_column(
            header, justify="left" if header in ("run", "checkpoint", "verdict") else "right", no_wrap=True
        )
    for t in truths:
        numbers.add_row(
            t.run,
            step(t),
            f"{t.accuracy:.3f}",
            f"{t.answer_loss:.3f}",
            f"{t.recovered:.3f}",
            "-" if t.new_task is None else f"{t.new_task:.3f}",
        )
        if t.verdict is None:
            continue
        fraction = "-"
        if t.spurious_fraction is not None and t.fraction_interval is not None:
            low, high = t.fraction_interval
            fraction = f"{t.spurious_fraction:.2f} [{low:.2f}, {high:.2f}]"
        p = "-" if t.p_value is None else ("< 1e-300" if t.p_value == 0 else f"{t.p_value:.2g}")
        verdicts.add_row(t.run, step(t), " or ".join(t.possible_verdicts) or t.verdict, fraction, p)
    return Group(numbers, verdicts)
