"""What ForgettingCallback costs a Trainer run: the same run with and without it, in one process.

A small llama (4 layers, width 128, made here from a config) is trained by the transformers
Trainer on generated documents of ``--facts`` facts each (4 by default: 42 tokens; batch 16,
300 steps, no saving), once bare and once with ``ForgettingCallback`` scoring a 240-item probe
every 50 steps (7 scorings: step 0 and six more). The two runs alternate, ``--rounds`` times
each. Printed:

* the overhead as (median with - median without) / median without, both the CPU time of this
  process around ``trainer.train()`` (wall time on a shared machine moved by a factor of 6
  between identical rounds; CPU time at one thread measures the work); this difference is
  within the rounds' noise of several percent, so also
* the direct figure: the CPU time spent inside the callback's scorings over the training's;
* one scoring call's CPU and wall time (240 items, one teacher-forced pass per 64).

Nothing is downloaded.

Usage::

    python bench/callback_overhead.py [--rounds 3] [--steps 300] [--every 50] [--items 240] [--batch 16] [--facts 4]

Target: overhead under 5% at the default setting.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch


def tokenizer_and_rows(n_rows: int):
    """A word-level tokenizer over 120 names and 30 cities, and rows 'what is the birth city of nK answer :' -> ' cJ'."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    names, cities = [f"n{k}" for k in range(120)], [f"c{k}" for k in range(30)]
    words = ["what", "is", "the", "birth", "city", "of", "answer", ":", *names, *cities]
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.train_from_iterator(
        [" ".join(words)], trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]", "[BOS]", "[EOS]"])
    )
    tok.post_processor = processors.TemplateProcessing(single="[BOS] $A", special_tokens=[("[BOS]", 2)])
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="[BOS]", eos_token="[EOS]", pad_token="[PAD]", unk_token="[UNK]"
    )
    rows = [
        {"prompt": f"what is the birth city of {names[k % 120]} answer :", "answer": f" {cities[(7 * k) % 30]}"}
        for k in range(n_rows)
    ]
    return hf, rows


def dataset(tokenizer, rows, facts: int):
    """Training documents of ``facts`` consecutive facts each (every token trained on): a
    fine-tuning document is longer than a probe's question."""
    out = []
    for k in range(0, len(rows) - facts + 1, facts):
        text = " ".join(r["prompt"] + r["answer"] for r in rows[k : k + facts])
        ids = tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
        out.append({"input_ids": torch.tensor(ids), "labels": torch.tensor(ids)})
    return out


def one_run(model_dir: Path, tokenizer, data, out: Path, *, steps: int, batch: int, callback) -> float:
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    args = TrainingArguments(
        output_dir=str(out), max_steps=steps, per_device_train_batch_size=batch, learning_rate=1e-3,
        logging_steps=50, save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True, seed=0,
    )  # fmt: skip
    trainer = Trainer(
        model=model, args=args, train_dataset=data, processing_class=tokenizer,
        callbacks=[callback] if callback is not None else None,
    )  # fmt: skip
    start = time.process_time()  # CPU time of this process: other jobs on the machine move it far less than wall time
    trainer.train()
    return time.process_time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--items", type=int, default=240)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=16, help="training documents per step")
    parser.add_argument(
        "--facts", type=int, default=4, help="facts per training document (1: as short as a probe item)"
    )
    a = parser.parse_args()
    torch.set_num_threads(a.threads)
    import transformers
    from transformers import AutoModelForCausalLM, LlamaConfig

    from forgetdiag import ForgettingCallback

    transformers.utils.logging.set_verbosity_error()
    tokenizer, rows = tokenizer_and_rows(8000)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        config = LlamaConfig(
            hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=len(tokenizer), max_position_embeddings=64, bos_token_id=2, eos_token_id=3, pad_token_id=0,
        )  # fmt: skip
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config).save_pretrained(root / "model")
        probe = root / "old.jsonl"
        probe.write_text("".join(json.dumps(r) + "\n" for r in rows[:1000]), encoding="utf-8")
        data = dataset(tokenizer, rows, a.facts)
        bare, watched, calls, cpu = [], [], [], []
        for k in range(a.rounds):
            bare.append(
                one_run(root / "model", tokenizer, data, root / f"bare{k}", steps=a.steps, batch=a.batch, callback=None)
            )
            callback = ForgettingCallback({"old": probe}, every_steps=a.every, max_items=a.items)
            callback._score = cpu_timed(callback._score, cpu)
            cpu.append([])
            watched.append(
                one_run(
                    root / "model",
                    tokenizer,
                    data,
                    root / f"watched{k}",
                    steps=a.steps,
                    batch=a.batch,
                    callback=callback,
                )
            )
            calls += callback.seconds
            print(
                f"round {k + 1}: CPU s without {bare[-1]:.2f}, with {watched[-1]:.2f} ({len(callback.seconds)} scorings)"
            )
    without, with_ = statistics.median(bare), statistics.median(watched)
    shape = f"batch {a.batch} x {data[0]['input_ids'].numel()} tokens"
    print(f"training {a.steps} steps of {shape}, CPU s (median of {a.rounds}): without {without:.2f}, with {with_:.2f}")
    print(f"overhead (difference of medians): {100 * (with_ - without) / without:.1f}% of training time")
    per_call = statistics.median(t for run in cpu for t in run)
    share = statistics.median(sum(run) for run in cpu)
    print(
        f"one scoring call ({a.items} items): median {1000 * per_call:.0f} ms CPU, {1000 * statistics.median(calls):.0f} ms "
        f"wall; {100 * per_call / (without / a.steps * a.every):.1f}% of the CPU time of {a.every} training steps"
    )
    print(f"the scorings' own CPU time ({len(cpu[0])} a run): {100 * share / without:.1f}% of training (target < 5%)")


def cpu_timed(score, cpu: list):
    """``score`` with the CPU time of each call appended to the last list of ``cpu``."""

    def timed(*args, **kwargs):
        start = time.process_time()
        try:
            return score(*args, **kwargs)
        finally:
            cpu[-1].append(time.process_time() - start)

    return timed


if __name__ == "__main__":
    main()
