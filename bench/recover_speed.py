"""How long a `recover` takes on the shipped sample pair, and why exact match needs no loop.

In one run, on the sample run's before/after/control checkpoints:

1. a full ``recover`` (the CLI's defaults), split into evaluation, recovery training and control
   (the split the result itself records), for 1 and 2 torch threads;
2. the same without recovering BEFORE (``--no-before-recovery``: the protocol before the
   recovered before-model became the reference), so that the cost of that one extra recovery is
   a ratio measured in the same run (target: at most one extra recovery's time);
3. the paired bootstrap of the verdict on 10,000 planted items (target: under 1 s);
4. greedy exact match on the evaluation items three ways, on the same model: the teacher-forced
   single forward pass that forgetdiag uses, batched ``generate()``, and ``generate()`` one
   prompt at a time; the three must agree item for item, and the ratios are printed.

Usage::

    python bench/recover_speed.py [--run sample_checkpoints/spurious] [--threads 1,2]

Target: a sample ``recover`` in under 30 s on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from forgetdiag import load_probe, load_run, recover
from forgetdiag.analyses.verdict import Outcomes, decide
from forgetdiag.checkpoints import find_checkpoints
from forgetdiag.evaluate import encode, exact_by_generation, score
from forgetdiag.models import load_model, load_tokenizer
from forgetdiag.runtime import Runtime, torch_threads
from forgetdiag.settings import RecoverySettings


def full_recover(spec, threads: int, *, before_recovery: bool = True) -> tuple[float, dict, str]:
    probe = load_probe(spec.probes["old"])
    recovery = load_probe(spec.probes["recovery"]) if "recovery" in spec.probes else None
    start = time.perf_counter()
    result = recover(
        spec.before,
        spec.after,
        probe,
        control=spec.control,
        recovery_probe=recovery,
        settings=RecoverySettings(before_recovery=before_recovery),
        runtime=Runtime(threads=threads),
    )
    return time.perf_counter() - start, result.timings, result.verdict


def exact_three_ways(spec, threads: int, limit: int) -> dict[str, float]:
    (ckpt,) = find_checkpoints(spec.after)
    tokenizer = load_tokenizer(ckpt)
    items = load_probe(spec.probes["old"]).items[:limit]
    encoded = encode(tokenizer, items)
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    with torch_threads(threads):
        model = load_model(ckpt)
        timings, answers = {}, {}
        for name, run in (
            ("teacher-forced (one pass)", lambda: score(model, encoded, pad_id=pad, batch_size=64).exact),
            ("generate(), batched", lambda: exact_by_generation(model, encoded, pad_id=pad, eos_id=eos, batch_size=64)),
            (
                "generate(), one by one",
                lambda: exact_by_generation(model, encoded, pad_id=pad, eos_id=eos, batch_size=1),
            ),
        ):
            start = time.perf_counter()
            answers[name] = run()
            timings[name] = time.perf_counter() - start
    first = next(iter(answers.values()))
    assert all((a == first).all() for a in answers.values()), "the three ways disagree"
    print(f"  exact match on {len(encoded)} items: {first.mean():.3f} by all three ways (item for item)")
    return timings


def time_bootstrap(n: int) -> float:
    """Seconds of :func:`decide` (McNemar, bootstrap, every statistic) on ``n`` planted items."""
    rng = np.random.default_rng(0)
    before = (rng.random(n) < 0.9).astype(float)
    after = before * (rng.random(n) < 0.3)
    recovered = np.maximum(after, before * (rng.random(n) < 0.9))
    outcomes = Outcomes(
        before,
        after,
        recovered=[recovered],
        before_recovered=[before],
        control=np.zeros(n),
        control_recovered=[(rng.random(n) < 0.02).astype(float)],
        groups=np.arange(n) // 4,
    )
    start = time.perf_counter()
    decide(outcomes)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=Path("sample_checkpoints/spurious"))
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--items", type=int, default=300, help="items for the three-way exact match")
    args = parser.parse_args()
    spec = load_run(args.run)
    print(
        f"run {spec.name}: before {spec.before.name}, after {spec.after.name}, control "
        f"{spec.control.name if spec.control else 'none'}"
    )
    walls, splits = {}, {}
    for threads in (int(t) for t in args.threads.split(",")):
        wall, split, verdict = full_recover(spec, threads)
        walls[threads], splits[threads] = wall, split
        parts = ", ".join(f"{k} {v:.1f} s" for k, v in split.items())
        print(f"recover, {threads} thread(s): {wall:.1f} s ({parts}); verdict {verdict}")
    fastest = min(walls, key=walls.get)
    for threads, wall in walls.items():
        print(f"  {threads} thread(s): {wall / walls[fastest]:.2f}x the fastest")
    without, split, verdict = full_recover(spec, fastest, before_recovery=False)
    parts = ", ".join(f"{k} {v:.1f} s" for k, v in split.items())
    print(f"recover --no-before-recovery, {fastest} thread(s): {without:.1f} s ({parts}); verdict {verdict}")
    # The extra cost, read inside one run (wall differences between runs move with the load): the
    # "before recovery" phase against the after-model's "recovery" phase of the same run.
    extra, one_recovery = splits[fastest].get("before recovery", 0.0), splits[fastest].get("recovery", 0.0)
    print(
        f"  the before-model's recovery: {extra:.1f} s, one recovery of the after-model {one_recovery:.1f} s in the "
        f"same run ({extra / one_recovery:.2f}x; target: at most one extra recovery -> "
        f"{'met' if extra <= 1.25 * one_recovery else 'NOT met'}); wall with / without: "
        f"{walls[fastest] / without:.2f}x"
    )
    bootstrap_seconds = time_bootstrap(10_000)
    print(
        f"paired bootstrap of the verdict, 10,000 items in 2,500 groups, 2,000 replicates: {bootstrap_seconds:.2f} s "
        f"(target under 1 s: {'met' if bootstrap_seconds < 1 else 'NOT met'})"
    )
    timings = exact_three_ways(spec, fastest, args.items)
    base = timings["teacher-forced (one pass)"]
    for name, seconds in timings.items():
        print(f"  {name:<28} {seconds:7.2f} s  {seconds / base:6.1f}x")
    print(
        f"target: recover under 30 s -> {'met' if walls[fastest] < 30 else 'NOT met'} "
        f"({walls[fastest]:.1f} s with {fastest} thread(s))"
    )


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
