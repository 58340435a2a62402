"""Weight-update subspace angles, per layer and component: ``forgetdiag angles`` (docs/science.md, 3.3).

An update is a difference of two checkpoints, dW = C[j] - C[i]. Every weight matrix (true q/k/v
parts of fused matrices, MLP, input embedding, lm_head unless tied) is oriented so that its
columns live in the residual stream; each update's kept left singular vectors span its basis.
For a pair of updates (A, B) this module reports the paper's per-direction angle of every
direction of B to the whole subspace of A, the principal angles, and next to each the angle that
unrelated subspaces of the same dimensions already give.

Tensors stream one name at a time (:func:`forgetdiag.streaming.stream_updates`); the bases of a
name are computed by a small thread pool while the next name is read. Nothing here prints.
"""

from __future__ import annotations

import math
import os
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from forgetdiag.analyses.angle_batch import expert_group_records, group_key
from forgetdiag.analyses.angle_nulls import (
    layer_spectra,
    pair_summary,
    second_run_records,
    with_data_null,
    with_run_null,
)
from forgetdiag.analyses.angle_pairs import PairSpec, Update, parse_pairs
from forgetdiag.analyses.angle_records import AngleRecord, angle_record, summarize_experts
from forgetdiag.analyses.weight_tasks import angle_records_on_ray
from forgetdiag.architectures import GENERIC, component_order
from forgetdiag.checkpoints import duplicate_notes, resolve_checkpoints, tower_notes
from forgetdiag.errors import CheckpointError
from forgetdiag.linalg import Basis, update_basis
from forgetdiag.parts import MatrixPart, matrix_parts
from forgetdiag.probes import Probe
from forgetdiag.results import Result, Timings
from forgetdiag.runtime import ProgressFn, Runtime, Warn, torch_threads
from forgetdiag.settings import AngleSettings
from forgetdiag.storage import Checkpoint
from forgetdiag.streaming import SequenceCheck, check_sequence, stream_updates

_GLOBAL_FIRST = ("embed", "pos_embed")  # global matrices shown before layer 0; others after


@dataclass(frozen=True)
class AnglesResult(Result):
    """Everything ``forgetdiag angles`` computed; ``to_dict()`` is its JSON."""

    analysis = "angles"
    checkpoints: tuple[str, ...]
    paths: tuple[str, ...]
    architecture: str
    family: str
    n_layers: int | None
    hidden_size: int | None
    pairs: tuple[PairSpec, ...]
    settings: AngleSettings
    device: str
    workers: int
    records: tuple[AngleRecord, ...]
    warnings: tuple[str, ...] = ()
    timings: dict[str, float] = field(default_factory=dict)

    def for_pair(self, pair: PairSpec) -> list[AngleRecord]:
        """The records of one pair, in forward-pass order."""
        return [r for r in self.records if r.pair == pair.label]

    def summary(self) -> str:
        return "; ".join(pair_summary(p.label, self.for_pair(p), self.settings.far_deg) for p in self.pairs)

    def body(self) -> dict:
        updates = sorted({u for p in self.pairs for u in (p.a, p.b)})
        return {
            "checkpoints": [
                {"index": k, "label": label, "path": path}
                for k, (label, path) in enumerate(zip(self.checkpoints, self.paths))
            ],
            "architecture": self.architecture,
            "family": self.family,
            "n_layers": self.n_layers,
            "hidden_size": self.hidden_size,
            "updates": [
                {"update": u.label, "from": self.checkpoints[u.i], "to": self.checkpoints[u.j]} for u in updates
            ],
            "pairs": [{"pair": p.label, "a": p.a.label, "b": p.b.label} for p in self.pairs],
            "settings": {
                **asdict(self.settings),
                "mode": self.settings.mode,
                "rank": self.settings.top_k,
                "device": self.device,
                "workers": self.workers,
            },
            "experts": [e.to_dict() for e in summarize_experts(self.records)],
            "records": [r.to_dict() for r in self.records],
        }


