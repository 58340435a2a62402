"""The bases of many small updates of one shape at once: the routed experts of one layer and
component.

A 64-expert layer holds 192 small matrices where a dense layer holds 3 big ones, and computing
one exact basis per small matrix is mostly per-call overhead (bench/angles_moe.py). Stacked into
one ``(experts, d, n)`` tensor, the float64 Gram matrices, their eigendecompositions and the
orthonormalisation are one batched call each. The numbers are those of
:func:`forgetdiag.linalg.update_basis` in exact mode (the mode it takes for small matrices):
the same Gram eigendecomposition, rank rule and sign convention, tested against it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from forgetdiag.analyses.angle_pairs import PairSpec
from forgetdiag.analyses.angle_records import AngleRecord, angle_record
from forgetdiag.linalg import _RANDOMIZED_MAX_SHARE, Basis
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


def batched_bases(
    deltas: Sequence[torch.Tensor | None],
    *,
    rank: int | None,
    energy: float | None,
    rtol: float,
    min_update: float,
) -> list[tuple[Basis | None, float]]:
    """(basis or None for "no update", Frobenius norm) of each oriented (d, n) update, all of
    one shape (None: unchanged), as :func:`forgetdiag.analyses.angles.update_basis_of` gives
    them one by one without standardization."""
    out: list[tuple[Basis | None, float]] = [(None, 0.0)] * len(deltas)
    present = [i for i, t in enumerate(deltas) if t is not None]
    if not present:
        return out
    x = torch.stack([deltas[i] for i in present]).to(torch.float64)  # (E, d, n)
    _, d, n = x.shape
    energies = x.square().sum(dim=(-2, -1))  # (E,) ||dW||_F^2
    norms = energies.sqrt()
    for i, norm in zip(present, norms.tolist()):
        out[i] = (None, norm)
    live = (energies > 0) & (norms / (d * n) ** 0.5 > min_update)  # (E,)
    if not bool(live.any()):
        return out
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
        r = torch.full((s.shape[0],), min(rank, m), dtype=torch.long)
    else:
        cum = torch.cumsum(s**2, dim=-1)  # (E, m)
        r = (torch.searchsorted(cum, energy * cum[:, -1:]).squeeze(-1) + 1).clamp_max(m)
    r = torch.minimum(r, (s > rtol * s[:, :1]).sum(dim=-1))  # (E,) s descending: a prefix is kept
    r_max = int(r.max())
    # Householder QR: the first r columns of Q depend on the first r columns of u only, so one
    # QR of the widest prefix orthonormalises every expert's kept columns at once.
    q, rr = torch.linalg.qr(u[..., :r_max])  # (E, d, r_max), (E, r_max, r_max)
    signs = torch.sign(torch.diagonal(rr, dim1=-2, dim2=-1))  # (E, r_max)
    q = q * torch.where(signs == 0, 1.0, signs).unsqueeze(-2)
    full = (s**2).sum(dim=-1)  # (E,)
    for k, i in enumerate(j for j, alive in zip(present, live.tolist()) if alive):
        ri = int(r[k])
        kept = float((s[k, :ri] ** 2).sum() / full[k])
        basis = Basis(
            q=q[k, :, :ri].contiguous(),
            singular_values=s[k, :ri].clone(),
            rank=ri,
            energy=min(kept, 1.0),
            total_energy=float(energies[k]),
            method="exact",
        )
        out[i] = (basis, out[i][1])
    return out


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
        records.append([angle_record(part, pair, a[k], b[k], d, angles.get(k)) for k, (part, _, _) in enumerate(group)])
    return [r for k in range(len(group)) for r in (per_pair[k] for per_pair in records)]


def _batched_angles(a, b) -> dict[int, tuple]:
    """Per expert with both bases: (direction angles, principal angles, their summary), as
    :func:`forgetdiag.linalg.direction_angles`, :func:`~forgetdiag.linalg.principal_angles`
    and :func:`~forgetdiag.linalg.summarize` give them, computed for each (ra, rb) in batch."""
    by_ranks: dict[tuple[int, int], list[int]] = {}
    for k, ((basis_a, _), (basis_b, _)) in enumerate(zip(a, b)):
        if basis_a is not None and basis_b is not None:
            by_ranks.setdefault((basis_a.rank, basis_b.rank), []).append(k)
    out = {}
    for (ra, rb), ks in by_ranks.items():
        qa = torch.stack([a[k][0].q for k in ks])  # (E, d, ra)
        qb = torch.stack([b[k][0].q for k in ks])  # (E, d, rb)
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
        q1, median, q3 = torch.quantile(directions, torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64), dim=-1)
        stats = {
            "mean": directions.mean(-1),
            "median": median,
            "q1": q1,
            "q3": q3,
            "min": directions.amin(-1),
            "max": directions.amax(-1),
        }
        columns = {key: value.tolist() for key, value in stats.items()}
        for row, k in enumerate(ks):
            summary = {key: float(values[row]) for key, values in columns.items()}
            out[k] = (directions[row], principal[row], summary)
    return out
