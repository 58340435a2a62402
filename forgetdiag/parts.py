"""The matrices analyses compare, cut from stored tensors: whole weights, the true parts of fused
ones (q/k/v of a fused attention matrix, gate/up of a fused MLP) and single experts of a fused
3-D mixture-of-experts tensor.

Every part knows how to turn the stored tensor into its canonical ``(out, in)`` matrix and into
the ``(hidden, other)`` matrix whose columns live in the residual stream. What is where is data
in :mod:`forgetdiag.architectures`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch

from forgetdiag.architectures import Component, Family, Split, TensorName, config_int, config_value, parse_name


@dataclass(frozen=True)
class MatrixPart:
    """One weight matrix an analysis compares: a whole tensor, one true part of a fused one, or
    one expert (and part) of a fused 3-D expert tensor.

    ``extract`` turns the stored tensor into this part's canonical ``(out, in)`` matrix;
    ``oriented`` into the ``(hidden, other)`` matrix whose columns live in the residual stream.
    """

    tensor: TensorName
    part: str | None
    component: str
    hidden_side: str
    rows: tuple[int, ...] | None  # the canonical rows of this part, None = all
    expert: int | None = None  # the routed expert (per-expert tensor or index into a 3-D one)

    @property
    def name(self) -> str:
        name = self.tensor.name
        if self.expert is not None and self.tensor.expert is None:  # one expert of a fused tensor
            name = f"{name}[{self.expert}]"
        return name if self.part is None else f"{name}[{self.part}]"

    @property
    def layer(self) -> int | None:
        return self.tensor.layer

    def extract(self, stored: torch.Tensor) -> torch.Tensor:
        """The canonical ``(out, in)`` matrix of this part from the stored tensor."""
        if stored.dim() == 3:  # (experts, ., .): this part's expert
            stored = stored[self.expert]
        canonical = stored.T if self.tensor.spec.stored == "in_out" else stored
        return canonical if self.rows is None else canonical[list(self.rows)]

    def oriented(self, stored: torch.Tensor) -> torch.Tensor:
        """This part with the residual-stream axis first: ``(hidden, other)``."""
        canonical = self.extract(stored)
        return canonical.T if self.hidden_side == "in" else canonical


def matrix_parts(
    tensor: TensorName, shape: tuple[int, ...], config: Mapping[str, Any], *, guess: bool = False
) -> list[MatrixPart]:
    """The comparable matrices inside one stored weight (several for fused q/k/v, one per expert
    and part for a fused 3-D expert tensor).

    With ``guess`` (used for families not in :data:`forgetdiag.architectures.FAMILIES`), an
    unknown 2-D weight with one hidden-size side is taken as a torch Linear whose hidden side is
    that one.
    """
    if guess and tensor.spec is None and tensor.kind == "weight" and len(shape) == 2 and tensor.tower is None:
        tensor = _guessed(tensor, shape, config)
    if not tensor.is_matrix_weight:
        return []
    spec = tensor.spec
    experts: list[int | None] = [tensor.expert]
    if len(shape) == 3 and spec.routed:
        tensor, spec = _oriented_experts(tensor, shape, config)
        experts, shape = list(range(shape[0])), shape[1:]
    elif len(shape) != 2:
        return []
    n_out = shape[1] if spec.stored == "in_out" else shape[0]
    if spec.split is None:
        return [MatrixPart(tensor, None, spec.name, spec.hidden_side, None, e) for e in experts]
    rows = split_rows(spec.split, n_out, config)
    return [
        MatrixPart(tensor, part, part, spec.hidden_side, tuple(idx), e) for e in experts for part, idx in rows.items()
    ]


def _oriented_experts(tensor: TensorName, shape: tuple[int, ...], config: Mapping[str, Any]):
    """A fused 3-D expert tensor with its storage layout checked against the hidden size: the
    family's layout unless only the other one puts the hidden size on the hidden side."""
    spec, hidden = tensor.spec, config_int(config, "hidden_size")

    def fits(stored: str) -> bool:
        out, inp = shape[1:] if stored == "out_in" else shape[1:][::-1]
        return (inp if spec.hidden_side == "in" else out) == hidden

    if hidden is not None and not fits(spec.stored):
        other = "in_out" if spec.stored == "out_in" else "out_in"
        if fits(other):
            spec = replace(spec, stored=other)
            tensor = replace(tensor, spec=spec)
    return tensor, spec


