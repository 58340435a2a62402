"""Writing results: atomic files, JSON, and the guard that keeps checkpoint directories untouched."""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from forgetdiag.errors import ForgetdiagError
from forgetdiag.layout import ADAPTER_CONFIG, enclosing_checkpoint

STDOUT = "-"


def write_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` so that readers see the old file or the whole new one.

    The text goes to a temporary file in the same directory, is flushed to disk, and replaces
    ``path`` in one rename; an interrupted run leaves no half-written file behind.
    """
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    if not directory.is_dir():
        raise ForgetdiagError(f"{path}: cannot write: directory {directory} does not exist")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    except OSError as exc:
        raise ForgetdiagError(f"{path}: cannot write in {directory} ({exc.strerror or exc})") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise ForgetdiagError(f"{path}: cannot write ({exc.strerror or exc})") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _clean(value: Any) -> Any:
    """JSON-safe values: NaN and infinities become null (JSON has no NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        return _clean(value.item())
    return value


def to_json(data: Any) -> str:
    """Pretty JSON text of plain data (NaN -> null)."""
    return json.dumps(_clean(data), indent=2, ensure_ascii=False) + "\n"


def write_json(path: str | Path, data: Any) -> None:
    """Write ``data`` as JSON to ``path``, or to stdout when ``path`` is ``-``."""
    text = to_json(data)
    if str(path) == STDOUT:
        sys.stdout.write(text)
        sys.stdout.flush()
    else:
        write_atomic(path, text)


def guard_outputs(
    outputs: Mapping[str, str | Path | None], inputs: Iterable[str | Path | None], *, derived: Iterable[str] = ()
) -> None:
    """Refuse, before any work, an output path that would harm an input or fail late.

    Args:
        outputs: option name (``--json``) -> the path it writes (None and ``-`` are skipped).
        inputs: every path the command reads: checkpoints (directories; the LoRA base an
            adapter names counts too), probes, run files, saved JSON.
        derived: options whose path was made from user data (a run file's ``name``): those
            must stay in the working directory.

    Raises:
        ForgetdiagError: an output inside a checkpoint directory, equal to an input, equal to
            another output, a directory, in a missing or unwritable directory, or (derived)
            outside the working directory.
    """
    read = [Path(p) for p in inputs if p is not None and str(p) != STDOUT]
    roots = {root for p in read if p.is_dir() for root in checkpoint_roots(p)}
    files = {p.resolve() for p in read if not p.is_dir()}
    derived, seen, cwd = set(derived), {}, Path.cwd().resolve()
    for option, out in outputs.items():
        if out is None or str(out) == STDOUT:
            continue
        target = Path(out).resolve()
        if target in seen:
            raise ForgetdiagError(f"{seen[target]} and {option} both write {out}; expected different paths")
        if target in files:
            raise ForgetdiagError(
                f"{option} {out}: is an input of this command; refusing to overwrite it, choose another output path"
            )
        # the inputs' checkpoints (however they look), and any checkpoint the path lies in: a
        # command whose inputs are all files (remedy, tokens) must not write into one either
        inside = next((root for root in roots if target == root or root in target.parents), None)
        inside = inside or enclosing_checkpoint(target.parent)
        if inside is not None:
            raise ForgetdiagError(
                f"{option} {out}: refusing to write inside the checkpoint "
                f"directory {inside}; forgetdiag never writes into checkpoints, "
                "choose another output path"
            )
        if option in derived and target.parent != cwd:
            raise ForgetdiagError(
                f"{option} {out}: made from the run file's name, it would be written "
                f"outside the working directory {cwd}; pass {option} PATH"
            )
        if target.is_dir():
            raise ForgetdiagError(f"{option} {out}: is a directory; expected a file path")
        _check_writable(option, out, target.parent)
        seen[target] = option


def _check_writable(option: str, out, directory: Path) -> None:
    """Create and remove a file in ``directory``: the one test of writability that /proc, /sys
    and read-only mounts cannot fool."""
    if not directory.is_dir():
        raise ForgetdiagError(f"{option} {out}: cannot write there: directory {directory} does not exist")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".forgetdiag-check.", dir=directory)
        os.close(fd)
        os.unlink(tmp)
    except OSError as exc:
        raise ForgetdiagError(f"{option} {out}: cannot write in {directory} ({exc.strerror or exc})") from None


def checkpoint_roots(path: Path) -> list[Path]:
    """The directories a checkpoint path stands for: itself and the LoRA bases its adapters name
    (an adapter directory, or a Trainer run of adapters)."""
    roots = [path.resolve()]
    configs = [path / ADAPTER_CONFIG, *path.glob(f"checkpoint-*/{ADAPTER_CONFIG}")]
    for config in configs:
        try:
            named = json.loads(config.read_text(encoding="utf-8")).get("base_model_name_or_path")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(named, str) and named:
            for candidate in (Path(named), config.parent / named):
                if candidate.is_dir():
                    roots.append(candidate.resolve())
    return roots
