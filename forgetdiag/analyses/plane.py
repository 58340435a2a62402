"""The plane of a loss surface: theta_0 + alpha d_x + beta d_y, and where checkpoints sit on it.

Raw directions (docs/science.md, section 3.4) are d_x = X_END - ORIGIN and d_y = Y_END - X_END, not
normalised, so that (0, 0), (1, 0) and (1, 1) are the three checkpoints. Filter-normalised
random directions (Li et al. 2018) are the option: per filter (a row of a stored ``(out, in)``
matrix, a column of a GPT-2 ``Conv1D``), a Gaussian direction rescaled to the norm of the
origin's filter; 1-D tensors (biases, norms) get no direction, as in the paper.

One model is held in memory. :class:`ModelPlane` keeps, per parameter, the origin and the two
directions in the compute dtype on the model's device, and sets the weights in place:
``p = origin + alpha * d_x + beta * d_y`` (no model copy per point).

Every other checkpoint is placed on the plane by least squares over ALL parameters,
c = G^-1 D^T (theta - theta_0) with G = D^T D, accumulated in float64 while the tensors are
streamed one name at a time; the off-plane residual |theta - theta_0 - D c| comes with it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch

from forgetdiag.architectures import TensorName, tower_of
from forgetdiag.binding import Target, bind
from forgetdiag.errors import CheckpointError
from forgetdiag.runtime import ProgressFn
from forgetdiag.storage import Checkpoint
from forgetdiag.streaming import check_sequence, require_finite, stream_tensors

RAW = "raw"
RANDOM = "filter-normalized-random"
NEARLY_PARALLEL_DEG = 5.0  # warn when the lines of d_x and d_y are closer than this
_CHUNK = 1 << 22  # elements per float64 chunk while accumulating dot products


@dataclass(frozen=True)
class PlaneInfo:
    """The two directions, measured over every parameter of the checkpoints (float64).

    Attributes:
        mode: ``raw`` or ``filter-normalized-random``.
        seed: the seed of random directions (None for raw).
        norm_x, norm_y: |d_x| and |d_y|: one unit of alpha (beta) is this far in parameter space.
        cos: cosine of the angle between d_x and d_y.
        n_params: coordinates the norms run over (every tensor of the checkpoints).
        origin_norm: |theta_0|, for scale (and, with the others, to recognise a plane).
    """

    mode: str
    seed: int | None
    norm_x: float
    norm_y: float
    cos: float
    n_params: int
    origin_norm: float

    @property
    def angle_deg(self) -> float:
        """Angle between d_x and d_y in degrees (0 to 180)."""
        sin = math.sqrt(max(0.0, 1.0 - self.cos * self.cos))
        return math.degrees(math.atan2(sin, self.cos))

    @property
    def line_angle_deg(self) -> float:
        """Angle between the lines of d_x and d_y (0 to 90): near 0, the plane is nearly a line."""
        return min(self.angle_deg, 180.0 - self.angle_deg)

    def to_dict(self) -> dict:
        return {**asdict(self), "angle_deg": self.angle_deg}


@dataclass(frozen=True)
class Placement:
    """A checkpoint placed on the plane by least squares over all parameters.

    Attributes:
        alpha, beta: coordinates, theta ~ theta_0 + alpha d_x + beta d_y.
        residual: |theta - theta_0 - alpha d_x - beta d_y| (off-plane distance).
        relative_residual: residual / |theta - theta_0| (0 on the plane, 1 orthogonal to it;
            0 for the origin itself).
        distance: |theta - theta_0|.
    """

    checkpoint: str
    path: str
    step: int | None
    alpha: float
    beta: float
    residual: float
    relative_residual: float
    distance: float

    def to_dict(self) -> dict:
        return asdict(self)


class ModelPlane:
    """A model whose weights are set in place to theta_0 + alpha d_x + beta d_y.

    ``params[k]`` is set from ``origin[k]``, ``dx[k]`` and ``dy[k]``, held in its dtype and on
    its device. A parameter that several checkpoint tensors fill (the experts of a fused 3-D
    parameter, the old rows of a grown vocabulary) is held whole: the blocks no tensor sets
    keep the loaded values, with zero directions.
    """

    def __init__(self) -> None:
        self.params: list[torch.nn.Parameter] = []
        self.origin: list[torch.Tensor] = []
        self.dx: list[torch.Tensor] = []
        self.dy: list[torch.Tensor] = []
        self._slot: dict[int, int] = {}

    def bind(self, target: Target, origin: torch.Tensor, dx: torch.Tensor, dy: torch.Tensor) -> None:
        """Hold ``origin``, ``dx``, ``dy`` for the block of the parameter ``target`` names."""
        param = target.param
        if target.index is None and not target.transposed:
            for values, t in ((self.origin, origin), (self.dx, dx), (self.dy, dy)):
                values.append(t.reshape(param.shape).to(device=param.device, dtype=param.dtype))
            self.params.append(param)
            return
        k = self._slot.get(id(param))
        if k is None:
            k = self._slot[id(param)] = len(self.params)
            self.params.append(param)
            self.origin.append(param.detach().clone())  # blocks no tensor sets keep these values
            self.dx.append(torch.zeros_like(param, requires_grad=False))
            self.dy.append(torch.zeros_like(param, requires_grad=False))
        for whole, value in ((self.origin[k], origin), (self.dx[k], dx), (self.dy[k], dy)):
            target.write(value, whole)

    @torch.no_grad()
    def set(self, alpha: float, beta: float) -> None:
        """Write theta_0 + alpha d_x + beta d_y into the model's parameters."""
        for p, o, dx, dy in zip(self.params, self.origin, self.dx, self.dy):
            torch.add(o, dx, alpha=alpha, out=p.data)
            p.data.add_(dy, alpha=beta)


