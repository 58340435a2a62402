"""``forgetdiag recover``: is the forgetting spurious or real?"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from forgetdiag.cli.app import app
from forgetdiag.cli.common import (
    HtmlOpt,
    JsonOpt,
    QuietOpt,
    SeedOpt,
    command,
    emit,
    progress_bar,
    warn,
    with_runtime,
)
from forgetdiag.probes import ProbeFields, load_probe
from forgetdiag.render.output import guard_outputs
from forgetdiag.runtime import Runtime
from forgetdiag.settings import Metric, RecoverySettings, Thresholds

Opt = typer.Option
DEFAULTS, LIMITS = RecoverySettings(), Thresholds()
# Options shared with `gate` and `report`, which run the same recovery probe.
ControlOpt = Annotated[
    Path | None,
    Opt(
        "--control",
        help="A checkpoint of the same kind that never held the old task's knowledge (e.g. trained the same way on other entities). It measures what the recovery budget teaches by itself.",
        show_default=False,
    ),
]
RecoveryProbeOpt = Annotated[
    Path | None,
    Opt(
        "--recovery-probe",
        help="Recovery examples in their own file (then all of --probe is evaluated).",
        show_default=False,
    ),
]
ShotsOpt = Annotated[
    int | None,
    Opt(
        "--shots",
        min=1,
        help="Recovery examples (whole groups). Default: half of the probe's groups.",
        show_default=False,
    ),
]
EvalOpt = Annotated[
    int | None,
    Opt("--eval", min=1, help="Cap on evaluation items. Default: all not used for recovery.", show_default=False),
]
EpochsOpt = Annotated[int, Opt("--epochs", min=1, help="Passes over the recovery examples.")]
MinStepsOpt = Annotated[int, Opt("--min-steps", min=1, help="At least this many recovery steps.")]
LrOpt = Annotated[
    float | None,
    Opt(
        "--lr",
        help="Recovery learning rate. Default by model size: 1e-4 under 20M parameters, 3e-5 under 300M, 1e-5 under 3B, else 5e-6 (LoRA: 2e-4, 1e-4 from 1B).",
        show_default=False,
    ),
]
RecBatchOpt = Annotated[int, Opt("--recovery-batch", min=1, help="Recovery examples per step (AdamW).")]
LoraOpt = Annotated[bool, Opt("--lora", help="Recover through a LoRA adapter (peft) so a 7B model fits one GPU.")]
LoraRankOpt = Annotated[int, Opt("--lora-rank", min=1, help="Rank of the recovery adapter.")]
MetricOpt = Annotated[
    Metric | None,
    Opt(
        "--metric",
        help="What decides: exact_match (greedy answer then stop, as in the paper) or first_token for a prompt/answer probe; acc or acc_norm for a multiple-choice probe. Default: exact_match, or acc.",
        show_default=False,
    ),
]
SeedsOpt = Annotated[
    int,
    Opt(
        "--seeds",
        min=1,
        max=100,
        help="Recover every model this many times (seeds --seed, --seed + 1, ...); their spread goes into the intervals.",
    ),
]
NoBeforeOpt = Annotated[
    bool,
    Opt(
        "--no-before-recovery",
        help="Do not recover BEFORE with the same budget (one recovery less); BEFORE itself is then the reference, and small drops may read as spurious.",
    ),
]
OverlapOpt = Annotated[
    bool,
    Opt(
        "--allow-overlap",
        help="Accept recovery and evaluation parts that share examples (the same file, groups or prompt+answer rows).",
    ),
]
AlphaOpt = Annotated[
    float,
    Opt(
        "--alpha",
        help="Significance level of the paired test of the drop (exact McNemar); a drop that is not significant is 'none'.",
    ),
]
MinDropOpt = Annotated[
    float, Opt("--min-drop", help="A drop in accuracy smaller than this is too small to matter: 'none'.")
]


@command(app, "recover")
@with_runtime(probe_fields=True)
def recover_cmd(
    before: Annotated[Path, typer.Argument(help="Checkpoint that knew the old task.", show_default=False)],
    after: Annotated[
        list[Path],
        typer.Argument(
            help="Checkpoint(s) trained on something else since; a Trainer run directory or several checkpoints give the curve along the run.",
            show_default=False,
        ),
    ],
    probe: Annotated[
        Path,
        Opt(
            "--probe",
            help="The old task's probe: JSONL, JSON or CSV with prompt, answer[, group] or prompt, choices, answer[, group] (multiple choice), or an lm-eval task .yaml.",
            show_default=False,
        ),
    ],
    control: ControlOpt = None,
    recovery_probe: RecoveryProbeOpt = None,
    shots: ShotsOpt = None,
    n_eval: EvalOpt = None,
    epochs: EpochsOpt = DEFAULTS.epochs,
    min_steps: MinStepsOpt = DEFAULTS.min_steps,
    lr: LrOpt = None,
    batch: RecBatchOpt = DEFAULTS.batch_size,
    lora: LoraOpt = False,
    lora_rank: LoraRankOpt = DEFAULTS.lora_rank,
    metric: MetricOpt = DEFAULTS.metric,
    seeds: SeedsOpt = DEFAULTS.seeds,
    no_before_recovery: NoBeforeOpt = False,
    allow_overlap: OverlapOpt = False,
    alpha: AlphaOpt = LIMITS.alpha,
    min_drop: MinDropOpt = LIMITS.min_drop,
    spurious_min: Annotated[
        float, Opt("--spurious-min", help="Spurious fraction at or above which forgetting is spurious.")
    ] = LIMITS.spurious_min,
    real_max: Annotated[
        float, Opt("--real-max", help="Spurious fraction at or below which forgetting is real.")
    ] = LIMITS.real_max,
    min_eval: Annotated[
        int, Opt("--min-eval", help="Fewest evaluation items that can support a verdict.")
    ] = LIMITS.min_eval,
    seed: SeedOpt = DEFAULTS.seed,
    json_path: JsonOpt = None,
    html_path: HtmlOpt = None,
    quiet: QuietOpt = False,
    runtime: Runtime = None,
    fields: ProbeFields = None,
) -> None:
    """Is the old task's knowledge gone, or only its alignment? Few-shot recovery probe.

    Scores BEFORE and AFTER on held-out probe items, fine-tunes in-memory copies of AFTER, of
    BEFORE (the reference) and of CONTROL on a few other items, scores again, and gives a
    verdict: none, spurious, real or mixed, with paired statistics (McNemar, bootstrap
    intervals over entities). Checkpoints on disk are never modified.
    """
    settings = RecoverySettings(
        shots=shots,
        n_eval=n_eval,
        epochs=epochs,
        min_steps=min_steps,
        lr=lr,
        batch_size=batch,
        lora=lora,
        lora_rank=lora_rank,
        seed=seed,
        seeds=seeds,
        before_recovery=not no_before_recovery,
        allow_overlap=allow_overlap,
        metric=metric,
        thresholds=Thresholds(
            spurious_min=spurious_min, real_max=real_max, alpha=alpha, min_drop=min_drop, min_eval=min_eval
        ),
    )
    guard_outputs(
        {"--json": json_path, "--html": html_path},
        [before, *after, control, probe, recovery_probe, runtime.base, runtime.tokenizer],
    )
    from forgetdiag.analyses.recovery import recover
    from forgetdiag.render.recover import recover_table, write_recover_html

    old = load_probe(probe, fields=fields)
    rec = load_probe(recovery_probe, fields=fields) if recovery_probe else None
    with progress_bar(quiet) as progress:
        result = recover(
            before,
            after,
            old,
            control=control,
            recovery_probe=rec,
            settings=settings,
            runtime=runtime,
            progress=progress,
            warn=warn,
        )
    if not result.decision.supported:
        warn(result.decision.reason)
    emit(result, json=json_path, html=html_path, table=recover_table, page=write_recover_html)
