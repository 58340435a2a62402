"""Per-unit activation magnitudes of every linear layer, measured with forward hooks (MIGU).

For each linear layer (``nn.Linear`` and GPT-2's ``Conv1D``) and output unit i, ``n_i`` sums
``|h_i|`` over every unpadded token of the items; the hooks add each batch's masked sum into one
float64 vector per layer, never keep activations, and are removed when the pass ends, also on
error. :mod:`forgetdiag.analyses.magnitudes` compares these sums between tasks.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from forgetdiag.evaluate import Encoded, accepts_logits_to_keep, batches_by_length, collate
from forgetdiag.runtime import ProgressFn


def linear_modules(model, *, include_head: bool = False) -> dict[str, torch.nn.Module]:
    """Every ``nn.Linear`` and GPT-2 ``Conv1D`` of ``model`` by module name, in model order.

    Args:
        model: a transformers causal LM.
        include_head: also the output head (``get_output_embeddings()``), whose units are
            vocabulary entries.
    """
    from transformers.pytorch_utils import Conv1D

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, (torch.nn.Linear, Conv1D)) and (include_head or m is not head)
    }


class _Recorder:
    """Forward hooks adding ``sum over unpadded tokens of |output|`` per unit (float64).

    Use as a context manager: the hooks are removed on exit, whatever happens inside.
    """

    def __init__(self, modules: dict[str, torch.nn.Module]) -> None:
        self.sums: dict[str, torch.Tensor] = {}  # name -> (units,) float64
        self.skipped: set[str] = set()  # outputs not shaped (batch, tokens, units), e.g. MoE experts
        self.mask: torch.Tensor | None = None  # (B, T) of the batch being run
        self.handles = []
        try:
            for name, module in modules.items():
                self.handles.append(module.register_forward_hook(functools.partial(self._add, name)))
        except BaseException:
            self.remove()
            raise

    def _add(self, name: str, module, args, output) -> None:
        if not isinstance(output, torch.Tensor) or output.shape[:-1] != self.mask.shape:
            self.skipped.add(name)
            return
        mask = self.mask.to(device=output.device, dtype=torch.float32)
        batch_sum = torch.einsum("btu,bt->u", output.detach().float().abs(), mask)  # (units,)
        total = self.sums.get(name)
        self.sums[name] = batch_sum.double() if total is None else total + batch_sum.double()

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def __enter__(self) -> _Recorder:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


@dataclass(frozen=True)
class Magnitudes:
    """Per-unit magnitudes of one model on one task.

    Attributes:
        sums: module name -> (units,) float64, ``sum over tokens of |output unit|``.
        n_tokens: unpadded tokens summed over.
        skipped: linear modules left out (their output is not per token, e.g. MoE experts).
    """

    sums: dict[str, torch.Tensor]
    n_tokens: int
    skipped: tuple[str, ...] = ()


@torch.inference_mode()
def unit_magnitudes(
    model,
    encoded: Sequence[Encoded],
    *,
    pad_id: int,
    batch_size: int = 32,
    include_head: bool = False,
    progress: ProgressFn | None = None,
    label: str = "magnitudes",
) -> Magnitudes:
    """``n_i = sum over tokens of |h_i|`` for every output unit of every linear layer.

    Args:
        model: a causal LM (its device is used).
        encoded: items from :func:`forgetdiag.evaluate.encode`; every unpadded position of
            prompt + completion counts.
        pad_id: any valid token id (padding is masked).
        batch_size: items per forward pass.
        include_head: also the output head (then full logits are computed).
        progress: ``progress(label, done, total)`` after each batch.

    Returns:
        :class:`Magnitudes`; memory held is one float64 vector per linear layer.
    """
    modules = linear_modules(model, include_head=include_head)
    device = next(model.parameters()).device
    extra = {"logits_to_keep": 1} if not include_head and accepts_logits_to_keep(model) else {}
    groups = batches_by_length(encoded, batch_size)
    n_tokens = 0
    with _Recorder(modules) as recorder:
        for done, idx in enumerate(groups):
            batch = collate([encoded[k] for k in idx], pad_id, device)
            recorder.mask = batch.attention_mask  # (B, T)
            model(**batch.model_inputs(), use_cache=False, **extra)
            n_tokens += int(batch.attention_mask.sum())
            if progress is not None:
                progress(label, done + 1, len(groups))
    sums = {name: recorder.sums[name].cpu() for name in modules if name in recorder.sums}
    skipped = tuple(name for name in modules if name in recorder.skipped or name not in recorder.sums)
    return Magnitudes(sums, n_tokens, skipped)
