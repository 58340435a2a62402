"""What ``recover`` found: per-model scores, examples, the curve along a run, and the result.

Numbers only; :mod:`forgetdiag.analyses.recovery` runs the protocol and the renderers draw it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from forgetdiag.analyses.verdict import Decision, wilson_interval
from forgetdiag.results import Result

if TYPE_CHECKING:
    from forgetdiag.analyses.recovery import RecoverySettings


@dataclass(frozen=True)
class Score:
    """Accuracy of one model on the evaluation part, with its Wilson interval."""

    exact_match: float
    first_token: float
    answer_loss: float
    n: int
    ci_low: float
    ci_high: float

    def value(self, metric: str) -> float:
        return self.exact_match if metric == "exact_match" else self.first_token


@dataclass(frozen=True)
class Example:
    """What a model says on one evaluation item, next to the expected answer."""

    prompt: str
    answer: str
    after_says: str
    recovered_says: str


@dataclass(frozen=True)
class PointResult:
    """One after-checkpoint: its score and its score after recovery."""

    label: str
    step: int | None
    after: Score
    recovered: Score
    decision: Decision
    train_loss: tuple[float, ...]


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
    warnings: tuple[str, ...] = ()
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def verdict(self) -> str:
        return self.decision.verdict

    def accuracy(self) -> dict[str, float | None]:
        """The verdict metric per model: before, after, recovered, control, control_recovered."""
        return {k: (s.value(self.metric) if s is not None else None) for k, s in self.scores.items()}

    def summary(self) -> str:
        return summary_text(self)

    def body(self) -> dict:
        d = self.decision
        settings = asdict(self.settings)
        thresholds = settings.pop("thresholds")
        return {
            "verdict": d.verdict,
            "supported": d.supported,
            "reason": d.reason,
            "metric": self.metric,
            "accuracy": self.accuracy(),
            "forgetting": d.forgetting,
            "alignment_loss": d.alignment_loss,
            "knowledge_loss": d.knowledge_loss,
            "control_gain": d.control_gain,
            "spurious_fraction": d.spurious_fraction,
            "noise_floor": d.noise_floor,
            "scores": {k: (asdict(s) if s else None) for k, s in self.scores.items()},
            "checkpoints": {"before": self.before, "after": self.after, "control": self.control},
            "probe": self.probe,
            "n_recovery": self.n_recovery,
            "n_eval": self.n_eval,
            "recovery": {**settings, "lr": self.lr, "steps": self.steps},
            "thresholds": thresholds,
            "sequence": [
                {
                    "checkpoint": p.label,
                    "step": p.step,
                    "accuracy": p.after.value(self.metric),
                    "recovered": p.recovered.value(self.metric),
                    "verdict": p.decision.verdict,
                    "spurious_fraction": p.decision.spurious_fraction,
                    "after": asdict(p.after),
                    "recovered_scores": asdict(p.recovered),
                }
                for p in self.sequence
            ],
            "examples": [asdict(e) for e in self.examples],
        }


def summary_text(result: RecoveryResult) -> str:
    """The verdict in words a user understands, with the numbers behind it."""
    acc, d = result.accuracy(), result.decision
    pct = lambda x: f"{100 * x:.0f}%"
    control = (
        f"; the control reaches {pct(acc['control_recovered'])}"
        if acc["control_recovered"] is not None
        else "; no control was given, so the recovery budget's own effect is unknown"
    )
    shots = f"{result.n_recovery} examples bring accuracy back from {pct(acc['after'])} to {pct(acc['recovered'])}"
    if d.verdict == "none":
        text = (
            f"no forgetting: accuracy went from {pct(acc['before'])} to {pct(acc['after'])}, "
            f"within the noise floor of {d.noise_floor:.3f} for {result.n_eval} items"
        )
    elif d.verdict == "spurious":
        text = f"spurious forgetting: the old knowledge is intact; {shots} (before: {pct(acc['before'])}){control}"
    elif d.verdict == "real":
        text = f"real forgetting: the old knowledge is gone; {shots} only (before: {pct(acc['before'])}){control}"
    else:
        text = f"mixed forgetting: part alignment, part knowledge; {shots} (before: {pct(acc['before'])}){control}"
    return text if d.supported else f"{text} ({d.reason})"


def summarise(scores, metric: str, confidence: float) -> Score:
    acc = scores.exact_match if metric == "exact_match" else scores.first_token_accuracy
    low, high = wilson_interval(acc, scores.n, confidence)
    return Score(scores.exact_match, scores.first_token_accuracy, scores.answer_loss, scores.n, low, high)
