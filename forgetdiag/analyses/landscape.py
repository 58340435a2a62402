"""The 2-D loss surface in the plane of two updates, with the run's trajectory (``landscape``).

docs/science.md, section 3.4. The loss at (alpha, beta) is the mean answer-token cross-entropy of a probe
(:func:`forgetdiag.evaluate.answer_loss`, the quantity ``score`` reports) for the model with
weights theta_0 + alpha d_x + beta d_y; one surface per probe. With raw directions, (0, 0),
(1, 0) and (1, 1) are ORIGIN, X_END and Y_END exactly.

One model is loaded; its weights are set in place at every point (:mod:`.plane`), and each
probe is tokenized and collated once, so a grid point costs one batched pass over the probes.
A grid can be resumed: the caller saves the partial results it receives (``on_partial``) and
passes them back as ``resume``; points already computed are not evaluated again.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from forgetdiag.analyses.landscape_grid import GridState, read_saved, restore
from forgetdiag.analyses.plane import NEARLY_PARALLEL_DEG, RANDOM, Placement, PlaneInfo, build_plane
from forgetdiag.checkpoints import resolve_checkpoints
from forgetdiag.errors import ForgetdiagError, ProbeError
from forgetdiag.evaluate import answer_loss, collate_batches
from forgetdiag.models import load_model, shared_tokenizer, tokenize_probe
from forgetdiag.probes import Probe, distinct_names, load_probe
from forgetdiag.results import Result
from forgetdiag.runtime import ProgressFn, Runtime, Warn
from forgetdiag.settings import LandscapeSettings
from forgetdiag.storage import Checkpoint
from forgetdiag.streaming import check_sequence

__all__ = [
    "AnchorPoint",
    "LandscapeResult",
    "LandscapeSettings",
    "Placement",
    "PlaneInfo",
    "ProbeInfo",
    "landscape",
    "read_saved",
]

GRID_DESCRIPTION = "evaluating grid points"


@dataclass(frozen=True)
class ProbeInfo:
    """A probe as evaluated: items, scored tokens, and a digest of its token ids."""

    name: str
    path: str | None
    items: int
    tokens: int
    digest: str


@dataclass(frozen=True)
class AnchorPoint:
    """A checkpoint that is a point of the plane by construction, and its losses there."""

    point: str  # origin, x_end, y_end
    checkpoint: str
    path: str
    alpha: float
    beta: float
    losses: dict[str, float]  # probe name -> loss (NaN until computed)
    computed: bool

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class LandscapeResult(Result):
    """Loss surfaces on the plane, anchor losses, and the trajectory's coordinates.

    Attributes:
        plane: the directions (|d_x|, |d_y|, their angle), see :class:`PlaneInfo`.
        alphas, betas: grid coordinates along d_x and d_y.
        probes: the probes evaluated, in order.
        surfaces: probe name -> (n_betas, n_alphas) losses (NaN where not computed).
        computed: (n_betas, n_alphas) True where the grid point was evaluated.
        anchors: losses at the checkpoints that define the plane.
        trajectory: every trajectory checkpoint placed by least squares, with its residual.
        evaluated: points evaluated by this call (the others came from ``resume``).
    """

    analysis = "landscape"
    plane: PlaneInfo
    alphas: tuple[float, ...]
    betas: tuple[float, ...]
    probes: tuple[ProbeInfo, ...]
    surfaces: dict[str, np.ndarray]
    computed: np.ndarray
    anchors: tuple[AnchorPoint, ...]
    trajectory: tuple[Placement, ...]
    dtype: str
    device: str
    evaluated: int = 0
    warnings: tuple[str, ...] = ()
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return bool(self.computed.all()) and all(a.computed for a in self.anchors)

    def mean_surface(self) -> np.ndarray:
        """(n_betas, n_alphas) mean of the probes' surfaces."""
        return np.mean(np.stack([self.surfaces[p.name] for p in self.probes]), axis=0)

    def summary(self) -> str:
        by_point = {a.point: a for a in self.anchors}
        parts = []
        for p in self.probes:
            losses = [
                f"{a.point} {a.losses[p.name]:.3g}"
                for a in self.anchors
                if a.computed and math.isfinite(a.losses[p.name])
            ]
            surface = self.surfaces[p.name]
            low = f"; lowest on the grid {np.nanmin(surface):.3g}" if np.isfinite(surface).any() else ""
            parts.append(f"{p.name} loss: {', '.join(losses) or 'not computed yet'}{low}")
        done = "" if self.complete else f" (partial: {int(self.computed.sum())} of {self.computed.size} points)"
        plane = "raw directions" if "x_end" in by_point else "random directions"
        return f"{plane}, {len(self.trajectory)} checkpoints placed{done}; " + "; ".join(parts)

    def body(self) -> dict:
        """Plain data for JSON; ``surfaces`` are rows over betas of values over alphas."""
        return {
            "complete": self.complete,
            "directions": self.plane.to_dict(),
            "alphas": list(self.alphas),
            "betas": list(self.betas),
            "probes": [asdict(p) for p in self.probes],
            "surfaces": {name: s.tolist() for name, s in self.surfaces.items()},
            "computed": self.computed.tolist(),
            "anchors": [a.to_dict() for a in self.anchors],
            "trajectory": [t.to_dict() for t in self.trajectory],
            "dtype": self.dtype,
            "device": self.device,
            "evaluated": self.evaluated,
        }


