"""CI gating: do the old task's numbers after fine-tuning stay within thresholds?

Sources of numbers:

* a recovery probe (:class:`~forgetdiag.analyses.recovery.RecoveryResult`, or the JSON that
  ``forgetdiag recover --json`` / ``report --json`` wrote): accuracy after, alignment loss,
  knowledge loss, forgetting;
* scores from elsewhere: two lm-evaluation-harness results files (before and after), whose
  ``higher_is_better`` says which way each metric is good and whose ``*_stderr`` give the noise.

Each threshold becomes a :class:`Check`; the gate passes when every check does.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Mapping

from forgetdiag.errors import ForgetdiagError


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
class GateResult:
    """All checks of a gate run; ``passed`` when every check holds."""

    checks: tuple[Check, ...]
    source: str
    notes: tuple[str, ...] = ()
    numbers: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    @property
    def failed(self) -> tuple[Check, ...]:
        return tuple(c for c in self.checks if not c.passed)

    def to_dict(self) -> dict:
        return {"passed": self.passed, "source": self.source,
                "checks": [asdict(c) for c in self.checks], "numbers": self.numbers,
                "notes": list(self.notes)}


@dataclass(frozen=True)
class GateThresholds:
    """Thresholds on a recovery probe's numbers (None: not checked)."""

    max_alignment_loss: float | None = None
    max_knowledge_loss: float | None = None
    min_accuracy: float | None = None
    max_forgetting: float | None = None

    def any(self) -> bool:
        return any(v is not None for v in asdict(self).values())


def _check(name: str, value: float | None, op: str, threshold: float, detail: str = "") -> Check:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return Check(name, float("nan"), op, threshold, False, "not measured")
    passed = value <= threshold if op == "<=" else value >= threshold
    return Check(name, float(value), op, threshold, passed, detail)


def gate_recovery(numbers: Mapping[str, Any], thresholds: GateThresholds, *,
                  source: str = "recover") -> GateResult:
    """Apply ``thresholds`` to the numbers of a recovery probe.

    Args:
        numbers: a ``RecoveryResult.to_dict()`` (or a recover/report JSON): it needs
            ``accuracy.after``, ``alignment_loss``, ``knowledge_loss``, ``forgetting`` and
            ``noise_floor``.
        thresholds: the limits; at least one must be set.
    """
    if not thresholds.any():
        raise ForgetdiagError("no threshold given; expected at least one of --max-alignment-loss, "
                              "--max-knowledge-loss, --min-accuracy, --max-forgetting")
    try:
        after = numbers["accuracy"]["after"]
        floor = numbers.get("noise_floor")
    except (KeyError, TypeError):
        raise ForgetdiagError(f"{source}: expected the JSON of `forgetdiag recover --json` "
                              "(with accuracy.after, alignment_loss, knowledge_loss)") from None
    noise = f"noise floor {floor:.3f}" if isinstance(floor, (int, float)) else ""
    checks = []
    t = thresholds
    if t.max_alignment_loss is not None:
        checks.append(_check("alignment loss", numbers.get("alignment_loss"), "<=", t.max_alignment_loss, noise))
    if t.max_knowledge_loss is not None:
        checks.append(_check("knowledge loss", numbers.get("knowledge_loss"), "<=", t.max_knowledge_loss, noise))
    if t.max_forgetting is not None:
        checks.append(_check("forgetting", numbers.get("forgetting"), "<=", t.max_forgetting, noise))
    if t.min_accuracy is not None:
        checks.append(_check("accuracy after", after, ">=", t.min_accuracy))
    kept = {k: numbers.get(k) for k in ("verdict", "accuracy", "forgetting", "alignment_loss",
                                         "knowledge_loss", "spurious_fraction", "noise_floor", "n_eval")}
    return GateResult(tuple(checks), source, numbers=kept)


def gate_probes(numbers: Mapping[str, Mapping[str, Any]], thresholds: GateThresholds, *,
                source: str = "recover") -> GateResult:
    """Apply ``thresholds`` to the recovery numbers of every probe; pass when all hold on each.

    Args:
        numbers: probe name -> its recovery numbers (as for :func:`gate_recovery`).
        thresholds: the limits, applied to each probe alike.

    Returns:
        For one probe, :func:`gate_recovery`'s result. For several, every check is named after
        its probe (``"old: knowledge loss"``), ``numbers`` holds ``{"probes": {name: ...}}`` and
        each probe's recovery verdict becomes a note.
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
    return GateResult(tuple(checks), source, tuple(notes), {"probes": kept})


def lm_eval_scores(results: Mapping[str, Any], where: str) -> dict[tuple[str, str], dict[str, Any]]:
    """``(task, metric key) -> {value, stderr, higher_is_better}`` from an lm-eval results JSON.

    Metric keys keep their filter (``acc,none``); ``higher_is_better`` is looked up by the metric
    name without the filter; metrics it does not cover are left out.
    """
    if not isinstance(results, Mapping) or not isinstance(results.get("results"), Mapping):
        raise ForgetdiagError(f"{where}: expected an lm-evaluation-harness results JSON with a "
                              "'results' object")
    hib = results.get("higher_is_better") or {}
    scores = {}
    for task, metrics in results["results"].items():
        if not isinstance(metrics, Mapping):
            continue
        for key, value in metrics.items():
            name, _, filt = key.partition(",")
            if name.endswith("_stderr") or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            better = (hib.get(task) or {}).get(name)
            if better is None:
                continue
            stderr = metrics.get(f"{name}_stderr,{filt}" if filt else f"{name}_stderr")
            stderr = float(stderr) if isinstance(stderr, (int, float)) and not isinstance(stderr, bool) else None
            scores[(task, key)] = {"value": float(value), "stderr": stderr, "higher_is_better": bool(better)}
    return scores


def gate_lm_eval(before: Mapping[str, Any], after: Mapping[str, Any], *, max_drop: float,
                 sigmas: float = 0.0, tasks: tuple[str, ...] = (), metrics: tuple[str, ...] = (),
                 names: tuple[str, str] = ("before", "after")) -> GateResult:
    """Fail any metric whose worsening from ``before`` to ``after`` exceeds ``max_drop``.

    A worsening is ``before - after`` for higher-is-better metrics and ``after - before``
    otherwise. With ``sigmas`` > 0 the allowed drop grows by ``sigmas`` combined standard errors
    (``sqrt(se_before^2 + se_after^2)``), so noise alone does not fail a job.
    """
    a, b = lm_eval_scores(before, names[0]), lm_eval_scores(after, names[1])
    keys = [k for k in a if k in b and (not tasks or k[0] in tasks)
            and (not metrics or k[1].partition(",")[0] in metrics)]
    if not keys:
        raise ForgetdiagError(f"{names[0]} and {names[1]}: no task metric with a known "
                              "higher_is_better appears in both results files"
                              + (" for the chosen --task/--metric" if tasks or metrics else ""))
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
    return GateResult(tuple(checks), f"lm-eval: {names[0]} vs {names[1]}", tuple(notes))
