"""The nulls of ``angles`` beyond the isotropic one (docs/angles.md, "Which null").

* data-informed (``--probe``): per matrix whose hidden side is a linear layer's input, the
  angle two unrelated updates ``X^T G1``, ``X^T G2`` make, X the layer's inputs over the probe
  (:class:`forgetdiag.nulls.InputSpectrum`). Inputs come from one forward pass of the
  checkpoint where update B starts, once per such checkpoint.
* a second run (``--null-run``): the same pairs with update B taken from another run of the same
  shapes: what an update with no shared cause gives on this very model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch

from forgetdiag.analyses.activations import linear_modules
from forgetdiag.analyses.angle_pairs import PairSpec, Update
from forgetdiag.analyses.angle_records import AngleRecord
from forgetdiag.analyses.input_moments import input_second_moments
from forgetdiag.checkpoints import resolve_checkpoints
from forgetdiag.errors import ForgetdiagError
from forgetdiag.models import load_model, shared_tokenizer, tokenize_probe
from forgetdiag.nulls import InputSpectrum, chance_label
from forgetdiag.parts import MatrixPart
from forgetdiag.probes import Probe
from forgetdiag.runtime import ProgressFn, Runtime, Warn
from forgetdiag.storage import Checkpoint

NULL_SAMPLES = 16


def layer_spectra(
    checkpoint: Checkpoint,
    probe: Probe,
    names: Sequence[str],
    runtime: Runtime,
    *,
    progress: ProgressFn | None = None,
    warn: Warn | None = None,
) -> tuple[dict[str, InputSpectrum], int]:
    """({stored tensor name: spectrum of its module's input}, tokens) for the tensors in
    ``names`` that are the weight of a linear layer of ``checkpoint``'s model."""
    tokenizer = shared_tokenizer([checkpoint], runtime, warn=warn)
    encoded, _ = tokenize_probe(tokenizer, probe, checkpoint, runtime, warn=warn)
    model = load_model(checkpoint, runtime)
    wanted = {m for m in linear_modules(model, include_head=True) if any(_same(name, m) for name in names)}
    with runtime.threads_for(checkpoint.n_params):
        moments, n_tokens = input_second_moments(
            model,
            encoded,
            pad_id=tokenizer.pad_token_id,
            batch_size=runtime.batch_size,
            progress=progress,
            label=f"layer inputs {checkpoint.label}",
            only=wanted,
        )
    del model
    spectra: dict[int, InputSpectrum] = {}  # one per shared moment
    out = {}
    for name in names:
        module = next((m for m in moments if _same(name, m)), None)
        if module is not None:
            moment = moments[module]
            out[name] = spectra.setdefault(id(moment), InputSpectrum(moment))
    return out, n_tokens


def _same(tensor: str, module: str) -> bool:
    """Is stored tensor ``tensor`` the weight of model module ``module`` (up to a prefix)?"""
    if not tensor.endswith(".weight"):
        return False
    stem = tensor.removesuffix(".weight")
    return module == stem or stem.endswith("." + module) or module.endswith("." + stem)


def with_data_null(
    records: Sequence[AngleRecord],
    pairs: Sequence[PairSpec],
    spectra: dict[int, dict[str, InputSpectrum]],
    parts: dict[tuple, tuple[MatrixPart, tuple[int, ...]]],
) -> list[AngleRecord]:
    """``records`` with the data-informed null filled in where it applies.

    Args:
        spectra: checkpoint index -> {tensor name: spectrum}, for the checkpoints where the
            pairs' updates B start.
        parts: (param, part, expert) -> (matrix part, stored shape).
    """
    start = {p.label: p.b.i for p in pairs}
    out = []
    for r in records:
        part, shape = parts[(r.param, r.part, r.expert)]
        spectrum = spectra.get(start[r.pair], {}).get(r.param)
        if not r.ok or spectrum is None or part.hidden_side != "in":
            out.append(r)
            continue
        d, n = part.oriented(torch.empty(shape, device="meta")).shape
        if d != spectrum.d:
            out.append(r)
            continue
        null = spectrum.null(n, r.rank_a, r.rank_b, samples=NULL_SAMPLES)
        out.append(
            replace(
                r,
                baseline_data_deg=null.mean_deg,
                baseline_data_sd_deg=null.sd_deg,
                baseline_data_energy_overlap=null.energy_overlap,
                chance=chance_label(r.angle_deg, null),
            )
        )
    return out


def with_run_null(records: Sequence[AngleRecord], run_records: Sequence[AngleRecord]) -> list[AngleRecord]:
    """``records`` with ``baseline_run_deg``: the angle of the same pair and matrix when B is
    the second run's update (``run_records``, computed with the same pair labels)."""
    found = {(r.pair, r.param, r.part, r.expert): r.angle_deg for r in run_records if r.ok}
    return [replace(r, baseline_run_deg=found.get((r.pair, r.param, r.part, r.expert))) if r.ok else r for r in records]


def second_run_records(found, specs, null_run, runtime: Runtime, run_pairs) -> list[AngleRecord]:
    """The records of ``specs`` with update B taken from the checkpoints of ``null_run`` (same
    indices), labelled as the original pairs; ``run_pairs(checkpoints, pairs)`` computes them."""
    second = resolve_checkpoints(null_run, runtime)
    need = max(p.b.j for p in specs)
    if need >= len(second):
        raise ForgetdiagError(
            f"--null-run has {len(second)} checkpoints; expected at least {need + 1}, as the "
            "pairs take update B from the same indices there"
        )
    shifted = [PairSpec(p.a, Update(p.b.i + len(found), p.b.j + len(found))) for p in specs]
    label = {s.label: p.label for s, p in zip(shifted, specs)}
    return [replace(r, pair=label[r.pair]) for r in run_pairs([*found, *second], shifted)]


def pair_summary(label: str, records: Sequence[AngleRecord], far_deg: float) -> str:
    """One pair in words: its mean angle, the isotropic null, and, with ``--probe``, how many
    matrices are aligned beyond the data-informed null (the only null that calls alignment)."""
    ok = [r for r in records if r.ok]
    if not ok:
        return f"{label}: no matrix changed in both updates"
    mean = sum(r.angle_deg for r in ok) / len(ok)
    iso = sum(r.baseline_deg for r in ok) / len(ok)
    text = f"{label}: mean angle {mean:.1f} deg over {len(ok)} matrices (isotropic null {iso:.1f} deg"
    judged = [r for r in ok if r.chance is not None]
    if not judged:
        far = sum(r.gap_deg > far_deg for r in ok)
        return (
            f"{text}; {far} sit more than {far_deg:g} deg below it, which real updates do by "
            "construction: give --probe for the data-informed null)"
        )
    data = sum(r.baseline_data_deg for r in judged) / len(judged)
    beyond = sum(r.chance == "beyond chance" for r in judged)
    return (
        f"{text}, data-informed null {data:.1f} deg over the {len(judged)} matrices it covers); "
        f"{beyond} of {len(judged)} aligned beyond chance"
    )
