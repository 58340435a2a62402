"""Cost of a landscape grid point next to a plain batched forward pass, and next to loss-landscapes.

In one process and one run (so that the ratios compare like with like on a shared machine):

* ``plain``: N evaluations of the probe's answer-token loss at fixed weights (the batched
  forward passes a grid point needs, nothing else), and N bare forward passes for reference;
* ``grid``: N grid points: weights set in place to theta_0 + a d_x + b d_y, then the same loss;
  the overhead of setting weights is grid / plain - 1 (target: under 15%);
* ``landscape()``: the whole API call for a grid of about N points (load, stream, evaluate);
* ``loss-landscapes`` (PyPI): ``planar_interpolation`` on the same model, plane and probe, with
  the same loss as its metric; its values are compared with ours at the points it evaluates.

Plain and grid are timed in alternating rounds (median of ``--rounds``) so that load from other
processes falls on both. Uses the shipped sample (``sample_checkpoints/spurious``, its
``forgetdiag.toml`` names the landscape checkpoints and probes) when present, else a synthetic
Llama written to ``--workdir`` (not committed).

Usage::

    python bench/landscape_speed.py [--points 16] [--rounds 3] [--threads 1] [--run DIR]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "sample_checkpoints" / "spurious"


def synthetic(workdir: Path, *, vocab: int = 2000, items: int = 64, seed: int = 0):
    """A 4-layer Llama (hidden 256, ~4M parameters) at three points of a run, and a probe."""
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from transformers.utils import logging

    logging.disable_progress_bar()
    workdir.mkdir(parents=True, exist_ok=True)
    words = [f"w{k}" for k in range(vocab - 4)]
    specials = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]
    tok = Tokenizer(models.WordLevel({w: k for k, w in enumerate(specials + words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="[BOS]", eos_token="[EOS]", pad_token="[PAD]", unk_token="[UNK]"
    )
    config = LlamaConfig(
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=vocab,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        bos_token_id=2,
        eos_token_id=3,
        pad_token_id=0,
    )
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    paths = []
    for k, name in enumerate(("origin", "x_end", "y_end")):
        if k:  # each update: Gaussian noise of 10% of every matrix's spread
            with torch.no_grad():
                for p in model.parameters():
                    if p.dim() == 2:
                        p.add_(0.1 * p.std() * torch.randn(p.shape, generator=generator))
        model.save_pretrained(workdir / name)
        tokenizer.save_pretrained(workdir / name)
        paths.append(workdir / name)
    pick = lambda n: " ".join(words[int(i)] for i in torch.randint(len(words), (n,), generator=generator))
    rows = [
        {"prompt": pick(int(torch.randint(16, 25, (1,), generator=generator))), "answer": " " + pick(2)}
        for _ in range(items)
    ]
    probe = workdir / "probe.jsonl"
    probe.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return (*paths, probe)


def from_run(run: Path):
    """The landscape checkpoints and old-task probe named by a run's forgetdiag.toml."""
    from forgetdiag.runfile import load_run

    spec = load_run(run)
    if len(spec.landscape) != 3 or "old" not in spec.probes:
        sys.exit(f"{run}: its forgetdiag.toml names no landscape = [origin, x_end, y_end] or old probe")
    return (*spec.landscape, spec.probes["old"])


CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}


def timed(fn) -> dict[str, float]:
    """Seconds ``fn()`` took on each clock. CPU time counts only this process, so it is the fair
    clock on a machine other jobs share (one torch thread: CPU time is compute time)."""
    start = {name: clock() for name, clock in CLOCKS.items()}
    fn()
    return {name: clock() - start[name] for name, clock in CLOCKS.items()}


def square(n_points: int, lo: float = -0.5, hi: float = 1.5) -> list[tuple[float, float]]:
    side = max(1, math.isqrt(n_points))
    axis = [lo + (hi - lo) * k / max(1, side - 1) for k in range(side)]
    return [(a, b) for b in axis for a in axis][:n_points]