_OUTPUT_SIDE_HINTS = ("o_proj", "out_proj", "down", "dense_4h_to_h", "c_proj", "fc2", "wo", "dense")


def _guessed(tensor: TensorName, shape: tuple[int, ...], config: Mapping[str, Any]) -> TensorName:
    hidden = config_int(config, "hidden_size")
    out_is_hidden, in_is_hidden = shape[0] == hidden, shape[1] == hidden
    if not (out_is_hidden or in_is_hidden):
        return tensor
    if out_is_hidden and in_is_hidden:
        last = tensor.component.rpartition(".")[2]
        side = "out" if any(h in last for h in _OUTPUT_SIDE_HINTS) else "in"
    else:
        side = "in" if in_is_hidden else "out"
    return replace(tensor, spec=Component(tensor.component, hidden_side=side))


def split_rows(split: Split, n_out: int, config: Mapping[str, Any]) -> dict[str, list[int]]:
    """Canonical row indices of each part of a fused matrix with ``n_out`` output rows."""
    n_parts = len(split.parts)
    if split.layout == "blocks":
        sizes = [config_value(config, s) for s in split.sizes] if split.sizes else [n_out // n_parts] * n_parts
        if sum(sizes) != n_out:
            raise ValueError(f"fused matrix has {n_out} rows, expected {sum(sizes)} = {sizes}")
        starts = [sum(sizes[:i]) for i in range(n_parts)]
        return {p: list(range(s, s + n)) for p, s, n in zip(split.parts, starts, sizes)}
    if split.layout == "heads":
        heads = config_value(config, "num_attention_heads")
        head_dim = n_out // (heads * n_parts)
        if heads * n_parts * head_dim != n_out:
            raise ValueError(f"fused matrix has {n_out} rows, not {heads} heads x {n_parts} parts")
        # rows reshape to (heads, parts, head_dim): part p of head h is rows
        # (h * parts + p) * head_dim ... + head_dim
        return {
            p: [(h * n_parts + i) * head_dim + j for h in range(heads) for j in range(head_dim)]
            for i, p in enumerate(split.parts)
        }
    if split.layout == "grouped":
        return _grouped_rows(split, n_out, config)
    raise ValueError(f"unknown split layout {split.layout!r}")


def _grouped_rows(split: Split, n_out: int, config: Mapping[str, Any]) -> dict[str, list[int]]:
    """Falcon's q/k/v: rows reshape to (groups, heads / groups + 2, head_dim); in each group the
    query heads come first, then one key head and one value head. The number of groups follows
    from the rows: (heads + 2 groups) head_dim = n_out."""
    heads, head_dim = config_value(config, "num_attention_heads"), config_value(config, "head_dim")
    slots = n_out // head_dim
    groups = (slots - heads) // 2
    if slots * head_dim != n_out or groups < 1 or heads % groups or heads + 2 * groups != slots:
        raise ValueError(f"fused matrix has {n_out} rows, not (heads {heads} + 2 x groups) x head_dim {head_dim}")
    per = heads // groups + 2  # slots per group: its query heads, one key head, one value head

    def rows(slot_of_group) -> list[int]:
        return [(g * per + s) * head_dim + j for g in range(groups) for s in slot_of_group for j in range(head_dim)]

    q, k, v = split.parts
    return {q: rows(range(per - 2)), k: rows([per - 2]), v: rows([per - 1])}


def experts_per_layer(names_and_shapes: Mapping[str, tuple[int, ...]], family: Family) -> dict[int, int]:
    """Routed experts of every mixture-of-experts layer, counted from the stored tensors: the
    distinct indices of per-expert tensors, or the first axis of a fused 3-D one."""
    found: dict[int, set[int] | int] = {}
    for name, shape in names_and_shapes.items():
        tensor = parse_name(name, family)
        if tensor.spec is None or not tensor.spec.routed or tensor.layer is None:
            continue
        if tensor.expert is not None:
            seen = found.setdefault(tensor.layer, set())
            if isinstance(seen, set):
                seen.add(tensor.expert)
        elif len(shape) == 3:
            found[tensor.layer] = shape[0]
    return {layer: len(v) if isinstance(v, set) else v for layer, v in sorted(found.items())}
