"""Few-shot recovery probes: is the forgetting spurious or real? (docs/science.md, "Recovery probe")

Split the old task's probe by group into a recovery part R and a disjoint evaluation part E.
Score BEFORE and AFTER on E; fine-tune an in-memory copy of AFTER on R only (loss on answer
tokens) for a small fixed budget and score it again; do the same to a CONTROL that never held
the old knowledge, to measure what the budget teaches by itself. The accuracies go to
:func:`forgetdiag.analyses.verdict.decide`. Checkpoints on disk are never touched.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from forgetdiag.analyses.recovery_result import (
    Example,
    PointResult,
    RecoveryResult,
    Score,
    summarise,
)
from forgetdiag.analyses.verdict import Thresholds, decide
from forgetdiag.checkpoints import resolve_checkpoints
from forgetdiag.errors import CheckpointError, ForgetdiagError, ProbeError
from forgetdiag.evaluate import Encoded, encode, generate_greedy, model_context, score
from forgetdiag.models import load_model, shared_tokenizer
from forgetdiag.probes import Probe, split_probe, with_chat_template
from forgetdiag.results import Timings
from forgetdiag.runtime import ProgressFn, Runtime, Warn
from forgetdiag.storage import Checkpoint
from forgetdiag.streaming import check_sequence
from forgetdiag.training import TrainConfig, train
from forgetdiag.validate import check_choice, check_number, check_seed, choices

Metric = Literal["exact_match", "first_token"]


@dataclass(frozen=True)
class RecoverySettings:
    """The recovery budget, the split and the verdict thresholds (CLI options of the same names).

    Attributes:
        shots: rows in the recovery part, taken as whole groups (default: half of the groups).
        n_eval: cap on the rows of the evaluation part (default: all the rest).
        epochs: passes over the recovery part.
        min_steps: at least this many optimiser steps (a few shots need several passes).
        lr: learning rate (default: by model size, see :func:`default_lr`).
        batch_size: recovery examples per step.
        lora: recover through a LoRA adapter (peft) instead of full fine-tuning.
        lora_rank: rank of that adapter (alpha = 2 x rank, all linear layers).
        seed: split and training seed.
        metric: what the verdict uses: ``exact_match`` (the paper's) or ``first_token``.
        examples: evaluation items whose greedy answers are shown.
        thresholds: where the verdict's lines are drawn (:class:`Thresholds`).
    """

    shots: int | None = None
    n_eval: int | None = None
    epochs: int = 1
    min_steps: int = 20
    lr: float | None = None
    batch_size: int = 32
    lora: bool = False
    lora_rank: int = 16
    seed: int = 0
    metric: Metric = "exact_match"
    examples: int = 5
    thresholds: Thresholds = Thresholds()

    def __post_init__(self) -> None:
        check_number("--shots", self.shots, low=1, integer=True, optional=True)
        check_number("--eval", self.n_eval, low=1, integer=True, optional=True)
        check_number("--epochs", self.epochs, low=1, integer=True)
        check_number("--min-steps", self.min_steps, low=1, integer=True)
        check_number("--lr", self.lr, low=0, low_open=True, optional=True)
        check_number("--recovery-batch", self.batch_size, low=1, integer=True)
        check_number("--lora-rank", self.lora_rank, low=1, integer=True)
        check_seed("--seed", self.seed)
        check_choice("--metric", self.metric, choices(Metric))
        check_number("examples", self.examples, low=0, integer=True)
        if not isinstance(self.thresholds, Thresholds):
            raise ForgetdiagError(f"thresholds: expected a Thresholds, found {type(self.thresholds).__name__}")


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
    pad_id: int
    progress: ProgressFn | None
    lr: float = 0.0
    steps: int = 0
    timings: Timings = field(default_factory=Timings)


def _score(model, ctx: _Context) -> Score:
    scores = score(model, ctx.evaluation, pad_id=ctx.pad_id, batch_size=ctx.runtime.batch_size, progress=ctx.progress)
    return summarise(scores, ctx.settings.metric, ctx.settings.thresholds.confidence)


def _fine_tune(model, ctx: _Context) -> tuple[object, list[float]]:
    """Recover ``model`` (an in-memory copy) on the recovery part; returns it and its losses."""
    if ctx.settings.lora:
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError:
            raise CheckpointError("--lora needs peft: pip install 'forgetdiag[peft]'") from None
        r = ctx.settings.lora_rank
        model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules="all-linear"))
    config = TrainConfig(
        max_steps=ctx.steps,
        lr=ctx.lr,
        seed=ctx.settings.seed,
        batch_size=min(ctx.settings.batch_size, len(ctx.recovery)),
    )
    losses = train(model, ctx.recovery, config, pad_id=ctx.pad_id, progress=ctx.progress)
    return model, losses


def _says(model, ctx: _Context, k: int) -> list[str]:
    items = ctx.evaluation[:k]
    said = generate_greedy(
        model, items, pad_id=ctx.pad_id, eos_id=ctx.tokenizer.eos_token_id, batch_size=ctx.runtime.batch_size
    )
    return [ctx.tokenizer.decode(s, skip_special_tokens=True) for s in said]


def _after_point(
    checkpoint: Checkpoint,
    ctx: _Context,
    before: Score,
    control: Score | None,
    control_recovered: Score | None,
    want_examples: bool,
) -> tuple[PointResult, tuple[Example, ...]]:
    with ctx.timings.phase("evaluation"):
        model = load_model(checkpoint, ctx.runtime)
        after = _score(model, ctx)
        said = _says(model, ctx, ctx.settings.examples) if want_examples else []
    with ctx.timings.phase("recovery"):
        model, losses = _fine_tune(model, ctx)
        recovered = _score(model, ctx)
        redo = _says(model, ctx, ctx.settings.examples) if want_examples else []
    metric = ctx.settings.metric
    decision = decide(
        before=before.value(metric),
        after=after.value(metric),
        recovered=recovered.value(metric),
        n_eval=after.n,
        control=control.value(metric) if control else None,
        control_recovered=control_recovered.value(metric) if control_recovered else None,
        thresholds=ctx.settings.thresholds,
    )
    examples = tuple(Example(i.prompt, i.answer, a, r) for i, a, r in zip(ctx.eval_items, said, redo))
    return (PointResult(checkpoint.label, checkpoint.step, after, recovered, decision, tuple(losses)), examples)


def _prepare(
    before: Checkpoint,
    others: Sequence[Checkpoint],
    probe: Probe,
    recovery_probe: Probe | None,
    settings: RecoverySettings,
    runtime: Runtime,
    warn: Warn | None,
) -> tuple[object, Probe, Probe, list[Encoded], list[Encoded]]:
    tokenizer = shared_tokenizer([before, *others], runtime)
    if runtime.chat_template:
        probe = with_chat_template(probe, tokenizer)
        recovery_probe = with_chat_template(recovery_probe, tokenizer) if recovery_probe else None
    if recovery_probe is None:
        rec, ev = split_probe(probe, n_recovery=settings.shots, n_eval=settings.n_eval, seed=settings.seed)
    else:
        ev = split_probe(probe, n_recovery=0, n_eval=settings.n_eval, seed=settings.seed)[1]
        shared = {i.group for i in ev.items if i.group is not None} & {i.group for i in recovery_probe.items}
        if shared:
            raise ProbeError(
                f"the recovery probe shares {len(shared)} groups with the evaluation "
                f"probe (e.g. {sorted(shared)[0]!r}); expected disjoint entities"
            )
        rec = (
            recovery_probe
            if settings.shots is None
            else split_probe(recovery_probe, n_recovery=settings.shots, seed=settings.seed)[0]
        )
    if not len(rec) or not len(ev):
        raise ProbeError(
            f"probe {probe.name}: {len(probe)} rows in {len(probe.groups)} groups leave "
            f"{len(rec)} for recovery and {len(ev)} for evaluation; expected both non-empty"
        )
    context = model_context(before.config)
    enc = lambda p: encode(tokenizer, p, max_length=context, truncate=runtime.truncate_prompts, warn=warn)
    return tokenizer, rec, ev, enc(rec), enc(ev)


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
        control: a checkpoint that never held the old knowledge (strongly recommended).
        at: in sequence mode, the checkpoint whose verdict heads the result (default: the last).
        settings: the budget, the split and the verdict thresholds.
        runtime: how models run.
        progress: ``progress(description, done, total)`` callback.
        warn: receives warnings (a control equal to AFTER, truncated prompts).

    Returns:
        A :class:`RecoveryResult`; its ``verdict`` is none, spurious, real or mixed.

    Example:
        >>> from forgetdiag import load_probe, recover
        >>> r = recover("runs/task0", "runs/task1/checkpoint-50",
        ...             load_probe("old.jsonl"), control="base")  # doctest: +SKIP
        >>> r.verdict, r.accuracy()  # doctest: +SKIP
    """
    warn = warn or (lambda message: None)
    before_ckpt = resolve_checkpoints(before, runtime, single="BEFORE")
    afters = resolve_checkpoints(after, runtime)
    control_ckpt = resolve_checkpoints(control, runtime, single="CONTROL") if control is not None else None
    everything = [before_ckpt, *afters, *([control_ckpt] if control_ckpt else [])]
    check_sequence(everything)
    notes = []
    if control_ckpt is not None and any(control_ckpt.path.resolve() == a.path.resolve() for a in afters):
        notes.append(
            "the control is the same checkpoint as AFTER: it cannot measure what the recovery budget teaches by itself"
        )
        warn(notes[-1])
    tokenizer, rec, ev, rec_enc, ev_enc = _prepare(
        before_ckpt, everything[1:], probe, recovery_probe, settings, runtime, warn
    )
    n_params = before_ckpt.n_params
    ctx = _Context(
        runtime,
        settings,
        tokenizer,
        rec_enc,
        ev_enc,
        ev.items,
        tokenizer.pad_token_id,
        progress,
        lr=settings.lr or default_lr(n_params, lora=settings.lora),
    )
    ctx.steps = max(
        settings.epochs * math.ceil(len(rec_enc) / min(settings.batch_size, len(rec_enc))), settings.min_steps
    )
    with runtime.threads_for(n_params):
        with ctx.timings.phase("evaluation"):
            before_score = _score(load_model(before_ckpt, runtime), ctx)
        control_score = control_rec = None
        if control_ckpt is not None:
            with ctx.timings.phase("control"):
                model = load_model(control_ckpt, runtime)
                control_score = _score(model, ctx)
                control_rec = _score(_fine_tune(model, ctx)[0], ctx)
                del model
        points, examples = [], ()
        for k, ckpt in enumerate(afters):
            point, ex = _after_point(
                ckpt, ctx, before_score, control_score, control_rec, want_examples=k == len(afters) - 1
            )
            points.append(point)
            examples = ex or examples
    head = _headline(afters, at, runtime)
    last = points[head]
    scores = {
        "before": before_score,
        "after": last.after,
        "recovered": last.recovered,
        "control": control_score,
        "control_recovered": control_rec,
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
        warnings=tuple(notes),
        timings=dict(ctx.timings),
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
