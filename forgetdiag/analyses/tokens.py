"""How hard the new task's tokens are for the old model (selective token masking).

docs/science.md, section 3.7. Tokens of the new data that the old model finds very unlikely drive
more forgetting: fitting them moves the weights furthest. Here every *completion* token of the
new data (the answer's tokens, then EOS: what answer-only fine-tuning trains on, as
:func:`forgetdiag.evaluate.encode` makes it) gets its teacher-forced log-probability under the
OLD model (:func:`forgetdiag.evaluate.token_logprobs`). Reported: the share of tokens whose
probability is below a threshold (default p < 0.01), the hardest tokens and examples next to
what the old model expected instead, and a per-token keep/drop mask that a training script can
use to skip the hardest tokens (:func:`mask_records`). Prompt tokens are context only: they
are never scored and never dropped.
"""

from __future__ import annotations

import functools
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from forgetdiag.checkpoints import resolve_checkpoints
from forgetdiag.evaluate import IGNORE, token_logprobs
from forgetdiag.models import load_model, load_tokenizer, tokenize_probe
from forgetdiag.probes import Probe
from forgetdiag.results import Result, Timings
from forgetdiag.runtime import ProgressFn, Runtime, Warn
from forgetdiag.settings import TokenSettings
from forgetdiag.storage import Checkpoint


@dataclass(frozen=True)
class TokenExample:
    """One data row, tokenized exactly as :func:`forgetdiag.evaluate.encode` does.

    Attributes:
        index: the row's position in the data file (0-based).
        prompt, answer: the row's text (the prompt after the chat template, if one was used).
        input_ids: prompt ids (with the tokenizer's BOS) + completion ids (answer, EOS).
        tokens: ``convert_ids_to_tokens(input_ids)``, one string per id (the vocabulary's form,
            e.g. ``Ġcity`` for a byte-level BPE).
        pieces: each id decoded alone, as text (`` city``): what tables show.
        n_prompt: how many of ``input_ids`` are the prompt's.
        logprobs: (C,) natural-log probability of each completion token under the old model;
            NaN for a first token that nothing precedes.
        expected: (C,) the old model's most likely token at each completion position, decoded.
        expected_text: all of ``expected`` decoded together (teacher forced: each token follows
            the true prefix, not the model's own earlier choices).
    """

    index: int
    prompt: str
    answer: str
    input_ids: tuple[int, ...]
    tokens: tuple[str, ...]
    pieces: tuple[str, ...]
    n_prompt: int
    logprobs: tuple[float, ...]
    expected: tuple[str, ...]
    expected_text: str = ""

    def hard(self, threshold: float) -> np.ndarray:
        """(C,) bool: completion tokens whose probability is below ``threshold``."""
        return np.asarray(self.logprobs) < math.log(threshold)  # NaN compares False

    def mean_logprob(self) -> float:
        scored = [x for x in self.logprobs if not math.isnan(x)]
        return sum(scored) / len(scored) if scored else math.nan


@dataclass(frozen=True)
class HardToken:
    """One completion token and what the old model expected there instead."""

    example: int  # TokenExample.index
    position: int  # index into input_ids
    token: str  # decoded text of the token
    logprob: float
    expected: str  # decoded text of the old model's most likely token there


