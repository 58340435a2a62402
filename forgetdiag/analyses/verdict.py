"""From per-item outcomes to a verdict: none, spurious, real or mixed forgetting (docs/recover.md).

Every model is scored on the same evaluation items, so the data are paired: item i is right (1)
or wrong (0) for each model. With B = before (old task learned), A = after (new task trained),
A' = A recovered on a few old-task examples, B' = B recovered with the same budget and seed,
C = a control that never held the old knowledge and C' = C recovered (accuracies are item
means; a recovered model's accuracy is the mean over its recovery seeds)::

    forgetting         = acc(B) - acc(A)                 what the user saw fall
    alignment loss     = acc(A') - acc(A)                what a few examples give back
    knowledge loss     = acc(B') - acc(A')               what they do not, against B'
    control gain       = max(0, acc(C') - acc(C))        what the budget teaches by itself
    spurious fraction  = clip((acc(A') - acc(A) - gain) / (acc(B') - acc(A) - gain), 0, 1)

The fraction is 1 when A recovers as far as an intact model does with the same budget, 0 when it
gains no more than the control. Without B' (``before_recovery=False``) B takes its place; without
a control the gain is 0 (the fraction without the control's correction is reported too).

Verdict: ``none`` unless the drop from B to A is significant (exact McNemar test on the items
that changed, two-sided p < ``alpha``) and at least ``min_drop``; else ``spurious`` when the
fraction is at least ``spurious_min``, ``real`` when at most ``real_max``, ``mixed`` between.
95% intervals come from a paired bootstrap over evaluation groups (an entity's items are
resampled together; items are their own group when a probe has none), with a recovery seed
drawn per replicate when there are several. A fraction whose interval reaches across a
threshold names every verdict it allows (``possible_verdicts``); the clear cases stay decisive.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from forgetdiag.errors import ForgetdiagError
from forgetdiag.settings import Thresholds

Array = np.ndarray
STATISTICS = (
    "forgetting",
    "alignment_loss",
    "knowledge_loss",
    "control_gain",
    "spurious_fraction",
    "spurious_fraction_uncorrected",
)


@dataclass(frozen=True)
class Outcomes:
    """Per-item outcomes (1 right, 0 wrong) of every model on the same evaluation items.

    Recovered models have one row per recovery seed. ``groups`` gives each item's cluster
    (entity) index; None makes every item its own cluster.
    """

    before: Array  # (n,)
    after: Array  # (n,)
    recovered: Array  # (seeds, n)
    before_recovered: Array | None = None  # (seeds, n)
    control: Array | None = None  # (n,)
    control_recovered: Array | None = None  # (seeds, n)
    groups: Array | None = None  # (n,) ints

    def __post_init__(self) -> None:
        n = len(self.before)
        for name in ("before", "after", "control"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, np.asarray(value, dtype=np.float64).reshape(n))
        for name in ("recovered", "before_recovered", "control_recovered"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, np.asarray(value, dtype=np.float64).reshape(-1, n))
        if (self.control is None) != (self.control_recovered is None):
            raise ForgetdiagError("a control needs its score both before and after recovery")
        groups = np.arange(n) if self.groups is None else np.unique(np.asarray(self.groups), return_inverse=True)[1]
        object.__setattr__(self, "groups", groups.reshape(n))

    @property
    def n(self) -> int:
        return len(self.before)

    def accuracies(self) -> dict[str, float | None]:
        """Each model's accuracy (recovered ones averaged over seeds)."""
        return {
            name: (None if (v := getattr(self, name)) is None else float(v.mean()))
            for name in ("before", "after", "recovered", "before_recovered", "control", "control_recovered")
        }


@dataclass(frozen=True)
class Decision:
    """The numbers behind a verdict and the verdict itself."""

    verdict: str
    forgetting: float
    alignment_loss: float
    knowledge_loss: float
    control_gain: float | None
    spurious_fraction: float | None
    spurious_fraction_uncorrected: float | None
    p_value: float
    control_p_value: float | None
    reference: str  # "before_recovered" or "before": what the knowledge loss and fraction use
    intervals: dict[str, tuple[float, float]] = field(default_factory=dict)
    possible_verdicts: tuple[str, ...] = ()
    supported: bool = True
    reason: str = ""

    @property
    def decisive(self) -> bool:
        return len(self.possible_verdicts) <= 1


