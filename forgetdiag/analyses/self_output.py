"""Self-output data: the new task's targets next to what the old model says, in its own words.

docs/remedy.md. Fine-tuning on text the model would produce itself moves it less than
fine-tuning on someone else's wording of the same content (self-distillation fine-tuning,
Yang et al., ACL 2024; Ren et al., 2024). For every prompt of the new data this module asks the
OLD model (the one about to be fine-tuned) for its greedy answer, and writes a row per prompt:

* the old model already says the target (greedy exact match, token for token with its stop, as
  :func:`forgetdiag.evaluate.score` counts it): the row is kept as is (``outcome = "same"``);
* otherwise, by default, the target is kept (``outcome = "target"``): facts the old model does
  not know cannot be taken from it;
* with a rewrite prompt (``--rewrite-prompt``, a template holding ``{answer}`` and usually
  ``{prompt}``), the old model is shown the target and asked to restate it; its greedy
  restatement replaces the target when it is complete (it ended with a stop token) and still
  contains the target answer (whitespace normalised, case kept): ``outcome = "restated"``, else
  the target is kept.

Every row keeps ``prompt``, ``answer`` (what to train on), ``group``, ``self_output`` (the old
model's greedy answer to the prompt), ``target`` (the original answer) and ``outcome``.
Generation is batched (:func:`forgetdiag.evaluate.generate_greedy` on batches of similar
length); the budget is ``max_new_tokens``, by default twice the longest target (in tokens, the
stop included).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from forgetdiag.checkpoints import resolve_checkpoints
from forgetdiag.evaluate import Encoded, batches_by_length, generate_greedy
from forgetdiag.models import load_model, load_tokenizer, tokenize_probe
from forgetdiag.probes import Probe, ProbeItem
from forgetdiag.results import Result, Timings
from forgetdiag.runtime import ProgressFn, Runtime, Warn
from forgetdiag.settings import SelfOutputSettings
from forgetdiag.storage import Checkpoint

OUTCOMES = ("same", "restated", "target")


@dataclass(frozen=True)
class SelfRow:
    """One output row (see the module docstring)."""

    prompt: str
    answer: str
    group: str | None
    self_output: str
    target: str
    outcome: str  # one of OUTCOMES
    restatement: str | None = None  # the old model's restatement (with --rewrite-prompt)

    @property
    def rewritten(self) -> bool:
        return self.answer != self.target

    def to_dict(self) -> dict:
        row = {"prompt": self.prompt, "answer": self.answer, "group": self.group, "self_output": self.self_output}
        row |= {"target": self.target, "outcome": self.outcome}
        if self.restatement is not None:
            row["restatement"] = self.restatement
        return row


@dataclass(frozen=True)
class SelfOutputResult(Result):
    """Every row with the old model's answer, and the counts of each outcome."""

    analysis = "self-output"
    checkpoint: str
    data: str
    settings: SelfOutputSettings
    max_new_tokens: int
    rows: tuple[SelfRow, ...]
    warnings: tuple[str, ...] = ()
    timings: dict[str, float] = field(default_factory=dict)

    def counts(self) -> dict[str, int]:
        return {o: sum(r.outcome == o for r in self.rows) for o in OUTCOMES}

    @property
    def n_rewritten(self) -> int:
        """Rows whose training answer is no longer the target."""
        return sum(r.rewritten for r in self.rows)

    def summary(self) -> str:
        c, n = self.counts(), len(self.rows)
        head = f"{self.checkpoint} already says the target on {c['same']} of {n} prompts of {self.data}"
        if self.settings.rewrite_prompt is None:
            return f"{head}; the other {n - c['same']} keep the target (no --rewrite-prompt): 0 rows rewritten"
        return (
            f"{head}; its restatement keeps the target answer on {c['restated']} of the other {n - c['same']}, "
            f"{self.n_rewritten} of them in other words: {self.n_rewritten} rows rewritten; "
            f"{c['target']} keep the target"
        )

    def body(self) -> dict:
        return {
            "checkpoint": self.checkpoint,
            "data": self.data,
            "rewrite_prompt": self.settings.rewrite_prompt,
            "max_new_tokens": self.max_new_tokens,
            "n_rows": len(self.rows),
            **{f"n_{o}": k for o, k in self.counts().items()},
            "n_rewritten": self.n_rewritten,
        }


def _generate(
    model,
    encoded: Sequence[Encoded],
    *,
    pad_id: int,
    stops: Collection[int],
    runtime: Runtime,
    budget: int,
    progress,
    what,
) -> list[tuple[int, ...]]:
    """Greedy answers in batches of similar length, reporting progress per batch."""
    out: list[tuple[int, ...]] = [()] * len(encoded)
    groups = batches_by_length(encoded, runtime.batch_size)
    for done, idx in enumerate(groups):
        said = generate_greedy(
            model,
            [encoded[k] for k in idx],
            pad_id=pad_id,
            eos_id=stops,
            batch_size=len(idx),
            max_new_tokens=budget,
        )
        for k, s in zip(idx, said):
            out[k] = s
        if progress is not None:
            progress(what, done + 1, len(groups))
    return out


