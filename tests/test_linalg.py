"""forgetdiag.linalg against independent references: scipy, plain numpy, planted subspaces."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import scipy.stats
import torch

from forgetdiag.linalg import (
    Basis,
    axis_angle,
    direction_angles,
    linear_cka,
    pca,
    principal_angles,
    summarize,
    update_basis,
    vector_angle,
)
from forgetdiag.nulls import baseline_direction_angle, baseline_principal_angles


def random_orthonormal(d: int, r: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(d, r, dtype=torch.float64, generator=g)).Q  # (d, r)


def planted_pair(thetas_deg: list[float], *, d: int = 40, extra_a: int = 0, seed: int = 0):
    """Bases with known principal angles: b_i = cos(t_i) o_i + sin(t_i) o_{r+i}.

    qa gets ``extra_a`` more columns orthogonal to everything in qb, which leaves the angles
    unchanged while making ra != rb.
    """
    r = len(thetas_deg)
    o = random_orthonormal(d, 2 * r + extra_a, seed)  # (d, 2r + extra) orthonormal frame
    t = torch.deg2rad(torch.tensor(thetas_deg, dtype=torch.float64))
    qa = torch.cat([o[:, :r], o[:, 2 * r :]], dim=1)  # (d, r + extra)
    qb = o[:, :r] * torch.cos(t) + o[:, r : 2 * r] * torch.sin(t)  # (d, r)
    return qa, qb


def scipy_angles_deg(qa: torch.Tensor, qb: torch.Tensor) -> np.ndarray:
    return np.sort(np.degrees(scipy.linalg.subspace_angles(qa.numpy(), qb.numpy())))


def low_rank_matrix(d: int, n: int, singular_values: list[float], *, seed: int = 0):
    """(d, n) float64 matrix with the given singular values; returns it and its left factor."""
    k = len(singular_values)
    u, v = random_orthonormal(d, k, seed), random_orthonormal(n, k, seed + 1)
    s = torch.tensor(singular_values, dtype=torch.float64)
    return (u * s) @ v.T, u


# --- principal angles ------------------------------------------------------------------------


SHAPES = [(50, 3, 3), (50, 5, 2), (50, 2, 7), (200, 20, 30), (10, 10, 4)]


@pytest.mark.parametrize("d,ra,rb", SHAPES)
def test_principal_angles_match_scipy(d, ra, rb):
    qa, qb = random_orthonormal(d, ra, 1), random_orthonormal(d, rb, 2)
    ours = principal_angles(qa, qb)
    assert ours.dtype == torch.float64 and ours.shape == (min(ra, rb),)
    assert torch.all(ours[1:] >= ours[:-1])  # ascending
    np.testing.assert_allclose(ours.numpy(), scipy_angles_deg(qa, qb), atol=1e-6)
    np.testing.assert_allclose(principal_angles(qb, qa).numpy(), ours.numpy(), atol=1e-10)


@pytest.mark.parametrize("extra_a", [0, 3])
def test_principal_angles_planted(extra_a):
    thetas = [0.0, 30.0, 60.0, 90.0]
    qa, qb = planted_pair(thetas, extra_a=extra_a)
    np.testing.assert_allclose(principal_angles(qa, qb).numpy(), thetas, atol=1e-10)
    # scipy picks arcsin/arccos with its mask in the wrong order here, so its exact 0 comes out
    # as arccos(1 - ulp) ~ 1.5e-6 deg; ours is exact to 1e-10 above
    np.testing.assert_allclose(scipy_angles_deg(qa, qb), thetas, atol=5e-6)


def test_principal_angles_near_0_and_90():
    thetas = [1e-7, 1e-4, 90.0 - 1e-4, 90.0 - 1e-7]
    qa, qb = planted_pair(thetas, extra_a=2, seed=3)
    ours = principal_angles(qa, qb).numpy()
    np.testing.assert_allclose(ours, thetas, rtol=1e-6, atol=1e-11)
    np.testing.assert_allclose(ours, scipy_angles_deg(qa, qb), atol=1e-6)
    # arccos of the cosines alone would have lost the tiny angles completely
    assert ours[0] > 0


def test_principal_angles_against_40_digit_reference():
    """A tiny angle next to a large one: scipy takes arccos for the tiny one and returns 0, so
    the referee is mpmath at 40 digits (same formulas, no rounding to speak of)."""
    mpmath = pytest.importorskip("mpmath")
    rng = np.random.default_rng(4)
    qa = np.linalg.qr(rng.standard_normal((7, 2)))[0]  # (7, 2)
    near = qa[:, :1] + 1e-9 * rng.standard_normal((7, 1))  # almost inside span(qa)
    others = rng.standard_normal((7, 3))
    others -= 0.95 * qa[:, 1:] @ (qa[:, 1:].T @ others)  # keep qa's 2nd column far from qb
    qb = np.linalg.qr(np.hstack([near, others]))[0]  # (7, 4)
    mpmath.mp.dps = 40
    a, b = mpmath.matrix(qa.tolist()), mpmath.matrix(qb.tolist())
    a, b = mpmath.qr(a)[0][:, :2], mpmath.qr(b)[0][:, :4]  # exactly orthonormal at 40 digits
    m = b.T * a  # (4, 2): the smaller basis is qa
    cos = sorted((float(c) for c in mpmath.svd_r(m, compute_uv=False)), reverse=True)
    sin = sorted(float(s) for s in mpmath.svd_r(a - b * m, compute_uv=False))
    reference = np.degrees(np.arctan2(sin, cos))
    assert reference[0] < 1e-6 and reference[1] > 45
    ours = principal_angles(torch.from_numpy(qa), torch.from_numpy(qb)).numpy()
    np.testing.assert_allclose(ours, reference, rtol=1e-7, atol=1e-12)


def test_principal_angles_edge_cases():
    q = random_orthonormal(20, 4, 5)
    assert torch.allclose(principal_angles(q, q), torch.zeros(4, dtype=torch.float64), atol=1e-12)
    assert principal_angles(q, q[:, :0]).shape == (0,)
    with pytest.raises(ValueError, match="orthonormal"):
        principal_angles(q * 2.0, q)
    with pytest.raises(ValueError, match="different spaces"):
        principal_angles(q, random_orthonormal(21, 4, 5))


# --- direction angles ------------------------------------------------------------------------


def test_direction_angles_match_numpy():
    qa = random_orthonormal(30, 6, 7).numpy()
    ub = random_orthonormal(30, 9, 8).numpy()
    p = qa @ qa.T  # (d, d) projector onto span(qa)
    expected = [math.degrees(math.atan2(np.linalg.norm(u - p @ u), np.linalg.norm(p @ u))) for u in ub.T]
    ours = direction_angles(torch.from_numpy(qa), torch.from_numpy(ub))
    assert ours.dtype == torch.float64 and ours.shape == (9,)
    np.testing.assert_allclose(ours.numpy(), expected, atol=1e-9)


def test_direction_angles_planted_and_edges():
    thetas = [0.0, 1e-6, 45.0, 89.9, 90.0]
    qa, qb = planted_pair(thetas, extra_a=2, seed=9)
    np.testing.assert_allclose(direction_angles(qa, qb).numpy(), thetas, rtol=1e-8, atol=1e-10)
    # the length of a direction does not matter; an empty subspace is orthogonal to everything
    longer = direction_angles(qa, 3.0 * qb).numpy()
    np.testing.assert_allclose(longer, thetas, rtol=1e-8, atol=1e-10)
    assert torch.all(direction_angles(qa[:, :0], qb) == 90.0)
    with pytest.raises(ValueError, match="zero column"):
        direction_angles(qa, torch.zeros(40, 1, dtype=torch.float64))


def test_summarize_matches_numpy():
    a = torch.tensor([10.0, 80.0, 20.0, 40.0, 35.0], dtype=torch.float64)
    s = summarize(a)
    assert list(s) == ["mean", "median", "q1", "q3", "min", "max"]
    x = a.numpy()
    q1, q3 = np.percentile(x, [25, 75])
    expected = [x.mean(), np.median(x), q1, q3, x.min(), x.max()]
    np.testing.assert_allclose(list(s.values()), expected)
    with pytest.raises(ValueError):
        summarize(torch.zeros(0))


# --- update basis ----------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(120, 300), (300, 80), (1536, 1600)])
def test_update_basis_planted_rank3(shape):
    a, u = low_rank_matrix(*shape, [5.0, 2.0, 0.5], seed=11)
    basis = update_basis(a.to(torch.float32), rank=64)
    expected_method = "randomized" if shape == (1536, 1600) else "exact"
    assert isinstance(basis, Basis) and basis.method == expected_method
    assert basis.rank == 3 and basis.q.shape == (shape[0], 3)  # float32 noise directions dropped
    assert basis.q.dtype == torch.float64 and basis.singular_values.dtype == torch.float64
    assert principal_angles(basis.q, u).max() < 1e-4
    np.testing.assert_allclose(basis.singular_values.numpy(), [5.0, 2.0, 0.5], rtol=1e-5)
    assert basis.energy == pytest.approx(1.0, abs=1e-6)
    assert basis.total_energy == pytest.approx(25 + 4 + 0.25, rel=1e-6)
    eye = torch.eye(3, dtype=torch.float64)
    assert torch.allclose(basis.q.T @ basis.q, eye, atol=1e-12)


def numpy_energy_basis(a: np.ndarray, energy: float):
    """The paper's rule, written plainly: full SVD, smallest r with cumulative share >= energy."""
    u, s, _ = np.linalg.svd(a.astype(np.float64), full_matrices=False)
    share = np.cumsum(s**2) / np.sum(s**2)
    r = int(np.argmax(share >= energy)) + 1
    return u[:, :r], share[r - 1]


