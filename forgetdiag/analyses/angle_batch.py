"""The bases of many small updates of one shape at once: the routed experts of one layer and
component.

A 64-expert layer holds 192 small matrices where a dense layer holds 3 big ones, and computing
one exact basis per small matrix is mostly per-call overhead (bench/angles_moe.py). Stacked into
one ``(experts, d, n)`` tensor, the float64 Gram matrices, their eigendecompositions, the
orthonormalisation and the angles are one batched call each, and the records are assembled from
a few Python lists. The numbers are those of :func:`forgetdiag.linalg.update_basis` in exact
mode (the mode it takes for small matrices) and of :func:`~forgetdiag.linalg.direction_angles`
and :func:`~forgetdiag.linalg.principal_angles`: the same Gram eigendecomposition, rank rule and
sign convention, tested against them to 1e-9 degrees.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from forgetdiag.analyses.angle_pairs import PairSpec
from forgetdiag.analyses.angle_records import AngleRecord, PairAngles, angle_record, energy_overlaps
from forgetdiag.linalg import _RANDOMIZED_MAX_SHARE, Basis, _orthonormalize, summarize_rows
from forgetdiag.parts import MatrixPart


def batchable(d: int, n: int, *, rank: int | None, oversample: int | None, standardize: bool) -> bool:
    """True when :func:`update_basis` would take its exact path for a (d, n) update: the
    batched bases then give its numbers (standardized updates keep the per-matrix path)."""
    if standardize:
        return False
    if rank is None:
        return True
    oversample = max(2 * rank, 10) if oversample is None else oversample
    return rank + oversample > _RANDOMIZED_MAX_SHARE * min(d, n)


@dataclass(frozen=True)
class BatchedBases:
    """The bases of one update of a group of same-shape matrices.

    Attributes:
        bases: per matrix, (basis or None for "no update", Frobenius norm), as
            :func:`forgetdiag.analyses.angles.update_basis_of` gives them one by one.
        row: per matrix, its row in ``q`` (None without a basis).
        q: (L, d, r_max) float64: row k's first ``bases[...].rank`` columns are its basis.
    """

    bases: list[tuple[Basis | None, float]]
    row: list[int | None]
    q: torch.Tensor | None


def batched_bases(
    deltas: Sequence[torch.Tensor | None],
    *,
    rank: int | None,
    energy: float | None,
    rtol: float,
    min_update: float,
) -> BatchedBases:
    """The bases of oriented (d, n) updates, all of one shape (None: unchanged), computed in
    batch: exact mode of :func:`forgetdiag.linalg.update_basis`, without standardization."""
    bases: list[tuple[Basis | None, float]] = [(None, 0.0)] * len(deltas)
    rows: list[int | None] = [None] * len(deltas)
    present = [i for i, t in enumerate(deltas) if t is not None]
    if not present:
        return BatchedBases(bases, rows, None)
    x = torch.stack([deltas[i] for i in present]).to(torch.float64)  # (E, d, n)
    _, d, n = x.shape
    energies = x.square().sum(dim=(-2, -1))  # (E,) ||dW||_F^2
    norms = energies.sqrt()
    for i, norm in zip(present, norms.tolist()):
        bases[i] = (None, norm)
    live = (energies > 0) & (norms / (d * n) ** 0.5 > min_update)  # (E,)
    if not bool(live.any()):
        return BatchedBases(bases, rows, None)
    x, energies = x[live], energies[live]
    if d <= n:
        lam, u = torch.linalg.eigh(x @ x.mT)  # (E, d), (E, d, d) ascending
        lam, u = lam.flip(-1), u.flip(-1)
        s = lam.clamp_min(0.0).sqrt()  # (E, d) descending
    else:
        lam, v = torch.linalg.eigh(x.mT @ x)  # (E, n), (E, n, n): right singular vectors
        lam, v = lam.flip(-1), v.flip(-1)
        s = lam.clamp_min(0.0).sqrt()  # (E, n)
        u = (x @ v) / torch.where(s > 0, s, 1.0).unsqueeze(-2)  # (E, d, n); s = 0 columns dropped below
    m = s.shape[-1]
    if rank is not None:
        r = torch.full((s.shape[0],), min(rank, m), dtype=torch.long, device=s.device)
    else:
        cum = torch.cumsum(s**2, dim=-1)  # (E, m)
        r = (torch.searchsorted(cum, energy * cum[:, -1:]).squeeze(-1) + 1).clamp_max(m)
    r = torch.minimum(r, (s > rtol * s[:, :1]).sum(dim=-1))  # (E,) s descending: a prefix is kept
    r_max = int(r.max())
    u = u[..., :r_max]
    # eigh's own vectors are orthonormal to float64 precision (the per-matrix path's QR leaves
    # them where they are, to ~1e-15); u = X v / s is re-orthonormalised as that QR would.
    q = u if d <= n else _orthonormalize_prefixes(u, r)
    kept = torch.arange(m, device=s.device) < r.unsqueeze(-1)  # (E, m)
    s2 = s**2
    shares = ((s2 * kept).sum(-1) / s2.sum(-1)).clamp_max(1.0)  # (E,) energy of the kept directions
    alive = [i for i, ok in zip(present, live.tolist()) if ok]
    for k, (i, ri, share, total) in enumerate(zip(alive, r.tolist(), shares.tolist(), energies.tolist())):
        basis = Basis(
            q=q[k, :, :ri], singular_values=s[k, :ri], rank=ri, energy=share, total_energy=total, method="exact"
        )
        bases[i] = (basis, bases[i][1])
        rows[i] = k
    return BatchedBases(bases, rows, q)


def _orthonormalize_prefixes(u: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Orthonormalise the first r[k] columns of each u[k] (nearly orthonormal already), as
    :func:`forgetdiag.linalg._orthonormalize` does with a QR whose R has a positive diagonal.

    Cholesky QR: u = Q R with R^T R = u^T u; for columns this close to orthonormal (condition
    ~1) it is as accurate as Householder QR and a tenth of its cost on small matrices. The
    columns after r[k] (dropped directions, possibly zero) are replaced by unit ones in the Gram
    matrix so the factorisation exists; column j of Q depends on columns <= j only.
    """
    r_max = u.shape[-1]
    keep = torch.arange(r_max, device=u.device) < r.unsqueeze(-1)  # (E, r_max)
    both = keep.unsqueeze(-1) & keep.unsqueeze(-2)  # (E, r_max, r_max)
    eye = torch.eye(r_max, dtype=u.dtype, device=u.device)
    gram = torch.where(both, u.mT @ u, eye)
    lower, info = torch.linalg.cholesky_ex(gram)  # gram = L L^T: R = L^T
    if bool((info != 0).any()):  # never for kept columns (s > rtol s_max); Householder then
        return _orthonormalize(u)
    return torch.linalg.solve_triangular(lower, u.mT, upper=False).mT  # u R^-1