class _Gram:
    """Float64 sums for least squares on the plane: G = D^T D, D^T r and r^T r per checkpoint."""

    def __init__(self, n_points: int) -> None:
        self.g = np.zeros((2, 2))
        self.b = np.zeros((n_points, 2))
        self.rr = np.zeros(n_points)
        self.origin_sq = 0.0

    def add_directions(self, dx: torch.Tensor, dy: torch.Tensor) -> None:
        for cx, cy in _chunks(dx, dy):
            self.g += np.array([[_dot(cx, cx), _dot(cx, cy)], [_dot(cx, cy), _dot(cy, cy)]])

    def add_origin(self, origin: torch.Tensor) -> None:
        for (co,) in _chunks(origin):
            self.origin_sq += _dot(co, co)

    def add_point(self, k: int, origin: torch.Tensor, theta: torch.Tensor, dx: torch.Tensor, dy: torch.Tensor) -> None:
        for co, ct, cx, cy in _chunks(origin, theta, dx, dy):
            r = ct - co  # (chunk,) float64: exact for fp32/bf16/fp16 weights
            self.b[k] += (_dot(cx, r), _dot(cy, r))
            self.rr[k] += _dot(r, r)


def _chunks(*tensors: torch.Tensor):
    """Matching float64 chunks of flattened tensors (bounded memory for huge embeddings)."""
    flat = [t.reshape(-1) for t in tensors]
    for start in range(0, flat[0].numel(), _CHUNK):
        yield tuple(f[start : start + _CHUNK].to(torch.float64) for f in flat)


def _dot(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.dot(a, b))


