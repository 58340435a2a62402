"""How long a `recover` takes on the shipped sample pair, and why exact match needs no loop.

In one run, on the sample run's before/after/control checkpoints:

1. a full ``recover`` (the CLI's defaults), split into evaluation, recovery training and control
   (the split the result itself records), for 1 and 2 torch threads;
2. greedy exact match on the evaluation items three ways, on the same model: the teacher-forced
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

import torch

from forgetdiag import load_probe, load_run, recover
from forgetdiag.checkpoints import find_checkpoints
from forgetdiag.evaluate import encode, exact_by_generation, score
from forgetdiag.models import load_model, load_tokenizer
from forgetdiag.runtime import Runtime, torch_threads


def full_recover(spec, threads: int) -> tuple[float, dict, str]:
    probe = load_probe(spec.probes["old"])
    recovery = load_probe(spec.probes["recovery"]) if "recovery" in spec.probes else None
    start = time.perf_counter()
    result = recover(
        spec.before, spec.after, probe, control=spec.control, recovery_probe=recovery, runtime=Runtime(threads=threads)
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
    walls = {}
    for threads in (int(t) for t in args.threads.split(",")):
        wall, split, verdict = full_recover(spec, threads)
        walls[threads] = wall
        parts = ", ".join(f"{k} {v:.1f} s" for k, v in split.items())
        print(f"recover, {threads} thread(s): {wall:.1f} s ({parts}); verdict {verdict}")
    fastest = min(walls, key=walls.get)
    for threads, wall in walls.items():
        print(f"  {threads} thread(s): {wall / walls[fastest]:.2f}x the fastest")
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