@dataclass
class _Frame:
    """Everything of a result except the grid's values."""

    plane: PlaneInfo
    probes: list[ProbeInfo]
    anchors: list[Checkpoint]
    points: list[tuple[str, float, float]]
    placements: list[Placement]
    dtype: str
    device: str
    warnings: list[str]
    notes: list[str]
    start: float = field(default_factory=time.perf_counter)
    evaluated: int = 0

    def result(self, grid: GridState) -> LandscapeResult:
        names = [p.name for p in self.probes]
        anchors = tuple(
            AnchorPoint(
                point,
                c.label,
                str(c.path),
                a,
                b,
                dict(zip(names, (float(v) for v in grid.anchor_values[k]))),
                bool(grid.anchor_done[k]),
            )
            for k, (c, (point, a, b)) in enumerate(zip(self.anchors, self.points))
        )
        return LandscapeResult(
            plane=self.plane,
            alphas=grid.alphas,
            betas=grid.betas,
            probes=tuple(self.probes),
            surfaces={n: grid.values[p].copy() for p, n in enumerate(names)},
            computed=grid.done.copy(),
            anchors=anchors,
            trajectory=tuple(self.placements),
            dtype=self.dtype,
            device=self.device,
            evaluated=self.evaluated,
            warnings=tuple(self.warnings) + tuple(self.notes),
            timings={"landscape": time.perf_counter() - self.start},
        )


def _prepare_probes(
    anchors: Sequence[Checkpoint], model, probes: Sequence[Probe], runtime: Runtime, device, warn: Warn
) -> tuple[list[ProbeInfo], list[list]]:
    """Tokenize each probe with the anchors' shared tokenizer and collate its batches once."""
    origin = anchors[0]
    tokenizer = shared_tokenizer(anchors, runtime, warn=warn)
    infos, batches = [], []
    for probe in probes:
        encoded, _ = tokenize_probe(tokenizer, probe, origin, runtime, warn=warn)
        ids = json.dumps([[e.prompt_ids, e.completion_ids] for e in encoded]).encode()
        infos.append(
            ProbeInfo(
                probe.name,
                probe.path,
                len(encoded),
                sum(len(e.completion_ids) for e in encoded),
                hashlib.sha256(ids).hexdigest()[:16],
            )
        )
        batches.append(
            collate_batches(encoded, pad_id=tokenizer.pad_token_id, batch_size=runtime.batch_size, device=device)
        )
    return infos, batches


def _direction_warnings(info: PlaneInfo, warn: Warn) -> list[str]:
    if info.line_angle_deg >= NEARLY_PARALLEL_DEG:
        return []
    message = (
        f"d_x and d_y are nearly parallel: the angle between them is {info.angle_deg:.2f} "
        f"degrees (under {NEARLY_PARALLEL_DEG:g} from a line); the plane is close to a line, "
        "so the surface barely changes across it and trajectory coordinates are ill-conditioned"
    )
    warn(message)
    return [message]


def _evaluate(
    model,
    plane,
    batches: Sequence[list],
    grid: GridState,
    frame: _Frame,
    *,
    on_partial: Callable[[LandscapeResult], None] | None,
    progress: ProgressFn | None,
) -> None:
    """Set the weights of every point still to do and record each probe's loss there."""
    todo = grid.todo()
    for k, (kind, index, alpha, beta) in enumerate(todo):
        plane.set(alpha, beta)
        grid.record(kind, index, [answer_loss(model, b) for b in batches])
        frame.evaluated += 1
        if on_partial is not None:
            on_partial(frame.result(grid))
        if progress is not None:
            progress(GRID_DESCRIPTION, k + 1, len(todo))


def _largest_vocabulary(anchors: Sequence[Checkpoint]) -> int:
    """The anchor the model is loaded from: the origin, unless the vocabulary grew along the
    anchors (tokens added before fine-tuning); then the last anchor with the most rows, whose
    new rows the plane holds fixed while it moves the common ones."""
    rows = [next((m.shape[0] for n, m in c.meta.items() if c.parse(n).component == "embed"), 0) for c in anchors]
    return 0 if rows[0] == max(rows) else max(k for k, r in enumerate(rows) if r == max(rows))


