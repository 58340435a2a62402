"""``forgetdiag angles``: per-layer subspace angles between weight updates."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, List, Optional

import typer

from forgetdiag.analyses.angles import AngleSettings, compute_angles
from forgetdiag.cli.app import app
from forgetdiag.cli.common import (AllowPickleOpt, BaseOpt, DeviceOpt, HtmlOpt, JsonOpt, QuietOpt,
                                   SeedOpt, command, print_renderable, progress_bar)
from forgetdiag.render.angles import angles_table, write_angles_html
from forgetdiag.render.output import STDOUT, guard_outputs, write_json

Opt = typer.Option


@command(app, "angles")
def angles_cmd(
    paths: Annotated[List[Path], typer.Argument(help="Checkpoints C0 C1 C2 ... in training order (model, adapter or Trainer run directories; a run expands to its checkpoints).", show_default=False)],
    pairs: Annotated[Optional[str], Opt("--pairs", help="Updates to compare, A:B comma-separated; an update is i-j (C(j) - C(i)) or k (C(k+1) - C(k)). E.g. 0-1:1-2 or 0-1:1-3. Default: consecutive updates, 0:1,1:2,...", show_default=False)] = None,
    rank: Annotated[Optional[int], Opt("--rank", help="Keep the top K directions of each update (randomized SVD). Default: 32 unless --energy.", show_default=False)] = None,
    energy: Annotated[Optional[float], Opt("--energy", help="Instead keep the directions holding this share of ||dW||^2, e.g. 0.99 (the paper's rule; exact SVD, slower).", show_default=False)] = None,
    rtol: Annotated[float, Opt("--rtol", help="Drop directions with singular value <= rtol x the largest.")] = 1e-4,
    min_update: Annotated[float, Opt("--min-update", help="An update whose RMS entry is at most this is 'no update' (0: only unchanged weights).")] = 0.0,
    standardize: Annotated[bool, Opt("--standardize", help="Standardise each update by its scalar mean and std first, as the paper did.")] = False,
    far: Annotated[float, Opt("--far", help="Mark mean angles further than this many degrees from their null baseline.")] = 10.0,
    json_path: JsonOpt = None,
    html_path: HtmlOpt = None,
    device: DeviceOpt = "cpu",
    workers: Annotated[Optional[int], Opt("--workers", min=1, help="CPU threads: matrices processed at once (default: all cores).", show_default=False)] = None,
    seed: SeedOpt = 0,
    allow_pickle: AllowPickleOpt = False,
    base: BaseOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Which directions did two weight updates share? Subspace angles per layer and component.

    Update i is C(i+1) - C(i). For every weight matrix (true q/k/v parts, MLP, embedding,
    lm_head unless tied) it compares the hidden-side singular subspaces of two updates: the
    paper's angle of each direction of the later update to the earlier update's subspace, and
    the principal angles, each next to the angle unrelated subspaces already give. Near 90:
    the updates moved different directions; far below the baseline: they share directions.
    """
    settings = AngleSettings(rank=rank, energy=energy, rtol=rtol, min_update=min_update,
                             standardize=standardize, seed=seed, far_deg=far)
    guard_outputs([json_path, html_path], paths)
    with progress_bar(quiet) as progress:
        result = compute_angles(paths, pairs=pairs, settings=settings, device=device, workers=workers,
                                allow_pickle=allow_pickle, base=base, progress=progress)
    if json_path is not None:
        write_json(json_path, result.to_dict())
    if html_path is not None:
        write_angles_html(html_path, result)
    print_renderable(angles_table(result), json_to_stdout=str(json_path) == STDOUT)
