"""``angles --ray local`` against one process, on the triple of bench/angles_speed.py.

Generates the TinyLlama-1.1B shaped triple of ``angles_speed.py`` (bf16, low-rank-plus-noise
updates; ``--layers`` and ``--vocab`` shrink it, default 22 layers and 32000 rows: the full
shape) and measures in one run, with the page cache warm for both:

(a) ``compute_angles`` in one process (every core: its own thread pool);
(b) the same call with ``Runtime(ray="local")`` on a local Ray runtime of ``--workers`` CPUs
    (started before the timing: ``local`` pays ~4 s for it once, a running cluster does not);
    the records must equal (a)'s;
(c) Ray's cost per task: ``--probe-tasks`` empty tasks through the same runtime, and the
    difference (b) - (a) spread over (b)'s tasks;
(d) the per-tensor phases of (a) on one thread, for docs/scale.md: reading the three stored
    tensors, the two updates (C1 - C0, C2 - C1 in float32), and the two rank-32 randomized
    bases, in GB/s of stored bytes and tensors/s.

(a) and (b) alternate ``--repeats`` times; the best of each is compared. It prints the ratio
Ray / one process (target <= 1.2 on 2 cores).

Usage::

    python bench/angles_ray.py [--layers 22] [--vocab 32000] [--workers 2] [--repeats 2]
                               [--workdir bench/_work/angles_ray] [--keep]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from pathlib import Path

import angles_speed as speed

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def shape(layers: int, vocab: int) -> None:
    """Shrink angles_speed's model to ``layers`` and ``vocab`` (its generator reads these)."""
    speed.LAYERS, speed.VOCAB = layers, vocab
    speed.GLOBALS = {name: ((vocab, speed.HIDDEN), side) for name, (_, side) in speed.GLOBALS.items()}


def one_process(paths):
    from forgetdiag.analyses.angles import compute_angles

    start = time.perf_counter()
    result = compute_angles(paths)
    return time.perf_counter() - start, result


def on_ray(paths):
    from forgetdiag import distributed
    from forgetdiag.analyses.angles import compute_angles
    from forgetdiag.runtime import Runtime

    distributed.SUBMITTED = []
    start = time.perf_counter()
    result = compute_angles(paths, runtime=Runtime(ray="local"))
    seconds = time.perf_counter() - start
    tasks = len(distributed.SUBMITTED)
    distributed.SUBMITTED = None
    return seconds, result, tasks


def empty_task_seconds(ray, n: int) -> float:
    @ray.remote(num_cpus=1)
    def empty(x):
        return x

    ray.get([empty.remote(k) for k in range(20)])  # workers started
    start = time.perf_counter()
    ray.get([empty.remote(k) for k in range(n)])
    return (time.perf_counter() - start) / n


def phases(paths) -> dict[str, float]:
    """Per-tensor read / update / randomized-basis rates on one thread (all matrices)."""
    import torch

    from forgetdiag.analyses.angles import AngleSettings, update_basis_of
    from forgetdiag.checkpoints import resolve_checkpoints
    from forgetdiag.streaming import _difference

    torch.set_num_threads(1)
    found = resolve_checkpoints(paths)
    names = [n for n in found[0].names if len(found[0].meta[n].shape) == 2]
    stored = sum(c.meta[n].shape[0] * c.meta[n].shape[1] * 2 for c in found for n in names)  # bf16
    read = update = basis = 0.0
    settings = AngleSettings()
    for name in names:
        t0 = time.perf_counter()
        tensors = [c.get(name, dtype=None) for c in found]
        t1 = time.perf_counter()
        deltas = [
            _difference(tensors[0], tensors[1], torch.float32),
            _difference(tensors[1], tensors[2], torch.float32),
        ]
        t2 = time.perf_counter()
        for k, delta in enumerate(deltas):
            oriented = delta.T if delta.shape[1] == speed.HIDDEN else delta  # hidden side first
            update_basis_of(oriented, name, settings, seed=k)
        t3 = time.perf_counter()
        read, update, basis = read + t1 - t0, update + t2 - t1, basis + t3 - t2
    gb = stored / 1e9
    return {
        "tensors": len(names),
        "stored_gb": gb,
        "read_s": read,
        "update_s": update,
        "basis_s": basis,
        "read_gbps": gb / read,
        "update_gbps": gb / update,
        "basis_gbps": gb / basis,
        "read_tps": len(names) / read,
        "update_tps": len(names) / update,
        "basis_tps": len(names) / basis,
        "all_tps": len(names) / (read + update + basis),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=speed.LAYERS)
    parser.add_argument("--vocab", type=int, default=speed.VOCAB)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--probe-tasks", type=int, default=200)
    parser.add_argument("--workdir", type=Path, default=ROOT / "bench" / "_work" / "angles_ray")
    parser.add_argument("--keep", action="store_true", help="keep (and reuse) the generated triple")
    args = parser.parse_args()
    import ray

    shape(args.layers, args.vocab)
    root = args.workdir / f"l{args.layers}_v{args.vocab}"
    if not (root / "c2" / "config.json").is_file():
        print(f"generating a {args.layers}-layer, vocab-{args.vocab} TinyLlama-shaped triple in {root} ...", flush=True)
        speed.generate(root)
    paths = [str(root / f"c{k}") for k in range(3)]
    speed.cat_seconds([Path(p) for p in paths])  # warm the page cache for both
    start = time.perf_counter()
    ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False, configure_logging=False)
    init_s = time.perf_counter() - start
    try:
        ones, rays, tasks = [], [], 0
        for _ in range(args.repeats):
            seconds, a = one_process(paths)
            ones.append(seconds)
            seconds, b, tasks = on_ray(paths)
            rays.append(seconds)
            assert [r.to_dict() for r in a.records] == [r.to_dict() for r in b.records], "records differ"
        per_task = empty_task_seconds(ray, args.probe_tasks)
    finally:
        ray.shutdown()
    rates = phases(paths)
    best_one, best_ray = min(ones), min(rays)
    print(f"shape: {args.layers} layers, vocab {args.vocab}; {len(a.records)} records, identical through Ray")
    print(f"one process: {', '.join(f'{s:.1f}' for s in ones)} s (best {best_one:.1f} s)")
    print(
        f"--ray local ({args.workers} CPUs, {tasks} tasks): {', '.join(f'{s:.1f}' for s in rays)} s (best {best_ray:.1f} s)"
    )
    print(f"ratio Ray / one process: {best_ray / best_one:.2f} (target <= 1.2)")
    print(f"Ray runtime start (local, once): {init_s:.1f} s")
    print(f"empty task round trip: {per_task * 1e3:.1f} ms per task ({args.probe_tasks} tasks, {args.workers} CPUs)")
    print(f"(Ray - one process) / tasks: {(best_ray - best_one) / max(tasks, 1) * 1e3:.0f} ms per task")
    print(
        f"per tensor on one thread ({rates['tensors']} matrices, {rates['stored_gb']:.2f} GB stored over 3 checkpoints):"
        f" read {rates['read_gbps']:.2f} GB/s ({rates['read_tps']:.1f} tensors/s),"
        f" update {rates['update_gbps']:.2f} GB/s ({rates['update_tps']:.1f}/s),"
        f" randomized bases {rates['basis_gbps']:.2f} GB/s ({rates['basis_tps']:.1f}/s);"
        f" all three {rates['all_tps']:.1f} tensors/s"
    )
    print(f"median one-process time per matrix: {statistics.median(ones) / rates['tensors'] * 1e3:.0f} ms")
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
