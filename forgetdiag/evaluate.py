"""How well a model answers probe items: exact match, first-token accuracy, answer-token loss.

Every analysis scores a model the same way, here. An item is a prompt and its *completion*: the
answer's tokens followed by the end-of-sequence token (the model must say the answer and stop).

Greedy decoding produces exactly the completion if and only if, in ONE teacher-forced forward
pass over prompt + completion, the argmax at every completion position equals the completion
token: each greedy step sees exactly the prefix the teacher-forced pass saw. So exact match
needs no autoregressive loop; :func:`score` computes it batched, and :func:`generate_greedy`
(the slow path) is kept to show what a model says instead.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from forgetdiag.errors import ProbeError
from forgetdiag.probes import Probe, ProbeItem
from forgetdiag.scores import ItemScores, Scores  # noqa: F401 - re-exported: score() returns Scores

IGNORE = -100  # target value for positions that are not scored


@dataclass(frozen=True)
class Encoded:
    """Token ids of one item: ``prompt_ids`` then ``completion_ids`` (answer, then EOS)."""

    prompt_ids: tuple[int, ...]
    completion_ids: tuple[int, ...]


def model_context(model_or_config) -> int | None:
    """The model's maximum sequence length from its config, if it has one."""
    config = getattr(model_or_config, "config", model_or_config)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None) if not isinstance(config, dict) else config.get(key)
        if isinstance(value, int) and value > 0:
            return value
    return None


def canonical_split(prompt: str, answer: str) -> tuple[str, str]:
    """Move the prompt's trailing whitespace to the front of the answer.

    Tokenizers merge a space with the word after it (``"A: " + "Kousti"`` is scored as the
    tokens ``"Ġ" "K" "ousti"``, while greedy decoding after ``"A:"`` says ``"ĠK" "ousti"``);
    lm-evaluation-harness moves the whitespace the same way before it tokenizes a continuation.
    """
    kept = prompt.rstrip()
    return kept, prompt[len(kept) :] + answer


def has_bos_text(tokenizer, text: str) -> bool:
    """True when ``text`` already starts with the tokenizer's BOS (a rendered chat template)."""
    bos = getattr(tokenizer, "bos_token", None)
    return bool(bos) and text.startswith(bos)


def encode(
    tokenizer,
    items: Probe | Sequence[ProbeItem],
    *,
    max_length: int | None = None,
    truncate: bool = False,
    add_eos: bool = True,
    stop_id: int | None = None,
    canonical: bool = True,
    warn: Callable[[str], None] | None = None,
) -> list[Encoded]:
    """Tokenize items into prompt and completion ids, as greedy decoding would produce them.

    The prompt's trailing whitespace moves into the answer (:func:`canonical_split`); the
    answer's tokens are those that prompt + answer adds after the prompt's own tokens (the rule
    lm-evaluation-harness uses for a continuation); the stop token ends the completion. A prompt
    that already holds the BOS text (a rendered chat template) gets no second BOS.

    Args:
        tokenizer: a Hugging Face tokenizer.
        items: a :class:`Probe` or its items.
        max_length: the model's context; longer items are an error unless ``truncate``.
        truncate: drop the oldest prompt tokens of items that do not fit (and ``warn`` once).
        add_eos: end each completion with the stop token (when there is one).
        stop_id: the stop token (default ``tokenizer.eos_token_id``; a chat model's end-of-turn
            token, see :func:`forgetdiag.models.stop_tokens`).
        canonical: move the prompt's trailing whitespace into the answer (off for prompts that
            end in a chat template's own text, where the model's turn begins).

    Raises:
        ProbeError: an answer that tokenizes to nothing, or an item longer than the context.
    """
    items = items.items if isinstance(items, Probe) else items
    eos = tokenizer.eos_token_id
    stop = (stop_id if stop_id is not None else eos) if add_eos else None
    encoded, truncated = [], 0
    for row, item in enumerate(items, start=1):
        prompt_text, answer_text = (
            canonical_split(item.prompt, item.answer) if canonical else (item.prompt, item.answer)
        )
        special = not has_bos_text(tokenizer, prompt_text)
        prompt = tokenizer(prompt_text, add_special_tokens=special)["input_ids"]
        full = tokenizer(prompt_text + answer_text, add_special_tokens=special)["input_ids"]
        if special and eos is not None and prompt and prompt[-1] == eos and full[-1] == eos:
            prompt, full = prompt[:-1], full[:-1]  # tokenizers that append EOS themselves
        answer = full[len(prompt) :]
        if not answer:
            raise ProbeError(
                f"probe row {row}: the answer {item.answer!r} tokenizes to nothing; "
                "expected an answer of at least one token"
            )
        completion = [*answer, stop] if stop is not None else answer
        if max_length is not None and len(prompt) + len(completion) > max_length:
            if not truncate or len(completion) >= max_length:
                raise ProbeError(
                    f"probe row {row}: prompt + answer is {len(prompt) + len(completion)} "
                    f"tokens, more than the model's context of {max_length}; shorten "
                    "it or pass --truncate-prompts to drop the prompt's oldest tokens"
                )
            prompt = prompt[len(prompt) + len(completion) - max_length :]
            truncated += 1
        encoded.append(Encoded(tuple(prompt), tuple(completion)))
    if truncated and warn is not None:
        warn(
            f"{truncated} prompts were longer than the model's context of {max_length} tokens "
            "and lost their oldest tokens"
        )
    return encoded


