"""Speed and memory of last-token hidden-state extraction (``forgetdiag features``).

Two measurements; each model runs in a fresh process:

1. **Speed**: hidden states (embedding output + every layer, at the last prompt token) for
   2000 prompts on a sample-sized model: ``sample_checkpoints/spurious/checkpoint-0`` with the
   prompts of ``sample_checkpoints/probes/task0_heldout.jsonl`` when they exist, else a 4-layer
   Llama (hidden 128, intermediate 512, vocabulary 2000) built from a config with prompts of
   12-24 random tokens. Prompts per second and peak extra resident memory, for forgetdiag's hooks
   and for transformers' ``output_hidden_states`` (``--threads 1,2`` adds two threads: on this
   shared 2-core machine they were 7x slower than one, 44 vs 312 prompts/s).
2. **Memory vs layers x tokens**: long prompts (``--long-tokens``) on 4- and 16-layer models
   of the same width: the peak extra memory of the hooks, of the base model with
   ``output_hidden_states=True``, and of the naive way (the full causal LM with
   ``output_hidden_states=True``, logits included). The hooks keep one position per layer, so
   their peak follows one layer's activations; ``output_hidden_states`` keeps every token of
   every layer until the forward pass returns.

Peak extra memory = VmHWM - VmRSS at the start of a pass (the high-water mark is reset through
/proc/self/clear_refs before every pass), so the model's own weights are not counted. Large
blocks are mmap'd and unmapped on free (MALLOC_MMAP_THRESHOLD_), so resident memory follows the
live tensors and passes of different methods in one process do not inherit each other's heap.

Usage::

    python bench/features_speed.py [--prompts 2000] [--long-tokens 512] [--long-prompts 32] [--repeats 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample_checkpoints" / "spurious" / "checkpoint-0"
SAMPLE_PROBE = ROOT / "sample_checkpoints" / "probes" / "task0_heldout.jsonl"


GROWTH_LIMIT = 1.2  # the hooks' peak from 4 to 16 layers: one layer's activations, not all


def _status(key: str) -> int:
    """A /proc/self/status field in bytes (VmRSS, VmHWM)."""
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"{key}:\s+(\d+) kB", text).group(1)) * 1024


def _model_and_prompts(case: dict):
    """The model under test and its prompts as forgetdiag ``Encoded`` items."""
    import torch

    from forgetdiag.evaluate import Encoded

    generator = torch.Generator().manual_seed(0)
    if case["sample"]:
        from forgetdiag.analyses.hidden import encode_prompts
        from forgetdiag.checkpoints import find_checkpoints
        from forgetdiag.models import load_model, load_tokenizer
        from forgetdiag.probes import Probe, load_probe

        checkpoint = find_checkpoints(SAMPLE)[0]
        model, tokenizer = load_model(checkpoint), load_tokenizer(checkpoint)
        probe = load_probe(SAMPLE_PROBE)
        items = [probe.items[k % len(probe)] for k in range(case["prompts"])]
        return model, encode_prompts(tokenizer, Probe("bench", tuple(items))), tokenizer.pad_token_id
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=case["layers"],
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=2000,
        max_position_embeddings=max(1024, case["max_len"]),
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    lengths = torch.randint(case["min_len"], case["max_len"] + 1, (case["prompts"],), generator=generator)
    prompts = [Encoded(tuple(torch.randint(4, 2000, (int(n),), generator=generator).tolist()), ()) for n in lengths]
    return model, prompts, 0


def _runner(model, pad_id: int, batch_size: int, method: str):
    """A function that extracts the last-token states of some prompts by ``method``."""
    import torch

    from forgetdiag.analyses.hidden import extract_features
    from forgetdiag.evaluate import batches_by_length, collate

    def naive(items):  # the full causal LM: logits and every position of every hidden state
        with torch.inference_mode():
            for idx in batches_by_length(items, batch_size):
                batch = collate([items[k] for k in idx], pad_id)
                out = model(**batch.model_inputs(), output_hidden_states=True, use_cache=False)
                torch.stack([h[:, -1] for h in out.hidden_states]).float()
                del out

    if method == "causal_lm":
        return naive
    return lambda items: extract_features(model, items, pad_id=pad_id, batch_size=batch_size, method=method)


def worker(case: dict) -> dict:
    """Run the case's methods in turn (``repeats`` rounds) in this process; best time, last peak.

    Methods alternate so that a change of load on a shared machine hits them alike; the
    high-water mark is reset before every pass, so each pass has its own peak.
    """
    import torch

    torch.set_num_threads(case["threads"])
    model, prompts, pad_id = _model_and_prompts(case)
    runs = {m: _runner(model, pad_id, case["batch"], m) for m in case["methods"]}
    for run in runs.values():
        run(prompts[:2])  # lazy imports and one-off allocations out of the way
    out = {m: {"seconds": float("inf")} for m in runs}
    for _ in range(case["repeats"]):
        for method, run in runs.items():
            Path("/proc/self/clear_refs").write_text("5")  # high-water mark := current RSS
            base = _status("VmRSS")
            start = time.perf_counter()
            run(prompts)
            seconds = time.perf_counter() - start
            peak = (_status("VmHWM") - base) / 2**20
            out[method] = {
                "seconds": min(seconds, out[method]["seconds"]),
                "peak_extra_mib": peak,
                "prompts_per_s": len(prompts) / min(seconds, out[method]["seconds"]),
            }
    tokens = sum(len(p.prompt_ids) for p in prompts) / len(prompts)
    return {"methods": out, "mean_tokens": tokens, "n_layers": model.config.num_hidden_layers}


def spawn(case: dict) -> dict:
    # Large blocks straight from mmap and back on free: resident memory then follows live tensors
    # instead of what glibc's heap happens to keep, so peaks are comparable across cases.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
    out = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(case)], check=True, capture_output=True, text=True, env=env
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--long-tokens", type=int, default=512)
    parser.add_argument("--long-prompts", type=int, default=32)
    parser.add_argument("--long-batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", default="1", help="torch thread counts of part 1, e.g. 1,2")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    sample = SAMPLE.is_dir() and SAMPLE_PROBE.is_file()
    print(f"model: {'sample ' + str(SAMPLE) if sample else '4-layer Llama, hidden 128, inter 512, vocab 2000'}")
    print(
        f"\n1. speed: hidden states of every layer at the last prompt token of {args.prompts} "
        f"prompts, batch {args.batch}; best of {args.repeats} alternating passes"
    )
    print(f"{'method':<22}{'threads':>8}{'tokens/prompt':>15}{'prompts/s':>11}{'peak extra MiB':>16}")
    for threads in (int(t) for t in args.threads.split(",")):
        r = spawn(
            {
                "sample": sample,
                "layers": 4,
                "prompts": args.prompts,
                "min_len": 12,
                "max_len": 24,
                "batch": args.batch,
                "threads": threads,
                "repeats": args.repeats,
                "methods": ["hooks", "output_hidden_states"],
            }
        )
        for method, m in r["methods"].items():
            print(
                f"{method:<22}{threads:>8}{r['mean_tokens']:>15.1f}{m['prompts_per_s']:>11.0f}"
                f"{m['peak_extra_mib']:>16.1f}"
            )
    print(
        f"\n2. memory vs layers x tokens: {args.long_prompts} prompts, batch {args.long_batch}, "
        "1 thread, hidden 128; 'all states' = (layers + 1) x batch x tokens x hidden x 4 bytes"
    )
    print(f"{'method':<22}{'layers':>7}{'tokens':>7}{'all states MiB':>16}{'peak extra MiB':>16}")
    peaks: dict[tuple[str, int, int], float] = {}
    for layers, tokens in (
        (4, args.long_tokens // 4),
        (4, args.long_tokens),
        (16, args.long_tokens // 4),
        (16, args.long_tokens),
    ):
        r = spawn(
            {
                "sample": False,
                "layers": layers,
                "prompts": args.long_prompts,
                "min_len": tokens,
                "max_len": tokens,
                "batch": args.long_batch,
                "threads": 1,
                "repeats": 1,
                "methods": ["hooks", "output_hidden_states", "causal_lm"],
            }
        )
        states = (layers + 1) * args.long_batch * tokens * 128 * 4 / 2**20
        for method, m in r["methods"].items():
            peaks[method, layers, tokens] = m["peak_extra_mib"]
            print(f"{method:<22}{layers:>7}{tokens:>7}{states:>16.1f}{m['peak_extra_mib']:>16.1f}")
    grow = {
        method: peaks[method, 16, args.long_tokens] / peaks[method, 4, args.long_tokens]
        for method in ("hooks", "output_hidden_states")
    }
    met = "met" if grow["hooks"] < GROWTH_LIMIT else "NOT met"
    print(
        f"\npeak from 4 to 16 layers at {args.long_tokens} tokens: hooks x{grow['hooks']:.2f}, "
        f"output_hidden_states x{grow['output_hidden_states']:.2f} (target: the hooks' peak does "
        f"not grow with depth, < x{GROWTH_LIMIT}: {met})"
    )
    print(
        "\nhooks: forgetdiag (last position of each layer, copied); output_hidden_states: the "
        "base model with output_hidden_states=True; causal_lm: the full model with "
        "output_hidden_states=True (logits too)."
    )


if __name__ == "__main__":
    main()
