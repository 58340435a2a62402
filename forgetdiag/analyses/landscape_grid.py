"""The grid of a loss surface while it is computed, and resuming a grid saved midway.

A run keeps, per probe, the loss at every grid point and at the anchors, with a mask of the
points already evaluated (a loss may legitimately be NaN or Inf far from the checkpoints, so
"not computed" is the mask, not a sentinel value). A saved partial result (the JSON of
:meth:`LandscapeResult.to_dict`) refills the grid if it was computed the same way: same
directions, dtype, grid, probes (token digests) and plane (|theta_0|, |d_x|, |d_y|, angle).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from forgetdiag.errors import ForgetdiagError


@dataclass
class GridState:
    """The mutable state of a run: losses per probe at the grid points and at the anchors."""

    alphas: tuple[float, ...]
    betas: tuple[float, ...]
    anchors: list[tuple[str, float, float]]  # (point, alpha, beta)
    n_probes: int
    values: np.ndarray = field(init=False)  # (P, n_betas, n_alphas)
    done: np.ndarray = field(init=False)  # (n_betas, n_alphas) bool
    anchor_values: np.ndarray = field(init=False)  # (A, P)
    anchor_done: np.ndarray = field(init=False)  # (A,) bool

    def __post_init__(self) -> None:
        shape = (len(self.betas), len(self.alphas))
        self.values = np.full((self.n_probes, *shape), np.nan)
        self.done = np.zeros(shape, dtype=bool)
        self.anchor_values = np.full((len(self.anchors), self.n_probes), np.nan)
        self.anchor_done = np.zeros(len(self.anchors), dtype=bool)

    def todo(self) -> list[tuple[str, tuple[int, ...], float, float]]:
        """Points still to evaluate, as ``(kind, index, alpha, beta)``: the anchors, then the
        grid row by row (rows over betas)."""
        out = [("anchor", (k,), a, b) for k, (_, a, b) in enumerate(self.anchors) if not self.anchor_done[k]]
        out += [
            ("grid", (i, j), self.alphas[j], self.betas[i])
            for i in range(len(self.betas))
            for j in range(len(self.alphas))
            if not self.done[i, j]
        ]
        return out

    def record(self, kind: str, index: tuple[int, ...], losses: Sequence[float]) -> None:
        """Store the probes' losses at one point of :meth:`todo`."""
        if kind == "anchor":
            self.anchor_values[index[0]] = losses
            self.anchor_done[index[0]] = True
        else:
            self.values[(slice(None), *index)] = losses
            self.done[index] = True


def fingerprint(data: Mapping[str, Any]) -> dict[str, Any]:
    """What must match for a saved grid to be resumed (from :meth:`LandscapeResult.to_dict`).

    The checkpoints are recognised by their numbers (|theta_0|, |d_x|, |d_y|, the angle), not
    by their paths, so a run that was moved still resumes.
    """
    d = data["directions"]
    return {
        "directions": d["mode"],
        "seed": d["seed"],
        "dtype": data["dtype"],
        "parameters": d["n_params"],
        "alpha values": list(data["alphas"]),
        "beta values": list(data["betas"]),
        "probes": [f"{p['name']} ({p['items']} items, tokens {p['digest']})" for p in data["probes"]],
        "anchor points": [a["point"] for a in data["anchors"]],
        "plane (|theta_0|, |d_x|, |d_y|, cos)": [d["origin_norm"], d["norm_x"], d["norm_y"], d["cos"]],
    }


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        return (
            isinstance(a, (int, float))
            and isinstance(b, (int, float))
            and math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
        )
    return a == b


def _short(value: Any) -> str:
    if isinstance(value, list) and len(value) > 4 and all(isinstance(v, (int, float)) for v in value):
        return f"{len(value)} values from {value[0]:g} to {value[-1]:g}"
    return str(value)


def restore(saved: Mapping[str, Any], grid: GridState, current: Mapping[str, Any]) -> None:
    """Fill ``grid`` with the points a saved partial result already holds.

    Args:
        saved: the saved result (:func:`read_saved`).
        grid: the new run's empty grid.
        current: the new run's result so far, as :meth:`LandscapeResult.to_dict`.

    Raises:
        ForgetdiagError: the saved result is not a landscape, or was computed differently
            (the message names the first difference).
    """
    names = [p["name"] for p in current["probes"]]
    try:
        old, new = fingerprint(saved), fingerprint(current)
        computed = np.array(saved["computed"], dtype=bool)
        surfaces = {n: np.array(saved["surfaces"][n], dtype=float) for n in names}  # null -> NaN
        anchors = {a["point"]: a for a in saved["anchors"]}
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise ForgetdiagError(
            f"cannot resume: the saved file is not a forgetdiag landscape result "
            f"({type(exc).__name__}: {exc}); rerun without --resume"
        ) from None
    for key in new:
        if not _same(old[key], new[key]):
            raise ForgetdiagError(
                f"cannot resume: the saved grid has {key} {_short(old[key])}, this "
                f"run has {_short(new[key])}; rerun without --resume to start over"
            )
    if computed.shape != grid.done.shape or any(s.shape != grid.done.shape for s in surfaces.values()):
        raise ForgetdiagError("cannot resume: the saved surfaces do not match the saved grid's shape")
    grid.done[:] = computed
    for p, name in enumerate(names):
        grid.values[p] = np.where(computed, surfaces[name], np.nan)
    for k, (point, _, _) in enumerate(grid.anchors):
        saved_anchor = anchors.get(point)
        if saved_anchor is not None and saved_anchor.get("computed"):
            losses = saved_anchor["losses"]
            grid.anchor_values[k] = [np.nan if losses.get(n) is None else losses[n] for n in names]
            grid.anchor_done[k] = True


def read_saved(path: str | Path) -> dict[str, Any] | None:
    """A landscape result saved as JSON (to resume it), or None if ``path`` does not exist.

    Raises:
        ForgetdiagError: the file is not valid JSON or not a landscape result.
    """
    path = Path(path)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ForgetdiagError(f"{path}: cannot resume from it: not valid JSON ({exc})") from None
    if not isinstance(data, dict) or data.get("analysis") != "landscape":
        raise ForgetdiagError(f"{path}: cannot resume from it: not a forgetdiag landscape result")
    return data
