"""Score checkpoints on probes, no training: the old task's curve along a run (docs/score.md).

Every checkpoint (a Trainer run expands to its ``checkpoint-N`` in step order) is loaded once and
scored on every probe with one teacher-forced pass (:func:`forgetdiag.choices.score_items`):

* a prompt/answer probe gives ``exact_match`` (greedy decoding says the answer, then stops),
  ``first_token`` (the answer's first token is the argmax) and ``answer_loss`` (the mean
  cross-entropy of the answer's tokens and its stop, token-weighted, in nats);
* a multiple-choice probe gives ``acc`` and ``acc_norm`` (lm-evaluation-harness's
  ``multiple_choice`` scoring).

Every number has a 95% interval: the Wilson score interval for an accuracy (items as
independent trials), and for the answer loss, a ratio of sums, the normal interval of the
delta method over items: ``R +- z * sqrt(sum_i (nll_i - R t_i)^2 / (n (n - 1))) / mean(t)``
with ``t_i`` the tokens of item i.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from forgetdiag.analyses.verdict import wilson_interval
from forgetdiag.checkpoints import resolve_checkpoints
from forgetdiag.choices import score_items
from forgetdiag.errors import ProbeError
from forgetdiag.models import load_model, shared_tokenizer, tokenize_probe
from forgetdiag.probes import KIND_NAMES, Probe, distinct_names, load_probe
from forgetdiag.results import Result, Timings
from forgetdiag.runtime import ProgressFn, Runtime, Warn
from forgetdiag.settings import ScoreSettings

METRIC_NAMES = {
    "exact_match": "exact match",
    "first_token": "first token",
    "answer_loss": "answer loss",
    "acc": "acc",
    "acc_norm": "acc_norm",
}


@dataclass(frozen=True)
class ScoreRecord:
    """One number: a checkpoint's score on a probe under one metric, with its interval."""

    checkpoint: str
    path: str
    probe: str
    metric: str
    value: float
    n: int
    ci_low: float
    ci_high: float
    step: int | None = None


@dataclass(frozen=True)
class ProbeSummary:
    """A probe as scored: its name, kind, rows, file and metrics (the first is its headline)."""

    name: str
    kind: str
    n: int
    path: str | None
    metrics: tuple[str, ...]


@dataclass(frozen=True)
class ScoreResult(Result):
    """Every checkpoint's scores on every probe; ``to_dict()`` is ``score --json``.

    ``scores`` is long-format (one record per checkpoint, probe and metric), in checkpoint
    order, so ``pandas.DataFrame(result.to_dict()["scores"])`` is the table.
    """

    analysis = "score"
    checkpoints: tuple[str, ...]
    probes: tuple[ProbeSummary, ...]
    scores: tuple[ScoreRecord, ...]
    interval: str
    warnings: tuple[str, ...] = ()
    timings: dict[str, float] = field(default_factory=dict)

    def value(self, checkpoint: str, probe: str, metric: str) -> ScoreRecord:
        """The record of one checkpoint (label), probe (name) and metric."""
        for r in self.scores:
            if (r.checkpoint, r.probe, r.metric) == (checkpoint, probe, metric):
                return r
        raise KeyError((checkpoint, probe, metric))

    def curve(self, probe: str, metric: str) -> list[ScoreRecord]:
        """One probe's metric along the checkpoints, in their order."""
        return [r for r in self.scores if r.probe == probe and r.metric == metric]

    def summary(self) -> str:
        parts = []
        for p in self.probes:
            curve = self.curve(p.name, p.metrics[0])
            first, last = curve[0], curve[-1]
            text = f"{p.name} {METRIC_NAMES[p.metrics[0]]} {first.value:.3f} at {first.checkpoint}"
            if len(curve) > 1:
                low = min(curve, key=lambda r: r.value if math.isfinite(r.value) else math.inf)
                text += f" -> {last.value:.3f} at {last.checkpoint}"
                if low not in (first, last):
                    text += f" (lowest {low.value:.3f} at {low.checkpoint})"
            parts.append(text)
        n = len(self.checkpoints)
        head = f"{n} checkpoint{'s' * (n != 1)} on {len(self.probes)} probe{'s' * (len(self.probes) != 1)}"
        return f"{head}: " + "; ".join(parts)

    def body(self) -> dict:
        return {
            "scores": [asdict(r) for r in self.scores],
            "checkpoints": list(self.checkpoints),
            "probes": [asdict(p) for p in self.probes],
            "interval": self.interval,
        }


