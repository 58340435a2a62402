"""The spurious sample run's task 1, retrained with a remedy (``samples build --remedy``).

Every remedy starts from the same model (the end of task 0) and trains the same steps with the
same data order seed, batch size and learning rate as the shipped run, changing one thing
(docs/remedy.md has each one's reference and the measured outcome):

* ``none``: the shipped recipe;
* ``freeze``: the input embedding and the bottom ``freeze_layers`` layers frozen
  (:func:`forgetdiag.training.freeze_bottom`; 1, what ``forgetdiag advise`` recommends on the
  shipped run);
* ``replay``: the training rows are :func:`forgetdiag.analyses.replay.replay_mix` of the task-1
  rows with task 0's training rows (``replay_ratio`` of the mix), never a row or person of the
  held-out evaluation probe;
* ``self-output``: the training rows are :func:`forgetdiag.analyses.self_output.self_output` of
  the old model (``checkpoint-0``) with the rewrite prompt ``rewrite_prompt``;
* ``mask``: the completion tokens the old model gives less than ``mask_threshold`` probability
  (:func:`forgetdiag.analyses.tokens.token_difficulty`, the keep flags of ``tokens
  --write-mask``) are left out of the loss;
* ``lora``: a LoRA adapter (peft; rank ``lora_rank``, alpha twice the rank, every linear layer
  of the blocks, no dropout) is trained instead of every weight, then merged into the weights.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from forgetdiag.errors import ForgetdiagError
from forgetdiag.evaluate import Encoded, encode
from forgetdiag.probes import Probe, ProbeItem
from forgetdiag.runtime import Runtime
from forgetdiag.settings import REMEDIES
from forgetdiag.training import freeze_bottom


@dataclass
class Task1Plan:
    """What task 1 trains with a remedy: the model to train, its items and per-token masks.

    Attributes:
        model: a copy of the base (a peft model for ``lora``); the base is never changed.
        encoded: the training items, in the order the trainer's seed shuffles.
        keep: per item, one flag per completion token (``mask``), else None.
        notes: what the remedy did, in numbers (rows replayed, rewritten, tokens dropped...).
    """

    model: Any
    encoded: list[Encoded]
    keep: list[tuple[bool, ...]] | None = None
    notes: dict[str, Any] = field(default_factory=dict)

    def merged(self):
        """The trained model as plain weights: the LoRA adapter merged into a copy, else itself."""
        if hasattr(self.model, "merge_and_unload"):
            return copy.deepcopy(self.model).merge_and_unload()
        return self.model


def task1_plan(
    base,
    tokenizer,
    items: Sequence[ProbeItem],
    *,
    remedy: str,
    config,
    data: dict[str, list[ProbeItem]],
    old_checkpoint: Path,
) -> Task1Plan:
    """The model and data task 1 trains with ``remedy`` (:data:`REMEDIES`).

    Args:
        base: the model at the end of task 0 (copied, never changed).
        items: the run's task-1 rows.
        config: the build's :class:`forgetdiag.samples.build.SampleConfig` (the remedies' numbers).
        data: :func:`forgetdiag.samples.build.task_data` (task 0's rows for replay, the
            held-out rows it must never replay).
        old_checkpoint: ``base`` as saved (``checkpoint-0``): the old model that self-output
            and the token mask ask, as a user would with ``forgetdiag remedy`` and ``tokens``.
    """
    if remedy not in REMEDIES:
        raise ForgetdiagError(f"--remedy {remedy!r}: expected one of {', '.join(REMEDIES)}")
    model = copy.deepcopy(base)
    new = Probe("task1", tuple(items))
    runtime = Runtime(batch_size=128)
    if remedy == "freeze":
        frozen = freeze_bottom(model, config.freeze_layers)
        return Task1Plan(model, encode(tokenizer, items), notes={"frozen_tensors": len(frozen)})
    if remedy == "replay":
        from forgetdiag.analyses.replay import ReplaySettings, replay_mix

        mix = replay_mix(
            Probe("task0", tuple(data["recovery"])),
            new,
            exclude=Probe("task0_heldout", tuple(data["old"])),
            settings=ReplaySettings(ratio=config.replay_ratio, seed=config.stage_seed(6)),
        )
        rows = [ProbeItem(r.prompt, r.answer, r.group) for r in mix.rows]
        notes = {"replayed_rows": mix.n_replayed, "replayed_groups": mix.replayed_groups, "rows": len(rows)}
        return Task1Plan(model, encode(tokenizer, rows), notes=notes)
    if remedy == "self-output":
        from forgetdiag.analyses.self_output import SelfOutputSettings, self_output

        result = self_output(
            old_checkpoint, new, settings=SelfOutputSettings(rewrite_prompt=config.rewrite_prompt), runtime=runtime
        )
        rows = [ProbeItem(r.prompt, r.answer, r.group) for r in result.rows]
        notes = {f"rows_{k}": v for k, v in result.counts().items()} | {"rows_rewritten": result.n_rewritten}
        return Task1Plan(model, encode(tokenizer, rows), notes=notes)
    if remedy == "mask":
        return _masked(model, tokenizer, new, config, old_checkpoint, runtime)
    if remedy == "lora":
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError:
            raise ForgetdiagError("--remedy lora needs peft: pip install 'forgetdiag[peft]'") from None
        r = config.lora_rank
        model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules="all-linear"))
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        return Task1Plan(model, encode(tokenizer, items), notes={"trainable_params": trainable})
    return Task1Plan(model, encode(tokenizer, items))


def _masked(model, tokenizer, new: Probe, config, old_checkpoint: Path, runtime: Runtime) -> Task1Plan:
    """The ``mask`` remedy: the keep flags of ``tokens --write-mask`` on the task-1 rows."""
    from forgetdiag.analyses.tokens import TokenSettings, mask_records, token_difficulty

    encoded = encode(tokenizer, new.items)
    result = token_difficulty(
        old_checkpoint, new, settings=TokenSettings(threshold=config.mask_threshold), runtime=runtime
    )
    keep = []
    for record, enc in zip(mask_records(result), encoded):
        if tuple(record["input_ids"]) != enc.prompt_ids + enc.completion_ids:  # one tokenization
            raise AssertionError(f"row {record['index']}: the mask's tokens are not the trained tokens")
        keep.append(tuple(record["keep"][record["n_prompt"] :]))
    dropped = sum(not k for flags in keep for k in flags)
    total = sum(len(flags) for flags in keep)
    notes = {
        "masked_tokens": dropped,
        "completion_tokens": total,
        "rows_with_a_masked_token": sum(not all(f) for f in keep),
    }
    return Task1Plan(model, encoded, keep=keep, notes=notes)
