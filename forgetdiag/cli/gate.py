"""``forgetdiag gate``: fail a CI job when fine-tuning broke an old ability."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from forgetdiag.cli.app import app
from forgetdiag.cli.common import (
    JsonOpt,
    QuietOpt,
    SeedOpt,
    command,
    emit,
    progress_bar,
    stderr,
    warn,
    with_runtime,
)
from forgetdiag.cli.recover import ControlOpt, EvalOpt, LoraOpt, LrOpt, MetricOpt, RecoveryProbeOpt, ShotsOpt
from forgetdiag.errors import EXIT_THRESHOLD, ForgetdiagError
from forgetdiag.probes import ProbeFields, load_probe
from forgetdiag.render.output import guard_outputs, write_atomic
from forgetdiag.runtime import Runtime
from forgetdiag.settings import GateThresholds, RecoverySettings

Opt = typer.Option
PathOpt = Path | None


def read_json(path: Path, what: str):
    """The JSON in ``path``, or one clear error."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ForgetdiagError(f"{path}: no such {what} file") from None
    except IsADirectoryError:
        raise ForgetdiagError(f"{path}: is a directory; expected a {what} file") from None
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise ForgetdiagError(f"{path}: invalid JSON in {what} ({exc})") from None


def _refuse_mixed_sources(
    limits: GateThresholds, checkpoints: list[Path], probes: list[Path], from_json: Path | None
) -> None:
    """lm-eval scores take --max-drop only: a recovery threshold or source would be ignored."""
    given = [f"--{name.replace('_', '-')}" for name, v in vars(limits).items() if v is not None]
    given += ["BEFORE AFTER"] * bool(checkpoints) + ["--probe"] * bool(probes)
    given += ["--from-json"] * (from_json is not None)
    if given:
        raise ForgetdiagError(
            f"{', '.join(given)} cannot be combined with --lm-eval-before/"
            "--lm-eval-after (lm-eval scores are gated by --max-drop only); "
            "gate the recovery probe in a separate `forgetdiag gate` run"
        )


