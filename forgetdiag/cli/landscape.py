"""``forgetdiag landscape``: the loss surface in the plane of two updates, with the trajectory."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

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
from forgetdiag.render.output import STDOUT, guard_outputs, write_json
from forgetdiag.runtime import Runtime
from forgetdiag.settings import Directions, LandscapeSettings

if TYPE_CHECKING:
    from forgetdiag.analyses.landscape import LandscapeResult

Opt = typer.Option
SAVE_EVERY = 5.0  # seconds between saves of a partial grid


def parse_grid(text: str) -> tuple[int, int]:
    """``"21x21"`` -> (21, 21): points along alpha, then beta."""
    try:
        nx, ny = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ForgetdiagError(
            f"--grid {text!r}: expected NxM, e.g. 21x21 (N points along alpha, M along beta)"
        ) from None
    if nx < 1 or ny < 1:
        raise ForgetdiagError(f"--grid {text!r}: expected at least one point per axis")
    return nx, ny


def parse_range(text: str, option: str) -> tuple[float, float]:
    """``"-0.5,1.5"`` -> (-0.5, 1.5)."""
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise ForgetdiagError(f"{option} {text!r}: expected LO,HI, e.g. -0.5,1.5") from None
    return lo, hi


def saved_grid(json_path: Path | None) -> dict | None:
    """The partial grid to resume from ``--json PATH`` (None, with a warning, if not there yet)."""
    from forgetdiag.analyses.landscape import read_saved

    if json_path is None or str(json_path) == STDOUT:
        raise ForgetdiagError("--resume needs --json PATH: the partial grid is saved to, and resumed from, that file")
    saved = read_saved(json_path)
    if saved is None:
        warn(f"--resume: {json_path} does not exist yet; starting a new grid")
    return saved


class PartialSaver:
    """Saves the latest partial result to the JSON path every few seconds, and on demand."""

    def __init__(self, path: Path | None) -> None:
        self.path, self.latest, self.saved_at = path, None, time.monotonic()

    def __call__(self, result: LandscapeResult) -> None:
        self.latest = result
        if self.path is not None and time.monotonic() - self.saved_at >= SAVE_EVERY:
            self.flush()

    def flush(self) -> None:
        if self.path is not None and self.latest is not None:
            write_json(self.path, self.latest.to_dict())
            self.saved_at = time.monotonic()


@command(app, "landscape")
@with_runtime(probe_fields=True)
def landscape_cmd(
    origin: Annotated[
        Path,
        typer.Argument(
            metavar="ORIGIN",
            help="ORIGIN: the checkpoint at (0, 0), e.g. the last one of the old task.",
            show_default=False,
        ),
    ],
    x_end: Annotated[
        Path | None,
        typer.Argument(
            metavar="X_END",
            help="X_END: the checkpoint at (1, 0); d_x = X_END - ORIGIN (e.g. the first steps of the new task).",
            show_default=False,
        ),
    ] = None,
    y_end: Annotated[
        Path | None,
        typer.Argument(
            metavar="Y_END",
            help="Y_END: the checkpoint at (1, 1); d_y = Y_END - X_END (e.g. the rest of the new task).",
            show_default=False,
        ),
    ] = None,
    probe: Annotated[
        list[Path],
        Opt(
            "--probe",
            metavar="FILE",
            help="A probe file (JSONL, JSON or CSV); one surface per probe. Repeat for several.",
            show_default=False,
        ),
    ] = [],  # noqa: B006
    trajectory: Annotated[
        list[Path],
        Opt(
            "--trajectory",
            metavar="PATH",
            help="Checkpoints or Trainer run directories to place on the plane. Repeat for several.",
            show_default=False,
        ),
    ] = [],  # noqa: B006
    directions: Annotated[
        Directions,
        Opt(
            "--directions",
            metavar="MODE",
            help="raw (d_x, d_y from the three checkpoints) or filter-normalized-random (Li et al. 2018; X_END, Y_END optional and then placed like the trajectory).",
        ),
    ] = "raw",
    grid: Annotated[str, Opt("--grid", metavar="NxM", help="Points along alpha x beta.")] = "21x21",
    x_range: Annotated[str, Opt("--x-range", metavar="LO,HI", help="Alpha range LO,HI (ends included).")] = "-0.5,1.5",
    y_range: Annotated[str, Opt("--y-range", metavar="LO,HI", help="Beta range LO,HI (ends included).")] = "-0.5,1.5",
    resume: Annotated[
        bool,
        Opt(
            "--resume",
            help="Continue the partial grid saved in --json PATH (points already there are not evaluated again).",
        ),
    ] = False,
    seed: SeedOpt = 0,
    json_path: JsonOpt = None,
    html_path: HtmlOpt = None,
    quiet: QuietOpt = False,
    runtime: Runtime = None,
    fields: ProbeFields = None,
) -> None:
    """The answer-token loss on the plane ORIGIN + alpha d_x + beta d_y, one surface per probe,
    with every --trajectory checkpoint placed on it (least squares over all parameters).

    Raw directions: (0, 0), (1, 0) and (1, 1) are ORIGIN, X_END and Y_END. The grid is saved to
    --json as it goes; --resume continues an interrupted one. Checkpoints are never modified.
    """
    if not probe:
        raise ForgetdiagError("no probe given; expected --probe FILE (one surface per probe)")
    guard_outputs(
        {"--json": json_path, "--html": html_path},
        [origin, x_end, y_end, *trajectory, *probe, runtime.base, runtime.tokenizer],
    )
    from forgetdiag.analyses.landscape import landscape
    from forgetdiag.render.landscape import landscape_table, write_landscape_html

    saved = saved_grid(json_path) if resume else None
    settings = LandscapeSettings(
        directions=directions,
        seed=seed,
        grid=parse_grid(grid),
        x_range=parse_range(x_range, "--x-range"),
        y_range=parse_range(y_range, "--y-range"),
    )
    probes = [load_probe(p, fields=fields) for p in probe]
    saver = PartialSaver(json_path if json_path is not None and str(json_path) != STDOUT else None)
    with progress_bar(quiet) as progress:
        try:
            result = landscape(
                origin,
                x_end,
                y_end,
                probes,
                trajectory=trajectory,
                settings=settings,
                runtime=runtime,
                resume=saved,
                on_partial=saver,
                progress=progress,
                warn=warn,
            )
        except BaseException:
            saver.flush()  # interrupted mid-grid: keep what was computed for --resume
            raise
    emit(result, json=json_path, html=html_path, table=landscape_table, page=write_landscape_html)
