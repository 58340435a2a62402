"""The verdict's statistics on planted per-item outcomes whose p-values and intervals are known."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import binomtest

from forgetdiag import ForgetdiagError
from forgetdiag.analyses.recovery import RecoverySettings
from forgetdiag.analyses.verdict import Outcomes, Thresholds, bootstrap, decide, mcnemar, statistics


def _items(n_right: int, n: int) -> np.ndarray:
    return np.array([1] * n_right + [0] * (n - n_right), dtype=float)


def _exact_mcnemar_by_hand(lost: int, gained: int) -> float:
    """Two-sided exact test: twice the smaller binomial tail of Binomial(lost + gained, 1/2)."""
    m, k = lost + gained, min(lost, gained)
    return min(1.0, 2 * sum(math.comb(m, i) for i in range(k + 1)) / 2**m)


@pytest.mark.parametrize("lost, gained", [(10, 0), (7, 2), (30, 18), (0, 0)])
def test_mcnemar_is_the_exact_binomial_test_of_the_changed_items(lost, gained):
    n = 200
    before = _items(100 + lost, n)  # items 0..99 right in both, then the lost ones
    after = before.copy()
    after[100 : 100 + lost] = 0
    after[100 + lost : 100 + lost + gained] = 1
    p, right_to_wrong, wrong_to_right = mcnemar(before, after)
    assert (right_to_wrong, wrong_to_right) == (lost, gained)
    assert p == pytest.approx(_exact_mcnemar_by_hand(lost, gained), rel=1e-12)
    if lost + gained:
        assert p == pytest.approx(binomtest(lost, lost + gained, 0.5).pvalue, rel=1e-12)


def test_a_small_paired_drop_is_forgetting_where_independent_intervals_saw_noise():
    """10 right -> wrong and 0 back on 200 items: p = 2 / 2**10 = 0.002; the old noise floor
    (0.097: two Wilson intervals in quadrature) called this 'none'."""
    before = np.ones(200)
    after = before.copy()
    after[:10] = 0
    d = decide(Outcomes(before, after, recovered=[before]))
    assert d.p_value == pytest.approx(2 / 2**10) and d.verdict == "spurious" and d.forgetting == pytest.approx(0.05)


def test_none_when_not_significant_or_too_small():
    before = np.ones(200)
    after = before.copy()
    after[:3] = 0  # 3 of 3 changed items lost: p = 0.25
    d = decide(Outcomes(before, after, recovered=[before]))
    assert d.verdict == "none" and d.p_value == pytest.approx(0.25) and "not significant" in d.reason
    big = np.ones(2000)
    small_drop = big.copy()
    small_drop[:30] = 0  # p ~ 2e-9 but a drop of 0.015 < --min-drop 0.02
    d = decide(Outcomes(big, small_drop, recovered=[big]))
    assert d.verdict == "none" and d.p_value < 1e-8 and "smaller than --min-drop" in d.reason
    assert decide(Outcomes(big, small_drop, recovered=[big]), Thresholds(min_drop=0.01)).verdict == "spurious"


def test_fractions_against_the_recovered_before_model_and_the_control_by_hand():
    n = 100
    o = Outcomes(
        before=_items(100, n),
        after=_items(10, n),
        recovered=[_items(90, n)],
        before_recovered=[_items(95, n)],
        control=_items(0, n),
        control_recovered=[_items(5, n)],
    )
    d = decide(o)
    assert d.reference == "before_recovered"
    assert d.forgetting == pytest.approx(0.90) and d.alignment_loss == pytest.approx(0.80)
    assert d.knowledge_loss == pytest.approx(0.05) and d.control_gain == pytest.approx(0.05)
    assert d.spurious_fraction == pytest.approx((0.80 - 0.05) / (0.85 - 0.05))
    assert d.spurious_fraction_uncorrected == pytest.approx(0.80 / 0.85)
    assert d.verdict == "spurious" and d.decisive
    # without B' the before model is the reference: the same recovery reads as more spurious
    plain = decide(Outcomes(before=o.before, after=o.after, recovered=o.recovered))
    assert plain.reference == "before" and plain.spurious_fraction == pytest.approx(0.80 / 0.90)


def test_statistics_work_on_replicates_and_clip():
    acc = {
        "before": np.array([1.0, 1.0]),
        "after": np.array([0.2, 0.5]),
        "recovered": np.array([0.2, 0.9]),
        "before_recovered": np.array([1.0, 0.8]),
        "control": None,
        "control_recovered": None,
    }
    s = statistics(acc)
    assert s["spurious_fraction"].tolist() == pytest.approx([0.0, 1.0])  # 0/0.8, then 0.4/0.3 clipped


def test_bootstrap_interval_of_a_paired_difference_matches_the_normal_one():
    """400 independent items, 40 right -> wrong: forgetting 0.1 with standard error
    sqrt(0.1 * 0.9 / 400) = 0.015, so the 95% interval is 0.1 -+ 1.96 x 0.015."""
    before = np.ones(400)
    after = before.copy()
    after[:40] = 0
    low, high = bootstrap(Outcomes(before, after, recovered=[after]), replicates=8000, confidence=0.95, seed=1)[
        "forgetting"
    ]
    se = math.sqrt(0.1 * 0.9 / 400)
    assert low == pytest.approx(0.1 - 1.96 * se, abs=0.004) and high == pytest.approx(0.1 + 1.96 * se, abs=0.004)


def test_bootstrap_resamples_whole_groups():
    """40 entities of 10 identical items: the evidence is 40 clusters, not 400 items, so the
    interval is as wide as that of 40 independent items (sqrt(10) wider than 400 items')."""
    before = np.ones(400)
    after = before.copy()
    after[:40] = 0  # 4 whole entities forgotten
    groups = np.repeat(np.arange(40), 10)
    clustered = bootstrap(
        Outcomes(before, after, recovered=[after], groups=groups), replicates=8000, confidence=0.95, seed=2
    )["forgetting"]
    se = math.sqrt(0.1 * 0.9 / 40)
    assert clustered[0] == pytest.approx(max(0.0, 0.1 - 1.96 * se), abs=0.02)
    assert clustered[1] == pytest.approx(0.1 + 1.96 * se, abs=0.02)
    assert clustered[1] - clustered[0] > 2.5 * (2 * 1.96 * math.sqrt(0.1 * 0.9 / 400))


def test_recovery_seeds_widen_the_intervals():
    before, after = np.ones(300), np.zeros(300)
    same = decide(Outcomes(before, after, recovered=[_items(240, 300)] * 3), seed=3)
    spread = decide(Outcomes(before, after, recovered=[_items(180, 300), _items(240, 300), _items(300, 300)]), seed=3)
    assert same.alignment_loss == spread.alignment_loss == pytest.approx(0.8)

    def width(d):
        low, high = d.intervals["alignment_loss"]
        return high - low

    assert width(spread) > 3 * width(same)


def test_a_fraction_near_a_threshold_names_both_verdicts():
    n = 40
    o = Outcomes(before=_items(40, n), after=_items(10, n), recovered=[_items(33, n)])  # fraction 23/30
    d = decide(o, seed=0)
    assert d.verdict == "spurious" and d.spurious_fraction == pytest.approx(23 / 30)
    assert not d.decisive and d.possible_verdicts[0] == "spurious" and "mixed" in d.possible_verdicts
    clear = decide(Outcomes(before=_items(500, 500), after=_items(20, 500), recovered=[_items(495, 500)]))
    assert clear.decisive and clear.possible_verdicts == ("spurious",)


def test_a_control_that_learns_is_tested():
    n = 200
    o = Outcomes(
        before=_items(200, n),
        after=_items(0, n),
        recovered=[_items(180, n)],
        control=_items(0, n),
        control_recovered=[_items(60, n)],
    )
    d = decide(o)
    assert d.control_gain == pytest.approx(0.3) and d.control_p_value == pytest.approx(2 / 2**60)
    assert d.spurious_fraction == pytest.approx((0.9 - 0.3) / (1.0 - 0.3))
    assert d.spurious_fraction_uncorrected == pytest.approx(0.9)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: Thresholds(alpha=2), "--alpha 2: expected a number between 0 and 1, both excluded"),
        (lambda: Thresholds(min_drop=-1), "--min-drop -1: expected a number between 0 and 1"),
        (lambda: RecoverySettings(seeds=0), "--seeds 0: expected an integer between 1 and 100"),
        (lambda: Thresholds(spurious_min=0.2, real_max=0.5), "--real-max < --spurious-min"),
    ],
)
def test_bad_settings(make, message):
    with pytest.raises(ForgetdiagError, match=message.replace("(", r"\(")):
        make()
