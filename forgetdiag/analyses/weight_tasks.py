"""The per-tensor work of ``angles`` and ``inspect`` as Ray tasks (``--ray``, :mod:`forgetdiag.distributed`).

A task gets the checkpoints' paths and the tensor names it owns, streams those tensors from the
files on its node, and sends back what one process would have computed for them: angle records,
or the count of tensors found finite. The driver puts the records back in forward-pass order, so
the result is the one-process result (same records, same JSON up to timings).

Routed experts of one layer stay in one task: one process computes their bases in batches per
layer (:mod:`.angle_batch`), and splitting a layer would change the batches.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from forgetdiag.analyses.angle_batch import group_key
from forgetdiag.distributed import CheckpointRef, plan_tasks, run_tasks, tensor_file
from forgetdiag.errors import ForgetdiagError
from forgetdiag.runtime import ProgressFn, Runtime, torch_threads
from forgetdiag.sources import _nbytes
from forgetdiag.storage import Checkpoint
from forgetdiag.streaming import SequenceCheck, require_finite


def stored_bytes(checkpoint: Checkpoint, name: str) -> int:
    """Bytes of ``name`` as stored (what a task reads of it from one checkpoint)."""
    meta = checkpoint.meta[name]
    dtype = getattr(torch, meta.dtype, None)
    return _nbytes(meta.shape, dtype if isinstance(dtype, torch.dtype) else torch.float32)


def _require_cpu(runtime: Runtime) -> None:
    if runtime.torch_device.type != "cpu":
        raise ForgetdiagError(
            f"--ray runs the per-tensor work on the workers' CPUs; drop --device {runtime.device} (found both)"
        )


# --- angles --------------------------------------------------------------------------------------


def angle_records_on_ray(
    run: Callable, checkpoints, specs, targets, check: SequenceCheck, settings, runtime: Runtime, progress
) -> list:
    """``run`` (:func:`forgetdiag.analyses.angles._run`) over Ray tasks; the records in the
    order one process gives them."""
    _require_cpu(runtime)
    refs = [CheckpointRef.of(c, runtime) for c in checkpoints]
    used = sorted({k for p in specs for k in (p.a.i, p.a.j, p.b.i, p.b.j)})
    units: dict[object, list] = {}  # unit -> its targets; a layer's batched experts are one unit
    for name, parts, shape in targets:
        batched = any(group_key(part, shape, settings) is not None for part in parts)
        units.setdefault(("experts", parts[0].layer) if batched else name, []).append((name, parts, shape))
    sized = [
        (
            key,
            tensor_file(checkpoints[used[0]], members[0][0]),
            sum(stored_bytes(checkpoints[k], n) for n, _, _ in members for k in used),
        )
        for key, members in units.items()
    ]
    total = sum(len(parts) for _, parts, _ in targets)

    def tasks(cpus: int):
        for keys in plan_tasks(sized, cpus):
            mine = [t for key in keys for t in units[key]]
            names = {name for name, _, _ in mine}
            sub = SequenceCheck(tuple(names), {n: r for n, r in check.rows.items() if n in names})
            yield (run, refs, specs, mine, sub, settings)

    gathered = run_tasks(
        runtime.ray,
        angle_task,
        tasks,
        size=lambda records: len(records) // len(specs),
        total=total,
        description="computing angles",
        progress=progress,
    )
    order = {(p.tensor.name, p.part, p.expert): k for k, p in enumerate(p for _, ps, _ in targets for p in ps)}
    records = [r for task in gathered for r in task]
    records.sort(key=lambda r: order[(r.param, r.part, r.expert)])  # stable: pairs keep their order
    return records


def angle_task(run: Callable, refs: Sequence[CheckpointRef], specs, targets, check, settings) -> list:
    """One task: stream its tensors from the files and compute their records, one CPU."""
    checkpoints = [ref.open() for ref in refs]
    with torch_threads(1):
        return run(checkpoints, specs, targets, check, settings, torch.device("cpu"), 1, None)


# --- inspect -------------------------------------------------------------------------------------


def check_values_on_ray(checkpoints: Sequence[Checkpoint], runtime: Runtime, progress: ProgressFn | None) -> None:
    """Read every tensor of every checkpoint once on the cluster; a NaN or Inf raises the
    CheckpointError one process raises (naming the tensor and its file)."""
    refs = [CheckpointRef.of(c, runtime) for c in checkpoints]
    sized = [
        ((k, name), tensor_file(c, name), stored_bytes(c, name)) for k, c in enumerate(checkpoints) for name in c.names
    ]

    def tasks(cpus: int):
        for units in plan_tasks(sized, cpus):
            yield (refs, units)

    run_tasks(
        runtime.ray,
        finite_task,
        tasks,
        size=lambda n: n,
        total=len(sized),
        description="checking values",
        progress=progress,
    )


def finite_task(refs: Sequence[CheckpointRef], units: Sequence[tuple[int, str]]) -> int:
    """One task: read its tensors and refuse NaN/Inf as one process does; the count read."""
    opened: dict[int, Checkpoint] = {}
    with torch_threads(1):
        for k, name in units:
            c = opened.get(k) or opened.setdefault(k, refs[k].open())
            require_finite(c.get(name), name, c)
    return len(units)
