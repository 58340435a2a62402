"""Which parameter of a loaded model each checkpoint tensor sets, and where inside it.

transformers does not always hold a checkpoint's tensors under their stored names and shapes:

* a multimodal wrapper stores ``language_model.model.layers.0...`` (or ``model.layers.0...``)
  and loads it as ``model.language_model.layers.0...``; Llama 4's text-only class drops the
  ``language_model.`` prefix;
* Mixtral stores ``block_sparse_moe``, loaded as ``mlp``;
* transformers 5 writes every routed expert's gate, up and down as its own 2-D tensor
  (``mlp.experts.3.gate_proj.weight``, Mixtral ``w1``/``w3``/``w2``) but holds all experts in
  two fused 3-D parameters: ``experts.gate_up_proj`` (experts, 2 x inter, hidden), gate rows
  first, and ``experts.down_proj`` (experts, hidden, inter); Llama 4 keeps them transposed;
* GPT-NeoX's ``embed_out`` is loaded as ``lm_head``.

:func:`bind` finds, for each checkpoint tensor, a :class:`Target`: the parameter, the block of
it the tensor fills, and whether the tensor is that block transposed. Layouts are read from the
shapes, and :meth:`Target.matches` checks a binding against the values the model was loaded
from, so that a plane through checkpoints sets the model's weights exactly.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from forgetdiag.architectures import tower_of

# Name rewrites between a checkpoint and a loaded model, tried in turn (both directions are
# listed where both occur): wrappers, Mixtral's block name, Llama 4's text-only class.
_REWRITES = (
    (r"^language_model\.model\.", "model.language_model."),
    (r"^model\.language_model\.", "language_model.model."),
    (r"^language_model\.lm_head\.", "lm_head."),
    (r"^model\.(?!language_model\.)", "model.language_model."),
    (r"^language_model\.model\.", "model."),
    (r"^language_model\.", ""),
    (r"\.block_sparse_moe\.", ".mlp."),
)
_EXPERT = re.compile(
    r"^(?P<prefix>.*\.experts)\.(?P<expert>\d+)\.(?P<kind>gate_proj|up_proj|down_proj|w1|w2|w3)\.weight$"
)
_GATE, _UP = ("gate_proj", "w1"), ("up_proj", "w3")


@dataclass(frozen=True)
class Target:
    """Where one checkpoint tensor lives in a loaded model.

    Attributes:
        name: the checkpoint tensor.
        param_name: the model parameter it sets.
        param: that parameter.
        index: the block of the parameter it fills (e.g. ``(3, slice(0, 64))``: expert 3's gate
            rows of a fused ``gate_up_proj``), or None for all of it.
        transposed: the checkpoint tensor is the transpose of that block.
    """

    name: str
    param_name: str
    param: torch.nn.Parameter
    index: tuple | None = None
    transposed: bool = False

    def view(self, whole: torch.Tensor | None = None) -> torch.Tensor:
        """The block of ``whole`` (default: the parameter's data) laid out as the checkpoint
        tensor; writing into it writes into ``whole``."""
        data = self.param.data if whole is None else whole
        block = data if self.index is None else data[self.index]
        return block.mT if self.transposed else block

    def write(self, value: torch.Tensor, whole: torch.Tensor | None = None) -> None:
        """Copy a checkpoint value into the parameter (or ``whole``), cast to its dtype."""
        view = self.view(whole)
        view.copy_(value.reshape(view.shape).to(device=view.device, dtype=view.dtype))

    def matches(self, value: torch.Tensor) -> bool:
        """The parameter holds ``value`` as cast to its dtype (to two roundings: a LoRA adapter
        merged into a half-precision base is rounded once more than its float32 value)."""
        view = self.view().detach().cpu()
        if tuple(view.shape) != tuple(value.shape):
            return False
        if torch.equal(view, value.to(view.dtype)):
            return True
        eps = torch.finfo(view.dtype).eps if view.is_floating_point() else 0
        return bool(eps) and torch.allclose(view.float(), value.float(), rtol=2 * eps, atol=0.0)


@dataclass
class Binding:
    """Targets of the checkpoint tensors a model has parameters for.

    Attributes:
        targets: checkpoint name -> :class:`Target`.
        aliases: names whose parameter another name already sets (tied weights), set once.
        mapped: names bound under another name or into a block of a fused parameter.
        towers: names of a wrapper's non-text towers (vision tower, projector), never bound.
    """

    targets: dict[str, Target] = field(default_factory=dict)
    aliases: list[str] = field(default_factory=list)
    mapped: list[str] = field(default_factory=list)
    towers: list[str] = field(default_factory=list)


def candidates(name: str, prefix: str = "") -> list[str]:
    """Names a checkpoint tensor may have in a loaded model: its own, with the model's
    ``base_model_prefix`` added or removed, and each rewrite of :data:`_REWRITES`."""
    out = [name]
    if prefix:
        out += [f"{prefix}.{name}", name.removeprefix(f"{prefix}.")]
    for pattern, replacement in _REWRITES:
        out += [re.sub(pattern, replacement, n, count=1) for n in list(out)]
    return list(dict.fromkeys(out))


def bind(model: torch.nn.Module, names: Sequence[str], shapes: dict[str, tuple[int, ...]]) -> Binding:
    """Find the parameter (and block) each checkpoint tensor sets in ``model``.

    Args:
        model: a loaded model.
        names: checkpoint tensor names.
        shapes: their stored shapes.

    Returns:
        A :class:`Binding`; names that reach no parameter are in none of its lists (the caller
        may still match them by value, e.g. a renamed tensor).
    """
    params = dict(model.named_parameters(remove_duplicate=False))
    prefix = getattr(model, "base_model_prefix", "") or ""
    binding, owner = Binding(), {}
    for name in names:
        if tower_of(name) is not None:
            binding.towers.append(name)
            continue
        target = _whole(name, shapes[name], params, prefix) or _expert_block(name, shapes[name], params, prefix)
        if target is None:
            continue
        key = (id(target.param), repr(target.index), target.transposed)
        if key in owner:
            binding.aliases.append(name)
            continue
        owner[key] = name
        binding.targets[name] = target
        if target.param_name != name or target.index is not None:
            binding.mapped.append(name)
    return binding


def _whole(name: str, shape: tuple[int, ...], params: dict, prefix: str) -> Target | None:
    """The parameter of the same shape, or one with more rows (a vocabulary grown since the
    checkpoint): its first rows."""
    found = [(c, params[c]) for c in candidates(name, prefix) if c in params]
    for candidate, param in found:
        if tuple(param.shape) == tuple(shape):
            return Target(name, candidate, param)
    for candidate, param in found:
        if len(shape) == 2 and tuple(param.shape[1:]) == tuple(shape[1:]) and param.shape[0] > shape[0]:
            return Target(name, candidate, param, (slice(0, shape[0]),))
    return None


def _expert_block(name: str, shape: tuple[int, ...], params: dict, prefix: str) -> Target | None:
    """One expert's 2-D tensor as its block of a fused 3-D parameter (either layout)."""
    match = _EXPERT.match(name)
    if match is None or len(shape) != 2:
        return None
    expert, kind = int(match["expert"]), match["kind"]
    fused = "down_proj" if kind in ("down_proj", "w2") else "gate_up_proj"
    for candidate in candidates(f"{match['prefix']}.{fused}", prefix):
        param = params.get(candidate)
        if param is None or param.dim() != 3 or expert >= param.shape[0]:
            continue
        rows, cols = param.shape[1:]
        if fused == "down_proj":
            if (rows, cols) == tuple(shape):
                return Target(name, candidate, param, (expert,))
            if (cols, rows) == tuple(shape):
                return Target(name, candidate, param, (expert,), transposed=True)
            continue
        inter, hidden = shape
        half = slice(0, inter) if kind in _GATE else slice(inter, 2 * inter)
        if (rows, cols) == (2 * inter, hidden):  # transformers 5: (experts, gate|up rows, hidden)
            return Target(name, candidate, param, (expert, half))
        if (rows, cols) == (hidden, 2 * inter):  # Llama 4: (experts, hidden, gate|up columns)
            return Target(name, candidate, param, (expert, slice(None), half), transposed=True)
    return None