@command(app, "gate")
@with_runtime(probe_fields=True)
def gate_cmd(
    checkpoints: Annotated[
        list[Path] | None,
        typer.Argument(help="BEFORE and AFTER checkpoints (to run the recovery probe).", show_default=False),
    ] = None,
    probe: Annotated[
        list[Path] | None,
        Opt(
            "--probe",
            help="The old task's probe (with BEFORE AFTER); repeatable: every threshold must hold on each probe.",
            show_default=False,
        ),
    ] = None,
    control: ControlOpt = None,
    recovery_probe: RecoveryProbeOpt = None,
    from_json: Annotated[
        PathOpt,
        Opt(
            "--from-json",
            help="Use the numbers of an earlier `recover --json` (or report/gate --json) instead of running it.",
            show_default=False,
        ),
    ] = None,
    max_alignment_loss: Annotated[
        float | None,
        Opt(
            "--max-alignment-loss",
            help="Fail when recovered - after accuracy exceeds this (alignment undone).",
            show_default=False,
        ),
    ] = None,
    max_knowledge_loss: Annotated[
        float | None,
        Opt(
            "--max-knowledge-loss",
            help="Fail when before - recovered accuracy exceeds this (knowledge gone).",
            show_default=False,
        ),
    ] = None,
    min_accuracy: Annotated[
        float | None,
        Opt(
            "--min-accuracy",
            help="Fail when the old task's accuracy after fine-tuning is below this.",
            show_default=False,
        ),
    ] = None,
    max_forgetting: Annotated[
        float | None,
        Opt("--max-forgetting", help="Fail when before - after accuracy exceeds this.", show_default=False),
    ] = None,
    lm_eval_before: Annotated[
        PathOpt,
        Opt(
            "--lm-eval-before",
            help="lm-evaluation-harness results JSON of the model before fine-tuning.",
            show_default=False,
        ),
    ] = None,
    lm_eval_after: Annotated[
        PathOpt,
        Opt("--lm-eval-after", help="lm-evaluation-harness results JSON after fine-tuning.", show_default=False),
    ] = None,
    max_drop: Annotated[
        float | None,
        Opt(
            "--max-drop",
            help="With --lm-eval-*: fail a metric that worsens by more than this (its higher_is_better decides the direction).",
            show_default=False,
        ),
    ] = None,
    sigmas: Annotated[
        float, Opt("--sigmas", help="With --lm-eval-*: also allow this many combined standard errors of drop.")
    ] = 0.0,
    lm_eval_task: Annotated[
        list[str] | None,
        Opt("--lm-eval-task", help="With --lm-eval-*: only these tasks (repeatable).", show_default=False),
    ] = None,
    lm_eval_metric: Annotated[
        list[str] | None,
        Opt(
            "--lm-eval-metric", help="With --lm-eval-*: only these metrics, e.g. acc (repeatable).", show_default=False
        ),
    ] = None,
    summary_md: Annotated[
        PathOpt,
        Opt("--summary-md", help="Write a Markdown summary (e.g. to $GITHUB_STEP_SUMMARY).", show_default=False),
    ] = None,
    json_path: JsonOpt = None,
    shots: ShotsOpt = None,
    n_eval: EvalOpt = None,
    lr: LrOpt = None,
    lora: LoraOpt = False,
    metric: MetricOpt = None,
    seed: SeedOpt = 0,
    quiet: QuietOpt = False,
    runtime: Runtime = None,
    fields: ProbeFields = None,
) -> None:
    """Gate a CI job on the old task: exit 0 when every threshold holds, 1 when one is broken, 2 on bad input.

    Three sources of numbers, one per run: BEFORE AFTER --probe (runs the recovery probe; repeat
    --probe to hold every threshold on each old task), --from-json (a saved `recover --json`), or
    --lm-eval-before/--lm-eval-after (lm-evaluation-harness results, gated by --max-drop).
    """
    checkpoints, probes = checkpoints or [], probe or []
    limits = GateThresholds(max_alignment_loss, max_knowledge_loss, min_accuracy, max_forgetting)
    guard_outputs(
        {"--json": json_path, "--summary-md": summary_md},
        [
            *checkpoints,
            *probes,
            control,
            recovery_probe,
            from_json,
            lm_eval_before,
            lm_eval_after,
            runtime.base,
            runtime.tokenizer,
        ],
    )
    from forgetdiag.analyses.gate import gate_by_recovery, gate_lm_eval, gate_recovery, probe_names
    from forgetdiag.render.gate import failure_lines, gate_markdown, gate_table

    if lm_eval_before or lm_eval_after:
        _refuse_mixed_sources(limits, checkpoints, probes, from_json)
        if not (lm_eval_before and lm_eval_after) or max_drop is None:
            raise ForgetdiagError("lm-eval gating needs --lm-eval-before, --lm-eval-after and --max-drop")
        result = gate_lm_eval(
            read_json(lm_eval_before, "lm-eval results"),
            read_json(lm_eval_after, "lm-eval results"),
            max_drop=max_drop,
            sigmas=sigmas,
            tasks=tuple(lm_eval_task or ()),
            metrics=tuple(lm_eval_metric or ()),
            names=(str(lm_eval_before), str(lm_eval_after)),
        )
    elif lm_only := [
        name
        for name, given in (
            ("--max-drop", max_drop is not None),
            ("--sigmas", sigmas != 0.0),
            ("--lm-eval-task", bool(lm_eval_task)),
            ("--lm-eval-metric", bool(lm_eval_metric)),
        )
        if given
    ]:
        raise ForgetdiagError(
            f"options for lm-eval scores only ({', '.join(lm_only)}); give "
            "--lm-eval-before and --lm-eval-after, or leave them out"
        )
    elif from_json is not None:
        limits.require_one()
        result = gate_recovery(read_json(from_json, "recover JSON"), limits, source=str(from_json))
    elif len(checkpoints) == 2 and probes:
        settings = RecoverySettings(shots=shots, n_eval=n_eval, lr=lr, lora=lora, metric=metric, seed=seed)
        limits.require_one()
        loaded = {name: load_probe(path, fields=fields) for name, path in zip(probe_names(probes), probes)}
        rec = load_probe(recovery_probe, fields=fields) if recovery_probe else None
        before, after = checkpoints
        with progress_bar(quiet) as progress:
            result = gate_by_recovery(
                before,
                after,
                loaded,
                limits,
                control=control,
                recovery_probe=rec,
                settings=settings,
                runtime=runtime,
                progress=progress,
                warn=warn,
            )
    else:
        raise ForgetdiagError(
            "expected BEFORE AFTER --probe FILE, --from-json FILE, or "
            f"--lm-eval-before/--lm-eval-after; found {len(checkpoints)} "
            f"checkpoints and {len(probes) or 'no'} probe(s)"
        )
    if summary_md is not None:
        write_atomic(summary_md, gate_markdown(result))
    emit(result, json=json_path, table=gate_table)
    if not result.passed:
        for line in failure_lines(result):
            stderr.print(f"forgetdiag: threshold broken: {line}", soft_wrap=True, highlight=False)
        raise typer.Exit(EXIT_THRESHOLD)
