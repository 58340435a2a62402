"""The streaming weight analyses on a Ray cluster: ``--ray ADDRESS``.

The weight analyses are independent per tensor, so a triple of 70B checkpoints splits into
hundreds of tasks that each read their own tensors. What travels through Ray is small: a task
gets the checkpoints' *paths* (:class:`CheckpointRef`) and the tensor names it owns, opens the
files itself (shared storage: every node sees the same paths) and sends back records. No tensor
bytes go through the object store; ``tests/test_ray.py`` counts them.

This module knows nothing of the analyses: they give it a task function and the task arguments
(:func:`run_tasks`), and it starts or joins the cluster, submits, and gathers in completion
order with progress and Ctrl-C as in one process. Ray is an optional extra
(``pip install 'forgetdiag[ray]'``).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from forgetdiag.errors import CheckpointError, ForgetdiagError
from forgetdiag.runtime import RAY_MISSING, ProgressFn, Runtime
from forgetdiag.storage import Checkpoint

# A task should carry a few seconds of work at least: the measured per-task cost of a local
# runtime is ~10-20 ms (docs/scale.md), and a 70B tensor reads in ~0.1-1 s per node.
TASKS_PER_CPU = 4


def require_ray():
    """The ``ray`` module, or a one-line ForgetdiagError with the install command."""
    try:
        import ray
    except ImportError:
        raise ForgetdiagError(RAY_MISSING) from None
    return ray


@contextlib.contextmanager
def ray_session(address: str) -> Iterator[Any]:
    """Ray connected as ``address`` says, for the length of a block.

    ``auto``: the running cluster (``RAY_ADDRESS`` or the local head); ``local``: a new local
    runtime with every core; anything else goes to ``ray.init(address=...)`` (``ray://host:10001``).
    A session that is already connected (a notebook's, a test's) is used as it is and left open.
    """
    ray = require_ray()
    if ray.is_initialized():
        yield ray
        return
    try:
        ray.init(
            address=None if address == "local" else address,
            include_dashboard=False,
            log_to_driver=False,
            logging_level=logging.ERROR,  # the command's own output stays one line per problem
        )
    except (ConnectionError, RuntimeError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise ForgetdiagError(f"--ray {address}: cannot connect to a Ray cluster ({first})") from None
    try:
        yield ray
    finally:
        ray.shutdown()


@dataclass(frozen=True)
class CheckpointRef:
    """How a worker finds one checkpoint again: paths and the reading options, no tensors."""

    path: str
    label: str
    step: int | None
    base: str | None
    allow_pickle: bool

    @classmethod
    def of(cls, checkpoint: Checkpoint, runtime: Runtime) -> CheckpointRef:
        base = checkpoint.base
        return cls(
            str(Path(checkpoint.path).resolve()),
            checkpoint.label,
            checkpoint.step,
            None if base is None else str(Path(base.path).resolve()),
            runtime.allow_pickle,
        )

    def open(self) -> Checkpoint:
        """The checkpoint, read from its files on this node (headers only until a tensor is asked)."""
        from forgetdiag.checkpoints import find_checkpoints

        found = find_checkpoints(self.path, allow_pickle=self.allow_pickle, base=self.base)
        if len(found) != 1:
            raise CheckpointError(f"{self.path}: expected one checkpoint on this worker, found {len(found)}")
        checkpoint = found[0].with_label(self.label)
        checkpoint.step = self.step
        return checkpoint


def tensor_file(checkpoint: Checkpoint, name: str) -> str:
    """The file holding ``name`` (a LoRA adapter's: the adapter's; a pickle: the directory)."""
    meta = checkpoint.meta.get(name)
    file = getattr(meta, "file", None)
    return str(file if file is not None else checkpoint.path)


def plan_tasks(units: Sequence[tuple[Any, str, int]], cpus: int) -> list[list[Any]]:
    """Group work units ``(unit, shard file, bytes)`` into tasks: by shard file, largest first,
    each file cut into pieces of about ``total / (TASKS_PER_CPU * cpus)`` bytes so every CPU
    gets several tasks (a straggler costs a small piece, not a whole file)."""
    total = sum(size for _, _, size in units) or 1
    target = max(total // (TASKS_PER_CPU * max(cpus, 1)), 1)
    by_file: dict[str, list[tuple[Any, int]]] = {}
    for unit, file, size in units:
        by_file.setdefault(file, []).append((unit, size))
    tasks: list[tuple[int, list[Any]]] = []
    for members in by_file.values():
        current, held = [], 0
        for unit, size in members:
            if current and held + size > target:
                tasks.append((held, current))
                current, held = [], 0
            current.append(unit)
            held += size
        if current:
            tasks.append((held, current))
    tasks.sort(key=lambda task: -task[0])  # largest first: the long tasks start early
    return [units for _, units in tasks]


@dataclass(frozen=True)
class Failure:
    """A task's bad-input error, sent back as text (one line) and raised again on the driver."""

    kind: str
    message: str


def guarded(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` for a worker: a ForgetdiagError (or an unreadable file) comes back as a
    :class:`Failure` instead of a remote traceback, so the driver prints one line."""

    def task(*args: Any) -> Any:
        try:
            return fn(*args)
        except ForgetdiagError as exc:
            return Failure(type(exc).__name__, str(exc))
        except OSError as exc:
            return Failure("CheckpointError", f"{exc.filename or 'a checkpoint file'}: cannot read ({exc.strerror})")

    task.__name__ = task.__qualname__ = getattr(fn, "__name__", "task")
    return task


def _raise(failure: Failure) -> None:
    from forgetdiag import errors

    cls = getattr(errors, failure.kind, ForgetdiagError)
    raise (cls if isinstance(cls, type) and issubclass(cls, ForgetdiagError) else ForgetdiagError)(failure.message)


_CANCEL_WAIT_S = 30.0  # at most this long for cancelled tasks to end after a failure

# Each submitted task's arguments, kept when a caller asks (tests count their bytes).
SUBMITTED: list[tuple[Any, ...]] | None = None


def run_tasks(
    address: str,
    fn: Callable[..., Any],
    tasks: Callable[[int], Sequence[tuple[Any, ...]]],
    *,
    size: Callable[[Any], int] = lambda result: 1,
    total: int | None = None,
    description: str = "working",
    progress: ProgressFn | None = None,
) -> list[Any]:
    """Run ``fn(*args)`` for every ``args`` of ``tasks(cpus)`` on Ray; the results in task order.

    ``tasks`` is called with the cluster's CPU count once connected. Each task uses one CPU.
    ``progress(description, done, total)`` advances by ``size(result)`` as tasks finish. A
    failure or Ctrl-C cancels every task still queued or running, waits (at most 30 s) until the
    cancellations have landed, then propagates.
    """
    with ray_session(address) as ray:
        cpus = int(ray.cluster_resources().get("CPU", 1))
        arguments = list(tasks(cpus))
        if SUBMITTED is not None:
            SUBMITTED.extend(arguments)
        remote = ray.remote(num_cpus=1, max_retries=0)(guarded(fn))
        refs = [remote.remote(*args) for args in arguments]
        position = {ref: k for k, ref in enumerate(refs)}
        results: list[Any] = [None] * len(refs)
        done, waiting = 0, list(refs)
        try:
            while waiting:
                ready, waiting = ray.wait(waiting, num_returns=1, timeout=0.5)
                for ref in ready:
                    result = ray.get(ref)
                    if isinstance(result, Failure):
                        _raise(result)
                    results[position[ref]] = result
                    done += size(result)
                    if progress is not None:
                        progress(description, done, total if total is not None else len(refs))
        except BaseException:
            for ref in waiting:
                with contextlib.suppress(Exception):
                    ray.cancel(ref, force=True)
            # Wait until every cancellation has landed: a force-cancel ends the worker process
            # whenever the worker gets to it, and a worker that a later call was given in the
            # meantime would take that call's task down with it (seen: WorkerCrashedError in
            # the next command of one session).
            with contextlib.suppress(Exception):
                ray.wait(waiting, num_returns=len(waiting), timeout=_CANCEL_WAIT_S)
            raise
        return results
