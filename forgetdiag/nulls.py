"""What chance gives: the angles between unrelated subspaces (the null baselines of ``angles``).

Every angle forgetdiag reports sits next to the angle two unrelated subspaces of the same
dimensions would make, so that a reader can tell structure from chance (docs/science.md).
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch


@functools.lru_cache(maxsize=4096)
def baseline_direction_angle(ra: int, d: int) -> float:
    """Expected angle (deg) of a uniformly random unit vector in R^d to a fixed ra-dim subspace.

    ||P u||^2 ~ Beta(ra/2, (d - ra)/2), so theta = arccos(||P u||) has density proportional to
    cos^(ra-1) sin^(d-ra-1) on [0, pi/2]; E[theta] is integrated numerically around the peak of
    that density. The common approximation arccos(sqrt(ra/d)), the angle at the typical
    ||P u||^2 = ra/d rather than the mean angle, is off by at most 0.37 deg at d = 1000,
    0.18 deg at d = 4096 (worst at ra = 1 or d - 1).

    Args:
        ra: dimension of the fixed subspace (0 gives 90 deg, >= d gives 0 deg).
        d: dimension of the space.

    Returns:
        The mean angle in degrees.
    """
    if d < 1 or ra < 0:
        raise ValueError(f"need d >= 1 and ra >= 0, got ra={ra}, d={d}")
    if ra >= d:
        return 0.0
    if ra == 0:
        return 90.0
    from scipy import integrate  # imported here: scipy.integrate is slow to import

    a, b = ra - 1, d - ra - 1  # exponents of cos and sin

    def log_density(t: float) -> float:  # unnormalized; skip 0 * log(0) at the ends
        return (a * math.log(math.cos(t)) if a else 0.0) + (b * math.log(math.sin(t)) if b else 0.0)

    mode = math.atan2(math.sqrt(b), math.sqrt(a))
    # log density is concave with |second derivative| >= a + b everywhere, so its mass lies
    # within a few 1/sqrt(a + b) of the mode; quad would miss so narrow a peak on all of [0, pi/2].
    width = 20.0 / math.sqrt(a + b) if a + b else math.pi
    lo, hi = max(0.0, mode - width), min(math.pi / 2, mode + width)
    peak = log_density(mode)
    points = [mode] if lo < mode < hi else None
    mass = integrate.quad(lambda t: math.exp(log_density(t) - peak), lo, hi, points=points)[0]
    first = integrate.quad(lambda t: t * math.exp(log_density(t) - peak), lo, hi, points=points)[0]
    return math.degrees(first / mass)


def baseline_principal_angles(ra: int, rb: int, d: int, *, samples: int = 16, seed: int = 0) -> torch.Tensor:
    """Mean sorted principal angles between two independent uniformly random subspaces.

    Seeded Monte Carlo. By rotation invariance one subspace is span(e_1..e_p), p = max(ra, rb),
    the other col(G) for a Gaussian G (d, k), k = min(ra, rb). The angles depend on G only via
    the R factors of its row blocks G[:p] and G[p:], sampled directly (Bartlett: chi diagonal,
    standard normal above), so a sample costs O(k^3) whatever d is.

    Args:
        ra, rb, d: dimensions of the two subspaces and of the space.
        samples: Monte Carlo samples averaged.
        seed: seed of a local numpy generator; same arguments, same numbers.

    Returns:
        (min(ra, rb),) float64 mean angles in degrees, ascending (a fresh tensor each call).
    """
    if d < 1 or ra < 0 or rb < 0 or ra > d or rb > d or samples < 1:
        raise ValueError(f"need 0 <= ra, rb <= d, samples >= 1; got {ra=}, {rb=}, {d=}, {samples=}")
    p, k = max(ra, rb), min(ra, rb)
    return torch.tensor(_baseline_principal_angles(p, k, d, samples, seed), dtype=torch.float64)


@functools.lru_cache(maxsize=1024)
def _baseline_principal_angles(p: int, k: int, d: int, samples: int, seed: int) -> tuple:
    if k == 0:
        return ()
    if p == d:
        return (0.0,) * k  # one subspace is all of R^d
    rng = np.random.default_rng(seed)
    total = np.zeros(k)
    for _ in range(samples):
        s = np.vstack([_gaussian_r_factor(rng, p, k), _gaussian_r_factor(rng, d - p, k)])
        q = np.linalg.qr(s)[0]  # (k + min(d - p, k), k) basis of the random subspace
        cos = np.linalg.svd(q[:k], compute_uv=False)  # (k,) descending
        sin = np.linalg.svd(q[k:], compute_uv=False)  # (min(d - p, k),) descending
        # when p + k > d the subspaces share p + k - d dimensions: those sines are exactly 0
        sin = np.pad(sin, (0, k - sin.size))[::-1]  # (k,) ascending
        total += np.arctan2(sin, cos)
    return tuple(np.degrees(total / samples).tolist())


def _gaussian_r_factor(rng: np.random.Generator, m: int, k: int) -> np.ndarray:
    """R factor (min(m, k), k) of the QR of an (m, k) standard Gaussian matrix."""
    rows = min(m, k)
    r = np.triu(rng.standard_normal((rows, k)), 1)
    r[np.arange(rows), np.arange(rows)] = np.sqrt(rng.chisquare(m - np.arange(rows)))
    return r
