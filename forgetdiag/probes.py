"""Probe data: the rows of a task, loaded, validated and split by group (docs/probes.md).

A probe file is JSONL (one object per line), a JSON array of objects, CSV with a header, or an
lm-evaluation-harness task file (``.yaml``, read by :mod:`forgetdiag.lm_eval_tasks`). A probe
holds one kind of row:

* **answer** rows, ``(prompt, answer)``: the model should continue the prompt with the answer
  and stop (scored by exact match, first token and answer loss);
* **multiple-choice** rows, ``(prompt, choices, answer)``, the answer being the right choice's
  text or its 0-based index: the model should find the right choice the likeliest
  continuation (scored by ``acc`` and ``acc_norm``, as lm-evaluation-harness does).

An optional group names the entity a row is about (one person's facts), and rows of one group
always stay on the same side of a split, so that the evaluation part never shares a fact with
the recovery part.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from forgetdiag.errors import ProbeError
from forgetdiag.probe_rows import ProbeFields, read_rows

Kind = Literal["answer", "choice"]
METRICS: dict[str, tuple[str, ...]] = {
    "answer": ("exact_match", "first_token"),  # per-item right or wrong; the first is the default
    "choice": ("acc", "acc_norm"),
}
KIND_NAMES: dict[str, str] = {"answer": "prompt/answer", "choice": "multiple-choice"}


@dataclass(frozen=True)
class ProbeItem:
    """One probe row: the model should continue ``prompt`` with ``answer`` and then stop; or,
    with ``choices``, find ``answer`` (one of them, by its text) the likeliest continuation."""

    prompt: str
    answer: str
    group: str | None = None
    choices: tuple[str, ...] | None = None

    @property
    def answer_index(self) -> int:
        """The right choice's index (choices are distinct)."""
        return self.choices.index(self.answer) if self.choices is not None else 0


@dataclass(frozen=True)
class Probe:
    """A named set of probe items (the name is the file's stem unless given)."""

    name: str
    items: tuple[ProbeItem, ...]
    path: str | None = None
    stop_strings: tuple[str, ...] = ()  # text that also ends an answer (an lm-eval task's `until`)

    def __len__(self) -> int:
        return len(self.items)

    @property
    def kind(self) -> Kind:
        """``choice`` for multiple-choice rows, ``answer`` otherwise (a probe holds one kind)."""
        return "choice" if self.items and self.items[0].choices is not None else "answer"

    @property
    def metrics(self) -> tuple[str, ...]:
        """The per-item metrics this probe can be judged by; the first is the default."""
        return METRICS[self.kind]

    def metric(self, metric: str | None, option: str = "--metric") -> str:
        """``metric`` if this probe has it, the probe's default for None; else one clear error."""
        if metric is None:
            return self.metrics[0]
        if metric not in self.metrics:
            raise ProbeError(
                f"{option} {metric}: probe {self.name} is a {KIND_NAMES[self.kind]} probe; "
                f"expected one of {', '.join(self.metrics)}"
            )
        return metric

    @property
    def groups(self) -> list[str]:
        """Distinct groups in first-seen order (an item without a group is its own group)."""
        return list(dict.fromkeys(_group_key(i, k) for k, i in enumerate(self.items)))


def _group_key(item: ProbeItem, index: int) -> str:
    return item.group if item.group is not None else f"\0row{index}"


def load_probe(path: str | Path, *, fields: ProbeFields = ProbeFields(), name: str | None = None) -> Probe:
    """Read a probe file: ``.jsonl``, ``.json`` array, ``.csv`` with a header row, or an
    lm-evaluation-harness task file (``.yaml``/``.yml``, with the ``lm-eval`` extra installed).

    JSONL is split on ``\\n`` only (a U+2028 inside a JSON string is text, not a line break);
    CSV goes through the csv module, so quoted fields keep their commas and newlines. Rows are
    all prompt/answer rows or all multiple-choice rows (:mod:`forgetdiag.probe_rows`).

    Raises:
        ProbeError: missing or empty file, invalid JSON (with its line number), a row without
            the prompt or answer field, a prompt, answer or group that is not text, choices that
            are not a list of distinct texts, an answer that is not among the choices, or rows
            of both kinds.

    Example:
        >>> probe = load_probe("sample_checkpoints/probes/task0_heldout.jsonl")  # doctest: +SKIP
    """
    path = Path(path)
    stop_strings: tuple[str, ...] = ()
    if path.suffix.lower() in (".yaml", ".yml"):
        from forgetdiag.lm_eval_tasks import task_rows

        rows, stop_strings = task_rows(path)
    else:
        rows = read_rows(path, fields)
    items = tuple(ProbeItem(*row) for row in rows)
    return Probe(name or path.stem, items, str(path), stop_strings=stop_strings)


def distinct_names(probes: Sequence[Probe]) -> list[Probe]:
    """Probes with distinct names (a repeated name, such as two files with one stem, gets ``-2``,
    ``-3``...), so that results keyed by probe name keep every probe."""
    out, seen = [], set()
    for probe in probes:
        name, k = probe.name, 1
        while name in seen:
            k += 1
            name = f"{probe.name}-{k}"
        seen.add(name)
        out.append(probe if name == probe.name else replace(probe, name=name))
    return out