@pytest.mark.parametrize("shape", [(60, 150), (150, 60)])
@pytest.mark.parametrize("energy", [0.5, 0.9, 0.99])
def test_update_basis_energy_matches_numpy(shape, energy):
    g = torch.Generator().manual_seed(3)
    # a decaying spectrum, as in real updates
    a = torch.randn(*shape, generator=g) * torch.logspace(0, -1.5, shape[1])  # (d, n) float32
    basis = update_basis(a, energy=energy)
    u_ref, share_ref = numpy_energy_basis(a.numpy(), energy)
    assert basis.method == "exact"
    assert basis.rank == u_ref.shape[1]
    assert basis.energy == pytest.approx(share_ref, abs=1e-12)
    assert basis.energy >= energy
    assert principal_angles(basis.q, torch.from_numpy(u_ref)).max() < 1e-6
    # column i is the i-th singular vector, not just any basis of the span
    assert direction_angles(torch.from_numpy(u_ref[:, :1]), basis.q[:, :1]).item() < 1e-6


def test_update_basis_randomized_agrees_with_exact_on_gapped_spectrum():
    spectrum = [10.0 - 0.3 * i for i in range(16)] + [0.2 * 0.97**i for i in range(200)]
    a, _ = low_rank_matrix(1024, 1536, spectrum, seed=21)
    a = a.to(torch.float32)
    fast = update_basis(a, rank=16)
    exact = update_basis(a, rank=16, oversample=1000)  # too many columns: falls back to exact
    assert (fast.method, exact.method) == ("randomized", "exact")
    assert fast.rank == exact.rank == 16
    assert principal_angles(fast.q, exact.q).max() < 1e-3
    assert direction_angles(exact.q, fast.q).max() < 1e-3
    np.testing.assert_allclose(fast.singular_values, exact.singular_values, rtol=1e-5)
    assert fast.energy == pytest.approx(exact.energy, abs=1e-6)


