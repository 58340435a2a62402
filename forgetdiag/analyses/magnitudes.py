"""Which output units of each linear layer a task drives, and how much tasks share them (MIGU).

docs/science.md, section 3.6. For every linear layer (``nn.Linear`` and GPT-2's ``Conv1D``) and every
output unit i, the task's magnitude is ``n_i = sum over tokens of |h_i|``, where h is the
layer's output and the tokens are every unpadded position of every probe item as
:func:`forgetdiag.evaluate.encode` makes it: prompt tokens (with the tokenizer's BOS), answer
tokens and EOS, i.e. the sequence a fine-tuning step on that item would see. A task's top set
S keeps the units whose n_i lies strictly above the T-quantile of the layer's n (linear
interpolation, as ``numpy.quantile``; T = 0.7 keeps about the top 30%; ties at the quantile
are left out, so units that a task never drives are never in its set). The overlap of task a
with task b is ``|S_a & S_b| / |S_a|``; two unrelated sets overlap by ``|S_b| / units`` on
average (the chance level reported next to it). The other end of the scale is the split-half
overlap: each task's items are split in two halves by group (a seeded shuffle, as the recovery
split), and the top sets of the two halves are compared: what the task shares with *itself* on
other items (n of the task is the sum of its halves' n, so this costs no extra forward pass).
An overlap between tasks near the split-half level says the layer does not tell the tasks apart.
MIGU updates only each task's top units, so a high overlap says the new task will write into
the units the old task reads.

Magnitudes come from forward hooks that add each batch's masked sum into one float64 vector
per layer (:func:`unit_magnitudes`); activations are never kept, and the hooks are removed
when the pass ends, also on error. The output head (``lm_head``; its units are vocabulary
entries, not features) is left out unless ``include_head``: leaving it out also lets the model
compute logits at one position only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from forgetdiag.analyses.activations import Magnitudes, unit_magnitudes
from forgetdiag.architectures import Component, tower_of
from forgetdiag.checkpoints import resolve_checkpoints
from forgetdiag.errors import CheckpointError, ForgetdiagError
from forgetdiag.evaluate import Encoded
from forgetdiag.models import load_model, shared_tokenizer, tokenize_probe
from forgetdiag.probes import Probe, split_probe
from forgetdiag.results import Result, Timings
from forgetdiag.runtime import ProgressFn, Runtime, Warn
from forgetdiag.settings import MagnitudeSettings
from forgetdiag.storage import Checkpoint
from forgetdiag.streaming import check_sequence

TOKENS_USED = "prompt + answer + EOS tokens of every item (padding masked)"


def top_units(n: torch.Tensor, quantile: float = 0.7) -> torch.Tensor:
    """A task's top set: (units,) bool, True where n_i is strictly above the T-quantile of n."""
    return n > torch.quantile(n.double(), quantile)


def overlap(a: torch.Tensor, b: torch.Tensor) -> float:
    """``|S_a & S_b| / |S_a|`` of two (units,) bool sets; NaN when S_a is empty."""
    size = int(a.sum())
    return int((a & b).sum()) / size if size else math.nan


@dataclass(frozen=True)
class ModuleOverlap:
    """Top-set intersections of every task pair in one linear layer of one checkpoint.

    ``shared[a][b] = |S_a & S_b|``, so ``shared[a][a] = |S_a|``. ``halves[t] = (|H_1|,
    |H_1 & H_2|)`` for the top sets of task t's two halves (split by group), or None when the
    task has a single group: how much a task shares with *itself* on other items.
    """

    module: str  # e.g. model.layers.3.mlp.up_proj
    layer: int | None  # parsed decoder-layer index (None outside the layers)
    component: str  # q, k, v, o, gate, up, down, qkv, fc_in, ... (module path if unknown)
    units: int
    shared: tuple[tuple[int, ...], ...]  # (tasks, tasks)
    halves: tuple[tuple[int, int] | None, ...] = ()  # (tasks,)

    def overlap(self, a: int, b: int) -> float:
        """``|S_a & S_b| / |S_a|`` (NaN when S_a is empty)."""
        size = self.shared[a][a]
        return self.shared[a][b] / size if size else math.nan

    def chance(self, a: int, b: int) -> float:
        """The overlap two unrelated sets of these sizes have on average: ``|S_b| / units``."""
        return self.shared[b][b] / self.units if self.units else math.nan

    def split_half(self, t: int) -> float:
        """``|H_1 & H_2| / |H_1|`` of task t's two halves (NaN without halves)."""
        return pooled_split_half([self], t)


