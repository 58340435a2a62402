"""Run descriptions: a small TOML file next to a run that names its checkpoints and probes.

``forgetdiag report RUN`` reads ``RUN/forgetdiag.toml`` (or a TOML file given directly). Paths
are relative to the file. Example::

    name = "spurious"
    description = "Task 1 = QA on new people; task-0 knowledge is intact."
    expected_verdict = "spurious"      # optional: the known truth (shipped samples)

    [checkpoints]
    before = "checkpoint-0"            # knew the old task
    after = "checkpoint-50"            # after training on the new task
    control = "../control"             # never held the old task's knowledge (optional)
    run = "."                          # the run's checkpoint-N sequence (optional)
    landscape = ["checkpoint-0", "checkpoint-50", "checkpoint-300"]  # origin, x end, y end

    [probes]
    old = "../probes/task0_heldout.jsonl"       # the old task (evaluation)
    recovery = "../probes/task0_recovery.jsonl" # the old task's recovery examples (optional)
    new = "../probes/task1_new_people.jsonl"    # the new task (optional)
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from forgetdiag.errors import ForgetdiagError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

RUN_FILE = "forgetdiag.toml"
_CHECKPOINT_KEYS = ("before", "after", "control", "run", "landscape")
_PROBE_KEYS = ("old", "recovery", "new")


@dataclass(frozen=True)
class RunSpec:
    """A run description with every path resolved."""

    path: Path
    name: str
    description: str = ""
    expected_verdict: str | None = None
    before: Path | None = None
    after: Path | None = None
    control: Path | None = None
    run: Path | None = None
    landscape: tuple[Path, ...] = ()
    probes: dict[str, Path] = field(default_factory=dict)


def find_run_file(path: str | Path) -> Path | None:
    """``path`` itself if it is a TOML file, ``path/forgetdiag.toml`` if present, else None."""
    path = Path(path)
    if path.is_file() and path.suffix == ".toml":
        return path
    candidate = path / RUN_FILE
    return candidate if candidate.is_file() else None


def load_run(path: str | Path) -> RunSpec:
    """Read a run description (a TOML file, or a directory holding ``forgetdiag.toml``).

    Raises:
        ForgetdiagError: no file, invalid TOML, unknown keys, or paths that do not exist.
    """
    file = find_run_file(path)
    if file is None:
        raise ForgetdiagError(f"{path}: no run description; expected a directory with {RUN_FILE} "
                              "or a .toml file (see the README, 'Describing a run')")
    try:
        data = tomllib.loads(file.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ForgetdiagError(f"{file}: invalid TOML ({exc})") from None
    root = file.parent
    checkpoints = _table(data, "checkpoints", _CHECKPOINT_KEYS, file)
    probes = _table(data, "probes", _PROBE_KEYS, file)
    unknown = set(data) - {"name", "description", "expected_verdict", "checkpoints", "probes"}
    if unknown:
        raise ForgetdiagError(f"{file}: unknown key {sorted(unknown)[0]!r}; expected name, "
                              "description, expected_verdict, [checkpoints], [probes]")
    resolve = lambda key: _existing(root, checkpoints[key], file) if key in checkpoints else None  # noqa: E731
    landscape = checkpoints.get("landscape", [])
    if landscape and (not isinstance(landscape, list) or len(landscape) != 3):
        raise ForgetdiagError(f"{file}: checkpoints.landscape must list 3 checkpoints "
                              "(origin, x end, y end)")
    return RunSpec(
        path=file, name=str(data.get("name", root.name)), description=str(data.get("description", "")),
        expected_verdict=data.get("expected_verdict"), before=resolve("before"),
        after=resolve("after"), control=resolve("control"), run=resolve("run"),
        landscape=tuple(_existing(root, p, file) for p in landscape),
        probes={k: _existing(root, v, file) for k, v in probes.items()})


def _table(data: dict[str, Any], key: str, allowed: tuple[str, ...], file: Path) -> dict[str, Any]:
    table = data.get(key, {})
    if not isinstance(table, dict):
        raise ForgetdiagError(f"{file}: [{key}] must be a table")
    unknown = set(table) - set(allowed)
    if unknown:
        raise ForgetdiagError(f"{file}: unknown key {key}.{sorted(unknown)[0]}; expected one of "
                              f"{', '.join(allowed)}")
    return table


def _existing(root: Path, value: Any, file: Path) -> Path:
    path = (root / str(value)).resolve()
    if not path.exists():
        raise ForgetdiagError(f"{file}: {value} does not exist (resolved to {path})")
    return path