def time_ours(model, plane, batches, points, rounds: int) -> dict[str, dict[str, float]]:
    """Mean seconds per point of a plain evaluation, a bare forward, setting the weights, and a
    grid point (set weights, then the same evaluation), interleaved point by point so that
    every kind sees the same machine load. Returns kind -> clock -> seconds."""
    from forgetdiag.evaluate import answer_loss

    @torch.inference_mode()
    def bare():
        for b in batches:
            model(**b.model_inputs(), use_cache=False)

    kinds = {
        "plain": lambda k: answer_loss(model, batches),
        "bare forward": lambda k: bare(),
        "set weights": lambda k: plane.set(*points[k]),
        "grid": lambda k: (plane.set(*points[k]), answer_loss(model, batches)),
    }
    answer_loss(model, batches)  # warm-up
    total = {kind: dict.fromkeys(CLOCKS, 0.0) for kind in kinds}
    for r in range(rounds):
        for k in range(len(points)):
            order = list(kinds) if (r + k) % 2 == 0 else list(kinds)[::-1]  # no order bias
            for kind in order:
                for clock, value in timed(lambda kind=kind, k=k: kinds[kind](k)).items():
                    total[kind][clock] += value
    n = rounds * len(points)
    return {kind: {clock: value / n for clock, value in clocks.items()} for kind, clocks in total.items()}


def ours_at(model, plane, batches, points) -> list[float]:
    from forgetdiag.evaluate import answer_loss

    values = []
    for a, b in points:
        plane.set(a, b)
        values.append(answer_loss(model, batches))
    return values


