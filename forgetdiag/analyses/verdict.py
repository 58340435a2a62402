"""From accuracies to a verdict: none, spurious, real or mixed forgetting (docs/science.md).

With B = before (old task learned), A = after (new task trained), A' = A recovered on a few
old-task examples, C = a control that never held the old knowledge and C' = C recovered::

    forgetting       = acc(B) - acc(A)
    alignment loss   = acc(A') - acc(A)          what few-shot re-alignment gives back
    knowledge loss   = acc(B) - acc(A')          what it does not
    control gain     = max(0, acc(C') - acc(C))  what the recovery budget teaches by itself
    spurious fraction = clip((alignment loss - control gain) / forgetting, 0, 1)

Verdict: ``none`` when forgetting is within the noise floor; else ``spurious`` when the spurious
fraction is at least ``spurious_min``, ``real`` when at most ``real_max``, ``mixed`` between.
The noise floor is the half-width of a 95% interval for a difference of two accuracies on the
evaluation set: Wilson intervals of acc(B) and acc(A) combined in quadrature, so 20 items give
a floor near 0.2-0.3 and 2000 items near 0.02-0.03.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from forgetdiag.errors import ForgetdiagError
from forgetdiag.validate import check_number

VERDICTS = ("none", "spurious", "real", "mixed")


@dataclass(frozen=True)
class Thresholds:
    """Verdict thresholds (CLI options of the same names).

    Attributes:
        spurious_min: spurious fraction at or above which forgetting is called spurious.
        real_max: spurious fraction at or below which it is called real.
        confidence: level of the binomial intervals behind the noise floor.
        min_eval: fewest evaluation items that can support a verdict at all.
    """

    spurious_min: float = 0.75
    real_max: float = 0.25
    confidence: float = 0.95
    min_eval: int = 30

    def __post_init__(self) -> None:
        check_number("--spurious-min", self.spurious_min, low=0, high=1)
        check_number("--real-max", self.real_max, low=0, high=1)
        check_number("confidence", self.confidence, low=0, high=1, low_open=True, high_open=True)
        check_number("--min-eval", self.min_eval, low=1, integer=True)
        if not self.real_max < self.spurious_min:
            raise ForgetdiagError(
                "thresholds need --real-max < --spurious-min, got "
                f"real_max={self.real_max}, spurious_min={self.spurious_min}"
            )


def wilson_interval(accuracy: float, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval of an accuracy measured on ``n`` items (scipy)."""
    from scipy.stats import binomtest  # scipy.stats takes a second to import: only when needed

    if n <= 0:
        return (0.0, 1.0)
    k = int(round(accuracy * n))
    ci = binomtest(k, n).proportion_ci(confidence_level=confidence, method="wilson")
    return float(ci.low), float(ci.high)


def noise_floor(acc_before: float, acc_after: float, n: int, confidence: float = 0.95) -> float:
    """Smallest accuracy drop that the evaluation set can tell from noise."""
    widths = []
    for acc in (acc_before, acc_after):
        low, high = wilson_interval(acc, n, confidence)
        widths.append((high - low) / 2)
    return math.sqrt(widths[0] ** 2 + widths[1] ** 2)


@dataclass(frozen=True)
class Decision:
    """The numbers behind a verdict and the verdict itself."""

    verdict: str
    forgetting: float
    alignment_loss: float
    knowledge_loss: float
    control_gain: float | None
    spurious_fraction: float | None
    noise_floor: float
    supported: bool
    reason: str

    def to_dict(self) -> dict:
        return asdict(self)


def decide(
    *,
    before: float,
    after: float,
    recovered: float,
    n_eval: int,
    control: float | None = None,
    control_recovered: float | None = None,
    thresholds: Thresholds = Thresholds(),
) -> Decision:
    """Classify forgetting from accuracies on one evaluation set of ``n_eval`` items.

    Example:
        >>> d = decide(before=0.98, after=0.12, recovered=0.91, n_eval=500,
        ...            control=0.0, control_recovered=0.02)
        >>> d.verdict, round(d.spurious_fraction, 3)
        ('spurious', 0.895)
    """
    forgetting = before - after
    alignment = recovered - after
    knowledge = before - recovered
    gain = None
    if control_recovered is not None:
        gain = max(0.0, control_recovered - (control if control is not None else 0.0))
    floor = noise_floor(before, after, n_eval, thresholds.confidence)
    supported = n_eval >= thresholds.min_eval
    reason = (
        ""
        if supported
        else (
            f"only {n_eval} evaluation items (fewer than {thresholds.min_eval}): "
            "too few to support a verdict; the numbers are shown for reference"
        )
    )
    if forgetting <= floor:
        return Decision(
            "none",
            forgetting,
            alignment,
            knowledge,
            gain,
            None,
            floor,
            supported,
            reason or f"forgetting {forgetting:+.3f} is within the noise floor {floor:.3f}",
        )
    fraction = min(1.0, max(0.0, (alignment - (gain or 0.0)) / forgetting))
    if fraction >= thresholds.spurious_min:
        verdict = "spurious"
    elif fraction <= thresholds.real_max:
        verdict = "real"
    else:
        verdict = "mixed"
    return Decision(verdict, forgetting, alignment, knowledge, gain, fraction, floor, supported, reason)