def test_update_basis_deterministic_and_leaves_global_rng_alone():
    a, _ = low_rank_matrix(1024, 1100, [1.0 / (i + 1) for i in range(300)], seed=5)
    a = a.to(torch.float32)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = update_basis(a, rank=8, seed=7)
    assert first.method == "randomized"
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(456)  # a different global state must not change the result
    second = update_basis(a, rank=8, seed=7)
    assert torch.equal(first.q, second.q)
    assert torch.equal(first.singular_values, second.singular_values)


def test_update_basis_total_energy_matches_float64_numpy():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((700, 900)) * np.linspace(0.1, 3.0, 900)  # uneven column scales
    for dtype in (torch.float32, torch.bfloat16):
        t = torch.from_numpy(x).to(dtype)
        expected = float(np.sum(t.double().numpy() ** 2))  # the stored values, squared in float64
        for view in (t, t.mT):  # contiguous and transposed (angles orients by transposing)
            assert update_basis(view, rank=8).total_energy == pytest.approx(expected, rel=1e-7)
    big = torch.full((50, 60), 1e30)  # squares overflow float32: the float64 pass takes over
    big[:, 0] = -2e30
    expected = 1e60 * (50 * 59 + 50 * 4)
    assert update_basis(big, energy=1.0).total_energy == pytest.approx(expected, rel=1e-7)