def _anchors(origin, x_end, y_end, trajectory, settings: LandscapeSettings, runtime: Runtime):
    """Anchor checkpoints, their points on the plane, and the checkpoints to place."""
    anchors = [resolve_checkpoints(origin, runtime, single="ORIGIN")]
    ends = [
        resolve_checkpoints(v, runtime, single=what)
        for v, what in ((x_end, "X_END"), (y_end, "Y_END"))
        if v is not None
    ]
    placed = resolve_checkpoints(list(trajectory), runtime)
    if settings.directions == RANDOM:
        return anchors, [("origin", 0.0, 0.0)], ends + placed
    if len(ends) != 2:
        raise ForgetdiagError(
            "raw directions need ORIGIN, X_END and Y_END (d_x = X_END - ORIGIN, "
            "d_y = Y_END - X_END); pass all three, or --directions "
            "filter-normalized-random"
        )
    return anchors + ends, [("origin", 0.0, 0.0), ("x_end", 1.0, 0.0), ("y_end", 1.0, 1.0)], placed


def landscape(
    origin: str | Path | Checkpoint,
    x_end: str | Path | Checkpoint | None,
    y_end: str | Path | Checkpoint | None,
    probes: Sequence[Probe | str | Path],
    *,
    trajectory: Sequence[str | Path | Checkpoint] = (),
    settings: LandscapeSettings = LandscapeSettings(),
    runtime: Runtime = Runtime(),
    resume: Mapping[str, Any] | None = None,
    on_partial: Callable[[LandscapeResult], None] | None = None,
    progress: ProgressFn | None = None,
    warn: Warn | None = None,
) -> LandscapeResult:
    """The loss surfaces of ``probes`` on the plane theta_0 + alpha d_x + beta d_y.

    Args:
        origin, x_end, y_end: checkpoints (paths or :class:`Checkpoint`); raw directions are
            d_x = x_end - origin and d_y = y_end - x_end. With random directions x_end and
            y_end are optional and, when given, placed on the plane like the trajectory.
        probes: one surface per probe (:class:`Probe` or a probe file).
        trajectory: checkpoints or Trainer run directories to place on the plane.
        settings: directions, seed and grid (see :class:`LandscapeSettings`).
        runtime: device, compute dtype, batch size, threads, tokenizer and reading options.
        resume: a partial result saved as JSON (:func:`read_saved`); its points are kept.
        on_partial: receives the result so far after every point (save it to resume later).
        progress: ``progress(description, done, total)``.
        warn: receives warnings (nearly parallel directions, truncated prompts).

    Returns:
        A :class:`LandscapeResult`.

    Raises:
        ForgetdiagError: bad checkpoints (different architectures, X_END equal to ORIGIN...),
            bad probes, or a ``resume`` computed with other settings.

    Example:
        >>> r = landscape("run/checkpoint-0", "run/checkpoint-50", "run/checkpoint-300",
        ...               ["probes/old.jsonl"], trajectory=["run"])  # doctest: +SKIP
        >>> r.anchors[1].losses, r.trajectory[2].alpha  # doctest: +SKIP
    """
    warn = warn or (lambda message: None)
    anchors, points, placed = _anchors(origin, x_end, y_end, trajectory, settings, runtime)
    probes = distinct_names([p if isinstance(p, Probe) else load_probe(p) for p in probes])
    if not probes:
        raise ProbeError("no probe given; expected at least one probe file (--probe)")
    check_sequence([*anchors, *placed])  # different architectures fail before anything loads
    device = runtime.torch_device
    loaded = _largest_vocabulary(anchors)
    with runtime.threads_for(anchors[0].n_params):
        start = time.perf_counter()
        model = load_model(anchors[loaded], runtime).requires_grad_(False)
        device = next(model.parameters()).device  # --device-map: where the first layer sits
        infos, batches = _prepare_probes(anchors, model, probes, runtime, device, warn)
        plane, info, placements, notes = build_plane(
            model, anchors, placed, mode=settings.directions, seed=settings.seed, loaded=loaded, progress=progress
        )
        dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        frame = _Frame(
            info,
            infos,
            anchors,
            points,
            placements,
            dtype,
            str(device),
            _direction_warnings(info, warn),
            notes,
            start=start,
        )
        grid = GridState(settings.alphas, settings.betas, points, len(infos))
        if resume is not None:
            restore(resume, grid, frame.result(grid).to_dict())
        _evaluate(model, plane, batches, grid, frame, on_partial=on_partial, progress=progress)
        return frame.result(grid)