@dataclass(frozen=True)
class Batch:
    """Left-padded prompt + completion: the completion of every row ends at the last position."""

    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T)
    position_ids: torch.Tensor  # (B, T)
    targets: torch.Tensor  # (B, C) completion tokens right-aligned, IGNORE elsewhere

    def model_inputs(self) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask, "position_ids": self.position_ids}


def collate(items: Sequence[Encoded], pad_id: int, device: torch.device | str = "cpu") -> Batch:
    """Left-pad a batch so that every completion ends at the last position.

    The logits predicting the completion then sit at the same trailing positions for every
    row: ``logits[:, -C-1:-1]`` with ``C = targets.shape[1]``.
    """
    width = max(len(e.completion_ids) for e in items)
    # one position before the widest completion must exist: it predicts its first token
    length = max(width + 1, max(len(e.prompt_ids) + len(e.completion_ids) for e in items))
    ids = torch.full((len(items), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(items), length), dtype=torch.long)
    targets = torch.full((len(items), width), IGNORE, dtype=torch.long)
    for b, e in enumerate(items):
        seq = e.prompt_ids + e.completion_ids
        ids[b, length - len(seq) :] = torch.tensor(seq)
        mask[b, length - len(seq) :] = 1
        targets[b, width - len(e.completion_ids) :] = torch.tensor(e.completion_ids)
        if not e.prompt_ids:  # nothing precedes the first token: it cannot be predicted
            targets[b, width - len(e.completion_ids)] = IGNORE
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T) positions restart after padding
    return Batch(ids.to(device), mask.to(device), positions.to(device), targets.to(device))


def completion_logits(model, batch: Batch) -> torch.Tensor:
    """Logits predicting each completion token: (B, C, vocab), aligned with ``batch.targets``."""
    width = batch.targets.shape[1]
    kwargs = batch.model_inputs()
    if accepts_logits_to_keep(model):
        kwargs["logits_to_keep"] = width + 1  # only the trailing positions are needed
    logits = model(**kwargs, use_cache=False).logits  # (B, T' , vocab)
    # across GPUs (--device-map) lm_head may sit on another device than the inputs: come back
    return logits[:, -width - 1 : -1].to(batch.targets.device)


def accepts_logits_to_keep(model) -> bool:
    forward = getattr(model, "forward", None)
    try:
        return "logits_to_keep" in inspect.signature(forward).parameters
    except (TypeError, ValueError):
        return False


def batches_by_length(encoded: Sequence[Encoded], batch_size: int) -> list[list[int]]:
    """Index batches of similar total length (less padding); order is deterministic."""
    order = sorted(range(len(encoded)), key=lambda k: (len(encoded[k].prompt_ids) + len(encoded[k].completion_ids), k))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


