"""Per-layer feature shifts and principal-component shifts (docs/science.md, section 3.5).

For every hidden-state index (0 = embedding output, l = output of decoder layer l; the last
index is after the final norm, exactly as transformers' ``output_hidden_states`` numbers them),
take the hidden state at the LAST PROMPT TOKEN of every probe prompt, for each checkpoint. Then,
per layer and per checkpoint pair (before, after): exact PCA of each feature set, the angle
between matching top PCs (|cos|: a PC's sign is arbitrary), principal angles between the top-k PC
subspaces, the mean-shift vector (its norm relative to the mean feature norm, its angle to the
before-PC1 and to the before top-k subspace), and linear CKA. A shift nearly orthogonal to the
old PCs with the PCs nearly unchanged means the old representation is kept and can be re-aligned.

Hidden states come from forward hooks that copy the last position of each decoder layer's output
(:func:`extract_features`), so memory holds (layers, batch, hidden) numbers, never the
(layers, batch, tokens, hidden) that ``output_hidden_states`` materialises; statistics run in
float64 on the CPU whatever the model's device and dtype.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace

import torch

from forgetdiag import linalg
from forgetdiag.analyses.feature_nulls import clears, split_half_null, with_sampling
from forgetdiag.analyses.feature_stats import (
    LayerShift,
    Projection,
    check_k,
    compare_layer,
    project,
    summarise_layer,
)
from forgetdiag.analyses.hidden import encode_prompts, extract_features
from forgetdiag.checkpoints import resolve_checkpoints
from forgetdiag.errors import CheckpointError, ForgetdiagError
from forgetdiag.evaluate import Encoded, model_context
from forgetdiag.models import load_model, require_known_ids, shared_tokenizer
from forgetdiag.probes import Probe, with_chat_template
from forgetdiag.results import Result, Timings
from forgetdiag.runtime import ProgressFn, Runtime, Warn
from forgetdiag.settings import FeatureSettings
from forgetdiag.settings.weights import parse_pairs  # noqa: F401 - part of this module's API
from forgetdiag.storage import Checkpoint
from forgetdiag.streaming import check_sequence

TIE = 0.9  # PC2 holding >= 90% of PC1's variance: PC1 alone is ill-defined (a note says so)


@dataclass(frozen=True)
class PairShift:
    """Every layer of one (before, after) pair and where the shift starts."""

    before: str
    after: str
    before_step: int | None
    after_step: int | None
    layers: tuple[LayerShift, ...]
    shift_start: int | None
    projections: tuple[Projection, ...] = ()


@dataclass(frozen=True)
class FeaturesResult(Result):
    """Everything ``forgetdiag features`` computed; ``to_dict()`` is its JSON."""

    analysis = "features"
    checkpoints: tuple[str, ...]
    probe: str
    n_prompts: int
    n_layers: int  # decoder layers; hidden-state indices run 0..n_layers
    hidden_size: int
    pairs: tuple[PairShift, ...]
    settings: FeatureSettings
    warnings: tuple[str, ...] = ()
    timings: dict[str, float] = field(default_factory=dict)

    def records(self) -> list[dict]:
        """One flat record per (pair, layer): loads straight into pandas."""
        rows = []
        for p, pair in enumerate(self.pairs):
            for s in pair.layers:
                rows.append(
                    {
                        "pair": p,
                        "before": pair.before,
                        "after": pair.after,
                        **asdict(s),
                        "pc1_angle_deg": s.pc1_angle_deg,
                        "pc_shift_deg": s.pc_shift_deg,
                        "shift_start": s.layer == pair.shift_start,
                    }
                )
        return rows

    def summary(self) -> str:
        return "; ".join(summary_text(self, p) for p in self.pairs)

    def body(self) -> dict:
        return {
            "checkpoints": list(self.checkpoints),
            "probe": self.probe,
            "n_prompts": self.n_prompts,
            "n_layers": self.n_layers,
            "hidden_size": self.hidden_size,
            "settings": asdict(self.settings),
            "pairs": [
                {"before": p.before, "after": p.after, "shift_start": p.shift_start, "summary": summary_text(self, p)}
                for p in self.pairs
            ],
            "records": self.records(),
        }


def summary_text(result: FeaturesResult, pair: PairShift) -> str:
    """Where the shift of one pair starts, in words, with the numbers behind it."""
    s = result.settings
    rule = (
        f"top-{s.k} PC subspace turns >= {s.pc_shift_min:g} deg beyond the split-half null's range, "
        f"or CKA drops >= {s.cka_drop_min:g}, at the 95% interval's cautious end"
    )
    if pair.shift_start is None:
        return f"{pair.before} -> {pair.after}: no layer shifts ({rule} nowhere)"
    at = pair.layers[pair.shift_start]
    where = "the embedding output" if at.layer == 0 else f"layer {at.layer} of {result.n_layers}"
    return (
        f"{pair.before} -> {pair.after}: shifts start at {where} (PC subspace "
        f"{at.pc_shift_deg:.1f} deg, PC1 {at.pc1_angle_deg:.1f} deg, CKA {at.cka:.3f}, mean "
        f"shift {at.mean_shift_rel:.3f} of the feature norm; rule: {rule})"
    )


def shift_start(layers: Sequence[LayerShift], settings: FeatureSettings) -> int | None:
    """The lowest layer whose PC shift reaches ``pc_shift_min`` with its interval above the
    split-half null's range, or whose CKA drop reaches ``cka_drop_min`` at the interval's
    upper CKA end (NaN never counts; without intervals the point values decide)."""
    for s in layers:
        pc = clears(s.intervals.get("pc_shift_deg"), s.null_pc_angle_range, s.pc_shift_deg, settings.pc_shift_min)
        cka_high = s.intervals.get("cka", [s.cka, s.cka])[1]
        if pc or (1.0 - s.cka >= settings.cka_drop_min and 1.0 - cka_high >= settings.cka_drop_min):
            return s.layer
    return None


def compare_features(
    before: torch.Tensor,
    after: torch.Tensor,
    *,
    settings: FeatureSettings = FeatureSettings(),
    paired: bool = True,
    null_from: torch.Tensor | None = None,
) -> tuple[LayerShift, ...]:
    """Per-layer shifts between two feature sets (e.g. your own states), with bootstrap
    intervals and the split-half null; :func:`shift_start` reads them.

    Args:
        before, after: (n_layers + 1, n, d) from :func:`extract_features`, the same prompts
            (``paired=False``: different prompts of one size, e.g. two halves; no CKA).
        null_from: (n_layers + 1, m, d) features whose split halves give the null (default
            ``before``).

    Returns:
        One :class:`LayerShift` per hidden-state index.
    """
    null_from = before if null_from is None else null_from
    if before.shape != after.shape or before.ndim != 3:
        raise ForgetdiagError(
            f"features must be two (layers, n, d) tensors of one shape, got "
            f"{tuple(before.shape)} and {tuple(after.shape)}"
        )
    check_k(before.shape[1], before.shape[2], settings.k, "the features")
    k, reps, seed = settings.k, settings.bootstrap, settings.seed
    return tuple(
        with_sampling(
            compare_layer(
                l, before[l], after[l], summarise_layer(before[l], k=k), summarise_layer(after[l], k=k), k=k, cka=paired
            ),
            before[l],
            after[l],
            split_half_null(null_from[l], k=k, splits=settings.splits, seed=seed + l),
            k=k,
            replicates=reps,
            seed=seed,
            paired=paired,
        )
        for l in range(before.shape[0])
    )


# ------------------------------------------------------------------------------ the analysis


def check_pairs(pairs: Sequence[tuple[int, int]] | None, n: int) -> list[tuple[int, int]]:
    """Validated pairs; None means consecutive ones (0:1, 1:2, ...)."""
    if n < 2:
        raise CheckpointError(f"features compares checkpoints and needs at least 2, got {n}")
    pairs = [(k, k + 1) for k in range(n - 1)] if pairs is None else [tuple(p) for p in pairs]
    if not pairs:
        raise ForgetdiagError("no pairs given; expected I:J pairs of checkpoint indices")
    for i, j in pairs:
        if not (0 <= i < n and 0 <= j < n) or i == j:
            raise ForgetdiagError(
                f"pair {i}:{j} is not two different checkpoints among the {n} given (indices 0 to {n - 1})"
            )
    return pairs


def _prompts(
    checkpoints: Sequence[Checkpoint], probe: Probe, runtime: Runtime, warn: Warn | None
) -> tuple[list[Encoded], int]:
    """Encoded prompts and the pad id, after checking that every checkpoint shares a tokenizer."""
    tokenizer = shared_tokenizer(checkpoints, runtime, warn=warn)
    if runtime.chat_template:
        probe = with_chat_template(probe, tokenizer)
    encoded = encode_prompts(
        tokenizer,
        probe,
        max_length=model_context(checkpoints[0].text_config),
        truncate=runtime.truncate_prompts,
        canonical=not runtime.chat_template,
        warn=warn,
    )
    for checkpoint in checkpoints:
        require_known_ids([e.prompt_ids for e in encoded], checkpoint)
    return encoded, tokenizer.pad_token_id


def _extract(
    checkpoint: Checkpoint, prompts, pad_id: int, runtime: Runtime, settings: FeatureSettings, progress
) -> torch.Tensor:
    model = load_model(checkpoint, runtime)
    feats = extract_features(
        model,
        prompts,
        pad_id=pad_id,
        batch_size=runtime.batch_size,
        method=settings.method,
        progress=progress,
        label=f"hidden states {checkpoint.label}",
    )
    del model
    bad = ~torch.isfinite(feats).all(dim=2).all(dim=1)  # (L + 1,)
    if bool(bad.any()):
        raise CheckpointError(
            f"{checkpoint.label}: NaN or Inf hidden states from layer "
            f"{int(bad.nonzero()[0])} (dtype {runtime.dtype}); expected finite "
            "features (try --dtype float32)"
        )
    return feats


def _pair(
    i: int,
    j: int,
    feats: dict,
    pcas: dict,
    cks: Sequence[Checkpoint],
    settings: FeatureSettings,
    previous: tuple[int, int] | None,
    nulls: dict,
) -> PairShift:
    sample = torch.randperm(feats[i].shape[1], generator=torch.Generator().manual_seed(settings.seed))
    sample = sample[: settings.max_points].sort().values  # (m,) prompts shown in the scatter
    layers, projections = [], []
    for l, (pb, pa) in enumerate(zip(pcas[i], pcas[j])):
        s = compare_layer(l, feats[i][l], feats[j][l], pb, pa, k=settings.k)
        if (i, l) not in nulls:
            nulls[(i, l)] = split_half_null(feats[i][l], k=settings.k, splits=settings.splits, seed=settings.seed + l)
        s = with_sampling(
            s, feats[i][l], feats[j][l], nulls[(i, l)], k=settings.k, replicates=settings.bootstrap, seed=settings.seed
        )
        if previous is not None:  # ~180 deg: this shift undoes the previous one
            before_shift = pcas[previous[1]][l].mean - pcas[previous[0]][l].mean
            if s.mean_shift_norm > 0 and float(torch.linalg.vector_norm(before_shift)) > 0:
                s = replace(s, shift_vs_previous_deg=linalg.vector_angle(pa.mean - pb.mean, before_shift))
        layers.append(s)
        if settings.max_points:
            projections.append(project(l, feats[i][l][sample], feats[j][l][sample], pb, pa))
    return PairShift(
        cks[i].label,
        cks[j].label,
        cks[i].step,
        cks[j].step,
        tuple(layers),
        shift_start(layers, settings),
        tuple(p for p in projections if p is not None),
    )


def _layers(layers: set[int]) -> str:
    return ("layer " if len(layers) == 1 else "layers ") + ", ".join(map(str, sorted(layers)))


def _notes(pairs: Sequence[PairShift], settings: FeatureSettings) -> list[str]:
    shifts = [s for p in pairs for s in p.layers]
    flat = {s.layer for s in shifts if s.k == 0}
    low = {s.layer for s in shifts if 0 < s.k < settings.k}
    tied = {
        s.layer for s in shifts if s.k >= 2 and any(e[1] >= TIE * e[0] for e in (s.explained_before, s.explained_after))
    }
    notes = []
    if flat:
        notes.append(
            f"{_layers(flat)}: the features do not vary across prompts (e.g. every "
            "prompt ends with the same token at the embedding output): no PCs or CKA"
        )
    if low:
        notes.append(
            f"{_layers(low)}: fewer than k={settings.k} principal directions, so "
            "fewer PCs are compared (see each record's k)"
        )
    if tied:
        notes.append(
            f"{_layers(tied)}: PC1 and PC2 hold nearly equal variance (within "
            f"{100 * (1 - TIE):.0f}%), so PC1 can turn inside their plane; read the "
            "PC-subspace angles there, not the PC1 angle"
        )
    return notes


def feature_shifts(
    checkpoints,
    probe: Probe,
    *,
    settings: FeatureSettings = FeatureSettings(),
    runtime: Runtime = Runtime(),
    progress: ProgressFn | None = None,
    warn: Warn | None = None,
) -> FeaturesResult:
    """Per-layer feature and principal-component shifts between checkpoints.

    Args:
        checkpoints: two or more checkpoints in training order (paths, a Trainer run
            directory, or :class:`Checkpoint` objects); the default pairs are consecutive.
        probe: prompts of the old task (answers are not used).
        settings: what is compared (``pairs``: (i, j) indices into the expanded checkpoint
            list, before i, after j; default consecutive ones) and where a shift starts.
        runtime: how models run (device, dtype, batch size...).
        progress: ``progress(description, done, total)`` per batch of prompts.
        warn: receives warnings (truncated prompts).

    Returns:
        A :class:`FeaturesResult` with one :class:`PairShift` per pair.

    Example:
        >>> r = feature_shifts(["runs/task0", "runs/task1/checkpoint-50"],
        ...                    load_probe("old.jsonl"))  # doctest: +SKIP
        >>> r.pairs[0].shift_start, r.records()[0]["cka"]  # doctest: +SKIP
    """
    cks = resolve_checkpoints(checkpoints, runtime)
    pairs = check_pairs(settings.pairs, len(cks))
    used = sorted({k for p in pairs for k in p})
    check_sequence([cks[k] for k in used])
    prompts, pad_id = _prompts([cks[k] for k in used], probe, runtime, warn)
    check_k(len(prompts), cks[used[0]].hidden_size, settings.k, f"probe {probe.name}")
    feats, pcas, done, timings, nulls = {}, {}, {}, Timings(), {}
    with runtime.threads_for(cks[used[0]].n_params):
        for c in used:
            with timings.phase("hidden_states"):
                feats[c] = _extract(cks[c], prompts, pad_id, runtime, settings, progress)
            with timings.phase("statistics"):
                pcas[c] = [summarise_layer(x, k=settings.k) for x in feats[c]]
                for p, (i, j) in enumerate(pairs):
                    if i in feats and j in feats and p not in done:
                        chained = p > 0 and pairs[p - 1][1] == i  # compare with the previous shift
                        done[p] = _pair(i, j, feats, pcas, cks, settings, pairs[p - 1] if chained else None, nulls)
                waiting = {k for p, pair in enumerate(pairs) if p not in done for k in pair}
                feats = {k: v for k, v in feats.items() if k in waiting}  # drop what no pair needs
    results = tuple(done[p] for p in range(len(pairs)))
    first = next(iter(pcas.values()))
    return FeaturesResult(
        checkpoints=tuple(c.label for c in cks),
        probe=probe.name,
        n_prompts=len(prompts),
        n_layers=len(first) - 1,
        hidden_size=int(first[0].mean.shape[0]),
        pairs=results,
        settings=settings,
        warnings=tuple(_notes(results, settings)),
        timings=dict(timings),
    )