def compute_angles(
    checkpoints: Sequence[str | Path | Checkpoint] | str | Path,
    *,
    probe: Probe | None = None,
    null_run: Sequence[str | Path | Checkpoint] | str | Path | None = None,
    settings: AngleSettings = AngleSettings(),
    runtime: Runtime = Runtime(),
    progress: ProgressFn | None = None,
    warn: Warn | None = None,
) -> AnglesResult:
    """Subspace angles between weight updates of one run, per layer and component.

    Args:
        checkpoints: paths (model, adapter or Trainer run directories; a run expands to its
            checkpoints) or :class:`Checkpoint` objects, in training order C0, C1, ...
        settings: which updates to compare (``compare``; default: consecutive updates, C1 - C0
            vs C2 - C1, ...) and how bases are chosen (default: top 32, randomized).
        runtime: where the SVDs run (``device``), CPU threads (``threads``, default: every
            core; see :func:`plan_threads`), and how checkpoints are read.
        progress: called as ``progress("computing angles", done, total)`` per matrix part.
        probe: items whose tokens give each layer's inputs for the data-informed null
            (``baseline_data_deg``; one forward pass per checkpoint where an update B starts).
        null_run: checkpoints of a second run of the same shapes: ``baseline_run_deg`` is the
            angle of each pair with update B taken from that run (the same indices).
        warn: receives tokenization warnings of the probe (other notes are in ``warnings``).

    Returns:
        :class:`AnglesResult` with one :class:`AngleRecord` per (pair, parameter, part).

    Raises:
        ForgetdiagError: bad pairs or settings; CheckpointError: unreadable or incompatible
            checkpoints, NaN/Inf in a weight (named), nothing comparable.
    """
    timings = Timings()
    found = resolve_checkpoints(checkpoints, runtime)
    specs = parse_pairs(settings.compare, len(found), labels=[c.label for c in found])
    check = check_sequence(found)
    targets, notes = comparable_parts(found[0], check, tied=all(c.tied_embeddings for c in found))
    notes = duplicate_notes(found) + notes
    torch_device = runtime.torch_device
    pool_size, threads = plan_threads(runtime.threads, torch_device)
    with timings.phase("angles"), torch_threads(threads):
        if runtime.ray is not None:  # the same _run per task, on the cluster (--ray)
            records = angle_records_on_ray(_run, found, specs, targets, check, settings, runtime, progress)
        else:
            records = _run(found, specs, targets, check, settings, torch_device, pool_size, progress)
    parts = {(p.tensor.name, p.part, p.expert): (p, shape) for _, ps, shape in targets for p in ps}
    if probe is not None:
        with timings.phase("activations"):
            names = [name for name, ps, _ in targets if any(p.hidden_side == "in" for p in ps)]
            spectra = {i: layer_spectra(found[i], probe, names, runtime, warn=warn)[0] for i in {p.b.i for p in specs}}
        with timings.phase("data_null"):
            records = with_data_null(records, specs, spectra, parts)
    if null_run is not None:
        with timings.phase("null_run"), torch_threads(threads):
            run = second_run_records(
                found,
                specs,
                null_run,
                runtime,
                lambda cs, ps: _run(cs, ps, targets, check_sequence(cs), settings, torch_device, pool_size, None),
            )
        records = with_run_null(records, run)
    first = found[0]
    return AnglesResult(
        checkpoints=tuple(c.label for c in found),
        paths=tuple(str(c.path) for c in found),
        architecture=first.architecture,
        family=first.family.name,
        n_layers=first.n_layers,
        hidden_size=first.hidden_size,
        pairs=tuple(specs),
        settings=settings,
        device=str(torch_device),
        workers=pool_size * (threads or 1),
        records=tuple(records),
        warnings=tuple(check.notes) + tuple(notes),
        timings=dict(timings),
    )


