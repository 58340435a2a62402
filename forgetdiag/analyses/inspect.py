"""What forgetdiag understands of a run, before anything expensive: ``forgetdiag inspect``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from forgetdiag.analyses.weight_tasks import check_values_on_ray
from forgetdiag.architectures import GENERIC, component_order
from forgetdiag.checkpoints import duplicate_notes, duplicates, resolve_checkpoints, tower_notes
from forgetdiag.parts import matrix_parts
from forgetdiag.results import Result, Timings
from forgetdiag.runtime import ProgressFn, Runtime, Warn
from forgetdiag.settings import InspectSettings
from forgetdiag.storage import Checkpoint
from forgetdiag.streaming import check_sequence, require_finite


@dataclass(frozen=True)
class CheckpointInfo:
    """One checkpoint as forgetdiag reads it."""

    label: str
    path: str
    step: int | None
    format: str
    architecture: str
    model_type: str | None
    family: str
    n_layers: int | None
    hidden_size: int | None
    n_params: int
    dtypes: tuple[str, ...]
    size_bytes: int
    tokenizer: bool
    components: tuple[str, ...]
    unrecognised: int
    tied_embeddings: bool
    lora: dict | None
    values_checked: bool
    experts: int | None = None  # routed experts per mixture-of-experts layer (the most of any layer)
    moe_layers: int = 0
    towers: dict[str, int] = field(default_factory=dict)  # a wrapper's non-text towers: tensors each
    duplicate_of: str | None = None  # an earlier checkpoint of the sequence with the same bytes


@dataclass(frozen=True)
class InspectResult(Result):
    """Checkpoints in sequence order, and what the sequence shares."""

    analysis = "inspect"
    checkpoints: tuple[CheckpointInfo, ...]
    shared_tensors: int
    warnings: tuple[str, ...] = ()
    timings: dict[str, float] = field(default_factory=dict)

    def summary(self) -> str:
        first = self.checkpoints[0]
        what = (
            f"{len(self.checkpoints)} checkpoints of one architecture" if len(self.checkpoints) > 1 else "1 checkpoint"
        )
        values = "every weight finite" if all(c.values_checked for c in self.checkpoints) else "values not read"
        return (
            f"{what}: {first.architecture} ({first.family} family), {first.n_layers} layers, "
            f"{first.n_params} parameters; {values}"
        )

    def body(self) -> dict:
        return {
            "checkpoints": [asdict(c) for c in self.checkpoints],
            "compatible": True,
            "shared_tensors": self.shared_tensors,
        }


def describe(
    checkpoint: Checkpoint, *, values_checked: bool = False, duplicate_of: str | None = None
) -> CheckpointInfo:
    """An :class:`CheckpointInfo` from headers and config only (no tensor data read)."""
    components: dict[str, None] = {}
    unrecognised = 0
    guess = checkpoint.family is GENERIC
    for name, meta in checkpoint.meta.items():
        tensor = checkpoint.parse(name)
        parts = matrix_parts(tensor, meta.shape, checkpoint.config, guess=guess)
        for part in parts:
            components[part.component] = None
        if not parts and tensor.kind == "weight" and len(meta.shape) == 2:
            unrecognised += 1
    lora = None
    if checkpoint.base is not None:
        lora = {
            "rank": checkpoint.rank,
            "alpha": checkpoint.source.config.get("lora_alpha"),
            "targets": len(checkpoint.targets),
            "base": str(checkpoint.base.path),
        }
    return CheckpointInfo(
        label=checkpoint.label,
        path=str(checkpoint.path),
        step=checkpoint.step,
        format=checkpoint.format,
        architecture=checkpoint.architecture,
        model_type=checkpoint.model_type,
        family=checkpoint.family.name,
        n_layers=checkpoint.n_layers,
        hidden_size=checkpoint.hidden_size,
        n_params=checkpoint.n_params,
        dtypes=tuple(checkpoint.dtypes),
        size_bytes=checkpoint.size_bytes,
        tokenizer=checkpoint.tokenizer_dir is not None,
        components=tuple(sorted(components, key=component_order)),
        unrecognised=unrecognised,
        tied_embeddings=checkpoint.tied_embeddings,
        lora=lora,
        values_checked=values_checked,
        experts=max(checkpoint.experts.values()) if checkpoint.experts else None,
        moe_layers=len(checkpoint.experts),
        towers={tower: len(names) for tower, names in checkpoint.towers.items()},
        duplicate_of=duplicate_of,
    )


def inspect_checkpoints(
    paths: Sequence[str | Path | Checkpoint] | str | Path,
    *,
    settings: InspectSettings = InspectSettings(),
    runtime: Runtime = Runtime(),
    progress: ProgressFn | None = None,
    warn: Warn | None = None,
) -> InspectResult:
    """Find the checkpoints at ``paths`` (one sequence, in order) and describe them.

    Args:
        paths: model, adapter or Trainer output directories (or :class:`Checkpoint` objects).
        settings: whether to read every value (:class:`InspectSettings`).
        runtime: how checkpoints are read (``allow_pickle``, ``base``).
        progress: ``progress("checking values", done, total)``.
        warn: unused (inspect's findings are in the result's ``warnings``).

    Raises:
        CheckpointError: unreadable checkpoints, different architectures, NaN/Inf weights.
    """
    checkpoints = resolve_checkpoints(paths, runtime)
    check = check_sequence(checkpoints)
    timings = Timings()
    if settings.check_values:
        total = sum(len(c.names) for c in checkpoints)
        done = 0
        with timings.phase("values"):
            if runtime.ray is not None:  # the same reads, on the cluster (--ray)
                check_values_on_ray(checkpoints, runtime, progress)
            else:
                for c in checkpoints:
                    for name in c.names:
                        require_finite(c.get(name), name, c)
                        done += 1
                        if progress is not None:
                            progress("checking values", done, total)
    pairs = duplicates(checkpoints)
    copies = {j: checkpoints[i].label for i, j in pairs}
    return InspectResult(
        tuple(
            describe(c, values_checked=settings.check_values, duplicate_of=copies.get(k))
            for k, c in enumerate(checkpoints)
        ),
        len(check.names),
        (*check.notes, *duplicate_notes(checkpoints, pairs), *tower_notes(checkpoints[0])),
        dict(timings),
    )
