"""Per-layer feature statistics of one checkpoint pair: PCA, PC angles, mean shift, CKA.

Tensors in, numbers out (float64); :mod:`forgetdiag.analyses.features` runs the models and
decides where a shift starts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from forgetdiag import linalg
from forgetdiag.errors import ProbeError
from forgetdiag.nulls import baseline_direction_angle

# A principal direction whose standard deviation is below this share of the mean feature norm
# is float32 rounding, not structure (features are stored in float32: ~6e-8 relative error).
RANK_RTOL = 1e-5


@dataclass(frozen=True)
class LayerShift:
    """One hidden-state index of one checkpoint pair. Angles in degrees; NaN where undefined
    (a layer whose features do not vary across prompts has no PCs; a zero shift no direction)."""

    layer: int  # 0 = embedding output
    k: int  # PCs compared: min(k, rank before, rank after)
    pc_angles_deg: tuple[float, ...]  # (k,) matching PCs, 0..90
    subspace_angles_deg: tuple[float, ...]  # (k,) principal angles, ascending
    mean_shift_norm: float
    mean_shift_rel: float  # ||mean after - mean before|| / mean_i ||before_i||
    mean_shift_pc1_angle_deg: float  # 0..90
    mean_shift_subspace_angle_deg: float  # to the before top-k subspace, 0..90
    cka: float
    rank_before: int
    rank_after: int
    explained_before: tuple[float, ...]  # (k,) variance shares of the top PCs
    explained_after: tuple[float, ...]
    shift_vs_previous_deg: float = math.nan  # 0..180 to the previous chained pair's shift
    # sampling (.feature_nulls): 95% bootstrap intervals {statistic: [low, high]}; the
    # split-half PC shift of the before model and its 95% range over splits; the mean angle of
    # a random direction to the before top-k subspace (the mean-shift angle's baseline)
    intervals: dict = field(default_factory=dict)
    null_pc_angle_deg: float = math.nan
    null_pc_angle_range: tuple[float, float] | None = None
    mean_shift_baseline_deg: float = math.nan

    @property
    def pc1_angle_deg(self) -> float:
        return self.pc_angles_deg[0] if self.pc_angles_deg else math.nan

    @property
    def pc_shift_deg(self) -> float:
        """Mean principal angle between the top-k PC subspaces: the PC shift of the rule."""
        angles = self.subspace_angles_deg
        return sum(angles) / len(angles) if angles else math.nan


@dataclass(frozen=True)
class Projection:
    """Before/after points on (before PC1, mean-shift direction made orthogonal to PC1)."""

    layer: int
    y_axis: str  # "mean shift" or "before PC2" when the shift is (nearly) along PC1 or zero
    before: np.ndarray  # (m, 2)
    after: np.ndarray  # (m, 2)


@dataclass(frozen=True)
class LayerPCA:
    """What one checkpoint's features at one layer contribute to every pair (float64)."""

    mean: torch.Tensor  # (d,)
    components: torch.Tensor  # (k, d) unit rows, the top PCs
    explained: torch.Tensor  # (k,) variance shares
    rank: int  # principal directions above RANK_RTOL (0: features constant across prompts)
    mean_norm: float  # mean_i ||x_i||


def summarise_layer(x: torch.Tensor, *, k: int) -> LayerPCA:
    """Exact PCA of one layer's features x (n, d), keeping the top k PCs and the rank."""
    x = x.to(torch.float64)
    mean_norm = float(torch.linalg.vector_norm(x, dim=1).mean())
    try:
        mean, components, variance = linalg.pca(x)  # all min(n - 1, d) directions
    except ValueError as exc:
        raise ProbeError(f"PCA of the features failed: {exc}") from None
    total = float(variance.sum())
    rank = int((variance.sqrt() > RANK_RTOL * mean_norm).sum()) if mean_norm > 0 else 0
    k = min(k, components.shape[0])
    shares = variance[:k] / total if total > 0 else torch.zeros(k, dtype=torch.float64)
    return LayerPCA(mean, components[:k].clone(), shares, rank, mean_norm)


def compare_layer(
    layer: int, xb: torch.Tensor, xa: torch.Tensor, pb: LayerPCA, pa: LayerPCA, *, k: int, cka: bool = True
) -> LayerShift:
    """The shift of one layer from before (xb, pb) to after (xa, pa); xb, xa are (n, d) (the
    same prompts; ``cka=False`` for different prompts, where CKA means nothing: NaN)."""
    k = min(k, pb.rank, pa.rank)
    qb, qa = pb.components[:k].mT, pa.components[:k].mT  # (d, k) orthonormal columns
    pc_angles = tuple(linalg.axis_angle(qb[:, i], qa[:, i]) for i in range(k))
    subspace = tuple(linalg.principal_angles(qb, qa).tolist())
    shift = pa.mean - pb.mean  # (d,)
    norm = float(torch.linalg.vector_norm(shift))
    moved = norm > 0 and k > 0
    return LayerShift(
        layer=layer,
        k=k,
        pc_angles_deg=pc_angles,
        subspace_angles_deg=subspace,
        mean_shift_norm=norm,
        mean_shift_rel=norm / pb.mean_norm if pb.mean_norm > 0 else math.nan,
        mean_shift_pc1_angle_deg=linalg.axis_angle(shift, qb[:, 0]) if moved else math.nan,
        mean_shift_subspace_angle_deg=(float(linalg.direction_angles(qb, shift[:, None])[0]) if moved else math.nan),
        cka=linalg.linear_cka(xb, xa) if cka and pb.rank and pa.rank else math.nan,
        rank_before=pb.rank,
        rank_after=pa.rank,
        explained_before=tuple(pb.explained[:k].tolist()),
        explained_after=tuple(pa.explained[:k].tolist()),
        mean_shift_baseline_deg=baseline_direction_angle(k, int(shift.shape[0])) if k else math.nan,
    )


def project(layer: int, xb: torch.Tensor, xa: torch.Tensor, pb: LayerPCA, pa: LayerPCA) -> Projection | None:
    """Points (m, d) of both checkpoints on (before PC1, mean shift orthogonal to PC1)."""
    if pb.rank == 0:
        return None
    e1 = pb.components[0]  # (d,)
    shift = pa.mean - pb.mean
    e2 = shift - (shift @ e1) * e1  # (d,) the part of the shift that PC1 does not explain
    y_axis = "mean shift"
    if float(torch.linalg.vector_norm(e2)) <= 1e-9 * max(pb.mean_norm, 1e-300):
        if pb.rank < 2:
            return None
        e2, y_axis = pb.components[1], "before PC2"
    basis = torch.stack([e1, e2 / torch.linalg.vector_norm(e2)]).mT  # (d, 2)
    to_plane = lambda x: ((x.to(torch.float64) - pb.mean) @ basis).numpy()
    return Projection(layer, y_axis, to_plane(xb), to_plane(xa))


def check_k(n: int, d: int | None, k: int, what: str) -> None:
    if n <= k:
        raise ProbeError(
            f"{what} has {n} prompts; --k {k} needs at least {k + 1} (the top {k} "
            f"PCs of {n} centred points are not all defined); pass a smaller --k "
            "or more prompts"
        )
    if d is not None and k > d:
        raise ProbeError(f"--k {k} exceeds the hidden size {d}; expected k <= {d}")
