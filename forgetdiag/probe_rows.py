"""Reading a probe file's rows: JSONL, a JSON array or CSV, each row checked and named by its line.

A row is a prompt/answer row, or a multiple-choice row when it has the choices field: a list of
distinct, non-empty texts, with the answer being the right choice's text or its 0-based index.
In CSV the choices are a ``choices`` cell holding a JSON list, or the cells of numbered columns
``choice_0``, ``choice_1``, ... (empty trailing cells are left out, so rows may have different
numbers of choices); an answer cell equal to a choice is that choice, otherwise a whole number
is an index. One probe holds one kind of row. docs/probes.md describes every layout.
"""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from forgetdiag.errors import ProbeError

Row = tuple[str, str, "str | None", "tuple[str, ...] | None"]  # prompt, answer, group, choices (a ProbeItem's fields)
NUMBERED = re.compile(r"^choice_(\d+)$")  # the CSV layout with one column per choice


@dataclass(frozen=True)
class ProbeFields:
    """The field (column) names of a probe file (CLI: --prompt-field, --answer-field, --group-field)."""

    prompt: str = "prompt"
    answer: str = "answer"
    group: str = "group"
    choices: str = "choices"

    def __post_init__(self) -> None:
        for name in ("prompt", "answer", "group", "choices"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ProbeError(f"--{name}-field {value!r}: expected a non-empty field name")


def read_rows(path: Path, fields: ProbeFields) -> list[Row]:
    """The checked rows of a JSONL, JSON or CSV probe file (see the module's docstring)."""
    expected = f"rows with '{fields.prompt}' and '{fields.answer}'"
    if not path.is_file():
        raise ProbeError(f"{path}: no such probe file; expected a JSONL, JSON or CSV file of {expected}")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise ProbeError(f"{path}: cannot read probe file as UTF-8 text ({exc})") from None
    if not text.strip():
        raise ProbeError(f"{path}: empty probe file; expected {expected}")
    is_csv = path.suffix.lower() == ".csv"
    if is_csv:
        numbered = _csv(path, text, fields)
    elif text.lstrip().startswith("["):
        numbered = _json_array(path, text)
    else:
        numbered = _jsonl(path, text)
    if not numbered:
        raise ProbeError(f"{path}: no rows; expected {expected}")
    items, first_kind = [], None
    for line, row in numbered:
        where = f"{path}: row on line {line}" if path.suffix.lower() != ".json" else f"{path}: row {line}"
        item = row_item(where, row, fields, index_from_text=is_csv)
        kind = "multiple-choice" if item[3] is not None else "prompt/answer"
        if first_kind is None:
            first_kind = kind
        elif kind != first_kind:
            raise ProbeError(
                f"{where} is a {kind} row but the rows before it are {first_kind} rows; "
                "expected one kind of row per probe (split them into two files)"
            )
        items.append(item)
    return items


def _csv(path: Path, text: str, fields: ProbeFields) -> list[tuple[int, Any]]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    rows = []
    try:
        for row in reader:
            rows.append((reader.line_num, _csv_choices(path, reader.line_num, row, fields)))  # the line it ends on
    except csv.Error as exc:
        raise ProbeError(f"{path}: invalid CSV on line {reader.line_num} ({exc})") from None
    return rows


def _csv_choices(path: Path, line: int, row: dict, fields: ProbeFields) -> dict:
    """A CSV row with its choices as a list: from the ``choices`` cell (a JSON list) or from
    the numbered ``choice_K`` cells; a row with neither (or empty ones) is a prompt/answer row."""
    row = dict(row)
    numbered = sorted((int(m.group(1)), key) for key in row if key and (m := NUMBERED.match(key)))
    cell = row.pop(fields.choices, None)
    if cell:
        try:
            row[fields.choices] = json.loads(cell)
        except json.JSONDecodeError:
            raise ProbeError(
                f"{path}: row on line {line}: '{fields.choices}' is {cell[:60]!r}; "
                'expected a JSON list of choices, e.g. ["Paris", "Rome"]'
            ) from None
    elif numbered:
        values = [row.pop(key) or "" for _, key in numbered]
        while values and not values[-1]:
            values.pop()
        if values:
            row[fields.choices] = values
    return row


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


def _shown(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)[:60]


def row_item(where: str, row: Any, fields: ProbeFields, *, index_from_text: bool = False) -> Row:
    """One checked probe row as a :class:`forgetdiag.probes.ProbeItem`'s fields; ``where`` names
    it in errors (``file: row on line 3``).

    Args:
        index_from_text: a text answer that is not among the choices but a whole number is an
            index (CSV cells are all text).
    """
    if not isinstance(row, dict):
        raise ProbeError(
            f"{where} is {type(row).__name__}; expected an object with '{fields.prompt}' and '{fields.answer}'"
        )
    for field in (fields.prompt, fields.answer):
        if row.get(field) is None:
            found = ", ".join(sorted(map(str, row))) or "no fields"
            raise ProbeError(f"{where} has no '{field}' field (found: {found})")
    choices = _choices(where, row.get(fields.choices), fields) if fields.choices in row else None
    answer = row[fields.answer]
    if choices is not None:
        answer = choices[_answer_index(where, answer, choices, fields, index_from_text)]
    values = {}
    for field, value in (
        (fields.prompt, row[fields.prompt]),
        (fields.answer, answer),
        (fields.group, row.get(fields.group)),
    ):
        if isinstance(value, (int, float)) and not isinstance(value, bool) and field == fields.group:
            value = str(value)  # numeric entity ids are common: 17 and "17" are one group
        if value is not None and not isinstance(value, str):
            raise ProbeError(
                f"{where}: '{field}' is {type(value).__name__} ({_shown(value)}); expected text (a JSON string)"
            )
        values[field] = value
    if not values[fields.answer].strip():
        raise ProbeError(f"{where} has an empty '{fields.answer}'; expected a non-empty answer")
    return (values[fields.prompt], values[fields.answer], values[fields.group], choices)


def _choices(where: str, value: Any, fields: ProbeFields) -> tuple[str, ...]:
    name = fields.choices
    if not isinstance(value, list):
        raise ProbeError(
            f"{where}: '{name}' is {type(value).__name__} ({_shown(value)}); expected a list of at least two choices"
        )
    if len(value) < 2:
        raise ProbeError(f"{where}: '{name}' has {len(value)} choice(s); expected a list of at least two choices")
    for k, choice in enumerate(value):
        if not isinstance(choice, str) or not choice.strip():
            raise ProbeError(f"{where}: choice {k} is {_shown(choice)}; expected non-empty text")
    repeated = next((c for k, c in enumerate(value) if c in value[:k]), None)
    if repeated is not None:
        raise ProbeError(f"{where}: the choice {repeated!r} appears twice in '{name}'; expected distinct choices")
    return tuple(value)


def _answer_index(where: str, answer: Any, choices: tuple[str, ...], fields: ProbeFields, index_from_text: bool) -> int:
    """The right choice's index from the answer: a choice's text or a 0-based index."""
    name = fields.answer
    if isinstance(answer, str) and answer in choices:
        return choices.index(answer)
    if index_from_text and isinstance(answer, str) and answer.strip().isdigit():
        answer = int(answer.strip())
    if isinstance(answer, int) and not isinstance(answer, bool):
        if 0 <= answer < len(choices):
            return answer
        raise ProbeError(
            f"{where}: '{name}' is the index {answer}, out of range for {len(choices)} choices; "
            f"expected 0 to {len(choices) - 1}"
        )
    if isinstance(answer, str):
        raise ProbeError(
            f"{where}: '{name}' {answer!r} is not among the {len(choices)} choices; "
            "expected the right choice's exact text or its 0-based index"
        )
    raise ProbeError(
        f"{where}: '{name}' is {type(answer).__name__} ({_shown(answer)}); "
        "expected the right choice's text or its 0-based index"
    )
