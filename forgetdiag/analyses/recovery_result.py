"""What ``recover`` found: per-model scores, examples, the curve along a run, and the result.

Numbers only; :mod:`forgetdiag.analyses.recovery` runs the protocol and the renderers draw it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from forgetdiag.analyses.verdict import Decision, Outcomes, interval_text, wilson_interval
from forgetdiag.results import Result

if TYPE_CHECKING:
    from forgetdiag.analyses.recovery import RecoverySettings
    from forgetdiag.choices import ChoiceScores
    from forgetdiag.evaluate import Scores

MODELS = ("before", "after", "recovered", "before_recovered", "control", "control_recovered")


@dataclass(frozen=True)
class Score:
    """One model on the evaluation part: each of the probe's metrics (exact match and first
    token for a prompt/answer probe, acc and acc_norm for a multiple-choice one; None for the
    other kind's), the answer loss (a recovered model: means over its recovery seeds), and the
    Wilson interval of the verdict's metric."""

    exact_match: float | None
    first_token: float | None
    answer_loss: float
    n: int
    ci_low: float
    ci_high: float
    seeds: int = 1
    acc: float | None = None
    acc_norm: float | None = None

    def value(self, metric: str) -> float:
        return getattr(self, metric)


def summarise(scores: Scores | ChoiceScores | Sequence[Scores | ChoiceScores], metric: str, confidence: float) -> Score:
    """One :class:`Score` from per-item scores (several: one per recovery seed, averaged)."""
    runs = [scores] if not isinstance(scores, (list, tuple)) else list(scores)
    values = {m: float(np.mean([s.value(m) for s in runs])) for m in runs[0].metrics}
    loss = float(np.mean([s.answer_loss for s in runs]))
    low, high = wilson_interval(values[metric], runs[0].n, confidence)
    return Score(
        values.get("exact_match"),
        values.get("first_token"),
        loss,
        runs[0].n,
        low,
        high,
        len(runs),
        values.get("acc"),
        values.get("acc_norm"),
    )


def outcome(scores: Scores | ChoiceScores | Sequence[Scores | ChoiceScores], metric: str) -> np.ndarray:
    """Per-item right (1) or wrong (0) under the verdict's metric: (n,), or (seeds, n)."""
    pick = lambda s: s.per_item(metric).astype(np.float64)
    if isinstance(scores, (list, tuple)):
        return np.stack([pick(s) for s in scores])
    return pick(scores)


@dataclass(frozen=True)
class Example:
    """What a model says on one evaluation item, next to the expected answer."""

    prompt: str
    answer: str
    after_says: str
    recovered_says: str


@dataclass(frozen=True)
class PointResult:
    """One after-checkpoint: its score, its score after recovery, and its verdict."""

    label: str
    step: int | None
    after: Score
    recovered: Score
    decision: Decision
    train_loss: tuple[float, ...]
    outcomes: Outcomes | None = None


