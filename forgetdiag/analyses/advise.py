"""From diagnosis to remedy: how many bottom layers (plus the input embedding) to freeze.

The paper behind forgetdiag finds that spurious forgetting is carried by the bottom layers: the
first steps of a new task undo the old task's alignment there, and freezing the input embedding
and those layers during the new task keeps it (docs/science.md, "advise"). ``advise`` measures where
a run's forgetting sits and turns it into a freeze depth.

Evidence, for the run's before and after checkpoints and the old task's probe:

* revert test (the decision): the after checkpoint with the input embedding and its bottom
  ``d`` layers put back to their before weights, for d = 0, 1, ...; the old task's greedy exact
  match at each depth, and the share of the lost accuracy it restores,
  ``(acc_d - acc_after) / (acc_before - acc_after)``. Freezing those parameters during the new
  task keeps them at exactly these before weights, so a depth that restores the old answers
  here is a depth whose freeze can keep them;
* angles (context): per layer, the mean per-direction angle between the run's early update
  (origin -> x end of the landscape triple) and its late one (x end -> y end), over the layer's
  weight matrices, divided by the angle of unrelated subspaces (1.0 = as unrelated as chance);
* features (context): the principal-subspace shift and CKA of the hidden states after each
  layer between before and after, and where the shift starts.

Advice: the smallest depth ``d`` (at most ``max_share`` of the layers) whose revert restores at
least ``restore_min`` of the lost accuracy: freeze the input embedding and layers 0 .. d-1. No
advice when the after checkpoint did not lose accuracy beyond the evaluation's noise, or when
no such depth exists (the forgetting is not held by the bottom layers; freezing them would not
prevent it).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace

from forgetdiag.analyses.freeze_code import code_snippets, frozen_parameters
from forgetdiag.analyses.revert import restore_intervals, revert_series
from forgetdiag.analyses.verdict import wilson_interval
from forgetdiag.checkpoints import resolve_checkpoints
from forgetdiag.errors import ForgetdiagError, ProbeError
from forgetdiag.models import shared_tokenizer, tokenize_probe
from forgetdiag.probes import Probe, split_probe
from forgetdiag.results import Result, Timings
from forgetdiag.runfile import RunSpec, landscape_triple
from forgetdiag.runtime import ProgressFn, Runtime, Warn
from forgetdiag.settings import AdviceSettings
from forgetdiag.streaming import check_sequence

EMBEDDING = -1  # the input embedding's row in the evidence


@dataclass(frozen=True)
class LayerEvidence:
    """What one depth shows (``layer`` = -1 for the input embedding).

    ``reverted_accuracy`` is the old task's exact match with the embedding and every layer up
    to this one put back to the before weights; ``restored`` its share of the lost accuracy.
    """

    layer: int
    reverted_accuracy: float | None = None
    reverted_loss: float | None = None
    restored: float | None = None
    restored_interval: tuple[float, float] | None = None  # 95%, paired bootstrap over items
    angle_deg: float | None = None
    baseline_deg: float | None = None
    departure: float | None = None
    pc_shift_deg: float | None = None
    cka: float | None = None
    frozen: bool = False


@dataclass(frozen=True)
class Advice(Result):
    """The advice, the evidence behind it, and ready-to-paste code."""

    analysis = "advise"
    freeze_layers: int | None  # None: no advice
    freeze_embedding: bool
    n_layers: int
    before: str
    after: str
    probe: str
    n_eval: int
    accuracy_before: float
    accuracy_after: float
    noise_floor: float
    drop_p_value: float
    evidence: tuple[LayerEvidence, ...]
    reason: str
    shift_start: int | None = None
    frozen_names: tuple[str, ...] = ()
    frozen_params: int = 0
    total_params: int = 0
    code: dict[str, str] = field(default_factory=dict)
    settings: AdviceSettings = AdviceSettings()
    warnings: tuple[str, ...] = ()
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def advised(self) -> bool:
        return self.freeze_layers is not None

    def summary(self) -> str:
        if not self.advised:
            return f"no freeze advised: {self.reason}"
        row = next((e for e in self.evidence if e.layer == self.freeze_layers - 1), None)
        restored = (
            ""
            if row is None or row.restored is None
            else f", which restores {100 * row.restored:.0f}% of the lost accuracy"
        )
        return (
            f"freeze the input embedding and the bottom {self.freeze_layers} of {self.n_layers} layers "
            f"during the next task: reverting them{restored} "
            f"({100 * self.accuracy_after:.1f}% -> before {100 * self.accuracy_before:.1f}%)"
        )

    def body(self) -> dict:
        return {
            "advised": self.advised,
            "freeze_layers": self.freeze_layers,
            "freeze_embedding": self.freeze_embedding,
            "n_layers": self.n_layers,
            "before": self.before,
            "after": self.after,
            "probe": self.probe,
            "n_eval": self.n_eval,
            "accuracy_before": self.accuracy_before,
            "accuracy_after": self.accuracy_after,
            "noise_floor": self.noise_floor,
            "drop_p_value": self.drop_p_value,
            "reason": self.reason,
            "shift_start": self.shift_start,
            "evidence": [asdict(e) for e in self.evidence],
            "frozen_names": list(self.frozen_names),
            "frozen_params": self.frozen_params,
            "total_params": self.total_params,
            "code": self.code,
            "settings": asdict(self.settings),
        }


def noise_floor(acc_before: float, acc_after: float, n: int, confidence: float = 0.95) -> float:
    """Smallest accuracy drop the evaluation set can tell from noise: the Wilson intervals of
    both accuracies, half-widths combined in quadrature. Kept for reference in the JSON; the
    decision uses the paired test of :mod:`.verdict` (:func:`restore_intervals`)."""
    widths = [(high - low) / 2 for low, high in (wilson_interval(a, n, confidence) for a in (acc_before, acc_after))]
    return math.hypot(*widths)


def decide_freeze(
    *,
    before: float,
    after: float,
    reverted: Sequence[float],
    n_eval: int,
    n_layers: int,
    settings: AdviceSettings = AdviceSettings(),
    p_value: float | None = None,
    intervals: Sequence[tuple[float, float]] | None = None,
) -> tuple[int | None, str]:
    """``(layers to freeze besides the embedding, or None; reason)`` from the revert test.

    Args:
        before, after: the old task's accuracy at the before and after checkpoints.
        reverted: accuracy with the embedding and the bottom d layers reverted, d = 0, 1, ...
        n_eval: evaluation items (for the noise floor when no ``p_value`` is given).
        p_value: paired (McNemar) p of the drop; the drop counts when p < 0.05.
        intervals: 95% interval of each depth's restore share; the advised depth needs its
            lower end to clear ``restore_min``, else the evidence is too weak to choose one.
    """
    lost = before - after
    floor = noise_floor(before, after, n_eval)
    if (p_value >= 0.05 or lost <= 0) if p_value is not None else lost <= floor:
        return None, (
            f"no advice: the old task did not drop beyond noise ({before:.1%} -> "
            f"{after:.1%}, noise floor {floor:.1%} on {n_eval} items); nothing to prevent"
        )
    cap = max(0, min(len(reverted) - 1, int(settings.max_share * n_layers)))
    for depth in range(cap + 1):
        share = (reverted[depth] - after) / lost
        if share >= settings.restore_min:
            low = None if intervals is None else intervals[depth][0]
            if low is not None and not low >= settings.restore_min:
                sure = [d for d in range(depth, cap + 1) if intervals[d][0] >= settings.restore_min]
                return None, (
                    f"no advice: the evidence is too weak to choose a depth; reverting depth {depth} "
                    f"restores {share:.0%} of the lost accuracy, but its 95% interval "
                    f"[{low:.0%}, {intervals[depth][1]:.0%}] reaches below {settings.restore_min:.0%}"
                    + (f" (the first depth whose interval clears it is {sure[0]})" if sure else "")
                    + "; score more items (--eval-items) to decide"
                )
            what = "the input embedding" + (f" and the bottom {depth} of {n_layers} layers" if depth else " only")
            return depth, (
                f"freeze {what}: putting them back to their before weights restores "
                f"{share:.0%} of the lost old-task accuracy ({after:.1%} -> "
                f"{reverted[depth]:.1%}; before {before:.1%})"
            )
    best = max(range(cap + 1), key=lambda d: reverted[d])
    return None, (
        f"no advice: the forgetting is not held by the bottom layers; reverting the "
        f"embedding and up to {cap} layers restores at most "
        f"{max(0.0, (reverted[best] - after) / lost):.0%} of the lost accuracy (needs "
        f"{settings.restore_min:.0%}), so freezing them would not prevent it"
    )


def angle_evidence(records: Sequence) -> dict[int, tuple[float, float]]:
    """Per depth (-1 = embedding): mean early/late angle and its mean chance baseline over the
    layer's matrices; a component's routed experts count once, by their medians (64 experts
    would otherwise outweigh the attention)."""
    by_layer: dict[int, dict[tuple, list]] = {}
    for r in records:
        if r.status != "ok" or r.angle_deg is None or r.baseline_deg is None:
            continue
        if r.layer is None and r.component != "embed":
            continue  # lm_head, position embeddings: not part of the freeze
        key = (r.component, r.param) if r.expert is None else (r.component, "experts")
        by_layer.setdefault(EMBEDDING if r.layer is None else r.layer, {}).setdefault(key, []).append(r)
    out = {}
    for layer, groups in by_layer.items():
        pairs = [
            (statistics.median(r.angle_deg for r in g), statistics.median(r.baseline_deg for r in g))
            for g in groups.values()
        ]
        out[layer] = (sum(a for a, _ in pairs) / len(pairs), sum(b for _, b in pairs) / len(pairs))
    return out


def advise(
    spec: RunSpec,
    old: Probe,
    *,
    settings: AdviceSettings = AdviceSettings(),
    runtime: Runtime = Runtime(),
    progress: ProgressFn | None = None,
    warn: Warn | None = None,
) -> Advice:
    """How many bottom layers and whether the input embedding to freeze during the next task.

    Args:
        spec: the run (``before`` and ``after`` are required; the ``landscape`` triple, else
            before, after and the last checkpoint of ``run``, gives the angles).
        old: the old task's probe.
        settings: thresholds and sizes (:class:`AdviceSettings`).
        runtime: how models run.

    Returns:
        An :class:`Advice`; ``advice.freeze_layers`` is None when the evidence does not
        support freezing (``advice.reason`` says why).

    Example:
        >>> a = advise(load_run("sample_checkpoints/spurious"),
        ...            load_probe("sample_checkpoints/probes/task0_heldout.jsonl"))  # doctest: +SKIP
        >>> a.freeze_layers, a.code["torch"]  # doctest: +SKIP
    """
    if spec.before is None or spec.after is None:
        raise ForgetdiagError(
            f"{spec.path}: advise needs a before and an after checkpoint "
            "([checkpoints] before/after in the run file, or --before/--after)"
        )
    before = resolve_checkpoints(spec.before, runtime, single="the before checkpoint")
    after = resolve_checkpoints(spec.after, runtime, single="the after checkpoint")
    check_sequence([before, after])
    n_layers = before.n_layers or 0
    if n_layers < 1:
        raise ForgetdiagError(
            f"{before.path}: no decoder layers found (config num_hidden_layers); expected a transformer checkpoint"
        )
    if old.kind == "choice":
        raise ProbeError(
            f"probe {old.name} is multiple-choice; advise's revert test scores greedy exact match: "
            "expected prompt/answer rows"
        )
    timings, notes = Timings(), []
    tokenizer = shared_tokenizer([before, after], runtime, warn=notes.append)
    evaluation = (
        old
        if len(old) <= settings.eval_items
        else split_probe(old, n_recovery=0, n_eval=settings.eval_items, seed=settings.seed)[1]
    )
    encoded, stops = tokenize_probe(tokenizer, evaluation, before, runtime, warn=warn)
    cap = max(0, int(settings.max_share * n_layers))
    with runtime.threads_for(before.n_params), timings.phase("revert"):
        b, a, series = revert_series(
            before,
            after,
            encoded,
            pad_id=tokenizer.pad_token_id,
            depths=cap,
            runtime=runtime,
            stops=stops.accepted,
            progress=progress,
        )
    reverted = [s.exact_match for s in series]
    p_value, intervals = restore_intervals(b.exact, a.exact, [s.exact for s in series], seed=settings.seed)
    depth, reason = decide_freeze(
        before=b.exact_match,
        after=a.exact_match,
        reverted=reverted,
        n_eval=b.n,
        n_layers=n_layers,
        settings=settings,
        p_value=p_value,
        intervals=intervals,
    )
    if before.tied_embeddings:
        notes.append(
            "tied embeddings: the revert test puts back the input embedding only and keeps the "
            "output head at the after weights, so the bottom rows measure the input side alone; "
            "in training, freezing the tied embedding also freezes the head"
        )
    lost = b.exact_match - a.exact_match
    rows = {EMBEDDING: LayerEvidence(EMBEDDING)} | {k: LayerEvidence(k) for k in range(n_layers)}
    for d, s in enumerate(series):
        restored = (s.exact_match - a.exact_match) / lost if lost > 0 else None
        rows[d - 1] = replace(
            rows[d - 1],
            reverted_accuracy=s.exact_match,
            reverted_loss=s.answer_loss,
            restored=restored,
            restored_interval=intervals[d] if lost > 0 else None,
        )
    shift_start = None
    if "angles" not in settings.skip:
        run = resolve_checkpoints(spec.run, runtime) if spec.run is not None else []
        triple = landscape_triple(spec, run, runtime)
        if isinstance(triple, str):
            notes.append(f"angles skipped: {triple}")
        else:
            from forgetdiag.analyses.angles import AngleSettings, compute_angles

            with timings.phase("angles"):
                angles = compute_angles(
                    triple, settings=AngleSettings(rank=settings.rank), runtime=runtime, progress=progress
                )
            for layer, (angle, baseline) in angle_evidence(angles.records).items():
                if layer in rows:
                    rows[layer] = replace(
                        rows[layer],
                        angle_deg=angle,
                        baseline_deg=baseline,
                        departure=angle / baseline if baseline > 0 else None,
                    )
    if "features" not in settings.skip:
        from forgetdiag.analyses.features import FeatureSettings, feature_shifts

        feature_start = time.perf_counter()
        prompts = (
            old
            if len(old) <= settings.feature_items
            else split_probe(old, n_recovery=0, n_eval=settings.feature_items, seed=settings.seed)[1]
        )
        shifts = feature_shifts(
            [before, after],
            prompts,
            settings=FeatureSettings(seed=settings.seed),
            runtime=runtime,
            progress=progress,
            warn=warn,
        ).pairs[0]
        shift_start = shifts.shift_start
        for s in shifts.layers:  # hidden index l > 0 is the output of decoder layer l - 1
            if s.layer - 1 in rows:
                rows[s.layer - 1] = replace(
                    rows[s.layer - 1],
                    pc_shift_deg=None if math.isnan(s.pc_shift_deg) else s.pc_shift_deg,
                    cka=None if math.isnan(s.cka) else s.cka,
                )
        timings["features"] = time.perf_counter() - feature_start
    if depth is not None:
        rows = {k: replace(e, frozen=k < depth) for k, e in rows.items()}
    evidence = tuple(rows[k] for k in sorted(rows))
    common = dict(
        n_layers=n_layers,
        before=before.label,
        after=after.label,
        probe=old.name,
        n_eval=b.n,
        accuracy_before=b.exact_match,
        accuracy_after=a.exact_match,
        noise_floor=noise_floor(b.exact_match, a.exact_match, b.n),
        drop_p_value=p_value,
        evidence=evidence,
        reason=reason,
        shift_start=shift_start,
        total_params=before.n_params,
        settings=settings,
        warnings=tuple(notes),
        timings=dict(timings),
    )
    if depth is None:
        return Advice(None, False, **common)
    names, count = frozen_parameters(after, depth, True)
    return Advice(
        depth, True, frozen_names=tuple(names), frozen_params=count, code=code_snippets(after, depth, True), **common
    )
