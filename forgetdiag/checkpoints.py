"""Find checkpoints on disk: model directories, Trainer runs, PEFT adapters, and sequences of them.

A user points forgetdiag at what training wrote:

* a model directory (``config.json`` + ``model.safetensors``, or sharded safetensors with
  ``model.safetensors.index.json``);
* a Hugging Face Trainer output directory, whose ``checkpoint-N`` subdirectories form a sequence
  ordered by N as a number. The Trainer's own pickles there (``optimizer.pt``,
  ``scheduler.pt``, ``rng_state.pth``, ``training_args.bin``) are ignored and never loaded;
* a PEFT LoRA adapter directory over a base model (see :mod:`forgetdiag.lora`);
* ``pytorch_model.bin`` only with ``allow_pickle=True``, then via ``torch.load(weights_only=True)``.

Every analysis turns what it was given (paths, :class:`Checkpoint` objects, lists of them) into
checkpoints with :func:`resolve_checkpoints`, the one way in. Reading tensors is
:mod:`forgetdiag.storage`.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, overload

from forgetdiag.errors import CheckpointError
from forgetdiag.lora import load_adapter
from forgetdiag.storage import (
    ADAPTER_CONFIG,
    EXPECTED,
    SAFETENSORS_INDEX,
    Checkpoint,
    load_model_dir,
    read_header,
)

if TYPE_CHECKING:
    from forgetdiag.runtime import Runtime

TRAINER_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def trainer_checkpoints(path: Path) -> list[tuple[int, Path]]:
    """``checkpoint-N`` subdirectories of a Trainer output directory, ordered by N as a number."""
    found = []
    for child in path.iterdir():
        match = TRAINER_CHECKPOINT.match(child.name)
        if match and child.is_dir():
            found.append((int(match.group(1)), child))
    return sorted(found)


def find_checkpoints(
    path: str | Path, *, allow_pickle: bool = False, base: str | Path | None = None
) -> list[Checkpoint]:
    """The checkpoints at ``path``: one for a model or adapter directory, several for a run.

    Args:
        path: a model directory, a Trainer output directory, or a PEFT adapter directory.
        allow_pickle: read ``pytorch_model.bin`` with ``torch.load(weights_only=True)``.
        base: the base model directory of a LoRA adapter (overrides adapter_config.json).

    Returns:
        Checkpoints in training order. A Trainer directory that also holds a final model at
        its top level lists it last, labelled ``final``.

    Example:
        >>> [c.label for c in find_checkpoints("runs/sft")]  # doctest: +SKIP
        ['checkpoint-50', 'checkpoint-100', 'final']
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory; {EXPECTED}")
    if not path.is_dir():
        raise CheckpointError(f"{path}: is a file; {EXPECTED}")
    if (path / ADAPTER_CONFIG).is_file():
        return [load_adapter(path, base=base, allow_pickle=allow_pickle)]
    steps = trainer_checkpoints(path)
    if steps:
        found = [_load_any(child, allow_pickle=allow_pickle, base=base, label=child.name, step=n) for n, child in steps]
        if (path / "config.json").is_file():
            found.append(load_model_dir(path, allow_pickle=allow_pickle, label="final"))
        return found
    if not any(path.iterdir()):
        raise CheckpointError(f"{path}: empty directory; {EXPECTED}")
    if not (path / "config.json").is_file():
        raise CheckpointError(
            f"{path}: no config.json, checkpoint-N subdirectory or adapter_config.json here; {EXPECTED}"
        )
    return [load_model_dir(path, allow_pickle=allow_pickle)]


def _load_any(path: Path, *, allow_pickle: bool, base, label: str, step: int) -> Checkpoint:
    if (path / ADAPTER_CONFIG).is_file():
        return load_adapter(path, base=base, allow_pickle=allow_pickle, label=label, step=step)
    return load_model_dir(path, allow_pickle=allow_pickle, label=label, step=step)


@overload
def resolve_checkpoints(value: Any, runtime: Runtime | None = None, *, single: None = None) -> list[Checkpoint]: ...
@overload
def resolve_checkpoints(value: Any, runtime: Runtime | None = None, *, single: str) -> Checkpoint: ...


def resolve_checkpoints(value, runtime=None, *, single=None):
    """Checkpoints from what a user passed: a path, a :class:`Checkpoint`, or a list of them.

    Paths are found with :func:`find_checkpoints` (a Trainer run expands in place, in step
    order), reading pickles and LoRA bases as ``runtime`` says. Labels follow one rule: the
    directory name (``checkpoint-N``, ``final`` for a run's top-level model); when two
    checkpoints of the result would share a label, every one of them is labelled by its path
    instead. Given checkpoints are never modified (relabelled copies are returned).

    Args:
        value: a path, a Checkpoint, or a sequence of paths and Checkpoints.
        runtime: how to read (``allow_pickle``, ``base``); default :class:`Runtime`.
        single: when given, exactly one checkpoint must result and it is returned; the text
            names the argument in the error (``"BEFORE"``).

    Raises:
        CheckpointError: unreadable checkpoints, or not exactly one where ``single`` is asked.
    """
    allow_pickle = bool(getattr(runtime, "allow_pickle", False))
    base = getattr(runtime, "base", None)
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    found: list[Checkpoint] = []
    for v in values:
        found.extend([v] if isinstance(v, Checkpoint) else find_checkpoints(v, allow_pickle=allow_pickle, base=base))
    if single is not None:
        if len(found) != 1:
            shown = ", ".join(c.label for c in found[:3]) + ("..." if len(found) > 3 else "")
            raise CheckpointError(
                f"{single} must be one checkpoint; {value} holds {len(found)} "
                f"({shown or 'none'}): pass one checkpoint-N directory"
            )
        return found[0]
    labels = [c.label for c in found]
    if len(set(labels)) != len(labels):  # e.g. two runs' checkpoint-100: label by path
        found = [c.with_label(str(c.path)) for c in found]
    return found


