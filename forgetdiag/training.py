"""A small, deterministic fine-tuning loop with the loss on completion tokens only.

Used by the recovery probe (fine-tune a copy of a checkpoint on a few old-task examples) and by
the sample builder (pretraining on biographies, QA fine-tuning). The prompt is masked: only the
answer and its EOS are learned. An item with an empty prompt is plain language modelling of
its completion (its first token is not predicted).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from forgetdiag.architectures import LAYER_PATTERN, tower_of
from forgetdiag.evaluate import IGNORE, Encoded, collate
from forgetdiag.validate import check_choice, check_number, check_seed, choices

Schedule = Literal["constant", "linear", "cosine"]


@dataclass(frozen=True)
class TrainConfig:
    """The budget and optimiser of a fine-tune (AdamW).

    Attributes:
        epochs: passes over the data (ignored when ``max_steps`` is set).
        lr: peak learning rate.
        batch_size: items per step.
        max_steps: stop after this many steps (default: ``epochs`` passes).
        schedule: ``constant``, ``linear`` (decay to 0) or ``cosine`` (decay to 0).
        warmup_steps: linear warm-up steps.
        weight_decay: AdamW weight decay.
        grad_clip: clip the gradient norm (None: no clipping).
        seed: data order and dropout seed (same seed, same result).
    """

    epochs: int = 1
    lr: float = 1e-4
    batch_size: int = 32
    max_steps: int | None = None
    schedule: Schedule = "constant"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        check_number("epochs", self.epochs, low=1, integer=True)
        check_number("lr", self.lr, low=0, low_open=True)
        check_number("batch_size", self.batch_size, low=1, integer=True)
        check_number("max_steps", self.max_steps, low=0, integer=True, optional=True)
        check_choice("schedule", self.schedule, choices(Schedule))
        check_number("warmup_steps", self.warmup_steps, low=0, integer=True)
        check_number("weight_decay", self.weight_decay, low=0)
        check_number("grad_clip", self.grad_clip, low=0, low_open=True, optional=True)
        check_seed("seed", self.seed)

    def total_steps(self, n_items: int) -> int:
        per_epoch = math.ceil(n_items / self.batch_size)
        return self.max_steps if self.max_steps is not None else per_epoch * self.epochs


def lr_factor(step: int, total: int, *, schedule: str, warmup: int) -> float:
    """The learning-rate multiplier at ``step`` (0-based) of ``total``."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    raise ValueError(f"unknown schedule {schedule!r}; expected constant, linear or cosine")


def completion_loss(
    model, items: Sequence[Encoded], pad_id: int, keep: Sequence[Sequence[bool]] | None = None
) -> torch.Tensor:
    """Mean cross-entropy over the completion tokens of a batch (prompt and padding masked).

    ``keep`` (one flag per completion token of each item) drops the tokens flagged False from
    the loss (selective token masking); they stay in the input as context. A batch whose every
    token is dropped gives a zero loss (and zero gradients).
    """
    device = next(model.parameters()).device
    batch = collate(items, pad_id, device)
    targets = batch.targets  # (B, C) completion tokens right-aligned
    width = targets.shape[1]
    if keep is not None:
        drop = torch.zeros_like(targets, dtype=torch.bool)
        for b, flags in enumerate(keep):
            if len(flags) != len(items[b].completion_ids):
                raise ValueError(f"keep mask of {len(flags)} flags for a completion of {len(items[b].completion_ids)}")
            drop[b, width - len(flags) :] = ~torch.tensor(list(flags), dtype=torch.bool)
        targets = targets.masked_fill(drop.to(device), IGNORE)
    logits = model(**batch.model_inputs(), use_cache=False).logits[:, -width - 1 : -1]  # (B, C, V)
    if keep is not None and not bool((targets != IGNORE).any()):
        return logits.float().sum() * 0.0  # nothing left to learn in this batch
    return torch.nn.functional.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE
    )


def train(
    model,
    encoded: Sequence[Encoded],
    config: TrainConfig,
    *,
    pad_id: int = 0,
    on_step: Callable[[int, float], None] | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    keep: Sequence[Sequence[bool]] | None = None,
) -> list[float]:
    """Fine-tune ``model`` in place on ``encoded`` and return the loss of every step.

    Only parameters with ``requires_grad`` are trained (freeze layers by turning it off).
    The caller's global RNG state is left as it was.

    Args:
        model: a causal LM; it is put in train mode and back in eval mode at the end.
        encoded: items from :func:`forgetdiag.evaluate.encode`.
        config: the budget (:class:`TrainConfig`).
        pad_id: any valid token id.
        on_step: called as ``on_step(step, loss)`` after every optimiser step (1-based).
        progress: called as ``progress("training", step, total)``.
        keep: per item, one flag per completion token; tokens flagged False are left out of
            the loss (selective token masking, :func:`completion_loss`). None: every token.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params or not encoded:
        return []
    if keep is not None and len(keep) != len(encoded):
        raise ValueError(f"{len(keep)} keep masks for {len(encoded)} items")
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    total = config.total_steps(len(encoded))
    generator = torch.Generator().manual_seed(config.seed)
    losses: list[float] = []
    devices = [model.device] if getattr(model, "device", torch.device("cpu")).type == "cuda" else []
    model.train()
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(config.seed)  # dropout, if the model has any
        step = 0
        while step < total:
            order = torch.randperm(len(encoded), generator=generator).tolist()
            for start in range(0, len(order), config.batch_size):
                if step >= total:
                    break
                picked = order[start : start + config.batch_size]
                batch = [encoded[k] for k in picked]
                for group in optimizer.param_groups:
                    group["lr"] = config.lr * lr_factor(
                        step, total, schedule=config.schedule, warmup=config.warmup_steps
                    )
                loss = completion_loss(model, batch, pad_id, None if keep is None else [keep[k] for k in picked])
                loss.backward()
                if config.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                losses.append(float(loss.detach()))
                if on_step is not None:
                    on_step(step, losses[-1])
                if progress is not None:
                    progress("training", step, total)
    model.eval()
    return losses


def freeze_bottom(model, n_layers: int, *, embedding: bool = True) -> list[str]:
    """Turn off ``requires_grad`` of the input embedding and of decoder layers ``0 .. n_layers-1``.

    Layers are matched by their parsed index (``layers.1.`` never matches layer 10); the input
    embedding is the module ``get_input_embeddings()`` returns (tied to the LM head in models
    that tie them, which then stays frozen too). Returns the frozen parameter names.
    """
    embed_params = set()
    if embedding:
        embed_params = {id(p) for p in model.get_input_embeddings().parameters()}
    frozen = []
    for name, param in model.named_parameters():
        match = LAYER_PATTERN.search(name)
        in_text_layer = match and int(match.group(1)) < n_layers and tower_of(name) is None
        if id(param) in embed_params or in_text_layer:
            param.requires_grad_(False)
            frozen.append(name)
    return frozen