@torch.inference_mode()
def score(
    model,
    encoded: Sequence[Encoded],
    *,
    pad_id: int = 0,
    batch_size: int = 32,
    stops: Collection[int] = (),
    progress: Callable[[str, int, int], None] | None = None,
) -> Scores:
    """Score items with one teacher-forced forward pass per batch.

    Args:
        model: a causal LM (its device is used).
        encoded: items from :func:`encode`.
        pad_id: any valid token id (padding is masked).
        batch_size: items per forward pass.
        stops: token ids that end an answer: where the completion holds one of them, the model
            stopping with any of them is right (an instruct model stops on any id of its
            generation config's ``eos_token_id`` or its end-of-turn token).

    Returns:
        :class:`Scores` in the order of ``encoded``.
    """
    n = len(encoded)
    exact, first = np.zeros(n, dtype=bool), np.zeros(n, dtype=bool)
    nll, n_tokens = np.zeros(n, dtype=np.float64), np.zeros(n, dtype=np.int64)
    device = next(model.parameters()).device
    stop_ids = torch.tensor(sorted(set(stops)), dtype=torch.long, device=device)  # (S,)
    groups = batches_by_length(encoded, batch_size)
    for done, idx in enumerate(groups):
        batch = collate([encoded[k] for k in idx], pad_id, device)
        logits = completion_logits(model, batch).float()  # (B, C, V)
        targets = batch.targets  # (B, C)
        valid = targets != IGNORE
        logp = torch.log_softmax(logits, dim=-1)
        token_nll = -logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (B, C)
        said = logits.argmax(-1)  # (B, C)
        hit = (said == targets) | ~valid
        if len(stop_ids):  # a stop where the completion stops: any stop id will do
            hit |= torch.isin(targets, stop_ids) & torch.isin(said, stop_ids)
        first_col = valid.float().argmax(-1)  # (B,) first scored column of each row
        rows = torch.arange(len(idx), device=device)
        exact[idx] = hit.all(-1).cpu().numpy()
        first[idx] = hit[rows, first_col].cpu().numpy()
        nll[idx] = (token_nll * valid).sum(-1).double().cpu().numpy()
        n_tokens[idx] = valid.sum(-1).cpu().numpy()
        if progress is not None:
            progress("scoring", done + 1, len(groups))
    return Scores(exact, first, nll, n_tokens)


def collate_batches(
    encoded: Sequence[Encoded], *, pad_id: int, batch_size: int = 32, device: torch.device | str = "cpu"
) -> list[Batch]:
    """Every batch of :func:`batches_by_length`, collated once on ``device``.

    For callers that evaluate the same items many times (a loss surface): collating once
    keeps the per-evaluation cost at the forward passes.
    """
    return [collate([encoded[k] for k in idx], pad_id, device) for idx in batches_by_length(encoded, batch_size)]


@torch.inference_mode()
def answer_loss(model, batches: Sequence[Batch]) -> float:
    """Mean completion-token cross-entropy over collated batches (nats).

    The same quantity as :attr:`Scores.answer_loss` (token-weighted over all items), without
    the accuracies: one forward pass per batch, and one host sync per batch.

    Args:
        model: a causal LM on the batches' device.
        batches: from :func:`collate_batches`.

    Returns:
        The loss as a Python float (NaN when no token is scored).
    """
    total, count = 0.0, 0
    for batch in batches:
        logits = completion_logits(model, batch).float()  # (B, C, V)
        targets = batch.targets  # (B, C), IGNORE where nothing is scored
        nll = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE, reduction="sum"
        )
        total += float(nll)  # accumulated in float64 across batches
        count += int((targets != IGNORE).sum())
    return total / count if count else float("nan")


