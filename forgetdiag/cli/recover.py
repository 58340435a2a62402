"""``forgetdiag recover``: is the forgetting spurious or real?"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, List, Optional

import typer

from forgetdiag.analyses.recovery import RecoveryResult, RecoverySettings, recover
from forgetdiag.analyses.verdict import Thresholds
from forgetdiag.cli.app import app
from forgetdiag.cli.common import (HtmlOpt, JsonOpt, ModelOptions, QuietOpt, SeedOpt, command,
                                   model_options, print_renderable, progress_bar, warn)
from forgetdiag.errors import ForgetdiagError
from forgetdiag.probes import Probe
from forgetdiag.render.output import STDOUT, guard_outputs, write_json
from forgetdiag.render.recover import recover_table, write_recover_html

Opt = typer.Option
# Options shared with `gate`, which runs the same recovery probe.
ControlOpt = Annotated[Optional[Path], Opt("--control", help="A checkpoint that never held the old task's knowledge (a base model or random init). Strongly recommended: it measures what the recovery budget teaches by itself.", show_default=False)]
RecoveryProbeOpt = Annotated[Optional[Path], Opt("--recovery-probe", help="Recovery examples in their own file (then all of --probe is evaluated).", show_default=False)]
ShotsOpt = Annotated[Optional[int], Opt("--shots", min=1, help="Recovery examples (whole groups). Default: half of the probe's groups.", show_default=False)]
EvalOpt = Annotated[Optional[int], Opt("--eval", min=1, help="Cap on evaluation items. Default: all not used for recovery.", show_default=False)]
EpochsOpt = Annotated[int, Opt("--epochs", min=1, help="Passes over the recovery examples.")]
MinStepsOpt = Annotated[int, Opt("--min-steps", min=1, help="At least this many recovery steps.")]
LrOpt = Annotated[Optional[float], Opt("--lr", help="Recovery learning rate. Default by model size: 1e-4 under 20M parameters, 3e-5 under 300M, 1e-5 under 3B, else 5e-6 (LoRA: 2e-4, 1e-4 from 1B).", show_default=False)]
RecBatchOpt = Annotated[int, Opt("--recovery-batch", min=1, help="Recovery examples per step (AdamW).")]
LoraOpt = Annotated[bool, Opt("--lora", help="Recover through a LoRA adapter (peft) so a 7B model fits one GPU.")]
LoraRankOpt = Annotated[int, Opt("--lora-rank", min=1, help="Rank of the recovery adapter.")]
MetricOpt = Annotated[str, Opt("--metric", help="What decides: exact_match (greedy answer then stop, as in the paper) or first_token.")]


def run_recover(before: Path, after: list[Path], probe: Path | Probe, *, control: Path | None,
                recovery_probe: Path | None, settings: dict, thresholds: dict,
                options: ModelOptions, quiet: bool) -> RecoveryResult:
    """Load the probes (``probe`` may be loaded already), build the settings, run
    :func:`recover` with a progress bar."""
    if settings.get("metric", "exact_match") not in ("exact_match", "first_token"):
        raise ForgetdiagError(f"--metric must be exact_match or first_token, not {settings['metric']!r}")
    old = probe if isinstance(probe, Probe) else options.probe(probe)
    rec = options.probe(recovery_probe) if recovery_probe else None
    try:
        limits = Thresholds(**thresholds)
    except ValueError as exc:
        raise ForgetdiagError(str(exc)) from None
    with progress_bar(quiet) as progress:
        result = recover(before, after, old, control=control, recovery_probe=rec,
                         settings=RecoverySettings(**settings), thresholds=limits,
                         runtime=options.runtime, progress=progress, warn=warn)
    if not result.decision.supported:
        warn(result.decision.reason)
    return result


@command(app, "recover")
@model_options
def recover_cmd(
    before: Annotated[Path, typer.Argument(help="Checkpoint that knew the old task.", show_default=False)],
    after: Annotated[List[Path], typer.Argument(help="Checkpoint(s) trained on something else since; a Trainer run directory or several checkpoints give the curve along the run.", show_default=False)],
    probe: Annotated[Path, Opt("--probe", help="The old task's probe (JSONL, JSON or CSV with prompt, answer[, group]).", show_default=False)],
    control: ControlOpt = None,
    recovery_probe: RecoveryProbeOpt = None,
    shots: ShotsOpt = None,
    n_eval: EvalOpt = None,
    epochs: EpochsOpt = 1,
    min_steps: MinStepsOpt = 20,
    lr: LrOpt = None,
    batch: RecBatchOpt = 32,
    lora: LoraOpt = False,
    lora_rank: LoraRankOpt = 16,
    metric: MetricOpt = "exact_match",
    spurious_min: Annotated[float, Opt("--spurious-min", help="Spurious fraction at or above which forgetting is spurious.")] = 0.75,
    real_max: Annotated[float, Opt("--real-max", help="Spurious fraction at or below which forgetting is real.")] = 0.25,
    min_eval: Annotated[int, Opt("--min-eval", help="Fewest evaluation items that can support a verdict.")] = 30,
    seed: SeedOpt = 0,
    json_path: JsonOpt = None,
    html_path: HtmlOpt = None,
    options: ModelOptions = None,
    quiet: QuietOpt = False,
) -> None:
    """Is the old task's knowledge gone, or only its alignment? Few-shot recovery probe.

    Scores BEFORE and AFTER on held-out probe items, fine-tunes an in-memory copy of AFTER
    (and of CONTROL) on a few other items, scores again, and gives a verdict: none, spurious,
    real or mixed. Checkpoints on disk are never modified.
    """
    guard_outputs([json_path, html_path], [before, *after, *([control] if control else [])])
    result = run_recover(
        before, after, probe, control=control, recovery_probe=recovery_probe, quiet=quiet,
        settings=dict(shots=shots, n_eval=n_eval, epochs=epochs, min_steps=min_steps, lr=lr,
                      batch_size=batch, lora=lora, lora_rank=lora_rank, seed=seed, metric=metric),
        thresholds=dict(spurious_min=spurious_min, real_max=real_max, min_eval=min_eval),
        options=options)
    if json_path is not None:
        write_json(json_path, result.to_dict())
    if html_path is not None:
        write_recover_html(html_path, result)
    print_renderable(recover_table(result), json_to_stdout=str(json_path) == STDOUT)