@dataclass(frozen=True)
class TokensResult(Result):
    """Everything ``forgetdiag tokens`` computed; ``to_dict()`` is its JSON.

    Attributes:
        checkpoint: the old model's label.
        data: the new task's name (file stem).
        threshold: probability below which a token counts as hard (and is dropped by the mask).
        top: how many hardest tokens / examples / token strings are listed.
        examples: every row, in file order.
    """

    analysis = "tokens"
    checkpoint: str
    data: str
    threshold: float
    top: int
    examples: tuple[TokenExample, ...]
    warnings: tuple[str, ...] = ()
    timings: dict[str, float] = field(default_factory=dict)

    def logprobs(self) -> np.ndarray:
        """(n_tokens,) every scored completion token's log-probability, row by row."""
        flat = np.array([x for e in self.examples for x in e.logprobs], dtype=np.float64)
        return flat[~np.isnan(flat)]

    def stats(self) -> dict[str, float | int]:
        """Token counts, share below the threshold, and the log-probability distribution."""
        lp = self.logprobs()
        below = int((lp < math.log(self.threshold)).sum())
        quant = np.quantile(lp, [0.1, 0.25, 0.5]) if lp.size else [math.nan] * 3
        return {
            "n_examples": len(self.examples),
            "n_tokens": int(lp.size),
            "n_below": below,
            "share_below": below / lp.size if lp.size else math.nan,
            "examples_with_hard_token": sum(bool(e.hard(self.threshold).any()) for e in self.examples),
            "mean_logprob": float(lp.mean()) if lp.size else math.nan,
            "logprob_p10": float(quant[0]),
            "logprob_p25": float(quant[1]),
            "median_logprob": float(quant[2]),
        }

    def hardest_tokens(self, k: int | None = None) -> list[HardToken]:
        """The ``k`` (default ``top``) completion tokens of lowest log-probability."""
        found = [
            HardToken(e.index, e.n_prompt + j, e.pieces[e.n_prompt + j], lp, e.expected[j])
            for e in self.examples
            for j, lp in enumerate(e.logprobs)
            if not math.isnan(lp)
        ]
        found.sort(key=lambda t: (t.logprob, t.example, t.position))
        return found[: self.top if k is None else k]

    def hardest_examples(self, k: int | None = None) -> list[TokenExample]:
        """The ``k`` rows of lowest mean completion log-probability."""
        scored = [e for e in self.examples if not math.isnan(e.mean_logprob())]
        return sorted(scored, key=lambda e: (e.mean_logprob(), e.index))[: self.top if k is None else k]

    def frequent_hard(self, k: int | None = None) -> list[dict]:
        """Token strings most often below the threshold: count, occurrences, mean log-prob."""
        hard, seen, total = Counter(), Counter(), {}
        for e in self.examples:
            for j, lp in enumerate(e.logprobs):
                if math.isnan(lp):
                    continue
                token = e.pieces[e.n_prompt + j]
                seen[token] += 1
                total[token] = total.get(token, 0.0) + lp
                hard[token] += lp < math.log(self.threshold)
        ranked = sorted((t for t in hard if hard[t]), key=lambda t: (-hard[t], total[t] / seen[t], t))
        return [
            {"token": t, "hard": hard[t], "occurrences": seen[t], "mean_logprob": total[t] / seen[t]}
            for t in ranked[: self.top if k is None else k]
        ]

    def summary(self) -> str:
        return summary_text(self)

    def body(self) -> dict:
        def example_row(e: TokenExample) -> dict:
            return {
                "index": e.index,
                "prompt": e.prompt,
                "answer": e.answer,
                "n_tokens": sum(not math.isnan(x) for x in e.logprobs),
                "n_below": int(e.hard(self.threshold).sum()),
                "mean_logprob": e.mean_logprob(),
                "min_logprob": min((x for x in e.logprobs if not math.isnan(x)), default=math.nan),
                "old_model_expects": e.expected_text,
            }

        return {
            "checkpoint": self.checkpoint,
            "data": self.data,
            "threshold": self.threshold,
            **self.stats(),
            "hardest_tokens": [vars(t) for t in self.hardest_tokens()],
            "hardest_examples": [example_row(e) for e in self.hardest_examples()],
            "frequent_hard_tokens": self.frequent_hard(),
            "examples": [example_row(e) for e in self.examples],
        }


def summary_text(result: TokensResult) -> str:
    """The share of hard tokens in words, with the numbers behind it."""
    s = result.stats()
    if not s["n_tokens"]:
        return f"no completion token of {result.data} could be scored"
    return (
        f"{100 * s['share_below']:.1f}% of the {s['n_tokens']} answer tokens (EOS included) of "
        f"{result.data} have p < {result.threshold:g} under {result.checkpoint}; "
        f"{s['examples_with_hard_token']} of {s['n_examples']} examples hold at least one; "
        f"median p = {math.exp(s['median_logprob']):.3g}, mean log-prob {s['mean_logprob']:.2f}"
    )