def statistics(acc: Mapping[str, Array | float | None]) -> dict[str, Array]:
    """The forgetting numbers from accuracies (scalars, or arrays of bootstrap replicates)."""
    before, after, recovered = (np.asarray(acc[k], dtype=np.float64) for k in ("before", "after", "recovered"))
    reference = acc.get("before_recovered")
    reference = before if reference is None else np.asarray(reference, dtype=np.float64)
    if acc.get("control") is None:
        gain = np.zeros_like(recovered)
    else:
        gain = np.maximum(0.0, np.asarray(acc["control_recovered"]) - np.asarray(acc["control"]))
    alignment = recovered - after
    gap = reference - after
    return {
        "forgetting": before - after,
        "alignment_loss": alignment,
        "knowledge_loss": reference - recovered,
        "control_gain": gain,
        "spurious_fraction": _fraction(alignment - gain, gap - gain, gap),
        "spurious_fraction_uncorrected": _fraction(alignment, gap, gap),
    }


def _fraction(part: Array, whole: Array, gap: Array) -> Array:
    """clip(part / whole, 0, 1). When ``whole`` is not positive: 1 if A was already as good as
    B' (``gap`` <= 0: nothing to recover), else 0 (the control gains the whole gap, so no
    recovery can be told from what the budget teaches alone)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(whole > 0, part / np.where(whole > 0, whole, 1.0), np.where(gap <= 0, 1.0, 0.0))
    return np.clip(ratio, 0.0, 1.0)


def mcnemar(first: Array, second: Array) -> tuple[float, int, int]:
    """Exact two-sided McNemar test of paired 0/1 outcomes: (p, right->wrong, wrong->right).

    Only the items that changed carry information; under no change each is equally likely to
    go either way, so right->wrong ~ Binomial(changed, 1/2). Rows of ``second`` (seeds) pool.
    """
    from scipy.stats import binomtest

    first = np.asarray(first, dtype=bool)
    second = np.atleast_2d(np.asarray(second, dtype=bool))
    lost = int((first & ~second).sum())
    gained = int((~first & second).sum())
    if lost + gained == 0:
        return 1.0, 0, 0
    return float(binomtest(lost, lost + gained, 0.5).pvalue), lost, gained


def bootstrap(
    outcomes: Outcomes, *, replicates: int, confidence: float, seed: int = 0, chunk: int = 512
) -> dict[str, tuple[float, float]]:
    """Percentile intervals of every statistic under a paired bootstrap over groups.

    Each replicate draws the groups with replacement (all of a group's items go together, the
    same for every model, which keeps the pairing) and one recovery seed for the recovered
    models (the same one for A', B' and C').

    Groups with the same size and the same right-answer counts for every model are
    interchangeable, so the draw is made over these patterns (a multinomial over a few dozen
    patterns instead of thousands of groups: the same distribution, a hundred times cheaper).
    """
    rng = np.random.default_rng(seed)
    n_groups = int(outcomes.groups.max()) + 1
    columns = [np.bincount(outcomes.groups, minlength=n_groups)]  # group sizes first
    layout = {}  # model -> its columns in the pattern matrix (one per seed)
    for name in ("before", "after", "control", "recovered", "before_recovered", "control_recovered"):
        value = getattr(outcomes, name)
        if value is not None:  # per-group sums of right answers, one column per seed
            rows = np.atleast_2d(value)
            layout[name] = list(range(len(columns), len(columns) + len(rows)))
            columns += [np.bincount(outcomes.groups, r, minlength=n_groups) for r in rows]
    patterns, counts = np.unique(np.stack(columns, axis=1), axis=0, return_counts=True)  # (K, cols), (K,)
    patterns = patterns.astype(np.float64)
    seeds = len(layout["recovered"])
    samples: dict[str, list[Array]] = {k: [] for k in STATISTICS}
    for start in range(0, replicates, chunk):
        m = min(chunk, replicates - start)
        weights = rng.multinomial(n_groups, counts / n_groups, size=m).astype(np.float64)  # (m, K)
        totals = weights @ patterns  # (m, cols): resampled sums of every column
        pick = rng.integers(0, seeds, size=m)  # (m,) the recovery seed of each replicate
        acc = {}
        for name, cols in layout.items():
            col = np.asarray(cols)[pick if len(cols) > 1 else np.zeros(m, dtype=int)]  # (m,)
            acc[name] = totals[np.arange(m), col] / totals[:, 0]
        for name, values in statistics({"control": None, "before_recovered": None, **acc}).items():
            samples[name].append(values)
    tail = 100 * (1 - confidence) / 2
    out = {}
    for name, parts in samples.items():
        values = np.concatenate(parts)
        if (name == "control_gain" and outcomes.control is None) or not np.isfinite(values).any():
            continue
        low, high = np.nanpercentile(values, [tail, 100 - tail])
        out[name] = (float(low), float(high))
    return out


def _possible(low: float, high: float, t: Thresholds) -> tuple[str, ...]:
    """The verdicts whose fraction ranges meet [low, high], in order real, mixed, spurious."""
    found = []
    if low <= t.real_max:
        found.append("real")
    if high > t.real_max and low < t.spurious_min:
        found.append("mixed")
    if high >= t.spurious_min:
        found.append("spurious")
    return tuple(found)


def _classify(fraction: float, t: Thresholds) -> str:
    if fraction >= t.spurious_min:
        return "spurious"
    return "real" if fraction <= t.real_max else "mixed"


def decide(outcomes: Outcomes, thresholds: Thresholds = Thresholds(), *, seed: int = 0) -> Decision:
    """Classify forgetting from paired per-item outcomes.

    Example:
        >>> o = Outcomes(before=[1] * 100, after=[1] * 10 + [0] * 90, recovered=[[1] * 95 + [0] * 5])
        >>> d = decide(o)
        >>> d.verdict, round(d.spurious_fraction, 3), d.p_value < 1e-20
        ('spurious', 0.944, True)
    """
    t = thresholds
    stats = {k: float(v) for k, v in statistics(outcomes.accuracies()).items()}
    p_value, lost, gained = mcnemar(outcomes.before, outcomes.after)
    intervals = bootstrap(outcomes, replicates=t.bootstrap, confidence=t.confidence, seed=seed)
    control_p = None
    if outcomes.control is not None:
        control_p = mcnemar(outcomes.control, outcomes.control_recovered)[0]
    reference = "before" if outcomes.before_recovered is None else "before_recovered"
    supported = outcomes.n >= t.min_eval
    reason = (
        ""
        if supported
        else (
            f"only {outcomes.n} evaluation items (fewer than {t.min_eval}): too few to support a "
            "verdict; the numbers are shown for reference"
        )
    )
    gain = stats["control_gain"] if outcomes.control is not None else None
    common = dict(
        forgetting=stats["forgetting"],
        alignment_loss=stats["alignment_loss"],
        knowledge_loss=stats["knowledge_loss"],
        control_gain=gain,
        p_value=p_value,
        control_p_value=control_p,
        reference=reference,
        intervals=intervals,
        supported=supported,
    )
    if p_value >= t.alpha or stats["forgetting"] < t.min_drop:
        why = (
            f"the drop of {stats['forgetting']:+.3f} is not significant ({lost} items right -> wrong, "
            f"{gained} wrong -> right; McNemar p = {p_value:.3g}, alpha {t.alpha:g})"
            if p_value >= t.alpha
            else f"the drop of {stats['forgetting']:+.3f} is smaller than --min-drop {t.min_drop:g}"
        )
        return Decision(
            "none",
            spurious_fraction=None,
            spurious_fraction_uncorrected=None,
            possible_verdicts=("none",),
            reason=reason or why,
            **common,
        )
    fraction = stats["spurious_fraction"]
    verdict = _classify(fraction, t)
    low, high = intervals.get("spurious_fraction", (fraction, fraction))
    allowed = _possible(min(low, fraction), max(high, fraction), t)
    possible = (verdict, *(v for v in allowed if v != verdict))  # the point estimate's first
    return Decision(
        verdict,
        spurious_fraction=fraction,
        spurious_fraction_uncorrected=stats["spurious_fraction_uncorrected"],
        possible_verdicts=possible,
        reason=reason,
        **common,
    )


def interval_text(d: Decision) -> str:
    """When the evidence allows several verdicts, that in words (else an empty string)."""
    if d.decisive:
        return ""
    low, high = d.intervals["spurious_fraction"]
    return (
        f"{' or '.join(d.possible_verdicts)}: the evidence cannot separate them (spurious fraction "
        f"{d.spurious_fraction:.2f}, 95% interval {low:.2f} to {high:.2f}); more evaluation items "
        "or --seeds would"
    )


def wilson_interval(accuracy: float, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval of one model's accuracy measured on ``n`` items (scipy)."""
    from scipy.stats import binomtest  # scipy.stats takes a second to import: only when needed

    if n <= 0 or not math.isfinite(accuracy):
        return (0.0, 1.0)
    k = int(round(accuracy * n))
    ci = binomtest(k, n).proportion_ci(confidence_level=confidence, method="wilson")
    return float(ci.low), float(ci.high)
