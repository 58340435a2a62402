"""What forgetdiag understands of a run, before anything expensive: ``forgetdiag inspect``."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

from forgetdiag.architectures import GENERIC, matrix_parts
from forgetdiag.checkpoints import Checkpoint, find_sequence
from forgetdiag.streaming import ProgressFn, check_sequence, require_finite


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


@dataclass(frozen=True)
class InspectResult:
    """Checkpoints in sequence order, and what the sequence shares."""

    checkpoints: tuple[CheckpointInfo, ...]
    shared_tensors: int
    notes: tuple[str, ...]

    def to_dict(self) -> dict:
        return {"checkpoints": [asdict(c) for c in self.checkpoints],
                "compatible": True, "shared_tensors": self.shared_tensors, "notes": list(self.notes)}


_ORDER = ("embed", "pos_embed", "q", "k", "v", "o", "gate", "up", "down", "fc_in", "fc_out", "lm_head")


def component_order(component: str) -> tuple[int, str]:
    """Sort key: the order components appear in a forward pass, unknown ones last."""
    return (_ORDER.index(component) if component in _ORDER else len(_ORDER), component)


def describe(checkpoint: Checkpoint, *, values_checked: bool = False) -> CheckpointInfo:
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
        lora = {"rank": checkpoint.rank, "alpha": checkpoint.source.config.get("lora_alpha"),
                "targets": len(checkpoint.targets), "base": str(checkpoint.base.path)}
    return CheckpointInfo(
        label=checkpoint.label, path=str(checkpoint.path), step=checkpoint.step,
        format=checkpoint.format, architecture=checkpoint.architecture,
        model_type=checkpoint.model_type, family=checkpoint.family.name,
        n_layers=checkpoint.n_layers, hidden_size=checkpoint.hidden_size,
        n_params=checkpoint.n_params, dtypes=tuple(checkpoint.dtypes),
        size_bytes=checkpoint.size_bytes, tokenizer=checkpoint.tokenizer_dir is not None,
        components=tuple(sorted(components, key=component_order)), unrecognised=unrecognised,
        tied_embeddings=checkpoint.tied_embeddings, lora=lora, values_checked=values_checked)


def inspect_checkpoints(paths: Sequence[str | Path], *, allow_pickle: bool = False,
                        base: str | Path | None = None, check_values: bool = True,
                        progress: ProgressFn | None = None) -> InspectResult:
    """Find the checkpoints at ``paths`` (one sequence, in order) and describe them.

    Args:
        paths: model, adapter or Trainer output directories.
        allow_pickle: also read ``pytorch_model.bin`` (with ``weights_only=True``).
        base: base model of LoRA adapters.
        check_values: read every tensor once and refuse NaN or Inf (named in the error).

    Raises:
        CheckpointError: unreadable checkpoints, different architectures, NaN/Inf weights.
    """
    checkpoints = find_sequence(paths, allow_pickle=allow_pickle, base=base)
    check = check_sequence(checkpoints)
    if check_values:
        total = sum(len(c.names) for c in checkpoints)
        done = 0
        for c in checkpoints:
            for name in c.names:
                require_finite(c.get(name), name, c)
                done += 1
                if progress is not None:
                    progress("checking values", done, total)
    return InspectResult(tuple(describe(c, values_checked=check_values) for c in checkpoints),
                         len(check.names), check.notes)
