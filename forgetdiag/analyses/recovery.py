"""Few-shot recovery probes: is the forgetting spurious or real? (docs/recover.md)

Split the old task's probe by group into a recovery part R and a disjoint evaluation part E.
Score BEFORE and AFTER on E; fine-tune an in-memory copy of AFTER on R only (loss on answer
tokens) for a small fixed budget and score it again; recover BEFORE with the same budget and
seed (the reference an intact model reaches), and a CONTROL that never held the old knowledge
(what the budget teaches by itself). The per-item outcomes go to
:func:`forgetdiag.analyses.verdict.decide`. Checkpoints on disk are never touched.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from forgetdiag.analyses.recovery_result import Example, PointResult, RecoveryResult, outcome, summarise
from forgetdiag.analyses.verdict import Outcomes, decide
from forgetdiag.checkpoints import resolve_checkpoints
from forgetdiag.choices import ChoiceScores, EncodedChoice, score_choices, score_items
from forgetdiag.errors import CheckpointError, ProbeError
from forgetdiag.evaluate import Encoded, Scores, generate_greedy
from forgetdiag.models import Stops, load_model, shared_tokenizer, tokenize_probe
from forgetdiag.probes import KIND_NAMES, Probe, recovery_split
from forgetdiag.results import Timings
from forgetdiag.runtime import ProgressFn, Runtime, Warn
from forgetdiag.settings import RecoverySettings
from forgetdiag.storage import Checkpoint
from forgetdiag.streaming import check_sequence
from forgetdiag.training import TrainConfig, train


def default_lr(n_params: int, *, lora: bool = False) -> float:
    """Recovery learning rate by model size: small enough that a control learns little.

    Full fine-tuning: 1e-4 under 20M parameters, 3e-5 under 300M, 1e-5 under 3B, else 5e-6.
    LoRA (the adapter learns from zero, so it takes larger steps): 2e-4 under 1B, else 1e-4.
    """
    if lora:
        return 2e-4 if n_params < 1_000_000_000 else 1e-4
    for limit, lr in ((20e6, 1e-4), (300e6, 3e-5), (3e9, 1e-5)):
        if n_params < limit:
            return lr
    return 5e-6


@dataclass
class _Context:
    """What every model run of one recovery needs (built once)."""

    runtime: Runtime
    settings: RecoverySettings
    tokenizer: object
    recovery: list[Encoded]
    evaluation: list[Encoded]
    eval_items: tuple
    stops: Stops
    pad_id: int
    progress: ProgressFn | None
    lr: float = 0.0
    steps: int = 0
    timings: Timings = field(default_factory=Timings)

    @property
    def seeds(self) -> list[int]:
        return [self.settings.seed + k for k in range(self.settings.seeds)]


def _score(model, ctx: _Context) -> Scores | ChoiceScores:
    return score_items(
        model,
        ctx.evaluation,
        pad_id=ctx.pad_id,
        batch_size=ctx.runtime.batch_size,
        stops=ctx.stops.accepted,
        progress=ctx.progress,
    )


def _fine_tune(model, ctx: _Context, seed: int) -> tuple[object, list[float]]:
    """Recover ``model`` (an in-memory copy) on the recovery part; returns it and its losses."""
    if ctx.settings.lora:
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError:
            raise CheckpointError("--lora needs peft: pip install 'forgetdiag[peft]'") from None
        r = ctx.settings.lora_rank
        model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules="all-linear"))
    config = TrainConfig(
        max_steps=ctx.steps, lr=ctx.lr, seed=seed, batch_size=min(ctx.settings.batch_size, len(ctx.recovery))
    )
    losses = train(model, ctx.recovery, config, pad_id=ctx.pad_id, progress=ctx.progress)
    return model, losses


def _recovered(
    checkpoint: Checkpoint, model, ctx: _Context, *, say: int = 0
) -> tuple[list[Scores], list[float], list[str]]:
    """Recover ``checkpoint`` once per seed and score each copy: (scores, the first seed's
    losses, what the first recovered copy says on ``say`` items). ``model`` is the loaded
    checkpoint, reused for the first seed; one model is in memory at a time."""
    scores, first_losses, said = [], [], []
    for k, seed in enumerate(ctx.seeds):
        if k > 0:
            model = load_model(checkpoint, ctx.runtime)
        model, losses = _fine_tune(model, ctx, seed)
        scores.append(_score(model, ctx))
        if k == 0:
            first_losses, said = losses, (_says(model, ctx, say) if say else [])
        del model
    return scores, first_losses, said


def _says(model, ctx: _Context, k: int) -> list[str]:
    if ctx.evaluation and isinstance(ctx.evaluation[0], EncodedChoice):  # the likeliest choice
        picked = score_choices(model, ctx.evaluation[:k], pad_id=ctx.pad_id, batch_size=ctx.runtime.batch_size)
        return [i.choices[int(np.argmax(ll))] for i, ll in zip(ctx.eval_items, picked.loglik)]
    said = generate_greedy(
        model, ctx.evaluation[:k], pad_id=ctx.pad_id, eos_id=ctx.stops.accepted, batch_size=ctx.runtime.batch_size
    )
    return [ctx.tokenizer.decode(s, skip_special_tokens=True) for s in said]


@dataclass
class _Reference:
    """BEFORE, BEFORE recovered and the control: scored once, shared by every after-checkpoint."""

    before: Scores | ChoiceScores
    before_recovered: list[Scores | ChoiceScores] | None = None
    control: Scores | ChoiceScores | None = None
    control_recovered: list[Scores | ChoiceScores] | None = None


def _after_point(
    checkpoint: Checkpoint, ctx: _Context, ref: _Reference, groups: np.ndarray, want_examples: bool
) -> tuple[PointResult, tuple[Example, ...]]:
    with ctx.timings.phase("evaluation"):
        model = load_model(checkpoint, ctx.runtime)
        after = _score(model, ctx)
        said = _says(model, ctx, ctx.settings.examples) if want_examples else []
    with ctx.timings.phase("recovery"):
        recovered, losses, redo = _recovered(checkpoint, model, ctx, say=ctx.settings.examples if want_examples else 0)
        del model
    metric, settings = ctx.settings.metric, ctx.settings
    outcomes = Outcomes(
        before=outcome(ref.before, metric),
        after=outcome(after, metric),
        recovered=outcome(recovered, metric),
        before_recovered=None if ref.before_recovered is None else outcome(ref.before_recovered, metric),
        control=None if ref.control is None else outcome(ref.control, metric),
        control_recovered=None if ref.control_recovered is None else outcome(ref.control_recovered, metric),
        groups=groups,
    )
    decision = decide(outcomes, settings.thresholds, seed=settings.seed)
    confidence = settings.thresholds.confidence
    point = PointResult(
        checkpoint.label,
        checkpoint.step,
        summarise(after, metric, confidence),
        summarise(recovered, metric, confidence),
        decision,
        tuple(losses),
        outcomes,
    )
    examples = tuple(Example(i.prompt, i.answer, a, r) for i, a, r in zip(ctx.eval_items, said, redo))
    return point, examples


def recover(
    before: str | Path | Checkpoint,
    after,
    probe: Probe,
    *,
    control: str | Path | Checkpoint | None = None,
    recovery_probe: Probe | None = None,
    at: str | Path | Checkpoint | None = None,
    settings: RecoverySettings = RecoverySettings(),
    runtime: Runtime = Runtime(),
    progress: ProgressFn | None = None,
    warn: Warn | None = None,
) -> RecoveryResult:
    """Is the forgetting from BEFORE to AFTER spurious or real?

    Args:
        before: a checkpoint that knew the old task.
        after: one checkpoint trained on something else since, or several (a Trainer run
            directory, a list): then every one is scored and recovered (sequence mode) and the
            verdict is the last one's.
        probe: the old task's probe; split by group into recovery and evaluation parts unless
            ``recovery_probe`` gives the recovery examples (then all of ``probe`` is evaluated).
        control: a checkpoint of the same kind that never held the old knowledge (e.g. trained
            the same way on other entities); it measures what the budget teaches by itself.
        at: in sequence mode, the checkpoint whose verdict heads the result (default: the last).
        settings: the budget, the split and the verdict thresholds.
        runtime: how models run.
        progress: ``progress(description, done, total)`` callback.
        warn: receives warnings (a control that learns, a probe without groups, truncation).

    Returns:
        A :class:`RecoveryResult`; its ``verdict`` is none, spurious, real or mixed.

    Example:
        >>> from forgetdiag import load_probe, recover
        >>> r = recover("runs/task0", "runs/task1/checkpoint-50",
        ...             load_probe("old.jsonl"), control="control")  # doctest: +SKIP
        >>> r.verdict, r.accuracy(), r.decision.intervals["spurious_fraction"]  # doctest: +SKIP
    """
    warn = warn or (lambda message: None)
    settings = replace(settings, metric=probe.metric(settings.metric))
    if recovery_probe is not None and recovery_probe.kind != probe.kind:
        raise ProbeError(
            f"the recovery probe {recovery_probe.name} has {KIND_NAMES[recovery_probe.kind]} rows and the "
            f"probe {probe.name} {KIND_NAMES[probe.kind]} rows; expected one kind of row for both"
        )
    before_ckpt = resolve_checkpoints(before, runtime, single="BEFORE")
    afters = resolve_checkpoints(after, runtime)
    control_ckpt = resolve_checkpoints(control, runtime, single="CONTROL") if control is not None else None
    everything = [before_ckpt, *afters, *([control_ckpt] if control_ckpt else [])]
    check_sequence(everything)
    head = _headline(afters, at, runtime)
    notes: list[str] = []

    def note(message: str) -> None:
        notes.append(message)
        warn(message)

    if control_ckpt is not None and any(control_ckpt.path.resolve() == a.path.resolve() for a in afters):
        note(
            "the control is the same checkpoint as AFTER: it cannot measure what the recovery budget teaches by itself"
        )
    tokenizer = shared_tokenizer(everything, runtime, warn=note)
    rec, ev = recovery_split(
        probe,
        recovery_probe,
        shots=settings.shots,
        n_eval=settings.n_eval,
        seed=settings.seed,
        allow_overlap=settings.allow_overlap,
        warn=warn,
    )
    rec_enc, _ = tokenize_probe(tokenizer, rec, before_ckpt, runtime, warn=warn)
    ev_enc, stops = tokenize_probe(tokenizer, ev, before_ckpt, runtime, warn=warn)
    n_params = before_ckpt.n_params
    ctx = _Context(
        runtime,
        settings,
        tokenizer,
        rec_enc,
        ev_enc,
        ev.items,
        stops,
        tokenizer.pad_token_id,
        progress,
        lr=settings.lr or default_lr(n_params, lora=settings.lora),
    )
    ctx.steps = max(
        settings.epochs * math.ceil(len(rec_enc) / min(settings.batch_size, len(rec_enc))), settings.min_steps
    )
    index: dict = {}  # evaluation items -> their group's number (an item without one is alone)
    groups = np.array(
        [
            index.setdefault(("group", i.group) if i.group is not None else ("row", k), len(index))
            for k, i in enumerate(ev.items)
        ]
    )
    with runtime.threads_for(n_params):
        with ctx.timings.phase("evaluation"):
            model = load_model(before_ckpt, runtime)
            ref = _Reference(_score(model, ctx))
        if settings.before_recovery:
            with ctx.timings.phase("before recovery"):
                ref.before_recovered = _recovered(before_ckpt, model, ctx)[0]
        del model
        if control_ckpt is not None:
            with ctx.timings.phase("control"):
                model = load_model(control_ckpt, runtime)
                ref.control = _score(model, ctx)
                ref.control_recovered = _recovered(control_ckpt, model, ctx)[0]
                del model
        points, examples = [], ()
        for k, ckpt in enumerate(afters):
            point, ex = _after_point(ckpt, ctx, ref, groups, want_examples=k == head)
            points.append(point)
            examples = ex or examples
    last = points[head]
    _explain(last, settings, note)
    confidence = settings.thresholds.confidence
    scores = {
        "before": summarise(ref.before, settings.metric, confidence),
        "after": last.after,
        "recovered": last.recovered,
        "before_recovered": (
            None if ref.before_recovered is None else summarise(ref.before_recovered, settings.metric, confidence)
        ),
        "control": None if ref.control is None else summarise(ref.control, settings.metric, confidence),
        "control_recovered": (
            None if ref.control_recovered is None else summarise(ref.control_recovered, settings.metric, confidence)
        ),
    }
    return RecoveryResult(
        before=before_ckpt.label,
        after=afters[head].label,
        control=control_ckpt.label if control_ckpt else None,
        probe=probe.name,
        n_recovery=len(rec),
        n_eval=len(ev),
        metric=settings.metric,
        scores=scores,
        decision=last.decision,
        settings=settings,
        lr=ctx.lr,
        steps=ctx.steps,
        sequence=tuple(points) if len(points) > 1 else (),
        examples=examples,
        outcomes=last.outcomes,
        groups=tuple(i.group if i.group is not None else "" for i in ev.items),
        warnings=tuple(notes),
        timings=dict(ctx.timings),
    )


def _explain(point: PointResult, settings: RecoverySettings, note) -> None:
    """Warnings about what the headline verdict rests on: the control and the reference."""
    d, alpha = point.decision, settings.thresholds.alpha
    if d.control_p_value is not None and d.control_p_value < alpha and (d.control_gain or 0) > 0:
        fractions = ""
        if d.spurious_fraction is not None:
            fractions = (
                f"; the spurious fraction is {d.spurious_fraction:.2f} with the control's correction and "
                f"{d.spurious_fraction_uncorrected:.2f} without"
            )
        note(
            f"the control gains {d.control_gain:+.3f} from recovery (McNemar p = {d.control_p_value:.3g}): it may "
            "hold the old knowledge (a control must be a model of the same kind that never saw the old task's "
            f"entities, not the base model the old task was learned on){fractions}"
        )
    if not settings.before_recovery:
        note(
            "BEFORE was not recovered (--no-before-recovery): the knowledge loss and the spurious fraction are "
            "measured against BEFORE itself; the budget also improves an intact model, so a small drop may read "
            "as spurious"
        )


def _headline(afters: Sequence[Checkpoint], at, runtime: Runtime) -> int:
    """Index of the after-checkpoint whose verdict heads the result."""
    if at is None:
        return len(afters) - 1
    target = resolve_checkpoints(at, runtime, single="the headline checkpoint").path.resolve()
    for k, ckpt in enumerate(afters):
        if ckpt.path.resolve() == target:
            return k
    raise CheckpointError(f"{at} is not among the AFTER checkpoints ({', '.join(c.label for c in afters)})")
