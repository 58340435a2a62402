"""The second moment of every linear layer's input, ``X^T X`` over the probe's tokens: what
the data-informed null of ``angles`` is drawn from (:class:`forgetdiag.nulls.InputSpectrum`).

One forward pass over the probe (prompt and answer tokens, as training sees them); forward
hooks add each batch's masked ``x^T x`` into one float64 (in, in) matrix per distinct input.
Modules fed the very same tensor (q, k and v; gate and up) share one matrix, so a layer holds
two, not five. The hooks are removed when the pass ends, also on error.
"""

from __future__ import annotations

import functools
from collections.abc import Collection, Sequence

import torch

from forgetdiag.analyses.activations import linear_modules
from forgetdiag.evaluate import Encoded, accepts_logits_to_keep, batches_by_length, collate
from forgetdiag.runtime import ProgressFn


class _MomentRecorder:
    def __init__(self, modules: dict[str, torch.nn.Module]) -> None:
        self.sums: dict[str, torch.Tensor] = {}  # group (first module fed the input) -> (in, in)
        self.group: dict[str, str] = {}  # module name -> its group
        self.mask: torch.Tensor | None = None  # (B, T)
        self._last: tuple[torch.Tensor, str] | None = None  # (the last input seen, its group)
        self.handles = []
        try:
            for name, module in modules.items():
                self.handles.append(module.register_forward_pre_hook(functools.partial(self._add, name)))
        except BaseException:
            self.remove()
            raise

    def _add(self, name: str, module, args) -> None:
        x = args[0] if args else None
        if not isinstance(x, torch.Tensor) or x.shape[:-1] != self.mask.shape:
            return  # not (batch, tokens, in): e.g. routed experts see gathered tokens
        if self._last is not None and self._last[0] is x:
            self.group[name] = self._last[1]  # the same tensor as the previous module: shared
            return
        self._last = (x, name)  # held, so no new tensor can take its place
        self.group.setdefault(name, name)
        flat = x.detach().float()[self.mask.to(x.device, torch.bool)]  # (tokens, in)
        moment = (flat.mT @ flat).double()  # (in, in)
        total = self.sums.get(name)
        self.sums[name] = moment.cpu() if total is None else total + moment.cpu()

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


@torch.inference_mode()
def input_second_moments(
    model,
    encoded: Sequence[Encoded],
    *,
    pad_id: int,
    batch_size: int = 32,
    progress: ProgressFn | None = None,
    label: str = "layer inputs",
    only: Collection[str] | None = None,
) -> tuple[dict[str, torch.Tensor], int]:
    """``{module name: X^T X}`` (in, in) float64 for every linear layer (the output head too),
    X its inputs at every unpadded token of the items; and the number of tokens.

    ``only``: the module names to record (default all); ``angles`` asks for the layers whose
    hidden side is their input (a down projection's wide input would cost the most and serve
    no null). Each batch's product runs in float32 and is summed in float64."""
    modules = {name: m for name, m in linear_modules(model, include_head=True).items() if only is None or name in only}
    device = next(model.parameters()).device
    extra = {"logits_to_keep": 0} if accepts_logits_to_keep(model) else {}
    groups = batches_by_length(encoded, batch_size)
    recorder, n_tokens = _MomentRecorder(modules), 0
    try:
        for done, idx in enumerate(groups):
            batch = collate([encoded[k] for k in idx], pad_id, device)
            recorder.mask = batch.attention_mask  # (B, T)
            recorder._last = None
            model(**batch.model_inputs(), use_cache=False, **extra)
            n_tokens += int(batch.attention_mask.sum())
            if progress is not None:
                progress(label, done + 1, len(groups))
    finally:
        recorder.remove()
        recorder._last = None
    return {name: recorder.sums[group] for name, group in recorder.group.items()}, n_tokens