def says_target(said: Sequence[int], completion: Sequence[int], stops: Collection[int]) -> bool:
    """Greedy exact match: the target's tokens, then a stop where the target has one."""
    if completion and completion[-1] in stops:
        return len(said) == len(completion) and tuple(said[:-1]) == tuple(completion[:-1]) and said[-1] in stops
    return tuple(said[: len(completion)]) == tuple(completion)


def _text(tokenizer, prompt_ids: Sequence[int], said: Sequence[int], stops: Collection[int]) -> str:
    """What the model said, as text that continues the prompt (a leading space kept)."""
    body = list(said[:-1]) if said and said[-1] in stops else list(said)
    head = tokenizer.decode(list(prompt_ids), skip_special_tokens=True)
    full = tokenizer.decode(list(prompt_ids) + body, skip_special_tokens=True)
    return full[len(head) :] if full.startswith(head) else tokenizer.decode(body, skip_special_tokens=True)


def _contains(text: str, answer: str) -> bool:
    return " ".join(answer.split()) in " ".join(text.split())


def self_output(
    old: str | Path | Checkpoint,
    new: Probe,
    *,
    settings: SelfOutputSettings = SelfOutputSettings(),
    runtime: Runtime = Runtime(),
    progress: ProgressFn | None = None,
    warn: Warn | None = None,
) -> SelfOutputResult:
    """The old model's greedy answer to every new prompt, and the rows to train on.

    Args:
        old: the model before fine-tuning on ``new`` (one checkpoint).
        new: the new task's rows (prompt, answer[, group]).
        settings: the rewrite policy and the generation budget (:class:`SelfOutputSettings`).
        runtime: how the model runs (device, dtype, batch size, chat template...).

    Returns:
        A :class:`SelfOutputResult`; ``[r.to_dict() for r in result.rows]`` is the output file.

    Example:
        >>> r = self_output("runs/task0", load_probe("task1.jsonl"),
        ...                 settings=SelfOutputSettings(rewrite_prompt="{prompt}{answer}\\n{prompt}"))  # doctest: +SKIP
        >>> r.counts(), r.n_rewritten  # doctest: +SKIP
    """
    ckpt = resolve_checkpoints(old, runtime, single="OLD_CKPT")
    tokenizer = load_tokenizer(ckpt, runtime)
    encoded, stops = tokenize_probe(tokenizer, new, ckpt, runtime, warn=warn)
    budget = settings.max_new_tokens or 2 * max(len(e.completion_ids) for e in encoded)
    accepted = stops.accepted
    pad = tokenizer.pad_token_id
    timings = Timings()
    restated: list[tuple[int, ...] | None] = [None] * len(encoded)
    with runtime.threads_for(ckpt.n_params):
        with timings.phase("loading"):
            model = load_model(ckpt, runtime)
        with timings.phase("generation"):
            said = _generate(
                model,
                encoded,
                pad_id=pad,
                stops=accepted,
                runtime=runtime,
                budget=budget,
                progress=progress,
                what="self-output",
            )
        same = [says_target(s, e.completion_ids, accepted) for s, e in zip(said, encoded)]
        todo = [k for k, hit in enumerate(same) if not hit]
        if settings.rewrite_prompt is not None and todo:
            ask = Probe(
                f"{new.name}:restate",
                tuple(ProbeItem(settings.restate_prompt(new.items[k]), new.items[k].answer) for k in todo),
            )
            asked, _ = tokenize_probe(tokenizer, ask, ckpt, runtime, warn=warn)
            with timings.phase("restatement"):
                again = _generate(
                    model,
                    asked,
                    pad_id=pad,
                    stops=accepted,
                    runtime=runtime,
                    budget=budget,
                    progress=progress,
                    what="restating",
                )
            for k, s, e in zip(todo, again, asked):
                restated[k] = (e.prompt_ids, s)
        del model
    rows = []
    for k, (item, enc) in enumerate(zip(new.items, encoded)):
        own = _text(tokenizer, enc.prompt_ids, said[k], accepted)
        if same[k]:
            rows.append(SelfRow(item.prompt, item.answer, item.group, own, item.answer, "same"))
            continue
        restatement, answer, outcome = None, item.answer, "target"
        if restated[k] is not None:
            prompt_ids, s = restated[k]
            restatement = _text(tokenizer, prompt_ids, s, accepted)
            complete = bool(s) and s[-1] in accepted
            if complete and restatement.strip() and _contains(restatement, item.answer):
                answer, outcome = restatement, "restated"
        rows.append(SelfRow(item.prompt, answer, item.group, own, item.answer, outcome, restatement))
    return SelfOutputResult(ckpt.label, new.name, settings, budget, tuple(rows), timings=dict(timings))
