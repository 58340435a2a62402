"""Settings of the analyses that score probes: recovery and its verdict, gate, score, report and the
remedies. Plain dataclasses, checked where they are made; no torch here (the CLI builds its options
from them before loading torch)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

from forgetdiag.errors import ForgetdiagError
from forgetdiag.probe_rows import ProbeFields
from forgetdiag.probes import ProbeItem
from forgetdiag.validate import check_choice, check_number, check_seed, choices


@dataclass(frozen=True)
class Thresholds:
    """Where the verdict's lines are drawn (CLI options of the same names).

    Attributes:
        spurious_min: spurious fraction at or above which forgetting is called spurious.
        real_max: spurious fraction at or below which it is called real.
        alpha: significance level of the paired test of the drop (and of the control's gain).
        min_drop: a drop smaller than this (in accuracy) is too small to matter: ``none``.
        min_eval: fewest evaluation items that can support a verdict at all.
        confidence: level of the bootstrap intervals.
        bootstrap: bootstrap replicates.
    """

    spurious_min: float = 0.75
    real_max: float = 0.25
    alpha: float = 0.05
    min_drop: float = 0.02
    min_eval: int = 30
    confidence: float = 0.95
    bootstrap: int = 2000

    def __post_init__(self) -> None:
        check_number("--spurious-min", self.spurious_min, low=0, high=1)
        check_number("--real-max", self.real_max, low=0, high=1)
        check_number("--alpha", self.alpha, low=0, high=1, low_open=True, high_open=True)
        check_number("--min-drop", self.min_drop, low=0, high=1)
        check_number("--min-eval", self.min_eval, low=1, integer=True)
        check_number("confidence", self.confidence, low=0, high=1, low_open=True, high_open=True)
        check_number("bootstrap", self.bootstrap, low=100, integer=True)
        if not self.real_max < self.spurious_min:
            raise ForgetdiagError(
                "thresholds need --real-max < --spurious-min, got "
                f"real_max={self.real_max}, spurious_min={self.spurious_min}"
            )


Metric = Literal["exact_match", "first_token", "acc", "acc_norm"]


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
        seed: split seed and the first recovery seed.
        seeds: recoveries per model (seeds ``seed``, ``seed + 1``, ...); their spread goes into
            the intervals.
        before_recovery: recover BEFORE too (the reference of the knowledge loss and the
            spurious fraction); off, BEFORE itself is the reference.
        allow_overlap: accept recovery and evaluation parts that share examples.
        metric: what the verdict uses: ``exact_match`` (the paper's) or ``first_token`` for a
            prompt/answer probe, ``acc`` or ``acc_norm`` for a multiple-choice one; None: the
            probe's first (``exact_match``, ``acc``).
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
    seeds: int = 1
    before_recovery: bool = True
    allow_overlap: bool = False
    metric: Metric | None = None
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
        check_number("--seeds", self.seeds, low=1, high=100, integer=True)
        if self.metric is not None:
            check_choice("--metric", self.metric, choices(Metric))
        check_number("examples", self.examples, low=0, integer=True)
        if not isinstance(self.thresholds, Thresholds):
            raise ForgetdiagError(f"thresholds: expected a Thresholds, found {type(self.thresholds).__name__}")


@dataclass(frozen=True)
class GateThresholds:
    """Thresholds on a recovery probe's numbers, each a share in [0, 1] (None: not checked)."""

    max_alignment_loss: float | None = None
    max_knowledge_loss: float | None = None
    min_accuracy: float | None = None
    max_forgetting: float | None = None

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            check_number("--" + name.replace("_", "-"), value, low=0, high=1, optional=True)

    def any(self) -> bool:
        return any(v is not None for v in asdict(self).values())

    def require_one(self) -> None:
        if not self.any():
            raise ForgetdiagError(
                "no threshold given; expected at least one of --max-alignment-loss, "
                "--max-knowledge-loss, --min-accuracy, --max-forgetting"
            )


@dataclass(frozen=True)
class ScoreSettings:
    """How the scores are summarised.

    Attributes:
        confidence: level of every interval (0.95: 95% intervals).
    """

    confidence: float = 0.95

    def __post_init__(self) -> None:
        check_number("confidence", self.confidence, low=0, high=1, low_open=True, high_open=True)


ANALYSES = ("recover", "angles", "landscape", "features")


@dataclass(frozen=True)
class ReportSettings:
    """What the report computes (CLI options of ``report``).

    Attributes:
        recovery: the recovery probe's budget and verdict thresholds.
        grid: points per side of the loss surface.
        landscape_items: probe items per loss surface (a seeded sample, whole groups).
        feature_items: probe prompts for the feature shifts (a seeded sample).
        rank: top-k directions per update in the angles (randomized SVD).
        skip: analyses not to run (``recover``, ``angles``, ``landscape``, ``features``).
        seed: seed of the samples.
        probe_fields: field names of the run's probe files.
        overlap: on a CPU with two or more cores and a model small enough to run on one
            thread (:meth:`forgetdiag.runtime.Runtime.auto_threads`), run ``recover`` on one core and the
            other analyses on another, at the same time. The numbers are the same either way.
    """

    recovery: RecoverySettings = RecoverySettings()
    grid: int = 9
    landscape_items: int = 200
    feature_items: int = 500
    rank: int = 16
    skip: tuple[str, ...] = ()
    seed: int = 0
    overlap: bool = True
    probe_fields: ProbeFields = ProbeFields()

    def __post_init__(self) -> None:
        object.__setattr__(self, "skip", tuple(self.skip))
        unknown = sorted(set(self.skip) - set(ANALYSES))
        if unknown:
            raise ForgetdiagError(f"--skip {unknown[0]}: expected one of {', '.join(ANALYSES)}")
        check_number("--grid", self.grid, low=2, integer=True)
        check_number("--landscape-items", self.landscape_items, low=1, integer=True)
        check_number("--feature-items", self.feature_items, low=2, integer=True)
        check_number("rank", self.rank, low=1, integer=True)
        check_seed("--seed", self.seed)


@dataclass(frozen=True)
class ReplaySettings:
    """How much old data to mix in (CLI options of the same names).

    Attributes:
        ratio: the old rows' share of the output, in (0, 1) (0.1: one row in ten is old).
        seed: the choice of old groups and the order of the output.
    """

    ratio: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        check_number("--ratio", self.ratio, low=0, high=1, low_open=True, high_open=True)
        check_seed("--seed", self.seed)


@dataclass(frozen=True)
class SelfOutputSettings:
    """What to do where the old model's answer differs (CLI options of the same names).

    Attributes:
        rewrite_prompt: a template with ``{answer}`` (the target) and usually ``{prompt}``; the
            old model's greedy continuation of it is its restatement. None: keep the target.
        max_new_tokens: generation budget per prompt (default: twice the longest target).
    """

    rewrite_prompt: str | None = None
    max_new_tokens: int | None = None

    def __post_init__(self) -> None:
        check_number("--max-new-tokens", self.max_new_tokens, low=1, integer=True, optional=True)
        if self.rewrite_prompt is not None and (
            not isinstance(self.rewrite_prompt, str) or "{answer}" not in self.rewrite_prompt
        ):
            raise ForgetdiagError(
                f"--rewrite-prompt {self.rewrite_prompt!r}: expected a template holding {{answer}} "
                "(the target to restate) and usually {prompt}"
            )

    def restate_prompt(self, item: ProbeItem) -> str:
        """The rewrite template filled in for one row (only ``{prompt}`` and ``{answer}`` are replaced)."""
        return self.rewrite_prompt.replace("{prompt}", item.prompt).replace("{answer}", item.answer)


# What `samples build --remedy` can change in the spurious run's task 1 (docs/remedy.md).
Remedy = Literal["none", "freeze", "replay", "self-output", "mask", "lora"]
REMEDIES: tuple[str, ...] = ("none", "freeze", "replay", "self-output", "mask", "lora")
