"""One record of ``forgetdiag angles``: the angles between two updates of one matrix.

Given the bases of updates A and B of one matrix part (or None where a matrix did not change),
:func:`angle_record` computes the paper's per-direction angles (each kept direction of B to the
whole subspace of A), the principal angles, and their null baselines: what two unrelated
subspaces of the same dimensions in R^d already give.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch

from forgetdiag.analyses.angle_pairs import PairSpec
from forgetdiag.linalg import Basis, direction_angles, principal_angles, summarize
from forgetdiag.nulls import baseline_direction_angle, baseline_principal_angles
from forgetdiag.parts import MatrixPart


@dataclass(frozen=True)
class AngleRecord:
    """One (pair, parameter, part): the angles between updates A and B of one matrix.

    ``expert`` is the routed expert's index for an expert's matrix (``component`` is then its
    ``gate``, ``up`` or ``down``), None elsewhere.

    ``status`` is ``ok``, ``no_update_a``, ``no_update_b`` or ``no_update`` (neither changed);
    unless ``ok``, every angle is None: a matrix that did not change has no subspace.
    ``method_a``/``method_b`` say how each basis was computed (``randomized`` or ``exact``).
    Angles are in degrees; ``direction`` summarises ``direction_deg`` (mean, median, q1, q3,
    min, max), the angle of each kept direction of B to the subspace of A.
    """

    pair: str
    update_a: str
    update_b: str
    param: str
    part: str | None
    layer: int | None
    component: str
    expert: int | None
    d: int
    status: str
    rank_a: int | None
    rank_b: int | None
    method_a: str | None
    method_b: str | None
    energy_a: float | None
    energy_b: float | None
    norm_a: float
    norm_b: float
    angle_deg: float | None
    baseline_deg: float | None
    direction: dict | None
    direction_deg: tuple[float, ...] | None
    principal_deg: tuple[float, ...] | None
    principal_mean_deg: float | None
    principal_baseline_deg: tuple[float, ...] | None
    principal_baseline_mean_deg: float | None
    # ||P_A dW_B||_F^2 / ||dW_B||_F^2 over B's kept directions (a lower bound when B's basis
    # keeps less than all of its energy): every direction weighed by its energy
    energy_overlap: float | None = None
    # the data-informed null (``--probe``; None for matrices whose hidden side is not a
    # linear layer's input): mean angle, its spread between draws, energy overlap, verdict
    baseline_data_deg: float | None = None
    baseline_data_sd_deg: float | None = None
    baseline_data_energy_overlap: float | None = None
    chance: str | None = None
    baseline_run_deg: float | None = None  # ``--null-run``: B taken from the second run

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def gap_deg(self) -> float | None:
        """Null baseline minus mean angle: > 0 when A and B share more than chance gives."""
        return None if not self.ok else self.baseline_deg - self.angle_deg

    def to_dict(self) -> dict:
        out = asdict(self)
        for key in ("direction_deg", "principal_deg", "principal_baseline_deg"):
            out[key] = None if out[key] is None else list(out[key])
        out["gap_deg"] = self.gap_deg
        return out


class PairAngles(NamedTuple):
    """The angles of one (pair, matrix part) whose two updates both have a basis.

    ``direction_deg``: each kept direction of B to span(A); ``direction``: their summary
    (:func:`forgetdiag.linalg.summarize`); ``principal_deg``: the principal angles, ascending;
    ``energy_overlap``: see :attr:`AngleRecord.energy_overlap`.
    """

    direction_deg: tuple[float, ...]
    principal_deg: tuple[float, ...]
    principal_mean_deg: float
    direction: dict[str, float]
    energy_overlap: float | None


def pair_angles(basis_a: Basis, basis_b: Basis) -> PairAngles:
    """The angles between the bases of updates A and B of one matrix."""
    directions = direction_angles(basis_a.q, basis_b.q).cpu()  # (rb,) B's directions to span(A)
    principal = principal_angles(basis_a.q, basis_b.q).cpu()  # (min(ra, rb),)
    return PairAngles(
        direction_deg=tuple(directions.tolist()),
        principal_deg=tuple(principal.tolist()),
        principal_mean_deg=float(principal.mean()),
        direction=summarize(directions),
        energy_overlap=energy_overlap(directions, basis_b),
    )


def angle_record(
    part: MatrixPart,
    pair: PairSpec,
    a: tuple[Basis | None, float],
    b: tuple[Basis | None, float],
    d: int,
    angles: PairAngles | None = None,
) -> AngleRecord:
    """The record of ``part`` for ``pair``.

    Args:
        part: the matrix (or part of a fused one).
        pair: the two updates compared.
        a, b: (basis or None for "no update", Frobenius norm of the update) of A and B.
        d: the hidden size, the dimension of the space the bases live in.
        angles: the angles when already computed (in a batch of experts, :mod:`.angle_batch`);
            else :func:`pair_angles` computes them here.

    Returns:
        An :class:`AngleRecord`; all angles None unless both updates exist.
    """
    (basis_a, norm_a), (basis_b, norm_b) = a, b
    common = dict(
        pair=pair.label,
        update_a=pair.a.label,
        update_b=pair.b.label,
        param=part.tensor.name,
        part=part.part,
        layer=part.layer,
        component=part.component,
        expert=part.expert,
        d=d,
        norm_a=norm_a,
        norm_b=norm_b,
    )
    if basis_a is None or basis_b is None:
        status = (
            "no_update" if basis_a is None and basis_b is None else "no_update_a" if basis_a is None else "no_update_b"
        )
        return AngleRecord(
            **common,
            status=status,
            rank_a=basis_a.rank if basis_a else None,
            rank_b=basis_b.rank if basis_b else None,
            method_a=basis_a.method if basis_a else None,
            method_b=basis_b.method if basis_b else None,
            energy_a=basis_a.energy if basis_a else None,
            energy_b=basis_b.energy if basis_b else None,
            angle_deg=None,
            baseline_deg=None,
            direction=None,
            direction_deg=None,
            principal_deg=None,
            principal_mean_deg=None,
            principal_baseline_deg=None,
            principal_baseline_mean_deg=None,
        )
    ra, rb = basis_a.rank, basis_b.rank
    angles = pair_angles(basis_a, basis_b) if angles is None else angles
    null, null_mean = _principal_null(ra, rb, d)
    return AngleRecord(
        **common,
        status="ok",
        rank_a=ra,
        rank_b=rb,
        method_a=basis_a.method,
        method_b=basis_b.method,
        energy_a=basis_a.energy,
        energy_b=basis_b.energy,
        angle_deg=angles.direction["mean"],
        baseline_deg=baseline_direction_angle(ra, d),
        direction=angles.direction,
        direction_deg=angles.direction_deg,
        principal_deg=angles.principal_deg,
        principal_mean_deg=angles.principal_mean_deg,
        principal_baseline_deg=null,
        principal_baseline_mean_deg=null_mean,
        energy_overlap=angles.energy_overlap,
    )


@functools.lru_cache(maxsize=4096)
def _principal_null(ra: int, rb: int, d: int) -> tuple[tuple[float, ...], float]:
    """The principal-angle baseline of (ra, rb, d) and its mean, as records hold them."""
    null = baseline_principal_angles(ra, rb, d, samples=baseline_samples(min(ra, rb)))
    return tuple(null.tolist()), float(null.mean())


def energy_overlap(directions_deg: torch.Tensor, basis_b: Basis) -> float | None:
    """sum_j s_j^2 cos^2(theta_j) / ||dW_B||_F^2: the share of B's energy inside span(A),
    from B's kept directions (singular values s_j, angles theta_j to span(A))."""
    if not basis_b.total_energy > 0:
        return None
    total = torch.tensor(basis_b.total_energy, dtype=torch.float64)
    return float(energy_overlaps(directions_deg.cpu(), basis_b.singular_values.cpu(), total))