def split_probe(
    probe: Probe, *, n_recovery: int | None = None, n_eval: int | None = None, seed: int = 0
) -> tuple[Probe, Probe]:
    """Split into a recovery part and a disjoint evaluation part by a seeded shuffle of groups.

    Args:
        probe: the old task's probe.
        n_recovery: rows in the recovery part (whole groups are taken until at least this many);
            default: half of the groups.
        n_eval: cap on the rows of the evaluation part (whole groups); default: all the rest.
        seed: shuffle seed (same seed, same split).

    Returns:
        ``(recovery, evaluation)``; no group appears in both.
    """
    order = _shuffled_groups(probe, seed)
    by_group: dict[str, list[ProbeItem]] = {}
    for k, item in enumerate(probe.items):
        by_group.setdefault(_group_key(item, k), []).append(item)
    if n_recovery is None:
        n_groups = len(order) // 2
        recovery_groups = order[:n_groups]
    else:
        recovery_groups, count = [], 0
        for g in order:
            if count >= n_recovery:
                break
            recovery_groups.append(g)
            count += len(by_group[g])
    taken = set(recovery_groups)
    rest = [g for g in order if g not in taken]
    eval_groups, count = [], 0
    for g in rest:
        if n_eval is not None and count + len(by_group[g]) > n_eval and eval_groups:
            break
        eval_groups.append(g)
        count += len(by_group[g])
    pick = lambda groups: tuple(i for g in groups for i in by_group[g])
    return (
        replace(probe, name=f"{probe.name}:recovery", items=pick(recovery_groups)),
        replace(probe, name=f"{probe.name}:evaluation", items=pick(eval_groups)),
    )


def _shuffled_groups(probe: Probe, seed: int) -> list[str]:
    groups = probe.groups
    import torch  # here, not at import: the CLI reads probe fields without loading torch

    generator = torch.Generator().manual_seed(seed)
    return [groups[k] for k in torch.randperm(len(groups), generator=generator).tolist()]


def _normalised(item) -> tuple[str, str]:
    return " ".join(item.prompt.split()), " ".join(item.answer.split())


def recovery_split(
    probe: Probe,
    recovery_probe: Probe | None = None,
    *,
    shots: int | None = None,
    n_eval: int | None = None,
    seed: int = 0,
    allow_overlap: bool = False,
    warn: Callable[[str], None] | None = None,
) -> tuple[Probe, Probe]:
    """The recovery and evaluation parts of a recovery probe, refusing leaks between them.

    Without ``recovery_probe`` the probe is split by group (:func:`split_probe`); with it, all of
    ``probe`` (up to ``n_eval`` rows) is evaluated and ``shots`` rows of ``recovery_probe``
    recover. Unless ``allow_overlap``, refused: the same file for both, groups on both sides,
    and rows whose prompt and answer (whitespace normalised) appear on both sides.
    """
    if recovery_probe is None:
        if all(i.group is None for i in probe.items) and warn is not None:
            warn(
                f"probe {probe.name} has no groups: its rows are split one by one, so facts about one "
                "entity can sit on both sides (give each row a 'group' naming its entity)"
            )
        rec, ev = split_probe(probe, n_recovery=shots, n_eval=n_eval, seed=seed)
    else:
        same_file = (
            probe.path is not None
            and recovery_probe.path is not None
            and (Path(probe.path).resolve() == Path(recovery_probe.path).resolve())
        )
        if same_file and not allow_overlap:
            raise ProbeError(
                f"{probe.path} is given as both --probe and --recovery-probe: every evaluation row "
                "would also be a recovery row; expected two disjoint files (or --allow-overlap)"
            )
        ev = split_probe(probe, n_recovery=0, n_eval=n_eval, seed=seed)[1]
        shared = {i.group for i in ev.items if i.group is not None} & {i.group for i in recovery_probe.items}
        if shared and not allow_overlap:
            raise ProbeError(
                f"the recovery probe shares {len(shared)} groups with the evaluation "
                f"probe (e.g. {sorted(shared)[0]!r}); expected disjoint entities (or --allow-overlap)"
            )
        rec = recovery_probe if shots is None else split_probe(recovery_probe, n_recovery=shots, seed=seed)[0]
    if not len(rec) or not len(ev):
        raise ProbeError(
            f"probe {probe.name}: {len(probe)} rows in {len(probe.groups)} groups leave "
            f"{len(rec)} for recovery and {len(ev)} for evaluation; expected both non-empty"
        )
    if not allow_overlap:
        seen = {_normalised(i) for i in rec.items}
        both = [i for i in ev.items if _normalised(i) in seen]
        if both:
            raise ProbeError(
                f"{len(both)} evaluation rows are also recovery rows (same prompt and answer, e.g. "
                f"{both[0].prompt!r} -> {both[0].answer!r}); expected disjoint examples (or --allow-overlap)"
            )
    return rec, ev


def with_chat_template(probe: Probe, tokenizer) -> Probe:
    """The probe with each prompt wrapped as a user turn in the tokenizer's chat template.

    The answer (each choice, in a multiple-choice probe) becomes the assistant's reply (leading
    whitespace dropped: a reply starts right after the template's generation prompt), so the
    model is scored on what it says there.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ProbeError("--chat-template was given but the tokenizer has no chat template")
    items = tuple(
        replace(
            i,
            prompt=tokenizer.apply_chat_template(
                [{"role": "user", "content": i.prompt}], tokenize=False, add_generation_prompt=True
            ),
            answer=i.answer.lstrip(),
            choices=None if i.choices is None else tuple(c.lstrip() for c in i.choices),
        )
        for i in probe.items
    )
    return replace(probe, items=items)


def probe_from_pairs(pairs: Sequence[tuple[str, str]], name: str = "probe") -> Probe:
    """A probe from ``(prompt, answer)`` pairs, for use from Python."""
    return Probe(name, tuple(ProbeItem(p, a) for p, a in pairs))