def pooled_overlap(modules: Sequence[ModuleOverlap], a: int, b: int) -> float:
    """``sum |S_a & S_b| / sum |S_a|`` over several modules (a layer, or the whole model)."""
    size = sum(m.shared[a][a] for m in modules)
    return sum(m.shared[a][b] for m in modules) / size if size else math.nan


def pooled_chance(modules: Sequence[ModuleOverlap], a: int, b: int) -> float:
    """The chance level of :func:`pooled_overlap`: ``sum |S_a| |S_b| / units / sum |S_a|``."""
    size = sum(m.shared[a][a] for m in modules)
    return sum(m.shared[a][a] * m.chance(a, b) for m in modules) / size if size else math.nan


def pooled_split_half(modules: Sequence[ModuleOverlap], t: int) -> float:
    """``sum |H_1 & H_2| / sum |H_1|`` of task t's halves (NaN when it has none)."""
    halves = [m.halves[t] for m in modules if len(m.halves) > t and m.halves[t] is not None]
    size = sum(h[0] for h in halves)
    return sum(h[1] for h in halves) / size if size else math.nan


@dataclass(frozen=True)
class CheckpointOverlap:
    """Every linear layer of one checkpoint."""

    label: str
    step: int | None
    modules: tuple[ModuleOverlap, ...]
    n_tokens: tuple[int, ...]  # (tasks,) unpadded tokens summed over

    def layers(self) -> dict[int | None, tuple[ModuleOverlap, ...]]:
        """Modules grouped by decoder-layer index, in model order."""
        out: dict[int | None, list[ModuleOverlap]] = {}
        for m in self.modules:
            out.setdefault(m.layer, []).append(m)
        return {k: tuple(v) for k, v in out.items()}


def compare_tasks(
    parts: Sequence[Sequence[Magnitudes]], *, quantile: float, parse: Callable[[str], object]
) -> tuple[ModuleOverlap, ...]:
    """Top sets and their pairwise intersections in every module all tasks measured.

    Args:
        parts: per task, its :class:`Magnitudes` on one or two disjoint halves of its items
            (the task's n is their sum; two halves also give its split-half overlap).
        quantile: T; a task's top set is above the T-quantile of its n.
        parse: tensor name -> an object with ``layer`` and ``component`` (``Checkpoint.parse``).
    """
    names = [n for n in parts[0][0].sums if all(n in m.sums for p in parts for m in p)]
    out = []
    for name in names:
        sets = [top_units(sum(m.sums[name] for m in p), quantile) for p in parts]  # tasks x (units,)
        shared = tuple(tuple(int((sa & sb).sum()) for sb in sets) for sa in sets)
        halves = []
        for p in parts:
            h = [top_units(m.sums[name], quantile) for m in p] if len(p) == 2 else None
            halves.append((int(h[0].sum()), int((h[0] & h[1]).sum())) if h else None)
        tensor = parse(f"{name}.weight")
        out.append(ModuleOverlap(name, tensor.layer, tensor.component, int(sets[0].numel()), shared, tuple(halves)))
    return tuple(out)


def _task_names(probes: Sequence[Probe]) -> tuple[str, ...]:
    if len(probes) < 2:
        raise ForgetdiagError(
            f"magnitudes compares tasks and needs at least 2 probes (one --probe per task), got {len(probes)}"
        )
    names = tuple(p.name for p in probes)
    if len(set(names)) != len(names):
        repeated = next(n for n in names if names.count(n) > 1)
        raise ForgetdiagError(
            f"two probes are both named {repeated!r}; expected one name per task (rename one of the files)"
        )
    return names


def _encode_tasks(
    checkpoints: Sequence[Checkpoint], probes: Sequence[Probe], runtime: Runtime, warn: Warn | None
) -> tuple[list[list[list[Encoded]]], int]:
    """Per task, its items encoded in two halves split by group (one part for a single group),
    and the pad id, after checking that one tokenizer serves every checkpoint."""
    tokenizer = shared_tokenizer(checkpoints, runtime, warn=warn)
    out = []
    for probe in probes:
        halves = [h for h in split_probe(probe, seed=0) if len(h)] if len(probe.groups) > 1 else [probe]
        out.append([tokenize_probe(tokenizer, h, checkpoints[0], runtime, warn=warn)[0] for h in halves])
    return out, tokenizer.pad_token_id


