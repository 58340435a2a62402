"""Writing results: atomic files, JSON, and the guard that keeps checkpoint directories untouched."""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterable

from forgetdiag.errors import ForgetdiagError

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
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
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


def guard_outputs(outputs: Iterable[str | Path | None], inputs: Iterable[str | Path]) -> None:
    """Refuse to write any output inside an input checkpoint directory.

    Raises:
        ForgetdiagError: an output path lies inside one of ``inputs``.
    """
    roots = [Path(p).resolve() for p in inputs if Path(p).is_dir()]
    for out in outputs:
        if out is None or str(out) == STDOUT:
            continue
        target = Path(out).resolve()
        for root in roots:
            if target == root or root in target.parents:
                raise ForgetdiagError(f"{out}: refusing to write inside the checkpoint directory "
                                      f"{root}; forgetdiag never writes into checkpoints, choose "
                                      "another output path")