def plan_threads(workers: int | None, device: torch.device) -> tuple[int, int | None]:
    """(matrices processed at once, torch intra-op threads) for ``workers`` CPU threads
    (``--threads``; None: every core this process may use).

    On CPU each matrix part is one single-threaded job and ``workers`` jobs run at once, while
    the main thread reads the next tensors. On TinyLlama-sized matrices (2 cores) giving the
    same work 2 torch intra-op threads instead cost 1.5-2x the CPU time and wall time: its
    matmuls (2048 x 64 blocks), tall-skinny QRs and element-wise passes are too small to
    scale across threads. Each randomized basis draws from its own seeded generator, so jobs
    run fully in parallel with the reading. On a GPU one job at a time feeds the device.
    """
    if device.type != "cpu":
        return 1, None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (workers or cores or 1), 1


def comparable_parts(
    checkpoint: Checkpoint,
    check: SequenceCheck,
    *,
    tied: bool | None = None,
) -> tuple[list[tuple[str, list[MatrixPart], tuple[int, ...]]], list[str]]:
    """The weight matrices to compare, per stored tensor, in forward-pass order.

    Embeddings and lm_head are included, lm_head only when not tied to the input embedding
    (``tied``: default the checkpoint's own). A wrapper's vision tower and projector are left
    out (a note says so).

    Returns:
        ([(tensor name, its parts, its shape as compared)], notes).

    Raises:
        CheckpointError: the checkpoints hold no weight matrix forgetdiag recognises.
    """
    guess = checkpoint.family is GENERIC
    tied = checkpoint.tied_embeddings if tied is None else tied
    found, notes = [], tower_notes(checkpoint)
    for name in check.names:
        tensor = checkpoint.parse(name)
        shape = checkpoint.meta[name].shape
        if name in check.rows:
            shape = (check.rows[name], *shape[1:])
        if tensor.component == "lm_head" and tied and tensor.kind == "weight":
            notes.append(f"{name} is tied to the input embedding (tie_word_embeddings): reported once, as embed")
            continue
        try:
            parts = matrix_parts(tensor, shape, checkpoint.config, guess=guess)
        except (ValueError, KeyError) as exc:
            raise CheckpointError(
                f"{name}: cannot split into its parts ({exc}); expected the layout its config describes"
            ) from None
        if parts:
            found.append((name, parts, shape))
    if not found:
        raise CheckpointError(
            f"{checkpoint.label}: no weight matrix recognised (family "
            f"{checkpoint.family.name}); run 'forgetdiag inspect' to see what is read"
        )
    found.sort(key=lambda item: _forward_key(item[1][0]))
    return found, notes


def _forward_key(part: MatrixPart) -> tuple:
    if part.layer is not None:
        return (1, part.layer, component_order(part.component), part.expert is not None, part.expert or 0)
    return (0 if part.component in _GLOBAL_FIRST else 2, 0, component_order(part.component))


