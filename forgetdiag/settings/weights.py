"""Settings of the analyses that read weights and features: inspect, angles, magnitudes, landscape,
features, advise and tokens. Plain dataclasses, checked where they are made; no torch here."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Literal

from forgetdiag.errors import ForgetdiagError
from forgetdiag.validate import check_choice, check_number, check_seed, choices


@dataclass(frozen=True)
class InspectSettings:
    """What ``inspect`` reads.

    Attributes:
        check_values: read every tensor once and refuse NaN or Inf (named in the error).
    """

    check_values: bool = True


DEFAULT_RANK = 32


@dataclass(frozen=True)
class AngleSettings:
    """Which updates are compared and how their bases are chosen (CLI options of the same
    names; ``far_deg`` is ``--far``).

    Attributes:
        compare: which updates to compare, ``A:B`` pairs (see :mod:`.angle_pairs`), e.g.
            ``0-1:1-2``; default: consecutive updates.
        rank: keep the top ``rank`` directions of each update (the fast default, 32; randomized
            SVD when ``rank + oversample`` is at most 1/8 of the matrix's smaller side).
        energy: instead keep the fewest directions holding this share of ||dW||_F^2 (the
            paper's rule, 0.99; exact SVD). Give at most one of rank and energy.
        rtol: drop directions whose singular value is <= rtol * the largest (float32 rounding
            leaves ~1e-7), so a rank-3 update gives a rank-3 basis whatever ``rank`` is.
        min_update: an update whose root-mean-square entry is <= this is "no update" (default
            0: only a matrix that did not change at all).
        standardize: subtract each update's scalar mean and divide by its scalar std first,
            as the paper did (the mean shift adds a rank-one term; off by default).
        seed: seed of the randomized SVD.
        oversample: extra range-finder columns of the randomized SVD (default: ``rank``).
        niter: power iterations of the randomized SVD.
        far_deg: renderers mark a mean angle further than this from its null baseline.
    """

    compare: str | None = None
    rank: int | None = None
    energy: float | None = None
    rtol: float = 1e-4
    min_update: float = 0.0
    standardize: bool = False
    seed: int = 0
    oversample: int | None = None
    niter: int = 3
    far_deg: float = 10.0

    def __post_init__(self) -> None:
        if self.rank is not None and self.energy is not None:
            raise ForgetdiagError(
                "give --rank or --energy, not both (rank: fixed top-k, "
                "randomized SVD; energy: the paper's share of ||dW||^2, exact SVD)"
            )
        if self.compare is not None and not isinstance(self.compare, str):
            raise ForgetdiagError(f"--compare {self.compare!r}: expected text such as 0-1:1-2")
        check_number("--rank", self.rank, low=1, integer=True, optional=True)
        check_number("--energy", self.energy, low=0.0, high=1.0, low_open=True, optional=True)
        check_number("--rtol", self.rtol, low=0.0, high=1.0, high_open=True)
        check_number("--min-update", self.min_update, low=0.0)
        check_seed("--seed", self.seed)
        check_number("--oversample", self.oversample, low=0, integer=True, optional=True)
        check_number("--niter", self.niter, low=0, integer=True)
        check_number("--far", self.far_deg, low=0.0, high=90.0)

    @property
    def mode(self) -> str:
        """``"rank"`` or ``"energy"``."""
        return "energy" if self.energy is not None else "rank"

    @property
    def top_k(self) -> int | None:
        """The fixed rank in rank mode (``DEFAULT_RANK`` unless given), else None."""
        return None if self.energy is not None else (self.rank or DEFAULT_RANK)


@dataclass(frozen=True)
class MagnitudeSettings:
    """What ``magnitudes`` measures (CLI options of the same names).

    Attributes:
        quantile: T in (0, 1); a task's top set holds the units strictly above the T-quantile
            of the layer's magnitudes (0.7: about the top 30%, as in MIGU).
        include_head: also measure the output head (its units are vocabulary entries).
    """

    quantile: float = 0.7
    include_head: bool = False

    def __post_init__(self) -> None:
        check_number("--quantile", self.quantile, low=0, high=1, low_open=True, high_open=True)


def axis(lo: float, hi: float, n: int) -> tuple[float, ...]:
    """``n`` evenly spaced values from ``lo`` to ``hi`` (rounded to 12 decimals, so that a grid
    over -0.5..1.5 holds 0 and 1 exactly; one point: the middle)."""
    import numpy as np  # here: the settings module stays light to import

    values = np.linspace(lo, hi, n) if n > 1 else np.array([(lo + hi) / 2])
    return tuple(float(v) for v in np.round(values, 12) + 0.0)  # + 0.0 turns -0.0 into 0.0


Directions = Literal["raw", "filter-normalized-random"]


@dataclass(frozen=True)
class LandscapeSettings:
    """What surface to compute.

    Attributes:
        directions: ``raw`` (d_x = X_END - ORIGIN, d_y = Y_END - X_END) or
            ``filter-normalized-random`` (Li et al. 2018, seeded).
        seed: seed of random directions.
        grid: points along alpha (x) and beta (y).
        x_range, y_range: the alpha and beta ranges, ends included.
    """

    directions: Directions = "raw"
    seed: int = 0
    grid: tuple[int, int] = (21, 21)
    x_range: tuple[float, float] = (-0.5, 1.5)
    y_range: tuple[float, float] = (-0.5, 1.5)

    def __post_init__(self) -> None:
        check_choice("--directions", self.directions, choices(Directions))
        check_seed("--seed", self.seed)
        if not isinstance(self.grid, (tuple, list)) or len(self.grid) != 2:
            raise ForgetdiagError(f"--grid {self.grid!r}: expected two counts, points along alpha and beta")
        for n in self.grid:
            check_number("--grid", n, low=1, integer=True)
        for name, (lo, hi) in (("x range", self.x_range), ("y range", self.y_range)):
            if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
                raise ForgetdiagError(f"{name} must be two finite numbers LO < HI, got {lo}, {hi}")

    @property
    def alphas(self) -> tuple[float, ...]:
        return axis(*self.x_range, self.grid[0])

    @property
    def betas(self) -> tuple[float, ...]:
        return axis(*self.y_range, self.grid[1])


Method = Literal["hooks", "output_hidden_states"]


@dataclass(frozen=True)
class FeatureSettings:
    """What is compared and where the shift is said to start (CLI options of the same names).

    Attributes:
        pairs: (i, j) indices into the expanded checkpoint list to compare, before i and after
            j (CLI: ``--pairs 0:1,0:3``); default: consecutive checkpoints.
        k: top principal components compared per layer (angles of matching PCs, principal
            angles between the top-k subspaces). The probe needs more than k prompts.
        pc_shift_min: a layer whose top-k PC subspace turns by at least this many degrees (mean
            principal angle) has shifted. Not the PC1 angle: PCs of nearly equal variance swap
            or rotate in their common plane, which turns PC1 while the subspace stays put.
        cka_drop_min: a layer whose linear CKA falls by at least this much (1 - CKA) has
            shifted. The shift starts at the lowest layer where either clears its threshold.
        max_points: prompts shown per checkpoint in the HTML scatter (a seeded sample).
        seed: seed of that sample.
        method: ``hooks`` (last token only, the default) or ``output_hidden_states``
            (transformers' own output: every token of every layer; for checks and benchmarks).
        bootstrap: bootstrap replicates over prompts for every statistic's 95% interval (0:
            none; the split-half null is then compared without intervals).
        splits: random half splits of the before model's prompts for the split-half null.
    """

    pairs: tuple[tuple[int, int], ...] | None = None
    k: int = 8
    pc_shift_min: float = 10.0
    cka_drop_min: float = 0.05
    max_points: int = 500
    seed: int = 0
    method: Method = "hooks"
    bootstrap: int = 200
    splits: int = 50

    def __post_init__(self) -> None:
        if self.pairs is not None:
            object.__setattr__(self, "pairs", tuple(tuple(p) for p in self.pairs))
            for pair in self.pairs:
                if len(pair) != 2 or not all(isinstance(k, int) and not isinstance(k, bool) for k in pair):
                    raise ForgetdiagError(f"--pairs {pair!r}: expected I:J pairs of checkpoint indices")
        check_number("--k", self.k, low=1, integer=True)
        check_number("--max-points", self.max_points, low=0, integer=True)
        check_number("--pc-shift-min", self.pc_shift_min, low=0, high=90, low_open=True)
        check_number("--cka-drop-min", self.cka_drop_min, low=0, high=1, low_open=True)
        check_seed("--seed", self.seed)
        check_number("--bootstrap", self.bootstrap, low=0, integer=True)
        check_number("splits", self.splits, low=1, integer=True)
        check_choice("method", self.method, choices(Method))


def parse_pairs(text: str) -> list[tuple[int, int]]:
    """``"0:1,1:3"`` (or ``0-1``) -> [(0, 1), (1, 3)]: indices into the checkpoint list."""
    pairs = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        match = re.fullmatch(r"(\d+)\s*[:-]\s*(\d+)", part)
        if match is None:
            raise ForgetdiagError(
                f"--pairs: cannot read {part!r}; expected I:J pairs of checkpoint "
                "indices separated by commas, e.g. 0:1,1:3"
            )
        pairs.append((int(match.group(1)), int(match.group(2))))
    return pairs


@dataclass(frozen=True)
class AdviceSettings:
    """Thresholds and sizes of the advice (CLI options of the same names).

    Attributes:
        restore_min: advise the smallest depth whose revert restores at least this share of
            the old task's lost accuracy.
        max_share: never advise freezing more than this share of the layers.
        eval_items: old-task probe rows scored per depth (a seeded sample of whole groups).
        feature_items: probe prompts for the feature shifts.
        rank: top-k directions per update for the angles.
        seed: sampling seed.
        skip: context analyses not to run (``angles``, ``features``).
    """

    restore_min: float = 0.5
    max_share: float = 0.5
    eval_items: int = 1000
    feature_items: int = 500
    rank: int = 16
    seed: int = 0
    skip: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_number("--restore-min", self.restore_min, low=0, high=1, low_open=True)
        check_number("--max-share", self.max_share, low=0, high=1, low_open=True)
        check_number("--eval-items", self.eval_items, low=1, integer=True)
        check_number("feature_items", self.feature_items, low=2, integer=True)
        check_number("rank", self.rank, low=1, integer=True)
        check_seed("--seed", self.seed)
        object.__setattr__(self, "skip", tuple(self.skip))
        unknown = set(self.skip) - {"angles", "features"}
        if unknown:
            raise ForgetdiagError(f"--skip {sorted(unknown)[0]}: expected angles or features")


@dataclass(frozen=True)
class TokenSettings:
    """What ``tokens`` calls hard and how much it lists (CLI options of the same names).

    Attributes:
        threshold: probability in (0, 1) below which a token is hard (and dropped by the mask);
            0.01: the old model gives it less than 1%.
        top: hardest tokens, examples and token strings listed.
    """

    threshold: float = 0.01
    top: int = 10

    def __post_init__(self) -> None:
        check_number("--threshold", self.threshold, low=0, high=1, low_open=True, high_open=True)
        check_number("--top", self.top, low=1, integer=True)
