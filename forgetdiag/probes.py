"""Probe data: (prompt, answer[, group]) rows of a task, loaded, validated and split by group.

A probe file is JSONL (one object per line), a JSON array of objects, or CSV with a header.
Rows need a prompt and an answer (field names configurable); an optional group names the entity a
row is about (one person's facts), and rows of one group always stay on the same side of a split,
so that the evaluation part never shares a fact with the recovery part.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from forgetdiag.errors import ProbeError


@dataclass(frozen=True)
class ProbeItem:
    """One probe row: the model should continue ``prompt`` with ``answer`` and then stop."""

    prompt: str
    answer: str
    group: str | None = None


@dataclass(frozen=True)
class Probe:
    """A named set of probe items (the name is the file's stem unless given)."""

    name: str
    items: tuple[ProbeItem, ...]
    path: str | None = None

    def __len__(self) -> int:
        return len(self.items)

    @property
    def groups(self) -> list[str]:
        """Distinct groups in first-seen order (an item without a group is its own group)."""
        return list(dict.fromkeys(_group_key(i, k) for k, i in enumerate(self.items)))


def _group_key(item: ProbeItem, index: int) -> str:
    return item.group if item.group is not None else f"\0row{index}"


@dataclass(frozen=True)
class ProbeFields:
    """The field (column) names of a probe file (CLI: --prompt-field, --answer-field, --group-field)."""

    prompt: str = "prompt"
    answer: str = "answer"
    group: str = "group"

    def __post_init__(self) -> None:
        for name in ("prompt", "answer", "group"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ProbeError(f"--{name}-field {value!r}: expected a non-empty field name")


def load_probe(path: str | Path, *, fields: ProbeFields = ProbeFields(), name: str | None = None) -> Probe:
    """Read a probe file (``.jsonl``, ``.json`` array, or ``.csv`` with a header row).

    JSONL is split on ``\\n`` only (a U+2028 inside a JSON string is text, not a line break);
    CSV goes through the csv module, so quoted fields keep their commas and newlines.

    Raises:
        ProbeError: missing or empty file, invalid JSON (with its line number), a row without
            the prompt or answer field, or a prompt, answer or group that is not text.

    Example:
        >>> probe = load_probe("sample_checkpoints/probes/task0_heldout.jsonl")  # doctest: +SKIP
    """
    path = Path(path)
    expected = f"rows with '{fields.prompt}' and '{fields.answer}'"
    if not path.is_file():
        raise ProbeError(f"{path}: no such probe file; expected a JSONL, JSON or CSV file of {expected}")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise ProbeError(f"{path}: cannot read probe file as UTF-8 text ({exc})") from None
    if not text.strip():
        raise ProbeError(f"{path}: empty probe file; expected {expected}")
    if path.suffix.lower() == ".csv":
        numbered = _csv(path, text)
    elif text.lstrip().startswith("["):
        numbered = _json_array(path, text)
    else:
        numbered = _jsonl(path, text)
    if not numbered:
        raise ProbeError(f"{path}: no rows; expected {expected}")
    items = tuple(_item(path, line, row, fields) for line, row in numbered)
    return Probe(name or path.stem, items, str(path))


def _csv(path: Path, text: str) -> list[tuple[int, Any]]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    rows = []
    try:
        for row in reader:
            rows.append((reader.line_num, row))  # the line the row ends on
    except csv.Error as exc:
        raise ProbeError(f"{path}: invalid CSV on line {reader.line_num} ({exc})") from None
    return rows


def _jsonl(path: Path, text: str) -> list[tuple[int, Any]]:
    rows = []
    for line_no, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            rows.append((line_no, json.loads(line)))
        except json.JSONDecodeError as exc:
            raise ProbeError(
                f"{path}: invalid JSON on line {line_no} ({exc.msg}); expected one JSON object per line"
            ) from None
    return rows


def _json_array(path: Path, text: str) -> list[tuple[int, Any]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ProbeError(f"{path}: invalid JSON on line {exc.lineno} ({exc.msg})") from None
    if not isinstance(data, list):
        raise ProbeError(f"{path}: expected a JSON array of objects, found {type(data).__name__}")
    return [(k + 1, row) for k, row in enumerate(data)]


def _item(path: Path, line: int, row: Any, fields: ProbeFields) -> ProbeItem:
    where = f"{path}: row on line {line}" if path.suffix.lower() != ".json" else f"{path}: row {line}"
    if not isinstance(row, dict):
        raise ProbeError(
            f"{where} is {type(row).__name__}; expected an object with '{fields.prompt}' and '{fields.answer}'"
        )
    for field in (fields.prompt, fields.answer):
        if row.get(field) is None:
            found = ", ".join(sorted(map(str, row))) or "no fields"
            raise ProbeError(f"{where} has no '{field}' field (found: {found})")
    values = {}
    for field in (fields.prompt, fields.answer, fields.group):
        value = row.get(field)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and field == fields.group:
            value = str(value)  # numeric entity ids are common: 17 and "17" are one group
        if value is not None and not isinstance(value, str):
            raise ProbeError(
                f"{where}: '{field}' is {type(value).__name__} ({json.dumps(value)[:60]}); "
                "expected text (a JSON string)"
            )
        values[field] = value
    if not values[fields.answer].strip():
        raise ProbeError(f"{where} has an empty '{fields.answer}'; expected a non-empty answer")
    return ProbeItem(values[fields.prompt], values[fields.answer], values[fields.group])


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
        Probe(f"{probe.name}:recovery", pick(recovery_groups), probe.path),
        Probe(f"{probe.name}:evaluation", pick(eval_groups), probe.path),
    )


def _shuffled_groups(probe: Probe, seed: int) -> list[str]:
    groups = probe.groups
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

    The answer becomes the assistant's reply (leading whitespace dropped: a reply starts right
    after the template's generation prompt), so the model is scored on what it says there.
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
        )
        for i in probe.items
    )
    return replace(probe, items=items)


def probe_from_pairs(pairs: Sequence[tuple[str, str]], name: str = "probe") -> Probe:
    """A probe from ``(prompt, answer)`` pairs, for use from Python."""
    return Probe(name, tuple(ProbeItem(p, a) for p, a in pairs))
