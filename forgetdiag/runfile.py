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
        raise ForgetdiagError(
            f"{path}: no run description; expected a directory with {RUN_FILE} "
            "or a .toml file (see docs/report.md, 'Describing a run')"
        )
    try:
        data = tomllib.loads(file.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ForgetdiagError(f"{file}: invalid TOML ({exc})") from None
    root = file.parent
    checkpoints = _table(data, "checkpoints", _CHECKPOINT_KEYS, file)
    probes = _table(data, "probes", _PROBE_KEYS, file)
    unknown = set(data) - {"name", "description", "expected_verdict", "checkpoints", "probes"}
    if unknown:
        raise ForgetdiagError(
            f"{file}: unknown key {sorted(unknown)[0]!r}; expected name, "
            "description, expected_verdict, [checkpoints], [probes]"
        )
    resolve = lambda key: _existing(root, checkpoints[key], file) if key in checkpoints else None
    landscape = checkpoints.get("landscape", [])
    if landscape and (not isinstance(landscape, list) or len(landscape) != 3):
        raise ForgetdiagError(f"{file}: checkpoints.landscape must list 3 checkpoints (origin, x end, y end)")
    for key in ("name", "description", "expected_verdict"):
        if key in data and not isinstance(data[key], str):
            raise ForgetdiagError(f"{file}: {key} must be text, found {data[key]!r}")
    return RunSpec(
        path=file,
        name=str(data.get("name", root.name)),
        description=str(data.get("description", "")),
        expected_verdict=data.get("expected_verdict"),
        before=resolve("before"),
        after=resolve("after"),
        control=resolve("control"),
        run=resolve("run"),
        landscape=tuple(_existing(root, p, file) for p in landscape),
        probes={k: _existing(root, v, file) for k, v in probes.items()},
    )


def _table(data: dict[str, Any], key: str, allowed: tuple[str, ...], file: Path) -> dict[str, Any]:
    table = data.get(key, {})
    if not isinstance(table, dict):
        raise ForgetdiagError(f"{file}: [{key}] must be a table")
    unknown = set(table) - set(allowed)
    if unknown:
        raise ForgetdiagError(f"{file}: unknown key {key}.{sorted(unknown)[0]}; expected one of {', '.join(allowed)}")
    return table


def _existing(root: Path, value: Any, file: Path) -> Path:
    path = (root / str(value)).resolve()
    if not path.exists():
        raise ForgetdiagError(f"{file}: {value} does not exist (resolved to {path})")
    return path


def spec_from_options(
    *,
    before: Path | None,
    after: Path | None,
    control: Path | None,
    run: Path | None,
    probe: Path | None,
    recovery_probe: Path | None,
    new_probe: Path | None,
    name: str = "run",
) -> RunSpec:
    """A :class:`RunSpec` from command-line options instead of a run file."""
    probes = {
        k: Path(v) for k, v in (("old", probe), ("recovery", recovery_probe), ("new", new_probe)) if v is not None
    }
    return RunSpec(
        path=Path("<options>"), name=name, before=before, after=after, control=control, run=run, probes=probes
    )


def resolve_spec(
    run: Path | None,
    *,
    before: Path | None = None,
    after: Path | None = None,
    control: Path | None = None,
    probe: Path | None = None,
    recovery_probe: Path | None = None,
    new_probe: Path | None = None,
) -> RunSpec:
    """The run file of ``run``, or a run described by options (these win when given).

    With ``before`` and ``probe`` given, ``run`` (if any) is taken as the Trainer run whose
    checkpoints form the sequence.
    """
    if run is not None and find_run_file(run) is not None and not any((before, after, probe)):
        return load_run(run)
    if before is None or probe is None:
        raise ForgetdiagError(
            f"{run or 'no RUN'}: no run description ({RUN_FILE}); expected RUN "
            "with forgetdiag.toml, or --before, --probe and an --after or a "
            "Trainer RUN directory"
        )
    is_trainer_run = run is not None and find_run_file(run) is None
    return spec_from_options(
        before=before,
        after=after,
        control=control,
        run=run if is_trainer_run else None,
        probe=probe,
        recovery_probe=recovery_probe,
        new_probe=new_probe,
        name=(run or after or before).name,
    )


def spec_inputs(spec: RunSpec) -> list[Path]:
    """Every path a run description names (for the output guard)."""
    paths = [spec.path, spec.before, spec.after, spec.control, spec.run, *spec.landscape, *spec.probes.values()]
    return [p for p in paths if p is not None and str(p) != "<options>"]


def landscape_triple(spec: RunSpec, run: list, runtime) -> list | str:
    """Origin, x end, y end: the run file's landscape, else before, after, last of the run;
    or, when those are not three single checkpoints, why not (in words)."""
    from forgetdiag.checkpoints import resolve_checkpoints

    if spec.landscape:
        paths = list(spec.landscape)
    else:
        paths = [p for p in (spec.before, spec.after) if p is not None]
        if run and run[-1].path.resolve() not in {p.resolve() for p in paths}:
            paths.append(run[-1].path)
    found = [resolve_checkpoints(p, runtime) for p in paths]
    if len(paths) != 3 or any(len(f) != 1 for f in found):
        return (
            "needs three single checkpoints (origin, early update end, late update end): "
            "set [checkpoints] landscape in the run file"
        )
    return [f[0] for f in found]