@torch.inference_mode()
def generate_greedy(
    model,
    encoded: Sequence[Encoded],
    *,
    pad_id: int,
    eos_id: int | Collection[int] | None,
    batch_size: int = 32,
    max_new_tokens: int | None = None,
) -> list[tuple[int, ...]]:
    """What the model says: greedy ``generate()`` after each prompt, cut at the first stop (kept).

    ``eos_id`` is one stop id or several (any of them ends an answer). ``batch_size=1``
    generates one prompt at a time. Slow next to :func:`score`; use it to show answers, not to
    count them.
    """
    from transformers import GenerationConfig

    stops = _stop_list(eos_id)
    device = next(model.parameters()).device
    out: list[tuple[int, ...]] = [()] * len(encoded)
    for idx in batches_by_length(encoded, batch_size):
        prompts = [Encoded(encoded[k].prompt_ids, ()) for k in idx]
        batch = collate(prompts, pad_id, device)
        budget = max_new_tokens or max(len(encoded[k].completion_ids) for k in idx)
        config = GenerationConfig(
            do_sample=False,
            num_beams=1,
            max_new_tokens=budget,
            min_new_tokens=0,
            eos_token_id=stops or None,
            pad_token_id=pad_id,
        )
        generated = model.generate(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, generation_config=config
        )[:, batch.input_ids.shape[1] :]
        for row, k in enumerate(idx):
            tokens = generated[row].tolist()
            end = next((j for j, t in enumerate(tokens) if t in stops), None)
            out[k] = tuple(tokens if end is None else tokens[: end + 1])
    return out


def _stop_list(eos_id: int | Collection[int] | None) -> list[int]:
    if eos_id is None:
        return []
    return [int(eos_id)] if isinstance(eos_id, int) else sorted({int(i) for i in eos_id})


def exact_by_generation(
    model, encoded: Sequence[Encoded], *, pad_id: int, eos_id: int | Collection[int] | None, batch_size: int = 32
) -> np.ndarray:
    """Greedy exact match the slow way, by generating: (n,) bool. For checks and benchmarks.

    An answer that ends with any stop id where the completion ends with one counts as exact.
    """
    stops = set(_stop_list(eos_id))
    said = generate_greedy(model, encoded, pad_id=pad_id, eos_id=eos_id, batch_size=batch_size)

    def same(s: tuple[int, ...], want: tuple[int, ...]) -> bool:
        if want and want[-1] in stops:
            return len(s) == len(want) and s[:-1] == want[:-1] and s[-1] in stops
        return s == want

    return np.array([same(s, e.completion_ids) for s, e in zip(said, encoded)], dtype=bool)


@torch.inference_mode()
def token_logprobs(
    model,
    encoded: Sequence[Encoded],
    *,
    pad_id: int = 0,
    batch_size: int = 32,
    progress: Callable[[str, int, int], None] | None = None,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Log-probability of every completion token under ``model`` (teacher forced), per item.

    The same forward pass as :func:`score` (left-padded batches, :func:`completion_logits`);
    the log-softmax runs in float64.

    Args:
        model: a causal LM (its device is used).
        encoded: items from :func:`encode`.
        pad_id: any valid token id (padding is masked).
        batch_size: items per forward pass.

    Returns:
        ``(logprobs, predicted)`` in the order of ``encoded``: for item k, ``logprobs[k]`` is a
        (C_k,) float64 array of ``log p(completion token | everything before it)`` (NaN for a
        first token that nothing precedes), and ``predicted[k]`` the (C_k,) int64 argmax token
        the model puts at each of those positions.
    """
    logprobs: list[np.ndarray] = [np.empty(0)] * len(encoded)
    predicted: list[np.ndarray] = [np.empty(0, dtype=np.int64)] * len(encoded)
    device = next(model.parameters()).device
    groups = batches_by_length(encoded, batch_size)
    for done, idx in enumerate(groups):
        batch = collate([encoded[k] for k in idx], pad_id, device)
        logits = completion_logits(model, batch).double()  # (B, C, V)
        targets = batch.targets  # (B, C), right-aligned, IGNORE elsewhere
        logp = torch.log_softmax(logits, dim=-1).gather(-1, targets.clamp(min=0).unsqueeze(-1))
        logp = logp.squeeze(-1).masked_fill(targets == IGNORE, float("nan")).cpu().numpy()  # (B, C)
        top = logits.argmax(-1).cpu().numpy()  # (B, C)
        for row, k in enumerate(idx):
            c = len(encoded[k].completion_ids)  # this item's completion: the last c columns
            logprobs[k], predicted[k] = logp[row, -c:].copy(), top[row, -c:].astype(np.int64)
        if progress is not None:
            progress("token log-probabilities", done + 1, len(groups))
    return logprobs, predicted