def loss_landscapes_run(paths, model, plane, batches, steps: int, rounds: int):
    """``planar_interpolation`` on the same plane, in rounds alternating with our grid over the
    same points: start = origin, end one = X_END, end two = origin + d_y (the package's second
    direction is end_two - start). Returns (their median seconds, our median seconds, points,
    their values, our values); raises with the reason if it cannot run."""
    import loss_landscapes
    from loss_landscapes.metrics import Metric

    from forgetdiag.checkpoints import find_checkpoints
    from forgetdiag.evaluate import answer_loss
    from forgetdiag.models import load_model

    class ProbeLoss(Metric):
        def __call__(self, model_wrapper):
            return answer_loss(model_wrapper.modules[0], batches)

    start, x_model, y_model, two = (load_model(find_checkpoints(p)[0]) for p in (*paths, paths[0]))
    with torch.no_grad():
        for p2, px, py in zip(two.parameters(), x_model.parameters(), y_model.parameters()):
            p2.add_(py - px)  # origin + d_y
    initial = {k: v.clone() for k, v in start.state_dict().items()}
    # Its loop steps along d_y BEFORE evaluating in even columns only: column i holds
    # beta = (j + 1) / steps for even i and j / steps for odd i, alpha = i / steps.
    points = [(i / steps, (j + (1 if i % 2 == 0 else 0)) / steps) for i in range(steps) for j in range(steps)]
    theirs_s, ours_s, out = [], [], {}

    def run_theirs():
        out["theirs"] = loss_landscapes.planar_interpolation(start, x_model, two, ProbeLoss(), steps=steps)

    def run_ours():
        out["ours"] = ours_at(model, plane, batches, points)

    for _ in range(rounds):
        start.load_state_dict(initial)  # it moved the start model's weights in place
        theirs_s.append(timed(run_theirs)["cpu"])
        ours_s.append(timed(run_ours)["cpu"])
    return (
        statistics.median(theirs_s),
        statistics.median(ours_s),
        points,
        [float(v) for v in out["theirs"].reshape(-1)],
        out["ours"],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--points", type=int, default=16, help="N: grid points (and plain passes) per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--run", type=Path, default=None, help="a run directory with forgetdiag.toml")
    parser.add_argument("--workdir", type=Path, default=ROOT / "bench" / "_work" / "landscape")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from forgetdiag.analyses.landscape import LandscapeSettings, landscape
    from forgetdiag.analyses.plane import build_plane
    from forgetdiag.checkpoints import find_checkpoints
    from forgetdiag.evaluate import collate_batches, encode, model_context
    from forgetdiag.models import load_model, load_tokenizer
    from forgetdiag.probes import load_probe
    from forgetdiag.runtime import Runtime

    run = args.run or (SAMPLE if (SAMPLE / "forgetdiag.toml").is_file() else None)
    *paths, probe_path = from_run(run) if run else synthetic(args.workdir)
    anchors = [find_checkpoints(p)[0] for p in paths]
    model = load_model(anchors[0]).requires_grad_(False)
    tokenizer = load_tokenizer(anchors[0])
    encoded = encode(tokenizer, load_probe(probe_path), max_length=model_context(model))
    batches = collate_batches(encoded, pad_id=tokenizer.pad_token_id, batch_size=args.batch_size)
    plane = build_plane(model, anchors, [])[0]
    n_params = sum(p.numel() for p in model.parameters())
    tokens = sum(len(e.prompt_ids) + len(e.completion_ids) for e in encoded)
    print(
        f"model: {anchors[0].path} ({n_params / 1e6:.2f}M parameters), probe: {probe_path.name} "
        f"({len(encoded)} items, {tokens} tokens, {len(batches)} batches), threads {args.threads}, "
        f"N = {args.points}, {args.rounds} rounds"
    )

    points = square(args.points)
    t = time_ours(model, plane, batches, points, args.rounds)
    print(f"per point, mean over {args.rounds} x {len(points)} interleaved evaluations (CPU time | wall time):")
    for name, clocks in t.items():
        print(f"  {name:<14} {1000 * clocks['cpu']:8.2f} ms | {1000 * clocks['wall']:8.2f} ms")
    ratio, wall = (t["grid"][c] / t["plain"][c] for c in ("cpu", "wall"))
    print(
        f"grid / plain = {ratio:.3f} CPU ({wall:.3f} wall): setting weights costs {100 * (ratio - 1):+.1f}% "
        f"per point (target < 15%: {'met' if ratio < 1.15 else 'NOT met'})"
    )
    plain_point = t["plain"]["cpu"]

    side = max(1, math.isqrt(args.points))
    settings = LandscapeSettings(grid=(side, side))
    out = {}
    whole = timed(
        lambda: out.update(
            result=landscape(
                *paths,
                [probe_path],
                settings=settings,
                runtime=Runtime(threads=args.threads, batch_size=args.batch_size),
            )
        )
    )
    evaluated = out["result"].evaluated
    per_point = whole["cpu"] / evaluated
    print(
        f"landscape(): {side}x{side} grid + 3 anchors = {evaluated} points in {whole['cpu']:.2f} s CPU "
        f"({whole['wall']:.2f} s wall), {1000 * per_point:.1f} ms per point including load and "
        f"streaming ({per_point / plain_point:.2f} x a plain evaluation)"
    )

    try:
        import loss_landscapes  # noqa: F401
    except ImportError as exc:
        print(f"loss-landscapes: not installed ({exc}); pip install loss-landscapes to compare")
        return
    steps = side
    try:
        theirs_s, ours_s, points, theirs, ours = loss_landscapes_run(paths, model, plane, batches, steps, args.rounds)
    except Exception as exc:
        print(f"loss-landscapes: cannot run with torch {torch.__version__}: {type(exc).__name__}: {exc}")
        return
    diff = max(abs(a - b) for a, b in zip(ours, theirs))
    m = steps * steps
    print(
        f"loss-landscapes planar_interpolation, {steps}x{steps} = {m} points (median of {args.rounds} rounds "
        f"alternating with ours on the same points): {1000 * theirs_s / m:.1f} ms per point, ours "
        f"{1000 * ours_s / m:.1f} ms: theirs / ours = {theirs_s / ours_s:.2f}"
    )
    print(
        f"  values at its {len(theirs)} points: max |ours - theirs| = {diff:.2e} "
        f"(losses {min(theirs):.4g}..{max(theirs):.4g})"
    )
    print(
        "  note: its grid covers alpha, beta in [0, 1) only, and its even columns are shifted by "
        "one step along d_y (it steps before evaluating); values were matched at the points it "
        "actually evaluates. It moves the weights by repeated in-place add/sub, so its error "
        "grows with the number of steps; ours sets theta_0 + a d_x + b d_y from scratch."
    )


if __name__ == "__main__":
    main()
