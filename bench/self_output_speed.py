"""How fast `forgetdiag remedy self-output` is, next to scoring the same items in the same run.

On the samples' new task (sample_checkpoints/probes/task1_spurious.jsonl, 1,500 prompts) and its
old model (sample_checkpoints/spurious/checkpoint-0), interleaved round by round so that other
jobs on the machine slow every part alike:

* baseline: :func:`forgetdiag.evaluate.score` on the same encoded items (one teacher-forced
  forward pass per batch): items per second;
* :func:`forgetdiag.analyses.self_output.self_output` without a rewrite prompt (one greedy
  generation per prompt) and with the samples' rewrite prompt (a second generation for every
  prompt the old model answers otherwise): prompts per second, the whole call (tokenizing,
  loading the model, generating, decoding) and its generation phase alone.

The median of ``--rounds`` rounds is printed, with each figure's ratio to scoring. Generation
is the cost: every answer token needs a forward pass of its own, where scoring needs one pass.

Usage::

    python bench/self_output_speed.py [--rounds 3] [--batch-size 64] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from forgetdiag import Runtime, load_probe, resolve_checkpoints
from forgetdiag.analyses.self_output import SelfOutputSettings, self_output
from forgetdiag.evaluate import score
from forgetdiag.models import load_model, load_tokenizer, tokenize_probe
from forgetdiag.runtime import torch_threads
from forgetdiag.samples.build import SampleConfig

SAMPLES = Path(__file__).resolve().parent.parent / "sample_checkpoints"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    old = SAMPLES / "spurious" / "checkpoint-0"
    new = load_probe(SAMPLES / "probes" / "task1_spurious.jsonl")
    runtime = Runtime(batch_size=args.batch_size, threads=args.threads)
    ckpt = resolve_checkpoints(old, runtime, single="OLD_CKPT")
    tokenizer = load_tokenizer(ckpt, runtime)
    encoded, stops = tokenize_probe(tokenizer, new, ckpt, runtime)
    rewrite = SelfOutputSettings(rewrite_prompt=SampleConfig().rewrite_prompt)
    times: dict[str, list[float]] = {}
    rewritten = None
    with torch_threads(args.threads):
        model = load_model(ckpt, runtime)
        score(model, encoded[:64], pad_id=tokenizer.pad_token_id, batch_size=args.batch_size)  # warm-up
        for r in range(args.rounds):
            tic = time.perf_counter()
            score(model, encoded, pad_id=tokenizer.pad_token_id, batch_size=args.batch_size, stops=stops.accepted)
            times.setdefault("score (baseline)", []).append(time.perf_counter() - tic)
            for name, settings in (("self-output", SelfOutputSettings()), ("self-output --rewrite-prompt", rewrite)):
                tic = time.perf_counter()
                result = self_output(old, new, settings=settings, runtime=runtime)
                times.setdefault(name, []).append(time.perf_counter() - tic)
                times.setdefault(f"{name}: generation only", []).append(
                    result.timings["generation"] + result.timings.get("restatement", 0.0)
                )
                if settings is rewrite:
                    rewritten = result
            print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f} s" for k, v in times.items()), flush=True)
    n = len(encoded)
    base = statistics.median(times["score (baseline)"])
    print(
        f"\n{n} prompts of {new.name}, old model {old.relative_to(SAMPLES.parent)}, batch {args.batch_size}, "
        f"{args.threads} thread(s); median of {args.rounds} rounds"
    )
    print(f"{'':<46} {'seconds':>8} {'per second':>11} {'x score time':>13}")
    for name, values in times.items():
        t = statistics.median(values)
        print(f"{name:<46} {t:>8.2f} {n / t:>11.0f} {t / base:>13.1f}")
    c = rewritten.counts()
    print(
        f"with the rewrite prompt: {c['same']} same, {c['restated']} restated "
        f"({rewritten.n_rewritten} rewritten), {c['target']} keep the target: "
        f"{n - c['same']} prompts generated twice"
    )


if __name__ == "__main__":
    main()
