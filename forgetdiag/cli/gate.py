"""``forgetdiag gate``: fail a CI job when fine-tuning broke an old ability."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, List, Optional

import typer

from forgetdiag.analyses.gate import GateResult, GateThresholds, gate_lm_eval, gate_probes, gate_recovery
from forgetdiag.cli.app import app
from forgetdiag.cli.common import (JsonOpt, ModelOptions, QuietOpt, SeedOpt, command, model_options,
                                   print_renderable, stderr)
from forgetdiag.cli.recover import (ControlOpt, EvalOpt, LrOpt, LoraOpt, RecoveryProbeOpt,
                                    ShotsOpt, run_recover)
from forgetdiag.errors import EXIT_THRESHOLD, ForgetdiagError
from forgetdiag.render.gate import failure_lines, gate_markdown, gate_table
from forgetdiag.render.output import STDOUT, guard_outputs, write_atomic, write_json

Opt = typer.Option
PathOpt = Optional[Path]


def _read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ForgetdiagError(f"{path}: no such {what} file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ForgetdiagError(f"{path}: invalid JSON in {what} ({exc})") from None


def _refuse_mixed_sources(limits: GateThresholds, checkpoints: list[Path], probes: list[Path],
                          from_json: Path | None) -> None:
    """lm-eval scores take --max-drop only: a recovery threshold or source would be ignored."""
    given = [f"--{name.replace('_', '-')}" for name, v in vars(limits).items() if v is not None]
    given += ["BEFORE AFTER"] * bool(checkpoints) + ["--probe"] * bool(probes)
    given += ["--from-json"] * (from_json is not None)
    if given:
        raise ForgetdiagError(f"{', '.join(given)} cannot be combined with --lm-eval-before/"
                              "--lm-eval-after (lm-eval scores are gated by --max-drop only); "
                              "gate the recovery probe in a separate `forgetdiag gate` run")


def _probe_names(probes: list[Path]) -> list[str]:
    """File stems, or the paths as given when two stems coincide."""
    stems = [p.stem for p in probes]
    return stems if len(set(stems)) == len(stems) else [str(p) for p in probes]


def _gate_by_recovery(checkpoints: list[Path], probes: list[Path], limits: GateThresholds, *,
                      control: Path | None, recovery_probe: Path | None, settings: dict,
                      options: ModelOptions, quiet: bool) -> GateResult:
    """Run the recovery probe BEFORE -> AFTER on each probe, then apply ``limits`` to each."""
    if not limits.any():  # fail before the expensive part
        gate_recovery({"accuracy": {"after": None}}, limits)
    if recovery_probe is not None and len(probes) > 1:
        raise ForgetdiagError(f"--recovery-probe pairs with one --probe; found {len(probes)} probes "
                              "(gate each probe with its recovery probe in its own run)")
    loaded = [options.probe(path) for path in probes]  # a bad file fails before any recovery
    before, after = checkpoints
    numbers = {name: run_recover(before, [after], probe, control=control, recovery_probe=recovery_probe,
                                 quiet=quiet, settings=settings, thresholds={}, options=options).to_dict()
               for name, probe in zip(_probe_names(probes), loaded)}
    return gate_probes(numbers, limits, source=f"recover {before} -> {after}")


@command(app, "gate")
@model_options
def gate_cmd(
    checkpoints: Annotated[Optional[List[Path]], typer.Argument(help="BEFORE and AFTER checkpoints (to run the recovery probe).", show_default=False)] = None,
    probe: Annotated[Optional[List[Path]], Opt("--probe", help="The old task's probe (with BEFORE AFTER); repeatable: every threshold must hold on each probe.", show_default=False)] = None,
    control: ControlOpt = None,
    recovery_probe: RecoveryProbeOpt = None,
    from_json: Annotated[PathOpt, Opt("--from-json", help="Use the numbers of an earlier `recover --json` instead of running it.", show_default=False)] = None,
    max_alignment_loss: Annotated[Optional[float], Opt("--max-alignment-loss", help="Fail when recovered - after accuracy exceeds this (alignment undone).", show_default=False)] = None,
    max_knowledge_loss: Annotated[Optional[float], Opt("--max-knowledge-loss", help="Fail when before - recovered accuracy exceeds this (knowledge gone).", show_default=False)] = None,
    min_accuracy: Annotated[Optional[float], Opt("--min-accuracy", help="Fail when the old task's accuracy after fine-tuning is below this.", show_default=False)] = None,
    max_forgetting: Annotated[Optional[float], Opt("--max-forgetting", help="Fail when before - after accuracy exceeds this.", show_default=False)] = None,
    lm_eval_before: Annotated[PathOpt, Opt("--lm-eval-before", help="lm-evaluation-harness results JSON of the model before fine-tuning.", show_default=False)] = None,
    lm_eval_after: Annotated[PathOpt, Opt("--lm-eval-after", help="lm-evaluation-harness results JSON after fine-tuning.", show_default=False)] = None,
    max_drop: Annotated[Optional[float], Opt("--max-drop", help="With --lm-eval-*: fail a metric that worsens by more than this (its higher_is_better decides the direction).", show_default=False)] = None,
    sigmas: Annotated[float, Opt("--sigmas", help="With --lm-eval-*: also allow this many combined standard errors of drop.")] = 0.0,
    task: Annotated[Optional[List[str]], Opt("--task", help="With --lm-eval-*: only these tasks (repeatable).", show_default=False)] = None,
    metric: Annotated[Optional[List[str]], Opt("--metric", help="With --lm-eval-*: only these metrics, e.g. acc (repeatable).", show_default=False)] = None,
    summary_md: Annotated[PathOpt, Opt("--summary-md", help="Write a Markdown summary (e.g. to $GITHUB_STEP_SUMMARY).", show_default=False)] = None,
    json_path: JsonOpt = None,
    shots: ShotsOpt = None,
    n_eval: EvalOpt = None,
    lr: LrOpt = None,
    lora: LoraOpt = False,
    seed: SeedOpt = 0,
    options: ModelOptions = None,
    quiet: QuietOpt = False,
) -> None:
    """Gate a CI job on the old task: exit 0 when every threshold holds, 1 when one is broken, 2 on bad input.

    Three sources of numbers, one per run: BEFORE AFTER --probe (runs the recovery probe; repeat
    --probe to hold every threshold on each old task), --from-json (a saved `recover --json`), or
    --lm-eval-before/--lm-eval-after (lm-evaluation-harness results, gated by --max-drop).
    """
    checkpoints, probes = checkpoints or [], probe or []
    guard_outputs([json_path, summary_md], checkpoints)
    limits = GateThresholds(max_alignment_loss, max_knowledge_loss, min_accuracy, max_forgetting)
    if lm_eval_before or lm_eval_after:
        _refuse_mixed_sources(limits, checkpoints, probes, from_json)
        if not (lm_eval_before and lm_eval_after) or max_drop is None:
            raise ForgetdiagError("lm-eval gating needs --lm-eval-before, --lm-eval-after and --max-drop")
        result = gate_lm_eval(_read_json(lm_eval_before, "lm-eval results"),
                              _read_json(lm_eval_after, "lm-eval results"), max_drop=max_drop,
                              sigmas=sigmas, tasks=tuple(task or ()), metrics=tuple(metric or ()),
                              names=(str(lm_eval_before), str(lm_eval_after)))
    elif lm_only := [name for name, given in (("--max-drop", max_drop is not None), ("--sigmas", sigmas != 0.0),
                                              ("--task", bool(task)), ("--metric", bool(metric))) if given]:
        raise ForgetdiagError(f"options for lm-eval scores only ({', '.join(lm_only)}); give "
                              "--lm-eval-before and --lm-eval-after, or leave them out")
    elif from_json is not None:
        result = gate_recovery(_read_json(from_json, "recover JSON"), limits, source=str(from_json))
    elif len(checkpoints) == 2 and probes:
        settings = dict(shots=shots, n_eval=n_eval, lr=lr, lora=lora, seed=seed, metric="exact_match")
        result = _gate_by_recovery(checkpoints, probes, limits, control=control,
                                   recovery_probe=recovery_probe, settings=settings,
                                   options=options, quiet=quiet)
    else:
        raise ForgetdiagError("expected BEFORE AFTER --probe FILE, --from-json FILE, or "
                              f"--lm-eval-before/--lm-eval-after; found {len(checkpoints)} "
                              f"checkpoints and {len(probes) or 'no'} probe(s)")
    if json_path is not None:
        write_json(json_path, result.to_dict())
    if summary_md is not None:
        write_atomic(summary_md, gate_markdown(result))
    print_renderable(gate_table(result), json_to_stdout=str(json_path) == STDOUT)
    if not result.passed:
        for line in failure_lines(result):
            stderr.print(f"forgetdiag: threshold broken: {line}", soft_wrap=True, highlight=False)
        raise typer.Exit(EXIT_THRESHOLD)
