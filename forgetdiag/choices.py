"""Multiple-choice scoring, as lm-evaluation-harness scores its ``multiple_choice`` tasks.

Each choice is a continuation of the prompt: the prompt's trailing whitespace moves into it
(:func:`forgetdiag.evaluate.canonical_split`), its tokens are those that prompt + choice adds
after the prompt's own tokens, and no stop token follows (a choice is scored, not said). Its
log-likelihood is the sum of its tokens' log-probabilities, teacher forced. Per item:

* ``acc``: the likeliest choice (argmax of the summed log-likelihoods) is the right one;
* ``acc_norm``: the same after dividing each log-likelihood by the choice's length in
  characters (the choice's text as written, without the prompt's moved whitespace: the length
  lm-eval takes of ``doc_to_choice``'s strings).

Every (item, choice) pair of a probe goes through the batched teacher-forced passes of
:mod:`forgetdiag.evaluate` (left-padded, one forward pass per batch of pairs).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from forgetdiag.errors import ProbeError
from forgetdiag.evaluate import (
    IGNORE,
    Encoded,
    Scores,
    batches_by_length,
    collate,
    completion_logits,
    encode,
)
from forgetdiag.probes import ProbeItem
from forgetdiag.scores import ItemScores


@dataclass(frozen=True)
class EncodedChoice(Encoded):
    """A multiple-choice item: every choice as its own (prompt, continuation) pair in ``options``,
    and the right one as ``prompt_ids`` + ``completion_ids`` (what recovery trains on and a loss
    surface measures: the right choice's answer loss)."""

    options: tuple[Encoded, ...]
    lengths: tuple[int, ...]  # characters of each choice (acc_norm's divisor)
    answer: int  # the right choice's index


def encode_choices(
    tokenizer,
    items: Sequence[ProbeItem],
    *,
    max_length: int | None = None,
    truncate: bool = False,
    canonical: bool = True,
    warn: Callable[[str], None] | None = None,
) -> list[EncodedChoice]:
    """Tokenize multiple-choice items: each choice as a continuation of its prompt, no stop token.

    Raises:
        ProbeError: a choice that tokenizes to nothing, or a prompt + choice longer than the
            context (unless ``truncate``: then the prompt loses its oldest tokens), naming the
            row and the choice.
    """
    out, truncated = [], []
    for row, item in enumerate(items, start=1):
        options = []
        for j, choice in enumerate(item.choices):
            try:
                (pair,) = encode(
                    tokenizer, [ProbeItem(item.prompt, choice)], max_length=max_length, truncate=truncate,
                    add_eos=False, canonical=canonical, warn=truncated.append,
                )  # fmt: skip
            except ProbeError as exc:  # encode calls the pair "row 1": name the item's row and choice
                raise ProbeError(f"probe row {row}, choice {j}: {exc.message.split(': ', 1)[1]}") from None
            options.append(pair)
        right = options[item.answer_index]
        out.append(
            EncodedChoice(
                right.prompt_ids,
                right.completion_ids,
                tuple(options),
                lengths=tuple(len(c) for c in item.choices),
                answer=item.answer_index,
            )
        )
    if truncated and warn is not None:
        warn(
            f"{len(truncated)} prompt + choice pairs were longer than the model's context of {max_length} "
            "tokens and lost their oldest prompt tokens"
        )
    return out


@dataclass(frozen=True)
class ChoiceScores(ItemScores):
    """Per-item results of :func:`score_choices`.

    Attributes:
        acc: (n,) the likeliest choice is the right one.
        acc_norm: (n,) the likeliest choice per character is the right one.
        nll: (n,) summed negative log-likelihood of the right choice's tokens.
        n_tokens: (n,) the right choice's tokens.
        loglik: per item, (choices,) summed log-likelihood of each choice.
    """

    acc: np.ndarray
    acc_norm: np.ndarray
    nll: np.ndarray
    n_tokens: np.ndarray
    loglik: tuple[np.ndarray, ...] = ()
    columns: ClassVar[dict[str, str]] = {"acc": "acc", "acc_norm": "acc_norm"}


@torch.inference_mode()
def score_choices(
    model,
    encoded: Sequence[EncodedChoice],
    *,
    pad_id: int = 0,
    batch_size: int = 32,
    progress: Callable[[str, int, int], None] | None = None,
) -> ChoiceScores:
    """Score multiple-choice items: every (item, choice) pair in batched teacher-forced passes.

    Args:
        model: a causal LM (its device is used).
        encoded: items from :func:`encode_choices`.
        pad_id: any valid token id (padding is masked).
        batch_size: (item, choice) pairs per forward pass.

    Returns:
        :class:`ChoiceScores` in the order of ``encoded``.
    """
    pairs = [option for item in encoded for option in item.options]
    starts = np.cumsum([0] + [len(item.options) for item in encoded])  # item k's pairs: starts[k]:starts[k+1]
    summed, counts = np.zeros(len(pairs), dtype=np.float64), np.zeros(len(pairs), dtype=np.int64)
    device = next(model.parameters()).device
    groups = batches_by_length(pairs, batch_size)
    for done, idx in enumerate(groups):
        batch = collate([pairs[k] for k in idx], pad_id, device)
        logits = completion_logits(model, batch).float()  # (B, C, V)
        targets = batch.targets  # (B, C), IGNORE where nothing is scored
        valid = targets != IGNORE
        logp = torch.log_softmax(logits, dim=-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        summed[idx] = (logp * valid).double().sum(-1).cpu().numpy()  # (B,) log-likelihood of each pair
        counts[idx] = valid.sum(-1).cpu().numpy()
        if progress is not None:
            progress("scoring choices", done + 1, len(groups))
    acc, acc_norm = np.zeros(len(encoded), dtype=bool), np.zeros(len(encoded), dtype=bool)
    nll, n_tokens, loglik = np.zeros(len(encoded)), np.zeros(len(encoded), dtype=np.int64), []
    for k, item in enumerate(encoded):
        ll, tokens = summed[starts[k] : starts[k + 1]], counts[starts[k] : starts[k + 1]]  # (choices,)
        acc[k] = int(np.argmax(ll)) == item.answer  # ties: the first choice, as numpy's argmax (lm-eval's)
        acc_norm[k] = int(np.argmax(ll / np.asarray(item.lengths, dtype=np.float64))) == item.answer
        nll[k], n_tokens[k] = -ll[item.answer], tokens[item.answer]
        loglik.append(ll)
    return ChoiceScores(acc, acc_norm, nll, n_tokens, tuple(loglik))


def score_items(
    model,
    encoded: Sequence[Encoded],
    *,
    pad_id: int = 0,
    batch_size: int = 32,
    stops: Collection[int] = (),
    progress: Callable[[str, int, int], None] | None = None,
) -> Scores | ChoiceScores:
    """:func:`score_choices` for multiple-choice items, :func:`forgetdiag.evaluate.score`
    otherwise: what :func:`forgetdiag.models.tokenize_probe` gave, scored the probe's way."""
    if encoded and isinstance(encoded[0], EncodedChoice):
        return score_choices(model, encoded, pad_id=pad_id, batch_size=batch_size, progress=progress)
    from forgetdiag.evaluate import score

    return score(model, encoded, pad_id=pad_id, batch_size=batch_size, stops=stops, progress=progress)