def filter_normalized(origin: torch.Tensor, tensor: TensorName, generator: torch.Generator) -> torch.Tensor:
    """A Gaussian direction with every filter rescaled to the norm of the origin's filter.

    A filter is one output unit's weights: a row of a stored ``(out, in)`` matrix (and of an
    embedding), a column of a GPT-2 ``Conv1D`` stored ``(in, out)``. 1-D tensors (biases,
    norm weights) get a zero direction (Li et al. 2018).

    Args:
        origin: the origin's tensor (float32).
        tensor: its name, for the storage layout.
        generator: a seeded CPU generator (the same seed gives the same direction).

    Returns:
        The direction, float32, the origin's shape.
    """
    if origin.dim() < 2:
        return torch.zeros_like(origin)
    d = torch.randn(origin.shape, generator=generator, dtype=torch.float32)
    axis = 1 if tensor.spec is not None and tensor.spec.stored == "in_out" else 0
    dims = [k for k in range(origin.dim()) if k != axis]  # a filter spans every other axis
    d_norm = torch.linalg.vector_norm(d, dim=dims, keepdim=True)  # (out, 1) or (1, out)
    o_norm = torch.linalg.vector_norm(origin, dim=dims, keepdim=True)
    return d * (o_norm / d_norm.clamp_min(torch.finfo(torch.float32).tiny))


def build_plane(
    model: torch.nn.Module,
    anchors: Sequence[Checkpoint],
    trajectory: Sequence[Checkpoint],
    *,
    mode: str = RAW,
    seed: int = 0,
    loaded: int = 0,
    progress: ProgressFn | None = None,
) -> tuple[ModelPlane, PlaneInfo, list[Placement], list[str]]:
    """Stream the anchors once: bind the plane to ``model`` and place ``trajectory`` on it.

    Args:
        model: the loaded model (from ``anchors[loaded]``); its parameters are bound (not yet
            changed).
        anchors: ``[origin, x_end, y_end]`` for raw directions, ``[origin]`` for random ones.
        trajectory: checkpoints to place on the plane.
        mode: ``raw`` or ``filter-normalized-random``.
        seed: seed of the random directions.
        loaded: which anchor the model was loaded from: every binding is checked against its
            values, so that the plane's anchors are the checkpoints exactly.
        progress: ``progress("reading checkpoints", done, total)``.

    Returns:
        The bound plane, its :class:`PlaneInfo`, one :class:`Placement` per trajectory
        checkpoint, and notes (tensors the model has no parameter for, tied duplicates, a
        wrapper's towers, a grown vocabulary).

    Raises:
        CheckpointError: different architectures or shapes; a tensor that changes between the
            anchors but that the model has no parameter for, or holds otherwise than stored;
            NaN/Inf weights.
    """
    check = check_sequence(anchors)
    shared = set(check.names)
    full = check
    if trajectory:
        full = check_sequence([*anchors, *trajectory])
        shared = set(full.names)
    shapes = {n: (check.rows.get(n, anchors[0].meta[n].shape[0]), *anchors[0].meta[n].shape[1:]) for n in check.names}
    binder = _Binder(model, check.names, shapes)
    names = [n for n in check.names if n not in set(binder.skipped)]
    plane, plane_gram, traj_gram = ModelPlane(), _Gram(0), _Gram(len(trajectory))
    generator = torch.Generator().manual_seed(seed)
    for tensor, values in stream_tensors(anchors, names, check=check, progress=progress):
        origin = values[0]
        target = binder.target(tensor.name, values[loaded])
        dx, dy = _directions(mode, values, tensor, target is not None, generator)
        del values
        plane_gram.add_directions(dx, dy)
        plane_gram.add_origin(origin)
        if trajectory and tensor.name in shared:
            traj_gram.add_directions(dx, dy)
            rows = full.rows.get(tensor.name)
            for k, c in enumerate(trajectory):
                theta = require_finite(c.get(tensor.name), tensor.name, c)
                traj_gram.add_point(k, origin, theta if rows is None else theta[:rows], dx, dy)
                del theta
        if target is not None:
            plane.bind(target, origin, dx, dy)
        elif bool(dx.any()) or bool(dy.any()):
            raise CheckpointError(
                f"{tensor.name} changes between the landscape checkpoints but the "
                f"loaded {type(model).__name__} has no parameter of that name or "
                "those values; expected checkpoints that load into it as they are"
            )
        else:
            binder.unbound.append(tensor.name)
        del origin, dx, dy
    info = _info(plane_gram, mode, seed, shapes, names)
    require_directions(info)
    notes = binder.notes() + [
        f"the vocabulary grew along the checkpoints: {name} is compared on its first {rows} rows; the "
        f"new rows keep the values of {anchors[loaded].label}, from which the model was loaded"
        for name, rows in check.rows.items()
    ]
    return plane, info, _placements(traj_gram, trajectory), notes