def test_update_basis_dtypes_and_errors():
    a, u = low_rank_matrix(40, 90, [3.0, 1.0], seed=2)
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        basis = update_basis(a.to(dtype), energy=1.0, rtol=1e-2)
        assert basis.rank == 2 and principal_angles(basis.q, u).max() < 2.0  # bf16 input is coarse
    assert update_basis(torch.zeros(40, 90), rank=4) is None
    assert update_basis(torch.zeros(40, 90, dtype=torch.bfloat16), energy=0.99) is None
    bad = a.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        update_basis(bad, rank=4)
    bad[0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        update_basis(bad, energy=0.9)
    for kwargs in ({}, {"rank": 2, "energy": 0.9}, {"rank": 0}, {"energy": 1.5}):
        with pytest.raises(ValueError):
            update_basis(a, **kwargs)
    with pytest.raises(ValueError, match="2-D"):
        update_basis(a[0], rank=2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_update_basis_on_cuda():
    a, u = low_rank_matrix(1024, 1100, [4.0, 2.0, 1.0], seed=4)
    for kwargs in ({"rank": 8}, {"energy": 0.99}):
        basis = update_basis(a.float().cuda(), **kwargs)
        assert basis.q.is_cuda and basis.rank == 3
        assert principal_angles(basis.q.cpu(), u).max() < 1e-4


# --- null baselines --------------------------------------------------------------------------


def test_baseline_direction_angle_closed_forms():
    # d=2, ra=1: uniform angle on [0, 90]; d=3: density sin(t) (ra=1) or cos(t) (ra=2)
    assert baseline_direction_angle(1, 2) == pytest.approx(45.0, abs=1e-9)
    assert baseline_direction_angle(1, 3) == pytest.approx(math.degrees(1.0), abs=1e-9)
    assert baseline_direction_angle(2, 3) == pytest.approx(math.degrees(math.pi / 2 - 1), abs=1e-9)
    assert baseline_direction_angle(0, 10) == 90.0
    assert baseline_direction_angle(10, 10) == 0.0


@pytest.mark.parametrize("ra,d", [(1, 10), (3, 10), (9, 10), (7, 100), (50, 100), (1, 8192), (256, 4096)])
def test_baseline_direction_angle_monte_carlo(ra, d):
    rng = np.random.default_rng(0)
    if d <= 100:  # literal random unit vectors against the first ra coordinates
        u = rng.standard_normal((20000, d))
        inside, outside = np.linalg.norm(u[:, :ra], axis=1), np.linalg.norm(u[:, ra:], axis=1)
    else:  # the same norms, drawn as chi variables
        inside = np.sqrt(rng.chisquare(ra, 200000))
        outside = np.sqrt(rng.chisquare(d - ra, 200000))
    mc = np.degrees(np.arctan2(outside, inside)).mean()
    assert baseline_direction_angle(ra, d) == pytest.approx(mc, abs=0.5)


@pytest.mark.parametrize("share", [1 / 4096, 0.1, 0.25, 0.5, 0.77])
def test_baseline_direction_angle_close_to_the_common_approximation(share):
    d = 4096
    ra = max(1, round(share * d))
    assert baseline_direction_angle(ra, d) == pytest.approx(math.degrees(math.acos(math.sqrt(ra / d))), abs=0.2)
    if share == 0.77:  # the number quoted in docs/science.md
        assert baseline_direction_angle(ra, d) == pytest.approx(28.6, abs=0.1)


def direct_monte_carlo_angles(ra: int, rb: int, d: int, samples: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    total = np.zeros(min(ra, rb))
    for _ in range(samples):
        a, b = rng.standard_normal((d, ra)), rng.standard_normal((d, rb))
        total += np.sort(np.degrees(scipy.linalg.subspace_angles(a, b)))
    return total / samples


def test_baseline_principal_angles_against_direct_monte_carlo():
    ours = baseline_principal_angles(5, 8, 30, samples=3000, seed=1)
    assert ours.dtype == torch.float64 and ours.shape == (5,)
    direct = direct_monte_carlo_angles(5, 8, 30, samples=1500, seed=2)
    np.testing.assert_allclose(ours.numpy(), direct, atol=1.0)
    # a single random direction against a subspace is the per-direction baseline
    line = baseline_principal_angles(6, 1, 20, samples=2000, seed=3).item()
    assert line == pytest.approx(baseline_direction_angle(6, 20), abs=0.7)


def test_baseline_principal_angles_sanity():
    first = baseline_principal_angles(32, 32, 64, samples=64, seed=0)
    again = baseline_principal_angles(32, 32, 64, samples=64, seed=0)
    assert torch.equal(first, again) and torch.all(first[1:] >= first[:-1])
    first[0] = -1.0  # callers cannot corrupt the cache
    assert baseline_principal_angles(32, 32, 64, samples=64, seed=0)[0] >= 0
    # ra = rb = d/2: cos^2 and sin^2 are exchangeable, so angle i and angle k-1-i sum to ~90
    np.testing.assert_allclose((again + again.flip(0)).numpy(), 90.0, atol=1.5)
    assert again.mean().item() == pytest.approx(45.0, abs=0.5)
    # subspaces of dimensions 7 and 6 in R^10 must share 3 directions
    shared = baseline_principal_angles(7, 6, 10)
    assert shared.shape == (6,) and torch.all(shared[:3] == 0) and torch.all(shared[3:] > 0)
    assert torch.all(baseline_principal_angles(10, 4, 10) == 0)
    assert baseline_principal_angles(0, 4, 10).shape == (0,)


def test_baseline_principal_angles_cost_does_not_grow_with_d():
    angles = baseline_principal_angles(256, 200, 8192, seed=11)
    assert angles.shape == (200,) and 60 < angles[0] < angles[-1] <= 90
    # a sampler that built d x r Gaussian matrices would need terabytes here
    huge = baseline_principal_angles(256, 200, 10**9, samples=2)
    expected = baseline_direction_angle(256, 10**9)  # every angle is close to this when d >> r
    assert torch.all((huge > expected - 0.05) & (huge <= 90))


# --- features: PCA, axis angles, CKA ---------------------------------------------------------


def test_pca_matches_numpy():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((50, 8)) * np.array([5, 4, 3, 2, 1, 0.5, 0.2, 0.1]) + 3.0
    mean, components, variance = pca(torch.from_numpy(x).to(torch.float32))
    assert components.shape == (8, 8) and components.dtype == torch.float64
    np.testing.assert_allclose(mean.numpy(), x.astype(np.float32).mean(0), rtol=1e-6)
    xc = x.astype(np.float32).astype(np.float64)
    eigenvalues, eigenvectors = np.linalg.eigh(np.cov(xc, rowvar=False))
    np.testing.assert_allclose(variance.numpy(), eigenvalues[::-1], rtol=1e-10)
    _, _, vh = np.linalg.svd(xc - xc.mean(0), full_matrices=False)
    for i in range(8):
        assert axis_angle(components[i], torch.from_numpy(vh[i])) < 1e-6
        assert axis_angle(components[i], torch.from_numpy(eigenvectors[:, -1 - i])) < 1e-6
    assert pca(torch.from_numpy(x), 3)[1].shape == (3, 8)
    assert pca(torch.from_numpy(x[:5]))[1].shape == (4, 8)  # default k = n - 1 when n <= d
    with pytest.raises(ValueError, match="at least 2"):
        pca(torch.ones(1, 8))
    with pytest.raises(ValueError, match="min"):
        pca(torch.from_numpy(x[:5]), 6)


def test_axis_and_vector_angles():
    rng = np.random.default_rng(1)
    u = torch.from_numpy(rng.standard_normal(64))
    assert axis_angle(u, -u) == 0.0  # a flipped PC is the same axis
    assert vector_angle(u, -u) == pytest.approx(180.0)
    w = torch.from_numpy(rng.standard_normal(64))
    w = w - (w @ u) / (u @ u) * u  # orthogonal to u
    assert axis_angle(u, w) == pytest.approx(90.0) and vector_angle(u, -w) == pytest.approx(90.0)
    tiny = 1e-9
    v = u / u.norm() + tiny * w / w.norm()
    assert axis_angle(u, v) == pytest.approx(math.degrees(tiny), rel=1e-6)  # arccos would give 0
    assert axis_angle(u, -v) == pytest.approx(math.degrees(tiny), rel=1e-6)
    with pytest.raises(ValueError):
        axis_angle(u, torch.zeros(64))


def gram_hsic_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Reference: linear CKA from n x n Gram matrices, HSIC(K, L) = tr(K H L H)."""
    n = x.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n

    def hsic(k, l):
        return np.trace(k @ h @ l @ h)

    k, l = x @ x.T, y @ y.T
    return hsic(k, l) / math.sqrt(hsic(k, k) * hsic(l, l))


def test_linear_cka():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((40, 12)) + 1.0
    y = x[:, :7] @ rng.standard_normal((7, 9)) + 0.5 * rng.standard_normal((40, 9))
    tx, ty = torch.from_numpy(x), torch.from_numpy(y)
    assert linear_cka(tx, ty) == pytest.approx(gram_hsic_cka(x, y), abs=1e-12)
    assert linear_cka(tx, tx) == pytest.approx(1.0, abs=1e-12)
    rotation = torch.from_numpy(scipy.stats.ortho_group.rvs(12, random_state=3))
    assert linear_cka(tx, 3.7 * tx @ rotation) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(ty, 0.2 * tx @ rotation) == pytest.approx(linear_cka(ty, tx), abs=1e-12)
    with pytest.raises(ValueError, match="same n"):
        linear_cka(tx, ty[:-1])
    with pytest.raises(ValueError, match="constant"):
        linear_cka(tx, torch.ones(40, 3))


def _expert_stack(generator, d, n, ranks):
    """One (d, n) update per rank in ``ranks``: None for unchanged, 0 for all zeros, else a
    matrix of that rank with singular values spread over 3.5 decades (just above rtol: there
    u = X v / s is orthonormal to ~1e-9 only, and the re-orthonormalisation shows)."""
    out = []
    for r in ranks:
        if r is None or r == 0:
            out.append(None if r is None else torch.zeros(d, n))
            continue
        u = torch.linalg.qr(torch.randn(d, r, generator=generator, dtype=torch.float64))[0]
        v = torch.linalg.qr(torch.randn(n, r, generator=generator, dtype=torch.float64))[0]
        s = torch.logspace(0, -3.5, r, dtype=torch.float64)
        out.append(((u * s) @ v.mT).to(torch.float32))
    return out


@pytest.mark.parametrize(("d", "n"), [(24, 12), (12, 24)])  # u from X v / s (Cholesky QR), u from eigh
@pytest.mark.parametrize("energy", [None, 0.9])
@pytest.mark.parametrize(
    "device",
    ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))],
)
def test_batched_expert_bases_and_angles_equal_one_matrix_at_a_time(d, n, energy, device, monkeypatch):
    """angle_batch's bases and angles equal update_basis, direction_angles, principal_angles
    and summarize run matrix by matrix, on experts of mixed ranks (full, low, zero, unchanged),
    so that ranks differ inside a batch and the Cholesky QR masks the dropped columns (its
    Householder fallback is disabled for the batch)."""
    from forgetdiag.analyses.angle_batch import _batched_angles, batched_bases
    from forgetdiag.analyses.angle_records import pair_angles

    g = torch.Generator().manual_seed(5)
    full = min(d, n)
    ranks_a = [full, 3, full, None, 0, 7, full, 3]
    ranks_b = [full, full, 2, full, full, None, 7, 3]
    kwargs = dict(rank=None if energy else 10, energy=energy, rtol=1e-4)
    inputs = {"a": _expert_stack(g, d, n, ranks_a), "b": _expert_stack(g, d, n, ranks_b)}
    with monkeypatch.context() as patch:
        patch.setattr(torch.linalg, "qr", None)
        on_device = {key: [None if t is None else t.to(device) for t in ts] for key, ts in inputs.items()}
        stacks = {key: (inputs[key], batched_bases(ts, **kwargs, min_update=0.0)) for key, ts in on_device.items()}
        angles = _batched_angles(stacks["a"][1], stacks["b"][1])
    both = 0
    for k in range(len(ranks_a)):
        single = {}
        for key, (deltas, batched) in stacks.items():
            basis, norm = batched.bases[k]
            one = None if deltas[k] is None or not deltas[k].any() else update_basis(deltas[k], **kwargs)
            assert (basis is None) == (one is None), (key, k)
            assert norm == pytest.approx(0.0 if deltas[k] is None else float(deltas[k].double().norm()), rel=1e-12)
            if one is None:
                continue
            assert (basis.rank, basis.method) == (one.rank, "exact")
            assert basis.energy == pytest.approx(one.energy, rel=1e-12)
            assert basis.total_energy == pytest.approx(one.total_energy, rel=1e-7)  # one: ~1e-8 (_squared_norm)
            q = basis.q.cpu()
            np.testing.assert_allclose(basis.singular_values.cpu(), one.singular_values, rtol=1e-10)
            np.testing.assert_allclose(q.mT @ q, np.eye(basis.rank), atol=1e-12)
            np.testing.assert_allclose(q, one.q, atol=1e-9)  # same vectors, same signs
            single[key] = one
        if len(single) < 2:
            assert k not in angles
            continue
        both += 1
        expected = pair_angles(single["a"], single["b"])
        got = angles[k]
        np.testing.assert_allclose(got.direction_deg, expected.direction_deg, atol=1e-9)
        np.testing.assert_allclose(got.principal_deg, expected.principal_deg, atol=1e-9)
        assert got.direction == pytest.approx(expected.direction, abs=1e-9)
        assert got.principal_mean_deg == pytest.approx(expected.principal_mean_deg, abs=1e-9)
        assert got.energy_overlap == pytest.approx(expected.energy_overlap, rel=1e-7)  # total energy as above
    assert both == 5