@dataclass(frozen=True)
class RecoveryResult(Result):
    """Everything ``forgetdiag recover`` computed; ``to_dict()`` is its JSON."""

    analysis = "recover"
    before: str
    after: str
    control: str | None
    probe: str
    n_recovery: int
    n_eval: int
    metric: str
    scores: dict[str, Score | None]
    decision: Decision
    settings: RecoverySettings
    lr: float
    steps: int
    sequence: tuple[PointResult, ...] = ()
    examples: tuple[Example, ...] = ()
    outcomes: Outcomes | None = None
    groups: tuple[str, ...] = ()  # each evaluation item's group, in item order
    warnings: tuple[str, ...] = ()
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def verdict(self) -> str:
        return self.decision.verdict

    def accuracy(self) -> dict[str, float | None]:
        """The verdict metric per model (recovered ones averaged over the recovery seeds)."""
        return {k: (s.value(self.metric) if s is not None else None) for k, s in self.scores.items()}

    def summary(self) -> str:
        return summary_text(self)

    def body(self) -> dict:
        d = self.decision
        settings = asdict(self.settings)
        thresholds = settings.pop("thresholds")
        return {
            "verdict": d.verdict,
            "decisive": d.decisive,
            "possible_verdicts": list(d.possible_verdicts),
            "supported": d.supported,
            "reason": d.reason,
            "metric": self.metric,
            "accuracy": self.accuracy(),
            "forgetting": d.forgetting,
            "alignment_loss": d.alignment_loss,
            "knowledge_loss": d.knowledge_loss,
            "control_gain": d.control_gain,
            "spurious_fraction": d.spurious_fraction,
            "spurious_fraction_uncorrected": d.spurious_fraction_uncorrected,
            "p_value": d.p_value,
            "control_p_value": d.control_p_value,
            "reference": d.reference,
            "intervals": {k: list(v) for k, v in d.intervals.items()},
            "scores": {k: (asdict(s) if s else None) for k, s in self.scores.items()},
            "checkpoints": {"before": self.before, "after": self.after, "control": self.control},
            "probe": self.probe,
            "n_recovery": self.n_recovery,
            "n_eval": self.n_eval,
            "recovery": {**settings, "lr": self.lr, "steps": self.steps},
            "thresholds": thresholds,
            "sequence": [_point(p, self.metric) for p in self.sequence],
            "examples": [asdict(e) for e in self.examples],
            "items": _items(self.outcomes, self.groups),
        }


def _point(p: PointResult, metric: str) -> dict:
    return {
        "checkpoint": p.label,
        "step": p.step,
        "accuracy": p.after.value(metric),
        "recovered": p.recovered.value(metric),
        "verdict": p.decision.verdict,
        "decisive": p.decision.decisive,
        "spurious_fraction": p.decision.spurious_fraction,
        "p_value": p.decision.p_value,
        "intervals": {k: list(v) for k, v in p.decision.intervals.items()},
        "after": asdict(p.after),
        "recovered_scores": asdict(p.recovered),
    }


def _items(outcomes: Outcomes | None, groups: tuple[str, ...]) -> dict | None:
    """Per-item outcomes (0/1, recovered models one row per seed), so that every number can be
    recomputed from the JSON."""
    if outcomes is None:
        return None
    out: dict = {"group": list(groups)}
    for name in MODELS:
        value = getattr(outcomes, name)
        if value is not None:
            out[name] = value.astype(int).tolist()
    return out


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.0f}%"


def summary_text(result: RecoveryResult) -> str:
    """The verdict in words a user understands, with the numbers behind it."""
    acc, d = result.accuracy(), result.decision
    if acc.get("control_recovered") is not None:
        control = f"; the control reaches {_pct(acc['control_recovered'])} (from {_pct(acc['control'])})"
    else:
        control = "; no control was given, so the verdict assumes the recovery budget teaches no old facts by itself"
    reference = (
        f"; the before-model recovered the same way reaches {_pct(acc['before_recovered'])}"
        if acc.get("before_recovered") is not None
        else ""
    )
    back = f"{result.n_recovery} examples bring accuracy back from {_pct(acc['after'])} to {_pct(acc['recovered'])}"
    if d.verdict == "none":
        text = f"no forgetting: accuracy went from {_pct(acc['before'])} to {_pct(acc['after'])}; {d.reason}"
        return text
    before = f" (before: {_pct(acc['before'])}{reference})"
    text = {
        "spurious": f"spurious forgetting: the old knowledge is intact; {back}{before}{control}",
        "real": f"real forgetting: the old knowledge is gone; {back} only{before}{control}",
        "mixed": f"mixed forgetting: part alignment, part knowledge; {back}{before}{control}",
    }[d.verdict]
    if not d.decisive:
        text = f"{interval_text(d)}; point estimate: {text}"
    return text if d.supported else f"{text} ({d.reason})"
