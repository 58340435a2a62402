"""Does the advised freeze prevent the spurious forgetting? The samples' spurious run, retrained.

For every seed, the sample builder's own pipeline (forgetdiag.samples.build) builds the world,
pretrains the tiny Llama on group A's biographies and teaches it task 0; then task 1 of the
`spurious` run (QA about new people) is trained twice from that same model, for the same steps
and data order:

* unfrozen, as in the shipped samples;
* with the input embedding and the bottom N layers frozen (``forgetdiag samples build --freeze N``).

N is what ``forgetdiag advise`` recommends on the shipped sample_checkpoints/spurious run
(computed at the start of this run), unless --freeze is given. Printed per seed and on average:
the held-out task-0 accuracy (greedy exact match) at the end of task 1 (the paper: 11% -> 44%),
and the cost on task 1 (its exact match and answer-token loss on its training questions). Exits
with status 1 when the freeze does not improve the final task-0 accuracy on every seed tried.

Usage::

    python bench/freeze_experiment.py [--seeds 0 1 2] [--freeze N] [--json PATH]

Each seed pretrains a model (about 9 minutes on one CPU core); seeds run one after another.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

from forgetdiag import load_probe, load_run
from forgetdiag.analyses.advise import AdviceSettings, advise
from forgetdiag.evaluate import encode, score
from forgetdiag.runtime import torch_threads
from forgetdiag.samples.build import SampleConfig, prepare, trained_base
from forgetdiag.training import TrainConfig, freeze_bottom, train

SAMPLES = Path(__file__).resolve().parent.parent / "sample_checkpoints"


def advised_depth() -> int:
    spec = load_run(SAMPLES / "spurious")
    advice = advise(spec, load_probe(spec.probes["old"]), settings=AdviceSettings(skip=("angles", "features")))
    print(f"forgetdiag advise {SAMPLES / 'spurious'}: {advice.reason}")
    if not advice.advised:
        raise SystemExit("no advice on the shipped spurious run: nothing to test")
    return advice.freeze_layers


def task1(base, tokenizer, data, config: SampleConfig, freeze: int | None) -> dict:
    """Train task 1 of the spurious run from ``base`` and score both tasks at the end."""
    model = copy.deepcopy(base)
    frozen = freeze_bottom(model, freeze) if freeze is not None else []
    pad = tokenizer.pad_token_id
    new = encode(tokenizer, data["spurious_train"])
    start = time.perf_counter()
    steps = TrainConfig(
        lr=config.spurious_lr, batch_size=config.qa_batch, max_steps=config.task1_steps, seed=config.stage_seed(3)
    )
    losses = train(model, new, steps, pad_id=pad)
    seconds = time.perf_counter() - start
    old = score(model, encode(tokenizer, data["old"]), pad_id=pad, batch_size=128)
    now = score(model, new, pad_id=pad, batch_size=128)
    return {
        "freeze": freeze,
        "frozen_tensors": len(frozen),
        "task0_heldout": old.exact_match,
        "task1_exact_match": now.exact_match,
        "task1_answer_loss": now.answer_loss,
        "task1_final_train_loss": statistics.fmean(losses[-20:]),
        "train_s": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--freeze", type=int, default=None, help="default: forgetdiag advise's depth")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    depth = args.freeze if args.freeze is not None else advised_depth()
    rows = []
    for seed in args.seeds:
        config = SampleConfig(seed=seed)
        start = time.perf_counter()
        with torch_threads(config.threads):
            world, tokenizer, data = prepare(config)
            base = trained_base(
                tokenizer,
                world.group_a,
                data["recovery"],
                config,
                seed=1,
                epochs=config.pretrain_epochs,
                label="group A",
            )
            before = score(
                base, encode(tokenizer, data["old"]), pad_id=tokenizer.pad_token_id, batch_size=128
            ).exact_match
            for freeze in (None, depth):
                row = {"seed": seed, "task0_before": before, **task1(base, tokenizer, data, config, freeze)}
                rows.append(row)
                print(json.dumps(row), flush=True)
        print(f"seed {seed}: {time.perf_counter() - start:.0f} s", flush=True)
    print(
        f"\nspurious run, task 1 for {SampleConfig().task1_steps} steps; frozen = input embedding "
        f"+ bottom {depth} layers"
    )
    print(f"{'seed':>4} {'task0 before':>12} {'unfrozen':>9} {'frozen':>7} {'task1 EM':>17} {'task1 loss':>17}")
    for seed in args.seeds:
        plain, frozen = [r for r in rows if r["seed"] == seed]
        print(
            f"{seed:>4} {plain['task0_before']:>12.3f} {plain['task0_heldout']:>9.3f} "
            f"{frozen['task0_heldout']:>7.3f} "
            f"{plain['task1_exact_match']:>8.3f}/{frozen['task1_exact_match']:<8.3f} "
            f"{plain['task1_answer_loss']:>8.3f}/{frozen['task1_answer_loss']:<8.3f}"
        )
    mean = lambda key, f: statistics.fmean(r[key] for r in rows if (r["freeze"] is None) == f)
    print(
        f"mean held-out task-0 accuracy: unfrozen {mean('task0_heldout', True):.3f} -> frozen "
        f"{mean('task0_heldout', False):.3f}; task-1 exact match {mean('task1_exact_match', True):.3f}"
        f" -> {mean('task1_exact_match', False):.3f}"
    )
    failed = [seed for seed in args.seeds if not improved(rows, seed)]
    print(f"freeze improves the final task-0 accuracy on every seed: {not failed}")
    if args.json:
        args.json.write_text(
            json.dumps({"freeze": depth, "rows": rows, "improved_on_every_seed": not failed}, indent=1) + "\n"
        )
    if failed:
        print(
            f"FAILED: freezing the input embedding + bottom {depth} layers did not improve the final "
            f"held-out task-0 accuracy on seed(s) {', '.join(map(str, failed))}",
            file=sys.stderr,
        )
        raise SystemExit(1)


def improved(rows: list[dict], seed: int) -> bool:
    """Whether the frozen run of ``seed`` ends with a higher held-out task-0 accuracy."""
    plain, frozen = (
        [r for r in rows if r["seed"] == seed and (r["freeze"] is None) == unfrozen] for unfrozen in (True, False)
    )
    return frozen[0]["task0_heldout"] > plain[0]["task0_heldout"]


if __name__ == "__main__":
    main()
