"""Probe data: (prompt, answer[, group]) rows of a task, loaded, validated and split by group.

A probe file is JSONL (one object per line), a JSON array of objects, or CSV with a header.
Rows need a prompt and an answer (field names configurable); an optional group names the entity a
row is about (one person's facts), and rows of one group always stay on the same side of a split,
so that the evaluation part never shares a fact with the recovery part.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

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


def load_probe(path: str | Path, *, prompt_field: str = "prompt", answer_field: str = "answer",
               group_field: str = "group", name: str | None = None) -> Probe:
    """Read a probe file (``.jsonl``, ``.json`` array, or ``.csv``).

    Raises:
        ProbeError: missing or empty file, invalid JSON (with its line number), a row without
            the prompt or answer field, or an answer that is empty.

    Example:
        >>> probe = load_probe("sample_checkpoints/probes/task0_heldout.jsonl")  # doctest: +SKIP
    """
    path = Path(path)
    if not path.is_file():
        raise ProbeError(f"{path}: no such probe file; expected a JSONL, JSON or CSV file of "
                         f"rows with '{prompt_field}' and '{answer_field}'")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise ProbeError(f"{path}: cannot read probe file as UTF-8 text ({exc})") from None
    if not text.strip():
        raise ProbeError(f"{path}: empty probe file; expected rows with '{prompt_field}' and '{answer_field}'")
    if path.suffix.lower() == ".csv":
        rows = list(csv.DictReader(text.splitlines()))
        numbered = [(k + 2, row) for k, row in enumerate(rows)]  # line 1 is the header
    elif text.lstrip().startswith("["):
        numbered = _json_array(path, text)
    else:
        numbered = _jsonl(path, text)
    if not numbered:
        raise ProbeError(f"{path}: no rows; expected rows with '{prompt_field}' and '{answer_field}'")
    items = tuple(_item(path, line, row, prompt_field, answer_field, group_field)
                  for line, row in numbered)
    return Probe(name or path.stem, items, str(path))


def _jsonl(path: Path, text: str) -> list[tuple[int, Any]]:
    rows = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append((line_no, json.loads(line)))
        except json.JSONDecodeError as exc:
            raise ProbeError(f"{path}: invalid JSON on line {line_no} ({exc.msg}); expected one "
                             "JSON object per line") from None
    return rows


def _json_array(path: Path, text: str) -> list[tuple[int, Any]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ProbeError(f"{path}: invalid JSON on line {exc.lineno} ({exc.msg})") from None
    if not isinstance(data, list):
        raise ProbeError(f"{path}: expected a JSON array of objects, found {type(data).__name__}")
    return [(k + 1, row) for k, row in enumerate(data)]


def _item(path: Path, line: int, row: Any, prompt_field: str, answer_field: str,
          group_field: str) -> ProbeItem:
    where = f"{path}: row on line {line}" if path.suffix.lower() != ".json" else f"{path}: row {line}"
    if not isinstance(row, dict):
        raise ProbeError(f"{where} is {type(row).__name__}; expected an object with "
                         f"'{prompt_field}' and '{answer_field}'")
    for field in (prompt_field, answer_field):
        if row.get(field) is None:
            found = ", ".join(sorted(map(str, row))) or "no fields"
            raise ProbeError(f"{where} has no '{field}' field (found: {found})")
    answer = str(row[answer_field])
    if not answer.strip():
        raise ProbeError(f"{where} has an empty '{answer_field}'; expected a non-empty answer")
    group = row.get(group_field)
    return ProbeItem(str(row[prompt_field]), answer, None if group is None else str(group))


def split_probe(probe: Probe, *, n_recovery: int | None = None, n_eval: int | None = None,
                seed: int = 0) -> tuple[Probe, Probe]:
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
    pick = lambda groups: tuple(i for g in groups for i in by_group[g])  # noqa: E731
    return (Probe(f"{probe.name}:recovery", pick(recovery_groups), probe.path),
            Probe(f"{probe.name}:evaluation", pick(eval_groups), probe.path))


def _shuffled_groups(probe: Probe, seed: int) -> list[str]:
    groups = probe.groups
    generator = torch.Generator().manual_seed(seed)
    return [groups[k] for k in torch.randperm(len(groups), generator=generator).tolist()]


def with_chat_template(probe: Probe, tokenizer) -> Probe:
    """The probe with each prompt wrapped as a user turn in the tokenizer's chat template.

    The answer stays the assistant's reply, so the model is scored on what it says after the
    generation prompt.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ProbeError("--chat-template was given but the tokenizer has no chat template")
    items = tuple(replace(i, prompt=tokenizer.apply_chat_template(
        [{"role": "user", "content": i.prompt}], tokenize=False, add_generation_prompt=True))
        for i in probe.items)
    return replace(probe, items=items)


def probe_from_pairs(pairs: Sequence[tuple[str, str]], name: str = "probe") -> Probe:
    """A probe from ``(prompt, answer)`` pairs, for use from Python."""
    return Probe(name, tuple(ProbeItem(p, a) for p, a in pairs))