def loss_interval(nll: np.ndarray, n_tokens: np.ndarray, confidence: float = 0.95) -> tuple[float, float]:
    """Normal interval (delta method over items) of the token-weighted mean loss sum(nll) / sum(t).

    Args:
        nll: (n,) summed negative log-likelihood of each item's scored tokens.
        n_tokens: (n,) scored tokens of each item.
    """
    from scipy.stats import norm

    n = len(nll)
    if n < 2 or n_tokens.sum() == 0:
        return (float("nan"), float("nan"))
    ratio = nll.sum() / n_tokens.sum()
    residual = nll - ratio * n_tokens  # (n,) each item's share of the error of the ratio
    se = math.sqrt(float((residual**2).sum()) / (n * (n - 1))) / float(n_tokens.mean())
    z = float(norm.ppf(0.5 + confidence / 2))
    return (float(ratio - z * se), float(ratio + z * se))


def score_checkpoints(
    checkpoints,
    probes: Sequence[Probe | str | Path],
    *,
    settings: ScoreSettings = ScoreSettings(),
    runtime: Runtime = Runtime(),
    progress: ProgressFn | None = None,
    warn: Warn | None = None,
) -> ScoreResult:
    """Score every checkpoint on every probe (no training).

    Args:
        checkpoints: checkpoints and run directories (paths or Checkpoint objects), in order.
        probes: :class:`Probe` objects or probe files; each is tokenized once, with the
            tokenizer every checkpoint shares.
        settings: the interval level.
        runtime: how models run (``batch_size``: items, or (item, choice) pairs, per pass).
        progress: ``progress(description, done, total)`` callback.
        warn: receives warnings (prompts truncated to the context).

    Returns:
        A :class:`ScoreResult`.

    Example:
        >>> r = score_checkpoints("sample_checkpoints/spurious",
        ...                       ["sample_checkpoints/probes/task0_heldout.jsonl"])  # doctest: +SKIP
        >>> [(x.checkpoint, x.value) for x in r.curve("task0_heldout", "exact_match")]  # doctest: +SKIP
    """
    cks = resolve_checkpoints(checkpoints, runtime)
    if not cks:
        raise ProbeError("no checkpoint given; expected at least one checkpoint or run directory")
    probes = distinct_names([p if isinstance(p, Probe) else load_probe(p) for p in probes])
    if not probes:
        raise ProbeError("no probe given; expected at least one probe file (--probe)")
    timings, notes = Timings(), []

    def note(line: str) -> None:
        notes.append(line)
        if warn is not None:
            warn(line)

    with timings.phase("tokenize"):
        tokenizer = shared_tokenizer(cks, runtime)
        prepared = [tokenize_probe(tokenizer, p, cks[0], runtime, warn=note) for p in probes]
    records = []
    for k, ckpt in enumerate(cks):
        with runtime.threads_for(ckpt.n_params):
            with timings.phase("load"):
                model = load_model(ckpt, runtime)
            for probe, (encoded, stops) in zip(probes, prepared):
                with timings.phase("score"):
                    scores = score_items(
                        model, encoded, pad_id=tokenizer.pad_token_id, batch_size=runtime.batch_size,
                        stops=stops.accepted, progress=progress,
                    )  # fmt: skip
                records += _records(ckpt, probe, scores, settings.confidence)
            del model
        if progress is not None:
            progress("checkpoints", k + 1, len(cks))
    level = f"{100 * settings.confidence:g}%"
    return ScoreResult(
        checkpoints=tuple(c.label for c in cks),
        probes=tuple(ProbeSummary(p.name, KIND_NAMES[p.kind], len(p), p.path, _metrics(p)) for p in probes),
        scores=tuple(records),
        interval=(
            f"{level} intervals: Wilson score interval for accuracies (items as independent trials); "
            "normal interval of the delta method over items for the answer loss"
        ),
        warnings=tuple(notes),
        timings=dict(timings),
    )


def _metrics(probe: Probe) -> tuple[str, ...]:
    return probe.metrics + (("answer_loss",) if probe.kind == "answer" else ())


def _records(ckpt, probe: Probe, scores, confidence: float) -> list[ScoreRecord]:
    out = []
    for metric in _metrics(probe):
        if metric == "answer_loss":
            value, (low, high) = scores.answer_loss, loss_interval(scores.nll, scores.n_tokens, confidence)
        else:
            value = scores.value(metric)
            low, high = wilson_interval(value, scores.n, confidence)
        out.append(ScoreRecord(ckpt.label, str(ckpt.path), probe.name, metric, value, scores.n, low, high, ckpt.step))
    return out