def find_sequence(
    paths: Iterable[str | Path], *, allow_pickle: bool = False, base: str | Path | None = None
) -> list[Checkpoint]:
    """All checkpoints of ``paths`` in the order given (a run directory expands in place);
    labels as :func:`resolve_checkpoints` gives them."""
    from forgetdiag.runtime import Runtime

    return resolve_checkpoints(
        list(paths), Runtime(allow_pickle=allow_pickle, base=None if base is None else str(base))
    )


def fingerprint(checkpoint: Checkpoint) -> dict[str, Any]:
    """Identify a checkpoint cheaply: weight sizes and sha256 of its config and tensor index.

    The index is ``model.safetensors.index.json`` for sharded checkpoints and the header of each
    safetensors file otherwise (names, dtypes, shapes and offsets); ``sample_sha256`` hashes the
    first and last MiB of each weight file, which tells checkpoints of one layout apart.
    """
    digest = hashlib.sha256()
    for file in sorted(checkpoint.weight_files):
        if file.suffix == ".safetensors":
            digest.update(read_header(file).raw)
        else:
            digest.update(f"{file.name}:{file.stat().st_size}".encode())
    index = checkpoint.path / SAFETENSORS_INDEX
    if index.is_file():
        digest.update(index.read_bytes())
    config = checkpoint.path / ("config.json" if checkpoint.base is None else ADAPTER_CONFIG)
    config_hash = hashlib.sha256(config.read_bytes()).hexdigest()[:16] if config.is_file() else None
    return {
        "label": checkpoint.label,
        "path": str(checkpoint.path),
        "format": checkpoint.format,
        "size_bytes": checkpoint.size_bytes,
        "index_sha256": digest.hexdigest()[:16],
        "sample_sha256": _sample_digest(checkpoint),
        "config_sha256": config_hash,
    }


def _sample_digest(checkpoint: Checkpoint) -> str:
    """sha256 of the first and last MiB of each weight file: tells weights apart cheaply."""
    sample = hashlib.sha256()
    for file in sorted(checkpoint.weight_files):
        with open(file, "rb") as handle:
            sample.update(handle.read(1 << 20))
            handle.seek(max(0, file.stat().st_size - (1 << 20)))
            sample.update(handle.read())
    return sample.hexdigest()[:16]


_COMPARE_BLOCK = 1 << 24  # bytes read at a time when two weight files are compared


def duplicates(checkpoints: Sequence[Checkpoint]) -> list[tuple[int, int]]:
    """Pairs ``(i, j)``, i < j, of checkpoints in a sequence that hold the same weights byte for
    byte (e.g. a Trainer run's ``final`` saved from its last ``checkpoint-N``).

    Candidates share their format, size, the first and last MiB of each weight file (as in
    :func:`fingerprint`, whose header hash is left out: the bytes are compared next) and, for
    adapters, their base; each candidate pair is then confirmed by comparing every byte of its
    weight files, so a match is never a guess from a sample.
    """
    keys = []
    for c in checkpoints:
        base = None if c.base is None else str(c.base.path.resolve())
        keys.append((c.format, c.size_bytes, _sample_digest(c), base))
    found = []
    for j in range(len(checkpoints)):
        for i in range(j):
            if keys[i] == keys[j] and _same_bytes(checkpoints[i], checkpoints[j]):
                found.append((i, j))
                break  # j duplicates its first equal; later pairs follow from that one
    return found


def _same_bytes(a: Checkpoint, b: Checkpoint) -> bool:
    files_a, files_b = sorted(a.weight_files), sorted(b.weight_files)
    if [f.name for f in files_a] != [f.name for f in files_b]:
        return False
    for fa, fb in zip(files_a, files_b):
        if fa.resolve() == fb.resolve():
            continue
        if fa.stat().st_size != fb.stat().st_size:
            return False
        with open(fa, "rb") as ha, open(fb, "rb") as hb:
            while True:
                block = ha.read(_COMPARE_BLOCK)
                if block != hb.read(_COMPARE_BLOCK):
                    return False
                if not block:
                    break
    return True


def duplicate_notes(checkpoints: Sequence[Checkpoint], pairs: Sequence[tuple[int, int]] | None = None) -> list[str]:
    """One line per checkpoint that repeats an earlier one of the sequence (``pairs``: from
    :func:`duplicates`, found here if None), in words."""
    return [
        f"{checkpoints[j].label} holds the same weights as {checkpoints[i].label} (identical bytes): "
        f"the update between them is zero"
        for i, j in (duplicates(checkpoints) if pairs is None else pairs)
    ]


def tower_notes(checkpoint: Checkpoint) -> list[str]:
    """A wrapper's non-text towers, left out of the text analyses, in words."""
    return [
        f"{len(names)} tensors of the {tower} ({sum(math.prod(checkpoint.meta[n].shape) for n in names):,} "
        "parameters) are not part of the text model and are left out"
        for tower, names in checkpoint.towers.items()
    ]
