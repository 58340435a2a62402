"""`forgetdiag score` against lm-evaluation-harness on the shipped sample runs, in the same run.

Both score the same checkpoints on the same 1,500 questions (sample_checkpoints/probes/
task0_heldout.jsonl) and must agree, checkpoint by checkpoint:

1. **exact match**: forgetdiag's one teacher-forced pass per checkpoint against lm-eval's
   ``generate_until`` task (greedy, ``until: ["\\n"]`` and the EOS, whitespace stripped, then
   ``exact_match``), which generates token by token;
2. **multiple choice** (``--mc``): the same questions with four choices each (the right answer
   and three other answers to the same kind of question, drawn with a seed), forgetdiag's
   ``acc``/``acc_norm`` against lm-eval's ``multiple_choice`` task.

lm-eval runs through its own ``simple_evaluate`` (HF backend, CPU, float32, BOS added as the
sample tokenizer adds it), one call per checkpoint, with the same batch size. Times include
loading each model on both sides. ``--lm-eval-checkpoints K`` times lm-eval on the first K
checkpoints only (and ``--limit N`` on the first N questions, for both sides), when the whole
run is too slow: the ratio is then per checkpoint, on the same items.

Usage::

    python bench/score_speed.py [--mc] [--lm-eval-checkpoints K] [--limit N] [--batch-size 64]

Target: ``score`` at least 3x faster than lm-eval for exact match.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "sample_checkpoints"
WORK = ROOT / "bench" / "_work" / "score_speed"


def checkpoints() -> list[Path]:
    """Both sample runs in step order, then the control: 13 checkpoints."""
    from forgetdiag.checkpoints import find_checkpoints

    found = [c.path for run in ("spurious", "real") for c in find_checkpoints(SAMPLES / run)]
    return [*found, SAMPLES / "control"]


def write_tasks(limit: int | None, seed: int = 0) -> tuple[Path, Path, Path, Path]:
    """The probe (first ``limit`` rows), its multiple-choice version, and lm-eval task files for both."""
    rows = [json.loads(line) for line in (SAMPLES / "probes" / "task0_heldout.jsonl").read_text().splitlines()]
    rows = rows[:limit] if limit else rows
    rng = random.Random(seed)
    by_question: dict[str, list[str]] = {}
    for r in rows:  # answers of the same kind of question ("What is the birth city of")
        by_question.setdefault(r["prompt"].split(" of ")[0], []).append(r["answer"])
    mc = []
    for r in rows:
        pool = sorted(set(by_question[r["prompt"].split(" of ")[0]]) - {r["answer"]})
        choices = [*rng.sample(pool, 3), r["answer"]]
        rng.shuffle(choices)
        mc.append({**r, "choices": [c.strip() for c in choices], "label": choices.index(r["answer"])})
    WORK.mkdir(parents=True, exist_ok=True)
    probe, mc_probe = WORK / "probe.jsonl", WORK / "mc.jsonl"
    probe.write_text("".join(json.dumps(r) + "\n" for r in rows))
    mc_probe.write_text(
        "".join(
            json.dumps(
                {"prompt": r["prompt"] + " ", "choices": r["choices"], "answer": r["label"], "group": r["group"]}
            )
            + "\n"
            for r in mc
        )
    )
    data = WORK / "mc_docs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in mc))
    common = {
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test",
        "doc_to_text": "{{prompt}}",
    }
    gen = {
        **common,
        "task": "fd_bench_gen",
        "output_type": "generate_until",
        "doc_to_target": "{{answer.strip()}}",
        "generation_kwargs": {"until": ["\n"], "do_sample": False, "max_gen_toks": 16},
        "filter_list": [{"name": "strip", "filter": [{"function": "remove_whitespace"}, {"function": "take_first"}]}],
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
    }
    choice = {
        **common,
        "task": "fd_bench_mc",
        "output_type": "multiple_choice",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "label",
        "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}],
    }
    (WORK / "gen.yaml").write_text(json.dumps(gen))
    (WORK / "mc.yaml").write_text(json.dumps(choice))
    return probe, mc_probe, WORK / "gen.yaml", WORK / "mc.yaml"


def run_forgetdiag(ckpts: list[Path], probe: Path, batch_size: int) -> tuple[float, dict[str, dict]]:
    from forgetdiag import Runtime
    from forgetdiag.analyses.score import score_checkpoints

    start = time.perf_counter()
    result = score_checkpoints(ckpts, [probe], runtime=Runtime(batch_size=batch_size))
    seconds = time.perf_counter() - start
    values: dict[str, dict] = {}
    for r in result.scores:
        values.setdefault(r.path, {})[r.metric] = r.value
    return seconds, values


def run_lm_eval(ckpts: list[Path], task: str, batch_size: int) -> tuple[float, dict[str, dict]]:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(WORK), include_defaults=False)
    values = {}
    start = time.perf_counter()
    for ckpt in ckpts:
        with contextlib.redirect_stderr(io.StringIO()):  # lm-eval's progress bars
            out = simple_evaluate(
                model="hf",
                model_args=f"pretrained={ckpt},dtype=float32,add_bos_token=True",
                tasks=[task],
                task_manager=manager,
                device="cpu",
                batch_size=batch_size,
            )
        values[str(ckpt)] = {k.split(",")[0]: v for k, v in out["results"][task].items() if "stderr" not in k}
    return time.perf_counter() - start, values


def compare(name: str, ours: tuple[float, dict], theirs: tuple[float, dict], pairs: list[tuple[str, str]], n_all: int):
    (t_ours, v_ours), (t_theirs, v_theirs) = ours, theirs
    n_theirs = len(v_theirs)
    per_ours, per_theirs = t_ours / n_all, t_theirs / n_theirs
    print(f"\n{name}")
    print(f"  forgetdiag score: {t_ours:7.1f} s for {n_all} checkpoints ({per_ours:.2f} s per checkpoint)")
    print(f"  lm-eval:          {t_theirs:7.1f} s for {n_theirs} checkpoints ({per_theirs:.2f} s per checkpoint)")
    agree = True
    for path, theirs_values in v_theirs.items():
        for ours_key, theirs_key in pairs:
            a, b = v_ours[path][ours_key], theirs_values[theirs_key]
            agree &= abs(a - b) < 1e-9
            label = f"{Path(path).parent.name}/{Path(path).name}"
            print(f"    {label:<27} {ours_key:<12} forgetdiag {a:.4f}  lm-eval {b:.4f}")
    print(f"  the same numbers on every checkpoint lm-eval scored: {'yes' if agree else 'NO'}")
    print(f"  ratio (lm-eval / forgetdiag, per checkpoint): {per_theirs / per_ours:.1f}x")
    return per_theirs / per_ours, agree


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lm-eval-checkpoints", type=int, default=None, help="lm-eval on the first K checkpoints only")
    parser.add_argument("--limit", type=int, default=None, help="the first N questions only (both sides)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--mc", action="store_true", help="also compare multiple choice")
    args = parser.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # figures appear as they are measured, also in a log file
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.disable(logging.WARNING)
    import torch

    ckpts = checkpoints()
    probe, mc_probe, _, _ = write_tasks(args.limit)
    subset = ckpts[: args.lm_eval_checkpoints] if args.lm_eval_checkpoints else ckpts
    n_items = sum(1 for _ in probe.open())
    print(
        f"{len(ckpts)} checkpoints, {n_items} questions, batch size {args.batch_size}, torch threads "
        f"{torch.get_num_threads()} (forgetdiag picks 1 for models under 20M parameters), lm-eval on {len(subset)}"
    )
    ratio, agree = compare(
        "exact match (lm-eval: generate_until, greedy, until \\n)",
        run_forgetdiag(ckpts, probe, args.batch_size),
        run_lm_eval(subset, "fd_bench_gen", args.batch_size),
        [("exact_match", "exact_match")],
        len(ckpts),
    )
    print(f"\ntarget: score at least 3x faster for exact match: {'met' if ratio >= 3 else 'NOT met'} ({ratio:.1f}x)")
    if args.mc:
        compare(
            "multiple choice (4 choices; lm-eval: multiple_choice)",
            run_forgetdiag(ckpts, mc_probe, args.batch_size),
            run_lm_eval(subset, "fd_bench_mc", args.batch_size),
            [("acc", "acc"), ("acc_norm", "acc_norm")],
            len(ckpts),
        )
    if not agree:
        raise SystemExit("forgetdiag and lm-eval disagree")


if __name__ == "__main__":
    main()