def energy_overlaps(directions_deg: torch.Tensor, singular_values: torch.Tensor, totals: torch.Tensor) -> torch.Tensor:
    """:func:`energy_overlap` of a batch: directions and singular values (..., rb), the updates'
    ||dW_B||_F^2 (...,), all positive; capped at 1 (rounding)."""
    cos2 = torch.cos(torch.deg2rad(directions_deg.to(torch.float64))) ** 2  # (..., rb)
    s2 = singular_values.to(torch.float64) ** 2  # (..., rb)
    return ((s2 * cos2).sum(-1) / totals).clamp_max(1.0)


def baseline_samples(k: int) -> int:
    """Monte Carlo samples of the principal-angle baseline: 16 for small subspaces, fewer for
    large ones (each sample already averages k sorted angles, and costs O(k^3))."""
    return max(1, min(16, math.ceil(512 / max(k, 1))))


@dataclass(frozen=True)
class ExpertSummary:
    """The routed experts of one (pair, layer, component), summarised.

    ``median_deg``, ``min_deg`` and ``max_deg`` run over the experts whose matrix changed in
    both updates (``n_ok`` of ``n_experts``); ``baseline_deg`` is the median of their null
    baselines. ``moved_most`` lists the experts with the largest update B (Frobenius norm),
    largest first, and ``norm_share`` the share of the component's squared update B they hold.
    """

    pair: str
    layer: int
    component: str
    n_experts: int
    n_ok: int
    median_deg: float | None
    min_deg: float | None
    max_deg: float | None
    baseline_deg: float | None
    moved_most: tuple[int, ...]
    norm_share: float | None

    def to_dict(self) -> dict:
        out = asdict(self)
        out["moved_most"] = list(self.moved_most)
        return out


def summarize_experts(records, *, top: int = 3) -> list[ExpertSummary]:
    """One :class:`ExpertSummary` per (pair, layer, component) of the routed experts in
    ``records`` (records of other matrices are ignored), in the records' order."""
    groups: dict[tuple, list[AngleRecord]] = {}
    for r in records:
        if r.expert is not None:
            groups.setdefault((r.pair, r.layer, r.component), []).append(r)
    out = []
    for (pair, layer, component), rs in groups.items():
        ok = [r for r in rs if r.ok]
        angles = sorted(r.angle_deg for r in ok)
        energy = [r.norm_b**2 for r in rs]
        moved = sorted((r for r in rs if r.norm_b > 0), key=lambda r: -r.norm_b)[:top]
        total = sum(energy)
        out.append(
            ExpertSummary(
                pair=pair,
                layer=layer,
                component=component,
                n_experts=len(rs),
                n_ok=len(ok),
                median_deg=_median(angles),
                min_deg=angles[0] if angles else None,
                max_deg=angles[-1] if angles else None,
                baseline_deg=_median(sorted(r.baseline_deg for r in ok)),
                moved_most=tuple(r.expert for r in moved),
                norm_share=sum(r.norm_b**2 for r in moved) / total if total > 0 else None,
            )
        )
    return out


def _median(values: list[float]) -> float | None:
    if not values:
        return None
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2
