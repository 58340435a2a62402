"""The remedies side by side: the spurious sample run's task 1 retrained with each, per seed.

Task 1 of the `spurious` sample run (QA about new people, 300 steps) is trained once per remedy
from the same model at the end of task 0, with the sample builder's own code
(`forgetdiag samples build --remedy R` runs the same function, forgetdiag.samples.build.run_task1):
the same steps, data order seed, batch and learning rate, changing one thing. Where that model
comes from is ``--base``:

* ``samples`` (the default): the shipped model, ``sample_checkpoints/spurious/checkpoint-0`` (seed 0's world; its bf16 weights as float32),
  with the shipped control. A seed here is task 1's training seed (data order and any random
  initialisation: seed k trains with the shipped run's seed + 1000 k, so seed 0 is the shipped
  order), so the spread is over training runs of one pretrained model. Seven task-1 runs and
  their evaluation took 19-21 minutes per seed with three seeds in parallel on a shared 2-core
  machine (a task-1 run took 34-38 s before the load rose);
* ``pretrain`` (the full size; the base alone takes about 15 minutes per seed on one core): for
  each seed, the builder's whole pipeline (its world, pretraining on group A, task 0 and the control), so the
  spread is also over worlds and pretrained models.

Measured at the end of task 1 on every remedy's final checkpoint (saved in bfloat16, as the
samples are), with forgetdiag itself:

* old task: greedy exact match on the 1,500 held-out task-0 questions, the same after recovery
  (one epoch on the other half of group A, lr 1e-4, batch 32: the samples' budget) and
  forgetdiag's verdict against checkpoint-0 with the control (one `recover` call over every
  remedy's checkpoint, so the references are shared);
* new task: exact match and answer-token loss on the task-1 questions (1,500).

The baseline measured in the same run is `none` (the shipped recipe): the table gives each
remedy's old-task accuracy as a multiple of it. Rows are written to --json as each seed ends
(`--table FILE...` prints the table of saved rows without training: run seeds in parallel
processes, then combine).

Usage::

    python bench/remedies.py [--seeds 0 1 2] [--remedies none freeze ...] [--json PATH]
    python bench/remedies.py --base pretrain --seeds 0 1 2     # the full size
    python bench/remedies.py --table seed0.json seed1.json seed2.json

Checkpoints go to bench/_work/remedies/ (deleted at the end unless --keep).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from dataclasses import replace
from pathlib import Path

from forgetdiag import find_checkpoints, load_probe, recover
from forgetdiag.evaluate import encode, score
from forgetdiag.models import load_model, load_tokenizer
from forgetdiag.runtime import torch_threads
from forgetdiag.samples import world as bio
from forgetdiag.samples.build import SampleConfig, prepare, run_task1, save_model, trained_base, write_probe
from forgetdiag.samples.measure import RECOVERY
from forgetdiag.samples.remedies import REMEDIES

WORK = Path(__file__).resolve().parent / "_work" / "remedies"
SAMPLES = Path(__file__).resolve().parent.parent / "sample_checkpoints"
# name -> (remedy, overrides of the sample config); "lora-10x" shows the learning rate's effect
VARIANTS = {name: (name, {}) for name in REMEDIES} | {"lora-10x": ("lora", {"lora_lr": 3e-3})}
DEFAULT = [*REMEDIES, "lora-10x"]


def run_seed(
    seed: int, variants: list[str], work: Path, *, base_from: str = "samples", miniature: bool = False
) -> list[dict]:
    """The base and control (shipped, or built for the seed), task 1 once per variant, then one
    recover over every variant."""
    if base_from == "samples":
        config = SampleConfig(seed=0)  # the shipped world
        train_seed = config.stage_seed(3) + 1000 * seed  # seed 0: the shipped run's data order
    else:
        config = SampleConfig.miniature(seed=seed) if miniature else SampleConfig(seed=seed)
        train_seed = config.stage_seed(3)
    config = replace(config, checkpoint_steps=())  # only the last step is kept
    root = work / f"{base_from}-seed{seed}"
    shutil.rmtree(root, ignore_errors=True)
    rows, start = [], time.perf_counter()
    with torch_threads(config.threads):
        world, tokenizer, data = prepare(config)
        for key, name in (("old", "old"), ("recovery", "recovery"), ("spurious", "new")):
            write_probe(root / "probes" / f"{name}.jsonl", data[key])
        if base_from == "samples":
            base, tokenizer, control_dir = shipped_base(data)
        else:
            base = trained_base(
                tokenizer,
                world.group_a,
                data["recovery"],
                config,
                seed=1,
                epochs=config.pretrain_epochs,
                label="group A",
            )
            control_task0 = bio.qa_items(world.c[: len(world.c) // 2])
            control = trained_base(
                tokenizer,
                world.c,
                control_task0,
                config,
                seed=5,
                epochs=config.control_pretrain_epochs,
                label="control",
            )
            control_dir = root / "control"
            save_model(control, tokenizer, control_dir, dtype=config.dtype)
        print(f"seed {seed}: base and control in {time.perf_counter() - start:.0f} s", flush=True)
        finals = []
        for name in variants:
            remedy, overrides = VARIANTS[name]
            cfg = replace(config, remedy=remedy, **overrides)
            tic = time.perf_counter()
            notes = run_task1(
                base,
                tokenizer,
                data["spurious_train"],
                root / name,
                lr=cfg.spurious_lr,
                config=cfg,
                seed=train_seed,
                remedy=remedy,
                data=data,
            )
            seconds = time.perf_counter() - tic
            (final,) = find_checkpoints(root / name / f"checkpoint-{cfg.task1_steps}")
            finals.append(final.with_label(name))
            rows.append({"seed": seed, "variant": name, "remedy": remedy, "task1_s": seconds, **notes})
            print(f"seed {seed}: {name} trained in {seconds:.0f} s {notes}", flush=True)
        probes = {key: load_probe(root / "probes" / f"{key}.jsonl") for key in ("old", "recovery", "new")}
        result = recover(
            root / variants[0] / "checkpoint-0",
            finals,
            probes["old"],
            control=control_dir,
            recovery_probe=probes["recovery"],
            settings=RECOVERY,
        )
        for row, point, final in zip(rows, result.sequence, finals):
            tok = load_tokenizer(final)
            new = score(load_model(final), encode(tok, probes["new"]), pad_id=tok.pad_token_id, batch_size=128)
            row |= {
                "base": base_from,
                "train_seed": train_seed,
                "old_before": result.scores["before"].exact_match,
                "old_after": point.after.exact_match,
                "recovered": point.recovered.exact_match,
                "verdict": point.decision.verdict,
                "spurious_fraction": point.decision.spurious_fraction,
                "new_exact_match": new.exact_match,
                "new_answer_loss": new.answer_loss,
                "control_recovered": result.scores["control_recovered"].exact_match,
            }
            print(json.dumps(row), flush=True)
    print(f"seed {seed}: {time.perf_counter() - start:.0f} s in all", flush=True)
    return rows


def shipped_base(data: dict) -> tuple:
    """The shipped spurious run's checkpoint-0 (float32 copy of its bf16 weights), its tokenizer
    and the shipped control; checks that seed 0's world gives the shipped probes."""
    for key, name in (("old", "task0_heldout"), ("recovery", "task0_recovery"), ("spurious", "task1_spurious")):
        shipped = load_probe(SAMPLES / "probes" / f"{name}.jsonl").items
        if [(i.prompt, i.answer, i.group) for i in shipped] != [(i.prompt, i.answer, i.group) for i in data[key]]:
            raise SystemExit(f"sample_checkpoints/probes/{name}.jsonl is not seed 0's world: rebuild the samples")
    (ckpt,) = find_checkpoints(SAMPLES / "spurious" / "checkpoint-0")
    model = load_model(ckpt).float().train()
    return model, load_tokenizer(ckpt), SAMPLES / "control"