def _directions(
    mode: str, values: Sequence[torch.Tensor], tensor: TensorName, settable: bool, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """d_x and d_y of one tensor (float32): raw differences, or seeded random directions."""
    if mode == RAW:
        return values[1] - values[0], values[2] - values[1]  # d_y = Y_END - X_END
    if settable:
        return filter_normalized(values[0], tensor, generator), filter_normalized(values[0], tensor, generator)
    return torch.zeros_like(values[0]), torch.zeros_like(values[0])  # a buffer saved with the weights


class _Binder:
    """Which model parameter (and block of it) each checkpoint tensor sets: by name, through a
    wrapper's or transformers 5's layout (:mod:`forgetdiag.binding`), else by the values of the
    checkpoint the model was loaded from. Every binding is checked against those values.

    transformers may rename tensors on loading (GPT-NeoX ``embed_out`` is ``lm_head`` in
    transformers 5). The model was loaded from one anchor, so a renamed tensor is the one
    parameter, among those no name reaches, that holds exactly that anchor's values.
    """

    def __init__(self, model: torch.nn.Module, names: Sequence[str], shapes: dict[str, tuple[int, ...]]) -> None:
        self.model = model
        binding = bind(model, names, shapes)
        self.targets, self.aliases, self.mapped, self.towers = (
            binding.targets,
            binding.aliases,
            binding.mapped,
            binding.towers,
        )
        self.skipped = set(self.aliases) | set(self.towers)
        bound = {id(t.param) for t in self.targets.values()}
        self.free = [(n, p) for n, p in model.named_parameters() if id(p) not in bound]
        self.renamed: list[str] = []
        self.unbound: list[str] = []

    def target(self, name: str, loaded: torch.Tensor) -> Target | None:
        """The target of ``name``, checked against ``loaded``, its value in the loaded checkpoint."""
        if name in self.targets:
            target = self.targets[name]
            if not target.matches(loaded):
                where = target.param_name + ("" if target.index is None else " (a block of it)")
                raise CheckpointError(
                    f"{name}: the loaded {type(self.model).__name__} holds other values in {where} than "
                    "the checkpoint it was loaded from; cannot set the plane's weights exactly"
                )
            return target
        same = [
            (n, p)
            for n, p in self.free
            if tuple(p.shape) == tuple(loaded.shape) and torch.equal(p.detach().cpu(), loaded.to(p.dtype))
        ]
        if len(same) > 1:
            raise CheckpointError(
                f"{name} has no parameter of that name in the loaded "
                f"{type(self.model).__name__}, and {len(same)} parameters hold its "
                f"values ({same[0][0]}, {same[1][0]}...): cannot tell which it sets"
            )
        if not same:
            return None
        self.free.remove(same[0])
        self.targets[name] = Target(name, same[0][0], same[0][1])
        self.renamed.append(f"{name} -> {same[0][0]}")
        return self.targets[name]

    def notes(self) -> list[str]:
        notes = []
        if self.renamed:
            notes.append(
                f"{len(self.renamed)} checkpoint tensors are named differently in the loaded "
                f"model and were matched by their values ({', '.join(self.renamed[:3])})"
            )
        experts = [n for n in self.mapped if self.targets[n].index is not None and self.targets[n].param.dim() == 3]
        if experts:
            notes.append(
                f"{len(experts)} expert tensors of the checkpoints are blocks of fused expert parameters "
                f"in the loaded model (first: {experts[0]} -> {self.targets[experts[0]].param_name})"
            )
        if self.towers:
            notes.append(
                f"{len(self.towers)} tensors of the wrapper's non-text towers (first: {self.towers[0]}) are "
                "left out of the plane: text probes never run them"
            )
        if self.unbound:
            notes.append(
                f"{len(self.unbound)} checkpoint tensors have no model parameter and do not "
                f"change between the landscape checkpoints (first: {self.unbound[0]})"
            )
        if self.aliases:
            notes.append(
                f"{len(self.aliases)} tensors duplicate a tied parameter and are counted once "
                f"(first: {self.aliases[0]})"
            )
        bound = {id(t.param) for t in self.targets.values()}
        fixed = [n for n, p in self.model.named_parameters() if id(p) not in bound and tower_of(n) is None]
        if fixed:
            notes.append(
                f"{len(fixed)} model parameters are not in the checkpoints and keep the "
                f"values they were loaded with (first: {fixed[0]})"
            )
        return notes


def require_directions(info: PlaneInfo) -> None:
    """Raise a CheckpointError naming the checkpoints when d_x or d_y is zero."""
    where = f"over all {info.n_params:,} parameters"
    if info.mode == RAW and info.norm_x == 0:
        raise CheckpointError(
            f"X_END equals ORIGIN: d_x = X_END - ORIGIN is zero {where}; expected "
            "an X_END from later in the run (e.g. the first steps of the new task)"
        )
    if info.mode == RAW and info.norm_y == 0:
        raise CheckpointError(
            f"Y_END equals X_END: d_y = Y_END - X_END is zero {where}; expected "
            "a Y_END from later in the run than X_END"
        )
    if info.norm_x == 0 or info.norm_y == 0:
        raise CheckpointError(
            f"a random direction is zero {where}: the origin has no 2-D weights "
            "to draw filter-normalized directions for"
        )


def _info(gram: _Gram, mode: str, seed: int, shapes: dict, names: Sequence[str]) -> PlaneInfo:
    g = gram.g
    norm_x, norm_y = math.sqrt(g[0, 0]), math.sqrt(g[1, 1])
    cos = g[0, 1] / (norm_x * norm_y) if norm_x > 0 and norm_y > 0 else float("nan")
    n_params = sum(math.prod(shapes[n]) for n in names)
    return PlaneInfo(
        mode,
        seed if mode == RANDOM else None,
        norm_x,
        norm_y,
        float(np.clip(cos, -1.0, 1.0)),
        n_params,
        math.sqrt(gram.origin_sq),
    )


def _placements(gram: _Gram, trajectory: Sequence[Checkpoint]) -> list[Placement]:
    if not trajectory:
        return []
    g = gram.g
    det = g[0, 0] * g[1, 1] - g[0, 1] ** 2
    if not det > 1e-12 * g[0, 0] * g[1, 1]:  # sin^2 of the angle below 1e-12
        raise CheckpointError(
            "d_x and d_y are parallel (or zero) over the trajectory's shared "
            "tensors: the plane is a line and cannot place checkpoints; choose "
            "anchors whose updates point in different directions"
        )
    out = []
    for k, c in enumerate(trajectory):
        coords = np.linalg.solve(g, gram.b[k])  # (2,) least-squares alpha, beta
        # |r - D c|^2 = r.r - b.c at the least-squares solution; rounding can make it < 0
        residual = math.sqrt(max(0.0, gram.rr[k] - float(gram.b[k] @ coords)))
        distance = math.sqrt(gram.rr[k])
        out.append(
            Placement(
                c.label,
                str(c.path),
                c.step,
                float(coords[0]),
                float(coords[1]),
                residual,
                residual / distance if distance > 0 else 0.0,
                distance,
            )
        )
    return out