@dataclass(frozen=True)
class MagnitudesResult(Result):
    """Everything ``forgetdiag magnitudes`` computed; ``to_dict()`` is its JSON.

    Attributes:
        tasks: task names (the probes' names), in the order given.
        n_items: (tasks,) probe items per task.
        quantile: T; top sets are above the T-quantile.
        include_head: whether the output head was measured.
        checkpoints: one :class:`CheckpointOverlap` per checkpoint, in training order.
        warnings: what was left out, in words.
    """

    analysis = "magnitudes"
    tasks: tuple[str, ...]
    n_items: tuple[int, ...]
    quantile: float
    include_head: bool
    checkpoints: tuple[CheckpointOverlap, ...]
    warnings: tuple[str, ...] = ()
    timings: dict[str, float] = field(default_factory=dict)

    def pairs(self) -> list[tuple[int, int]]:
        """Every ordered pair of different tasks, as indices into ``tasks``."""
        n = len(self.tasks)
        return [(a, b) for a in range(n) for b in range(n) if a != b]

    def records(self) -> list[dict]:
        """Long format: one row per (checkpoint, linear layer, task_a, task_b)."""
        rows = []
        for c in self.checkpoints:
            for m in c.modules:
                for a, b in self.pairs():
                    rows.append(
                        {
                            "checkpoint": c.label,
                            "step": c.step,
                            "module": m.module,
                            "layer": m.layer,
                            "component": m.component,
                            "units": m.units,
                            "task_a": self.tasks[a],
                            "task_b": self.tasks[b],
                            "top_a": m.shared[a][a],
                            "top_b": m.shared[b][b],
                            "shared": m.shared[a][b],
                            "overlap": m.overlap(a, b),
                            "chance": m.chance(a, b),
                            "split_half_a": m.split_half(a),
                            "split_half_b": m.split_half(b),
                        }
                    )
        return rows

    def trend(self) -> list[dict]:
        """Pooled over all linear layers: one row per (checkpoint, task_a, task_b)."""
        return [
            {
                "checkpoint": c.label,
                "step": c.step,
                "task_a": self.tasks[a],
                "task_b": self.tasks[b],
                "overlap": pooled_overlap(c.modules, a, b),
                "chance": pooled_chance(c.modules, a, b),
                "split_half_a": pooled_split_half(c.modules, a),
                "split_half_b": pooled_split_half(c.modules, b),
            }
            for c in self.checkpoints
            for a, b in self.pairs()
        ]

    def summary(self) -> str:
        return summary_text(self)

    def body(self) -> dict:
        return {
            "tasks": list(self.tasks),
            "n_items": list(self.n_items),
            "quantile": self.quantile,
            "tokens": TOKENS_USED,
            "include_head": self.include_head,
            "checkpoints": [
                {"label": c.label, "step": c.step, "n_tokens": list(c.n_tokens), "linear_layers": len(c.modules)}
                for c in self.checkpoints
            ],
            "trend": self.trend(),
            "records": self.records(),
        }


def summary_text(result: MagnitudesResult) -> str:
    """How much the first two tasks share their top units, and how that moved along the run."""
    first, last = result.checkpoints[0], result.checkpoints[-1]
    a, b = 0, 1
    name_a, name_b = result.tasks[a], result.tasks[b]
    now = pooled_overlap(last.modules, a, b)
    chance = pooled_chance(last.modules, a, b)
    within = pooled_split_half(last.modules, a)
    text = (
        f"{100 * now:.0f}% of {name_a}'s top units (above the {result.quantile:g} quantile) are "
        f"also {name_b}'s, over {len(last.modules)} linear layers of {last.label} (chance: "
        f"{100 * chance:.0f}%"
        + ("" if math.isnan(within) else f"; two halves of {name_a} share {100 * within:.0f}%")
        + ")"
    )
    by_layer = sorted(
        (x, layer)
        for layer, ms in last.layers().items()
        if layer is not None and not math.isnan(x := pooled_overlap(ms, a, b))
    )
    if by_layer and by_layer[-1][0] > by_layer[0][0]:
        (lo, lo_layer), (hi, hi_layer) = by_layer[0], by_layer[-1]
        text += f"; most shared in layer {hi_layer} ({100 * hi:.0f}%), least in layer {lo_layer} ({100 * lo:.0f}%)"
    if len(result.checkpoints) > 1:
        then = pooled_overlap(first.modules, a, b)
        text += f"; {100 * then:.0f}% at {first.label}"
    return text


