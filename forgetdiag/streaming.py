"""Compare checkpoints of one run and stream their tensors one name at a time.

``stream_tensors`` reads tensor ``name`` from every checkpoint, yields the N tensors, and moves
on: an analysis over N checkpoints of a 7B model holds N tensors, not N models. ``stream_updates``
yields the updates C[j] - C[i] for chosen pairs, computed from LoRA factors alone when every
checkpoint is an adapter over one shared base.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from forgetdiag.architectures import TensorName, config_int
from forgetdiag.errors import CheckpointError
from forgetdiag.runtime import ProgressFn
from forgetdiag.storage import Checkpoint

# Config fields that must agree for two checkpoints to be one architecture (canonical names:
# GPT-2's n_embd/n_layer/n_head and a wrapper's text_config are read through config_int).
_ARCH_FIELDS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "num_experts",
)
_VOCAB_COMPONENTS = ("embed", "lm_head")
_BLOCK = 1 << 18  # elements per block of _difference's conversion: 1 MiB of float32


@dataclass(frozen=True)
class SequenceCheck:
    """What a sequence of checkpoints has in common.

    Attributes:
        names: tensors present in every checkpoint, in the first checkpoint's order.
        rows: for vocabulary tensors resized along the run, the common number of rows compared.
        notes: differences that are handled, in words (vocabulary resized, tensors not shared).
    """

    names: tuple[str, ...]
    rows: dict[str, int] = field(default_factory=dict)
    notes: tuple[str, ...] = ()


def check_sequence(checkpoints: Sequence[Checkpoint]) -> SequenceCheck:
    """Check that ``checkpoints`` share one architecture and tensor shapes.

    Raises:
        CheckpointError: the checkpoints are of different architectures, or a shared tensor
            differs in shape (other than the vocabulary rows of embeddings and lm_head).
    """
    if not checkpoints:
        raise CheckpointError("no checkpoints given; expected at least one")
    first = checkpoints[0]
    for other in checkpoints[1:]:
        _check_architecture(first, other)
        _check_experts(first, other)
    shared = [n for n in first.names if all(n in c.meta for c in checkpoints[1:])]
    notes, rows = [], {}
    only_some = sorted({n for c in checkpoints for n in c.names} - set(shared))
    if only_some:
        notes.append(f"{len(only_some)} tensors are not in every checkpoint and are left out (first: {only_some[0]})")
    for name in shared:
        shapes = [c.meta[name].shape for c in checkpoints]
        if len(set(shapes)) == 1:
            continue
        tensor = first.parse(name)
        if tensor.component in _VOCAB_COMPONENTS and len({s[1:] for s in shapes}) == 1:
            rows[name] = min(s[0] for s in shapes)
            notes.append(
                f"vocabulary resized along the run: {name} has "
                f"{'/'.join(str(s[0]) for s in shapes)} rows; the first {rows[name]} "
                "rows are compared"
            )
            continue
        i = next(k for k, s in enumerate(shapes) if s != shapes[0])
        raise CheckpointError(
            f"checkpoints differ in shape: {name} is {shapes[0]} in "
            f"{first.label} and {shapes[i]} in {checkpoints[i].label}; "
            "expected one architecture throughout"
        )
    return SequenceCheck(tuple(shared), rows, tuple(notes))


def _check_architecture(a: Checkpoint, b: Checkpoint) -> None:
    if a.model_type is not None and b.model_type is not None and a.model_type != b.model_type:
        raise CheckpointError(
            f"checkpoints of different architectures: {a.label} is {_describe(a)} but {b.label} is "
            f"{_describe(b)} (model_type {a.model_type} vs {b.model_type}); expected one architecture throughout"
        )
    for key in _ARCH_FIELDS:
        va, vb = config_int(a.config, key), config_int(b.config, key)
        if va is not None and vb is not None and va != vb:
            raise CheckpointError(
                f"checkpoints of different architectures: {a.label} is "
                f"{_describe(a)} but {b.label} is {_describe(b)} ({key} "
                f"{va} vs {vb}); expected one architecture throughout"
            )


def _check_experts(a: Checkpoint, b: Checkpoint) -> None:
    """Refuse checkpoints whose mixture-of-experts layers hold different numbers of experts
    (counted from the tensors, whatever the configs say)."""
    ea, eb = a.experts, b.experts
    for layer in sorted(set(ea) | set(eb)):
        if ea.get(layer) != eb.get(layer):
            raise CheckpointError(
                f"checkpoints differ in their experts: layer {layer} holds {ea.get(layer, 0)} experts in "
                f"{a.label} and {eb.get(layer, 0)} in {b.label}; expected one architecture throughout"
            )


def _describe(c: Checkpoint) -> str:
    return f"{c.architecture} ({c.n_layers} layers, hidden {c.hidden_size})"


def require_finite(tensor: torch.Tensor, name: str, checkpoint: Checkpoint) -> torch.Tensor:
    """``tensor`` unchanged, or a CheckpointError naming the tensor if it holds NaN or Inf."""
    if not tensor.is_floating_point():
        return tensor
    # One fast reduction, no copy: a sum is finite when every element is (a finite sum can
    # only fail by overflow, which the checks after it rule out). Half-precision tensors are
    # summed in their own dtype first (float accumulation inside, ~30x faster on CPU than
    # sum(dtype=float32)); a float16 sum overflows past 65504, so float32 comes next.
    if bool(torch.isfinite(tensor.sum())):
        return tensor
    if tensor.element_size() < 4 and bool(torch.isfinite(tensor.sum(dtype=torch.float32))):
        return tensor
    if bool(torch.isfinite(tensor).all()):
        return tensor
    kind = "NaN" if bool(torch.isnan(tensor).any()) else "Inf"
    file = getattr(checkpoint.meta.get(name), "file", None)  # the shard, where known
    raise CheckpointError(
        f"{checkpoint.label}: tensor {name} holds {kind} values ({file or checkpoint.path}); expected finite weights"
    )


def stream_tensors(
    checkpoints: Sequence[Checkpoint],
    names: Sequence[str] | None = None,
    *,
    check: SequenceCheck | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    progress: ProgressFn | None = None,
) -> Iterator[tuple[TensorName, list[torch.Tensor]]]:
    """Yield ``(name, [tensor in each checkpoint])`` one tensor name at a time.

    Args:
        checkpoints: a compatible sequence (see :func:`check_sequence`).
        names: tensor names to read (default: every shared tensor).
        check: a precomputed :func:`check_sequence` result.
        dtype, device: where the tensors are delivered (float32 on CPU by default).
        progress: called as ``progress("reading tensors", done, total)``.

    Raises:
        CheckpointError: a tensor holds NaN or Inf (named in the message).

    Memory: a loop variable keeps the previous name's tensors alive while the next ones are
    read; ``del`` them at the end of the loop body to hold one name's tensors, not two.
    """
    check = check or check_sequence(checkpoints)
    names = list(check.names if names is None else names)
    for done, name in enumerate(names):
        _prefetch(checkpoints, names, done)
        rows = check.rows.get(name)
        tensors = []
        for c in checkpoints:
            t = require_finite(c.get(name, dtype=dtype, device=device), name, c)
            tensors.append(t if rows is None else t[:rows])
            del t  # hold each tensor once: in the list only
        yield checkpoints[0].parse(name), tensors
        del tensors
        if progress is not None:
            progress("reading tensors", done + 1, len(names))


def shared_lora_base(checkpoints: Sequence[Checkpoint]) -> str | None:
    """The base path if every checkpoint is that base or a LoRA adapter over it, else None."""
    bases = {str((c.base or c).path.resolve()) for c in checkpoints}
    if len(bases) == 1 and any(c.base is not None for c in checkpoints):
        return bases.pop()
    return None


def stream_updates(
    checkpoints: Sequence[Checkpoint],
    pairs: Sequence[tuple[int, int]],
    names: Sequence[str] | None = None,
    *,
    check: SequenceCheck | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    progress: ProgressFn | None = None,
) -> Iterator[tuple[TensorName, dict[tuple[int, int], torch.Tensor | None]]]:
    """Yield ``(name, {(i, j): C[j] - C[i]})`` one tensor name at a time.

    When all checkpoints are LoRA adapters over one base (or that base), updates come from the
    adapters' ``scale * B @ A`` alone, the base is never read, and an update that no adapter
    touches is ``None`` (exactly zero). Otherwise each tensor is read once per checkpoint that
    takes part in a pair.
    """
    check = check or check_sequence(checkpoints)
    names = list(check.names if names is None else names)
    used = sorted({k for pair in pairs for k in pair})
    from_deltas = shared_lora_base(checkpoints) is not None
    for done, name in enumerate(names):
        if not from_deltas:
            _prefetch([checkpoints[k] for k in used], names, done)
        rows = check.rows.get(name)
        values: dict[int, torch.Tensor | None] = {}
        for k in used:
            c = checkpoints[k]
            if from_deltas:
                t = c.delta(name, dtype=dtype, device=device)
            else:  # the stored dtype: the differences below cast inside the subtraction
                t = c.get(name, dtype=dtype if c.base is not None else None, device=device)
            if t is not None:
                t = require_finite(t, name, c)
                t = t if rows is None else t[:rows]
            values[k] = t
            del t
        updates = {(i, j): _difference(values[i], values[j], dtype) for i, j in pairs}
        del values  # the updates are all the caller needs
        yield checkpoints[0].parse(name), updates
        del updates
        if progress is not None:
            progress("reading tensors", done + 1, len(names))


def _prefetch(checkpoints: Sequence[Checkpoint], names: Sequence[str], done: int) -> None:
    """Before name ``done`` is read: start reading the name after it in the background (and
    this one, on the first call), so a cold read overlaps the work on the current tensors."""
    for name in names[done + 1 : done + 2] if done else names[:2]:
        for c in checkpoints:
            c.prefetch(name)


def _difference(a: torch.Tensor | None, b: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """``b - a`` in ``dtype``: exactly ``b.to(dtype) - a.to(dtype)``, in one new tensor.

    On CPU ``a`` is converted a block at a time into a small scratch buffer that stays in cache:
    an in-place subtraction of a tensor of another dtype takes PyTorch's slow casting path there
    (on a (5632, 2048) bf16 operand 24 ms, against 6 ms for block conversion and subtraction),
    and converting ``a`` whole would allocate a second full-size tensor.
    """
    if a is None and b is None:
        return None
    if a is None:
        return b.to(dtype, copy=True)
    if b is None:
        return a.to(dtype, copy=True).neg_()
    out = b.to(dtype, copy=True)
    if a.dtype == dtype or not a.is_contiguous() or out.device.type != "cpu":
        return out.sub_(a)  # on a GPU the casting kernel is fast: no blocks
    flat_out, flat_a = out.view(-1), a.view(-1)
    scratch = torch.empty(min(_BLOCK, flat_a.numel()), dtype=dtype, device=out.device)
    for start in range(0, flat_a.numel(), _BLOCK):
        part = flat_a[start : start + _BLOCK]
        flat_out[start : start + part.numel()].sub_(scratch[: part.numel()].copy_(part))
    return out
