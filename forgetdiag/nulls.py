"""What chance gives: the angles between unrelated subspaces (the null baselines of ``angles``).

Every angle forgetdiag reports sits next to the angle two unrelated subspaces of the same
dimensions would make, so that a reader can tell structure from chance (docs/science.md).
"""

from __future__ import annotations

import functools
import math
import threading
from dataclasses import dataclass

import numpy as np
import torch

from forgetdiag.runtime import torch_threads


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


# ---------------------------------------------------------------- the data-informed null


@dataclass(frozen=True)
class DataNull:
    """What two unrelated updates ``X^T G1``, ``X^T G2`` of one layer give (independent
    Gaussian G; X the layer's inputs): the mean per-direction angle (its Monte Carlo mean and
    the spread of that statistic between draws) and the energy overlap."""

    mean_deg: float
    sd_deg: float
    energy_overlap: float
    samples: int


class InputSpectrum:
    """The eigenvalues of one layer's input second moment ``X^T X`` (tokens summed), and the
    data-informed null it implies for updates whose hidden side is that input.

    An update of a linear layer is a sum over tokens of ``x_t g_t^T``: its hidden-side columns
    live where the inputs x_t do. With G independent Gaussian (T, n), the n columns of
    ``X^T G`` are independent N(0, X^T X); angles do not change under a rotation, so only the
    eigenvalues matter. The null draws ``diag(sqrt(lam)) Z`` (Z Gaussian d x n; when n > d the
    Bartlett factor of Z Z^T, d x d, which has the same left singular vectors and values) and
    compares the top-ra subspace of one draw with the top-rb directions of another, as
    ``angles`` compares real updates. Thread-safe cache per (n, ra, rb).
    """

    def __init__(self, second_moment: torch.Tensor) -> None:
        lam = torch.linalg.eigvalsh(second_moment.to(torch.float64).cpu()).flip(0).clamp_min(0.0)  # (d,) descending
        self.eigenvalues = lam.numpy()
        self._cache: dict[tuple, DataNull] = {}
        self._lock = threading.Lock()

    @property
    def d(self) -> int:
        return int(self.eigenvalues.shape[0])

    def null(self, n: int, ra: int, rb: int, *, samples: int = 16, seed: int = 0) -> DataNull:
        """The null of updates (d, n) with kept ranks ra and rb."""
        key = (n, ra, rb, samples, seed)
        with self._lock:
            found = self._cache.get(key)
        if found is None:
            found = data_null(self.eigenvalues, n, ra, rb, samples=samples, seed=seed)
            with self._lock:
                self._cache[key] = found
        return found


def data_null(eigenvalues: np.ndarray, n: int, ra: int, rb: int, *, samples: int = 16, seed: int = 0) -> DataNull:
    """Monte Carlo null of :class:`InputSpectrum` for second-moment ``eigenvalues`` (d,)."""
    d = int(eigenvalues.shape[0])
    if not (1 <= ra <= d and 1 <= rb <= d and n >= 1 and samples >= 1):
        raise ValueError(f"need 1 <= ra, rb <= d and n, samples >= 1; got {ra=}, {rb=}, {d=}, {n=}, {samples=}")
    rng = np.random.default_rng(seed)
    scale = np.sqrt(eigenvalues)[:, None]  # (d, 1)
    means, overlaps = [], []
    with torch_threads(1):  # small SVDs: one thread each is fastest (see _top_directions)
        for _ in range(samples):
            _draw(rng, scale, d, n, ra, rb, means, overlaps)
    return DataNull(
        mean_deg=float(np.mean(means)),
        sd_deg=float(np.std(means, ddof=1)) if samples > 1 else 0.0,
        energy_overlap=float(np.mean(overlaps)),
        samples=samples,
    )


def _draw(rng, scale, d, n, ra, rb, means, overlaps) -> None:
    """One Monte Carlo draw of :func:`data_null`, appended to ``means`` and ``overlaps``."""
    qa, _ = _top_directions(scale * _gaussian_factor(rng, d, n), ra)  # (d, ra)
    qb, sb = _top_directions(scale * _gaussian_factor(rng, d, n), rb, full_energy=True)
    cos = np.clip(np.linalg.norm(qa.T @ qb, axis=0), 0.0, 1.0)  # (rb,)
    means.append(float(np.degrees(np.arccos(cos)).mean()))
    kept, total = sb
    overlaps.append(float((kept * cos**2).sum() / total) if total > 0 else math.nan)


def _gaussian_factor(rng: np.random.Generator, d: int, n: int) -> np.ndarray:
    """A (d, min(n, d)) matrix M with M M^T distributed as Z Z^T for Z standard Gaussian (d, n)."""
    if n <= d:
        return rng.standard_normal((d, n))
    low = np.tril(rng.standard_normal((d, d)), -1)
    low[np.arange(d), np.arange(d)] = np.sqrt(rng.chisquare(n - np.arange(d)))  # Bartlett
    return low


def _top_directions(m: np.ndarray, r: int, *, full_energy: bool = False):
    """Top r left singular vectors of m (d, k); with ``full_energy`` also (their squared
    singular values, ||m||_F^2)."""
    # torch's LAPACK, run single-threaded by data_null: threaded SVDs of small matrices were
    # ~15-25x slower on busy shared cores (32 SVDs of 128 x 128: 3.4 s vs 0.25 s)
    u, s, _ = torch.linalg.svd(torch.from_numpy(m), full_matrices=False)
    u, s = u.numpy(), s.numpy()
    energy = (s[:r] ** 2, float((s**2).sum())) if full_energy else None
    return u[:, :r], energy


def chance_label(angle_deg: float, null: DataNull, *, z: float = 3.0) -> str:
    """``beyond chance`` when the angle sits more than z null spreads (and 1 deg) below the
    null's mean, ``less aligned than chance`` as far above, else ``at chance``."""
    margin = max(z * null.sd_deg, 1.0)
    if angle_deg < null.mean_deg - margin:
        return "beyond chance"
    if angle_deg > null.mean_deg + margin:
        return "less aligned than chance"
    return "at chance"