def group_key(part: MatrixPart, shape: tuple[int, ...], settings) -> tuple | None:
    """The batch a routed expert's part joins (layer, component, part, oriented shape), or None
    for a matrix computed on its own (not an expert, or too big for the exact path)."""
    if part.expert is None:
        return None
    d, n = part.oriented(torch.empty(shape, device="meta")).shape
    top_k = settings.top_k
    if not batchable(d, n, rank=top_k, oversample=settings.oversample or top_k, standardize=settings.standardize):
        return None
    return (part.layer, part.component, part.part, d, n)


def expert_group_records(group, pairs: Sequence[PairSpec], settings) -> list[AngleRecord]:
    """The records of a group of routed experts' parts of one shape, ``[(part, stored shape,
    {update: stored delta or None})]``: bases in batch, then the angles of the experts whose
    two bases have the same ranks in batch, then each record as ``angle_record`` makes it."""
    updates = sorted({u for p in pairs for u in (p.a, p.b)})
    bases = {}
    for update in updates:
        oriented = [None if deltas[update] is None else part.oriented(deltas[update]) for part, _, deltas in group]
        bases[update] = batched_bases(
            oriented, rank=settings.top_k, energy=settings.energy, rtol=settings.rtol, min_update=settings.min_update
        )
    d = group[0][0].oriented(torch.empty(group[0][1], device="meta")).shape[0]
    records = []
    for pair in pairs:
        a, b = bases[pair.a], bases[pair.b]
        angles = _batched_angles(a, b)
        records.append(
            [angle_record(part, pair, a.bases[k], b.bases[k], d, angles.get(k)) for k, (part, _, _) in enumerate(group)]
        )
    return [r for k in range(len(group)) for r in (per_pair[k] for per_pair in records)]


def _batched_angles(a: BatchedBases, b: BatchedBases) -> dict[int, PairAngles]:
    """Per matrix with both bases: its :class:`PairAngles`, as :func:`angle_record` computes
    them one by one (the same formulas, SVDs included), computed for each (ra, rb) in batch."""
    by_ranks: dict[tuple[int, int], list[int]] = {}
    for k, ((basis_a, _), (basis_b, _)) in enumerate(zip(a.bases, b.bases)):
        if basis_a is not None and basis_b is not None:
            by_ranks.setdefault((basis_a.rank, basis_b.rank), []).append(k)
    out = {}
    for (ra, rb), ks in by_ranks.items():
        qa = a.q[[a.row[k] for k in ks], :, :ra]  # (E, d, ra)
        qb = b.q[[b.row[k] for k in ks], :, :rb]  # (E, d, rb)
        coords = qa.mT @ qb  # (E, ra, rb): B's directions in A's basis
        residual = qb - qa @ coords  # (E, d, rb): their parts outside span(A)
        directions = torch.rad2deg(
            torch.atan2(torch.linalg.vector_norm(residual, dim=-2), torch.linalg.vector_norm(coords, dim=-2))
        )  # (E, rb)
        big, small = (qa, qb) if ra >= rb else (qb, qa)  # principal angles: the smaller basis second
        m = big.mT @ small  # (E, max, min)
        cos = torch.linalg.svdvals(m)  # (E, min) descending
        sin = torch.linalg.svdvals(small - big @ m).flip(-1)  # (E, min) ascending
        principal = torch.rad2deg(torch.atan2(sin, cos))  # (E, min)
        s_b = torch.stack([b.bases[k][0].singular_values for k in ks])  # (E, rb)
        totals = torch.tensor([b.bases[k][0].total_energy for k in ks], dtype=torch.float64, device=s_b.device)
        rows = zip(
            ks,
            directions.tolist(),
            principal.tolist(),
            principal.mean(-1).tolist(),
            summarize_rows(directions),
            energy_overlaps(directions, s_b, totals).tolist(),
        )
        for k, dirs, princ, princ_mean, summary, overlap in rows:
            out[k] = PairAngles(tuple(dirs), tuple(princ), princ_mean, summary, overlap)
    return out