def _skipped_notes(ckpt: Checkpoint, skipped: set[str]) -> list[str]:
    """What was not measured, in words: a wrapper's towers (text never runs them), routed
    experts and their routers, and other modules whose output is not one vector per token
    (Qwen2-MoE's shared expert runs on the flattened tokens)."""
    towers = {n for n in skipped if tower_of(n) is not None}
    routed = {n for n in skipped - towers if (ckpt.parse(f"{n}.weight").spec or _NONE).routed}
    other = skipped - towers - routed
    notes = []
    if towers:
        notes.append(f"{len(towers)} linear layers of the wrapper's non-text towers never run on text: left out")
    if ckpt.experts:
        notes.append(
            f"the routed experts ({max(ckpt.experts.values())} per layer in {len(ckpt.experts)} layers) and their "
            "routers are not measured: each expert sees only the tokens routed to it, and transformers' routers "
            "are not linear layers whose output is one vector per token"
        )
    if other:
        notes.append(
            f"{len(other)} linear layers whose output is not one vector per token were left out (first: {min(other)})"
        )
    return notes


_NONE = Component("")


def _checkpoint_overlap(ckpt: Checkpoint, parts: Sequence[Sequence[Magnitudes]], quantile: float) -> CheckpointOverlap:
    modules = compare_tasks(parts, quantile=quantile, parse=ckpt.parse)
    if not modules:
        raise CheckpointError(
            f"{ckpt.label}: no linear layer (torch Linear or GPT-2 Conv1D) to measure; expected a transformer LM"
        )
    return CheckpointOverlap(ckpt.label, ckpt.step, modules, tuple(sum(m.n_tokens for m in p) for p in parts))


def magnitude_overlap(
    checkpoints,
    probes: Sequence[Probe],
    *,
    settings: MagnitudeSettings = MagnitudeSettings(),
    runtime: Runtime = Runtime(),
    progress: ProgressFn | None = None,
    warn: Warn | None = None,
) -> MagnitudesResult:
    """Per linear layer, how much the tasks' most driven output units overlap (MIGU).

    Args:
        checkpoints: one checkpoint, several, or a Trainer run directory (expands to its
            checkpoint-N in step order); paths or :class:`Checkpoint` objects.
        probes: one probe per task (at least two); every item's prompt + answer + EOS tokens
            are summed over.
        settings: the quantile T and whether the output head is measured
            (:class:`MagnitudeSettings`).
        runtime: how models run (device, dtype, batch size, tokenizer, threads...).
        progress: ``progress(description, done, total)`` callback.
        warn: receives warnings (truncated prompts, skipped modules).

    Returns:
        A :class:`MagnitudesResult`; ``records()`` is one row per (checkpoint, layer, task pair).

    Example:
        >>> from forgetdiag import load_probe
        >>> r = magnitude_overlap("runs/task1", [load_probe("task0.jsonl"),
        ...                       load_probe("task1.jsonl")])  # doctest: +SKIP
        >>> r.trend()[-1]["overlap"]  # doctest: +SKIP
    """
    tasks = _task_names(probes)
    cks = resolve_checkpoints(checkpoints, runtime)
    check_sequence(cks)
    encoded, pad_id = _encode_tasks(cks, probes, runtime, warn)
    results, skipped, timings = [], set(), Timings()
    with runtime.threads_for(cks[0].n_params), timings.phase("magnitudes"):
        for ckpt in cks:
            model = load_model(ckpt, runtime)
            parts = [
                [
                    unit_magnitudes(
                        model,
                        enc,
                        pad_id=pad_id,
                        batch_size=runtime.batch_size,
                        include_head=settings.include_head,
                        progress=progress,
                        label=f"{ckpt.label}: {task} ({k + 1}/{len(halves)})",
                    )
                    for k, enc in enumerate(halves)
                ]
                for task, halves in zip(tasks, encoded)
            ]
            del model
            skipped.update(name for p in parts for m in p for name in m.skipped)
            results.append(_checkpoint_overlap(ckpt, parts, settings.quantile))
    notes = _skipped_notes(cks[0], skipped)
    if warn is not None:
        for note in notes:
            warn(note)
    return MagnitudesResult(
        tasks,
        tuple(len(p) for p in probes),
        settings.quantile,
        settings.include_head,
        tuple(results),
        tuple(notes),
        dict(timings),
    )