def spread(values: list[float], fmt: str = ".3f") -> str:
    """``mean (min-max)`` over the seeds."""
    if len(values) == 1:
        return format(values[0], fmt)
    return f"{statistics.fmean(values):{fmt}} ({min(values):{fmt}}-{max(values):{fmt}})"


def table(rows: list[dict]) -> str:
    """One line per variant: means over the seeds with their range, verdicts per seed."""
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    seeds = sorted({r["seed"] for r in rows})
    baseline = {r["seed"]: r["old_after"] for r in rows if r["variant"] == "none"}
    head = ["remedy", "old task after task 1", "x none", "recovered", "verdicts", "new task EM", "new task loss"]
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for v in variants:
        mine = sorted((r for r in rows if r["variant"] == v), key=lambda r: r["seed"])
        ratio = [r["old_after"] / baseline[r["seed"]] for r in mine if baseline.get(r["seed"])]
        lines.append(
            " | ".join(
                [
                    v,
                    spread([r["old_after"] for r in mine]),
                    spread(ratio, ".2f") if ratio else "-",
                    spread([r["recovered"] for r in mine]),
                    "/".join(r["verdict"] for r in mine),
                    spread([r["new_exact_match"] for r in mine]),
                    spread([r["new_answer_loss"] for r in mine], ".2f"),
                ]
            )
        )
    before = spread([r["old_before"] for r in rows if r["variant"] == variants[0]])
    return (
        f"seeds {', '.join(map(str, seeds))}: mean (min-max); old task before task 1 {before}; "
        "'x none': old-task accuracy over the shipped recipe's on the same seed\n" + "\n".join(lines)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--remedies", nargs="+", default=DEFAULT, choices=list(VARIANTS))
    parser.add_argument("--json", type=Path, default=None, help="append rows here as each seed ends")
    parser.add_argument("--table", type=Path, nargs="+", default=None, help="print the table of saved rows")
    parser.add_argument(
        "--base",
        choices=["samples", "pretrain"],
        default="samples",
        help="samples: the shipped model, seeds are task 1's training seeds (minutes); "
        "pretrain: every seed's own world and pretraining (the full size, ~40 min per seed)",
    )
    parser.add_argument("--work", type=Path, default=WORK)
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints in --work")
    parser.add_argument("--miniature", action="store_true", help="a seconds-long smoke run (numbers meaningless)")
    args = parser.parse_args()
    if args.table:
        rows = [r for path in args.table for r in json.loads(path.read_text())["rows"]]
        print(table(rows))
        return
    if args.miniature:
        args.base = "pretrain"  # the miniature world has no shipped model
    if "none" not in args.remedies:
        args.remedies.insert(0, "none")  # the baseline
    rows: list[dict] = []
    for seed in args.seeds:
        rows += run_seed(seed, args.remedies, args.work, base_from=args.base, miniature=args.miniature)
        if args.json:
            args.json.write_text(json.dumps({"rows": rows}, indent=1) + "\n")
        if not args.keep:
            shutil.rmtree(args.work / f"{args.base}-seed{seed}", ignore_errors=True)
    print()
    print(table(rows))


if __name__ == "__main__":
    main()
