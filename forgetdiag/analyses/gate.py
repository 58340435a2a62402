"""CI gating: do the old task's numbers after fine-tuning stay within thresholds?

Sources of numbers:

* a recovery probe (:class:`~forgetdiag.analyses.recovery_result.RecoveryResult`, run here by
  :func:`gate_by_recovery`, or the JSON that ``recover --json``, ``report --json`` or an earlier
  ``gate --json`` wrote, read into :class:`RecoveryNumbers`): accuracy after, alignment loss,
  knowledge loss, forgetting;
* scores from elsewhere: two lm-evaluation-harness results files (before and after), whose
  ``higher_is_better`` says which way each metric is good and whose ``*_stderr`` give the noise.

Each threshold becomes a :class:`Check`; the gate passes when every check does.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from forgetdiag.analyses.recovery import RecoverySettings, recover
from forgetdiag.analyses.recovery_result import RecoveryResult
from forgetdiag.errors import ForgetdiagError
from forgetdiag.probes import Probe
from forgetdiag.results import Result
from forgetdiag.runtime import ProgressFn, Runtime, Warn
from forgetdiag.settings import GateThresholds
from forgetdiag.validate import check_number


@dataclass(frozen=True)
class Check:
    """One threshold applied to one number."""

    name: str
    value: float
    op: str  # "<=" or ">="
    threshold: float
    passed: bool
    detail: str = ""


@dataclass(frozen=True)
class GateResult(Result):
    """All checks of a gate run; ``passed`` when every check holds."""

    analysis = "gate"
    checks: tuple[Check, ...]
    source: str
    numbers: dict[str, Any] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    @property
    def failed(self) -> tuple[Check, ...]:
        return tuple(c for c in self.checks if not c.passed)

    def summary(self) -> str:
        if self.passed:
            return f"passed: all {len(self.checks)} thresholds hold ({self.source})"
        broken = ", ".join(f"{c.name} {c.value:.4g} breaks {c.op} {c.threshold:g}" for c in self.failed)
        return f"failed: {len(self.failed)} of {len(self.checks)} thresholds broken ({broken})"

    def body(self) -> dict:
        return {
            "passed": self.passed,
            "source": self.source,
            "checks": [asdict(c) for c in self.checks],
            "numbers": self.numbers,
        }


@dataclass(frozen=True)
class RecoveryNumbers:
    """The numbers a recovery gate checks, from a :class:`RecoveryResult` or its saved JSON."""

    accuracy: dict[str, float | None]
    forgetting: float | None
    alignment_loss: float | None
    knowledge_loss: float | None
    spurious_fraction: float | None
    p_value: float | None
    intervals: dict[str, tuple[float, float]]
    verdict: str | None
    n_eval: int | None

    @classmethod
    def from_result(cls, result: RecoveryResult) -> RecoveryNumbers:
        return cls.from_json(result.to_dict(), "recover")

    @classmethod
    def from_json(cls, data: Any, source: str) -> RecoveryNumbers:
        """From ``recover --json`` (or the ``recover`` part of ``report --json``, or the
        ``numbers`` of a one-probe ``gate --json``); numbers must be numbers."""
        expected = (
            f"{source}: expected the JSON of `forgetdiag recover --json` (or report/gate "
            "--json), with accuracy.after, alignment_loss, knowledge_loss"
        )
        if isinstance(data, Mapping) and data.get("analysis") == "report":
            data = data.get("recover")
        elif isinstance(data, Mapping) and data.get("analysis") == "gate":
            data = data.get("numbers")
        if not isinstance(data, Mapping) or not isinstance(data.get("accuracy"), Mapping):
            raise ForgetdiagError(expected)
        accuracy = {str(k): _number(v, f"{source}: accuracy.{k}") for k, v in data["accuracy"].items()}
        if "after" not in accuracy:
            raise ForgetdiagError(expected)
        verdict = data.get("verdict")
        n_eval = data.get("n_eval")
        if n_eval is not None and (isinstance(n_eval, bool) or not isinstance(n_eval, int)):
            raise ForgetdiagError(f"{source}: n_eval must be an integer, found {n_eval!r}")
        intervals = data.get("intervals") or {}
        if not isinstance(intervals, Mapping):
            raise ForgetdiagError(f"{source}: intervals must be an object of [low, high] pairs")
        pairs = {}
        for name, pair in intervals.items():
            if not isinstance(pair, (list, tuple)) or len(pair) != 2:
                raise ForgetdiagError(f"{source}: intervals.{name} must be [low, high], found {pair!r}")
            pairs[str(name)] = tuple(_number(v, f"{source}: intervals.{name}") for v in pair)
        return cls(
            accuracy,
            *(
                _number(data.get(k), f"{source}: {k}")
                for k in ("forgetting", "alignment_loss", "knowledge_loss", "spurious_fraction", "p_value")
            ),
            pairs,
            verdict if isinstance(verdict, str) else None,
            n_eval,
        )

    def to_dict(self) -> dict:
        return asdict(self)


def _number(value: Any, where: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ForgetdiagError(f"{where} must be a number or null, found {value!r}")
    return float(value)


def _check(name: str, value: float | None, op: str, threshold: float, detail: str = "") -> Check:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return Check(name, float("nan"), op, threshold, False, "not measured")
    passed = value <= threshold if op == "<=" else value >= threshold
    return Check(name, float(value), op, threshold, passed, detail)


def gate_recovery(
    numbers: RecoveryResult | RecoveryNumbers | Mapping[str, Any],
    thresholds: GateThresholds,
    *,
    source: str = "recover",
) -> GateResult:
    """Apply ``thresholds`` to the numbers of a recovery probe.

    Args:
        numbers: a :class:`RecoveryResult`, :class:`RecoveryNumbers`, or saved JSON (recover,
            report or gate ``--json``).
        thresholds: the limits; at least one must be set.
    """
    thresholds.require_one()
    if isinstance(numbers, Mapping):
        numbers = RecoveryNumbers.from_json(numbers, source)
    elif not isinstance(numbers, RecoveryNumbers):
        numbers = RecoveryNumbers.from_result(numbers)
    t, n = thresholds, numbers

    def spread(name: str) -> str:  # the check's 95% interval, shown next to it
        low, high = n.intervals.get(name, (None, None))
        return "" if low is None or high is None else f"95% interval {low:.3f} to {high:.3f}"

    checks = []
    if t.max_alignment_loss is not None:
        checks.append(_check("alignment loss", n.alignment_loss, "<=", t.max_alignment_loss, spread("alignment_loss")))
    if t.max_knowledge_loss is not None:
        checks.append(_check("knowledge loss", n.knowledge_loss, "<=", t.max_knowledge_loss, spread("knowledge_loss")))
    if t.max_forgetting is not None:
        checks.append(_check("forgetting", n.forgetting, "<=", t.max_forgetting, spread("forgetting")))
    if t.min_accuracy is not None:
        checks.append(_check("accuracy after", n.accuracy.get("after"), ">=", t.min_accuracy))
    return GateResult(tuple(checks), source, numbers=n.to_dict())


def gate_probes(
    numbers: Mapping[str, RecoveryResult | RecoveryNumbers | Mapping[str, Any]],
    thresholds: GateThresholds,
    *,
    source: str = "recover",
) -> GateResult:
    """Apply ``thresholds`` to the recovery numbers of every probe; pass when all hold on each.

    Returns:
        For one probe, :func:`gate_recovery`'s result. For several, every check is named after
        its probe (``"old: knowledge loss"``), ``numbers`` holds ``{"probes": {name: ...}}`` and
        each probe's recovery verdict becomes a warning line.
    """
    if len(numbers) == 1:
        ((name, one),) = numbers.items()
        return gate_recovery(one, thresholds, source=source)
    checks, notes, kept = [], [], {}
    for name, one in numbers.items():
        result = gate_recovery(one, thresholds, source=name)
        checks += [replace(c, name=f"{name}: {c.name}") for c in result.checks]
        kept[name] = result.numbers
        if result.numbers.get("verdict"):
            notes.append(f"{name}: recovery verdict {result.numbers['verdict']}")
    return GateResult(tuple(checks), source, {"probes": kept}, tuple(notes))


def gate_by_recovery(
    before,
    after,
    probes: Mapping[str, Probe],
    thresholds: GateThresholds,
    *,
    control=None,
    recovery_probe: Probe | None = None,
    settings: RecoverySettings = RecoverySettings(),
    runtime: Runtime = Runtime(),
    progress: ProgressFn | None = None,
    warn: Warn | None = None,
) -> GateResult:
    """Run the recovery probe BEFORE -> AFTER on each probe, then apply ``thresholds`` to each.

    Args:
        before, after: one checkpoint each (paths or Checkpoint objects).
        probes: name -> the old task's probe; every threshold must hold on each.
        recovery_probe: recovery examples in their own file (only with a single probe).
        settings, runtime: the recovery budget and how models run.
    """
    thresholds.require_one()  # fail before the expensive part
    if recovery_probe is not None and len(probes) > 1:
        raise ForgetdiagError(
            f"--recovery-probe pairs with one --probe; found {len(probes)} probes "
            "(gate each probe with its recovery probe in its own run)"
        )
    results = {
        name: recover(
            before,
            [after],
            probe,
            control=control,
            recovery_probe=recovery_probe,
            settings=settings,
            runtime=runtime,
            progress=progress,
            warn=warn,
        )
        for name, probe in probes.items()
    }
    gated = gate_probes(results, thresholds, source=f"recover {before} -> {after}")
    timings: dict[str, float] = {}
    for name, r in results.items():
        for phase, seconds in r.timings.items():
            timings[phase] = timings.get(phase, 0.0) + seconds
        if not r.decision.supported and warn is not None:
            warn(f"{name}: {r.decision.reason}" if len(results) > 1 else r.decision.reason)
    return replace(gated, timings=timings)


def probe_names(paths: Sequence[str | Path]) -> list[str]:
    """File stems, or the paths as given when two stems coincide."""
    stems = [Path(p).stem for p in paths]
    return stems if len(set(stems)) == len(stems) else [str(p) for p in paths]


def lm_eval_scores(results: Mapping[str, Any], where: str) -> dict[tuple[str, str], dict[str, Any]]:
    """``(task, metric key) -> {value, stderr, higher_is_better}`` from an lm-eval results JSON.

    Metric keys keep their filter (``acc,none``); ``higher_is_better`` is looked up by the metric
    name without the filter and must be a JSON boolean; metrics it does not cover are left out.
    """
    if not isinstance(results, Mapping) or not isinstance(results.get("results"), Mapping):
        raise ForgetdiagError(f"{where}: expected an lm-evaluation-harness results JSON with a 'results' object")
    hib = results.get("higher_is_better") or {}
    if not isinstance(hib, Mapping):
        raise ForgetdiagError(f"{where}: 'higher_is_better' must be an object of tasks")
    scores = {}
    for task, metrics in results["results"].items():
        if not isinstance(metrics, Mapping):
            continue
        for key, value in metrics.items():
            name, _, filt = key.partition(",")
            if name.endswith("_stderr") or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            better = (hib.get(task) or {}).get(name) if isinstance(hib.get(task) or {}, Mapping) else None
            if better is None:
                continue
            if not isinstance(better, bool):
                raise ForgetdiagError(
                    f"{where}: higher_is_better.{task}.{name} must be true or false, found {better!r}"
                )
            stderr = metrics.get(f"{name}_stderr,{filt}" if filt else f"{name}_stderr")
            stderr = float(stderr) if isinstance(stderr, (int, float)) and not isinstance(stderr, bool) else None
            scores[(task, key)] = {"value": float(value), "stderr": stderr, "higher_is_better": better}
    return scores


def gate_lm_eval(
    before: Mapping[str, Any],
    after: Mapping[str, Any],
    *,
    max_drop: float,
    sigmas: float = 0.0,
    tasks: tuple[str, ...] = (),
    metrics: tuple[str, ...] = (),
    names: tuple[str, str] = ("before", "after"),
) -> GateResult:
    """Fail any metric whose worsening from ``before`` to ``after`` exceeds ``max_drop``.

    A worsening is ``before - after`` for higher-is-better metrics and ``after - before``
    otherwise. With ``sigmas`` > 0 the allowed drop grows by ``sigmas`` combined standard errors
    (``sqrt(se_before^2 + se_after^2)``), so noise alone does not fail a job.
    """
    check_number("--max-drop", max_drop, low=0)
    check_number("--sigmas", sigmas, low=0)
    a, b = lm_eval_scores(before, names[0]), lm_eval_scores(after, names[1])
    keys = [
        k for k in a if k in b and (not tasks or k[0] in tasks) and (not metrics or k[1].partition(",")[0] in metrics)
    ]
    if not keys:
        raise ForgetdiagError(
            f"{names[0]} and {names[1]}: no task metric with a known "
            "higher_is_better appears in both results files"
            + (" for the chosen --lm-eval-task/--lm-eval-metric" if tasks or metrics else "")
        )
    checks, notes = [], []
    for task, key in sorted(keys):
        va, vb = a[(task, key)], b[(task, key)]
        drop = (va["value"] - vb["value"]) if va["higher_is_better"] else (vb["value"] - va["value"])
        allowed, detail = max_drop, f"{va['value']:.4g} -> {vb['value']:.4g}"
        if sigmas and va["stderr"] is not None and vb["stderr"] is not None:
            se = math.hypot(va["stderr"], vb["stderr"])
            allowed += sigmas * se
            detail += f", +{sigmas:g} x stderr {se:.3g}"
        checks.append(_check(f"{task} {key} drop", drop, "<=", allowed, detail))
    for task, key in sorted(set(a) - set(b)):
        notes.append(f"{task} {key} is in {names[0]} only")
    return GateResult(tuple(checks), f"lm-eval: {names[0]} vs {names[1]}", warnings=tuple(notes))