def _run(checkpoints, specs, targets, check, settings, device, pool_size, progress) -> list[AngleRecord]:
    """Stream the updates name by name; a pool computes bases and angles while the next is read."""
    updates = sorted({u for p in specs for u in (p.a, p.b)})
    parts_of = {name: parts for name, parts, _ in targets}
    shapes = {name: shape for name, _, shape in targets}
    total = sum(len(parts) for parts in parts_of.values())
    stream = stream_updates(
        checkpoints, [(u.i, u.j) for u in updates], list(parts_of), check=check, dtype=torch.float32, device=device
    )
    records: list[AngleRecord] = []
    pending: deque[Future] = deque()

    def collect_oldest() -> None:
        records.extend(pending.popleft().result())
        if progress is not None:
            progress("computing angles", len(records) // len(specs), total)

    # Routed experts of one layer wait here, grouped by component and shape, and go to the pool
    # as one batched job per group when the stream leaves the layer (see .angle_batch).
    groups: dict[tuple, list] = {}
    group_layer = None

    def flush_groups() -> None:
        for group in groups.values():
            pending.append(pool.submit(expert_group_records, group, specs, settings))
        groups.clear()

    with ThreadPoolExecutor(max_workers=pool_size, thread_name_prefix="angles") as pool:
        try:
            for tensor, deltas in stream:
                if tensor.layer != group_layer:
                    flush_groups()
                    group_layer = tensor.layer
                by_update = {u: deltas[(u.i, u.j)] for u in updates}
                for part in parts_of[tensor.name]:
                    key = group_key(part, shapes[tensor.name], settings)
                    if key is not None:
                        groups.setdefault(key, []).append((part, shapes[tensor.name], by_update))
                        continue
                    pending.append(pool.submit(part_records, part, shapes[tensor.name], by_update, specs, settings))
                del deltas, by_update  # the jobs hold what they need
                while len(pending) > 2 * pool_size:  # bounds the updates held in memory
                    collect_oldest()
            flush_groups()
            while pending:
                collect_oldest()
        except BaseException:
            for future in pending:
                future.cancel()
            raise
    order = {(p.tensor.name, p.part, p.expert): k for k, p in enumerate(p for ps in parts_of.values() for p in ps)}
    records.sort(key=lambda r: order[(r.param, r.part, r.expert)])  # stable: pairs keep their order
    return records


def part_records(
    part: MatrixPart,
    shape: tuple[int, ...],
    deltas: dict[Update, torch.Tensor | None],
    pairs: Sequence[PairSpec],
    settings: AngleSettings,
) -> list[AngleRecord]:
    """The records of one matrix part for every pair.

    Args:
        part: which matrix (and which rows of a fused one).
        shape: the stored tensor's shape (as compared: resized vocabularies cut to common rows).
        deltas: each update of the stored tensor in its stored layout, None if unchanged.
        pairs: the pairs to compare.
        settings: how bases are chosen.

    Returns:
        One :class:`AngleRecord` per pair.
    """
    bases: dict[Update, tuple[Basis | None, float]] = {}
    for update in sorted({u for p in pairs for u in (p.a, p.b)}):
        delta = deltas[update]
        oriented = None if delta is None else part.oriented(delta)  # (d, n) view
        bases[update] = update_basis_of(oriented, part.name, settings, seed=update_seed(settings.seed, update))
    d = hidden_dim(part, shape)
    return [angle_record(part, pair, bases[pair.a], bases[pair.b], d) for pair in pairs]


def hidden_dim(part: MatrixPart, shape: tuple[int, ...]) -> int:
    """d, the residual-stream side of ``part`` of a stored tensor of ``shape``."""
    return part.oriented(torch.empty(shape, device="meta")).shape[0]


def update_seed(seed: int, update: Update) -> int:
    """The randomized-SVD seed of one update: different for every update of a run.

    The range finder's random test matrix lives on the hidden side; with one seed for both
    updates of a pair, the directions it picks where a spectrum is flat (noise) coincide and
    fake shared structure (measured: 6.7 deg too aligned on a TinyLlama lm_head update).
    """
    return seed + 1_000_003 * update.i + update.j


def update_basis_of(
    delta: torch.Tensor | None, name: str, settings: AngleSettings, *, seed: int = 0
) -> tuple[Basis | None, float]:
    """(basis or None for "no update", Frobenius norm) of one oriented update (d, n).

    Args:
        delta: (d, n) update, hidden side first, or None when unchanged.
        name: the matrix's name, for errors.
        settings: how the basis is chosen.
        seed: seed of the randomized SVD (see :func:`update_seed`).
    """
    if delta is None:
        return None, 0.0
    norm = float(torch.linalg.vector_norm(delta))
    if norm == 0.0 or norm / math.sqrt(delta.numel()) <= settings.min_update:
        return None, norm
    if settings.standardize:
        std, mean = torch.std_mean(delta)
        if float(std) == 0.0:
            return None, norm  # a constant matrix: nothing left after the mean shift
        delta = (delta - mean) / std
    k = settings.top_k
    try:
        basis = update_basis(
            delta,
            rank=k,
            energy=settings.energy,
            rtol=settings.rtol,
            seed=seed,
            niter=settings.niter,
            oversample=None if k is None else (settings.oversample or k),
        )
    except ValueError as exc:
        raise CheckpointError(f"update of {name}: {exc}") from None
    return basis, norm