def mask_records(result: TokensResult) -> list[dict]:
    """Per row, the per-token keep/drop mask (the ``--write-mask`` JSONL), in file order.

    Every list is aligned with ``input_ids`` (prompt ids, then answer ids, then EOS, exactly as
    :func:`forgetdiag.evaluate.encode` makes them). ``logprobs`` is null on prompt tokens;
    ``keep`` is false only on completion tokens with probability below the threshold;
    (null also where nothing precedes a token, or for a probability that underflowed to 0);
    ``labels`` is a ready Hugging Face ``labels`` row for answer-only training that skips them
    (the token id where a completion token is kept, -100 on prompt and dropped tokens).
    """
    rows = []
    for e in result.examples:
        hard = e.hard(result.threshold)  # (C,)
        keep = [True] * e.n_prompt + [not h for h in hard.tolist()]
        labels = [IGNORE] * e.n_prompt + [
            i if k else IGNORE for i, k in zip(e.input_ids[e.n_prompt :], keep[e.n_prompt :])
        ]
        logprobs = [None] * e.n_prompt + [x if math.isfinite(x) else None for x in e.logprobs]
        rows.append(
            {
                "index": e.index,
                "prompt": e.prompt,
                "answer": e.answer,
                "n_prompt": e.n_prompt,
                "input_ids": list(e.input_ids),
                "tokens": list(e.tokens),
                "logprobs": logprobs,
                "keep": keep,
                "labels": labels,
            }
        )
    return rows


def token_difficulty(
    old: str | Path | Checkpoint,
    data: Probe,
    *,
    settings: TokenSettings = TokenSettings(),
    runtime: Runtime = Runtime(),
    progress: ProgressFn | None = None,
    warn: Warn | None = None,
) -> TokensResult:
    """Per-token log-probabilities of the new task's answers under the old model.

    Args:
        old: the model before fine-tuning on ``data`` (one checkpoint).
        data: the new task's rows (prompt, answer); their completion tokens (answer, EOS) are
            scored, teacher forced.
        settings: the threshold below which a token is hard and how many are listed
            (:class:`TokenSettings`).
        runtime: how the model runs (device, dtype, batch size, tokenizer, threads...).
        progress: ``progress(description, done, total)`` callback.
        warn: receives warnings (truncated prompts).

    Returns:
        A :class:`TokensResult`; :func:`mask_records` gives its keep/drop mask.

    Example:
        >>> from forgetdiag import load_probe
        >>> r = token_difficulty("runs/task0", load_probe("task1.jsonl"))  # doctest: +SKIP
        >>> r.stats()["share_below"]  # doctest: +SKIP
    """
    ckpt = resolve_checkpoints(old, runtime, single="OLD_CKPT")
    tokenizer = load_tokenizer(ckpt, runtime)
    encoded, _ = tokenize_probe(tokenizer, data, ckpt, runtime, warn=warn)
    timings = Timings()
    with runtime.threads_for(ckpt.n_params), timings.phase("scoring"):
        model = load_model(ckpt, runtime)
        logprobs, predicted = token_logprobs(
            model, encoded, pad_id=tokenizer.pad_token_id, batch_size=runtime.batch_size, progress=progress
        )
        del model
    piece = functools.lru_cache(maxsize=None)(lambda i: tokenizer.decode([i]))
    examples = []
    for k, (item, enc) in enumerate(zip(data.items, encoded)):
        ids = enc.prompt_ids + enc.completion_ids
        said = predicted[k].tolist()
        examples.append(
            TokenExample(
                k,
                item.prompt,
                item.answer,
                ids,
                tuple(tokenizer.convert_ids_to_tokens(list(ids))),
                tuple(piece(i) for i in ids),
                len(enc.prompt_ids),
                tuple(logprobs[k].tolist()),
                tuple(piece(i) for i in said),
                tokenizer.decode(said),
            )
        )
    return TokensResult(ckpt.label, data.name, settings.threshold, settings.top, tuple(examples), timings=dict(timings))
