"""Does a mixture-of-experts model make ``forgetdiag angles`` slower per parameter than a dense one?

Builds, from transformers configs, two checkpoint triples C0, C1, C2 of the same parameter count
(not committed; in ``--workdir``):

* an OLMoE-style model of tiny width: ``--layers`` layers of hidden ``--hidden``, each with
  ``--experts`` routed experts of intermediate size ``--expert-inter`` and a router; saved by
  ``save_pretrained``, so every expert's gate, up and down are separate 2-D tensors (transformers
  5 writes them so, while the loaded model holds fused 3-D ones);
* a Llama-style dense model of the same hidden size whose MLP intermediate size is
  ``experts * expert_inter``: the same MLP parameters in three big matrices per layer instead
  of ``3 * experts`` small ones (the MoE model has the router on top, <1% more).

Every 2-D weight gets two updates, each a random rank-8 matrix plus dense noise holding ~10% of
its energy (so every basis keeps the default 32 directions). Then ``compute_angles`` runs on
each triple ``--repeats`` times in this process, alternating, on every core (the default), and
the script prints the median wall time, the time per million parameters and the ratio MoE /
dense (target: at most 1, i.e. the experts cost no more per parameter than dense matrices).

Usage::

    python bench/angles_moe.py [--experts 64] [--hidden 64] [--expert-inter 32] [--layers 4]
                               [--repeats 5] [--workdir bench/_work/angles_moe] [--keep]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from forgetdiag import AngleSettings, Runtime, compute_angles  # noqa: E402


def build(kind: str, args) -> torch.nn.Module:
    import transformers
    from transformers import AutoModelForCausalLM, LlamaConfig, OlmoeConfig

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    common = dict(
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=args.vocab,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    if kind == "moe":
        config = OlmoeConfig(
            **common, intermediate_size=args.expert_inter, num_experts=args.experts, num_experts_per_tok=2
        )
    else:
        config = LlamaConfig(**common, intermediate_size=args.experts * args.expert_inter)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


def low_rank_update(shape: tuple[int, ...], generator: torch.Generator, scale: float = 1e-3) -> torch.Tensor:
    """A random rank-8 matrix plus dense noise holding ~10% of the energy (per 2-D slice)."""
    *lead, out, inp = shape
    u = torch.randn(*lead, out, 8, generator=generator)
    v = torch.randn(*lead, 8, inp, generator=generator)
    signal = u @ v / 8**0.5
    noise = torch.randn(shape, generator=generator) * signal.std() * 0.33
    return scale * (signal + noise) / (signal + noise).std()


def make_run(kind: str, root: Path, args) -> tuple[list[Path], int]:
    model = build(kind, args)
    generator = torch.Generator().manual_seed(1)
    paths = []
    for k in range(3):
        if k:
            with torch.no_grad():
                for p in model.parameters():
                    if p.dim() >= 2:
                        p.add_(low_rank_update(tuple(p.shape), generator))
        path = root / kind / f"c{k}"
        model.save_pretrained(path)
        paths.append(path)
    return paths, sum(p.numel() for p in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--expert-inter", type=int, default=32)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--workdir", type=Path, default=ROOT / "bench" / "_work" / "angles_moe")
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()

    shutil.rmtree(args.workdir, ignore_errors=True)
    runs = {kind: make_run(kind, args.workdir, args) for kind in ("moe", "dense")}
    runtime = Runtime(threads=args.threads)
    times: dict[str, list[float]] = {kind: [] for kind in runs}
    records = {}
    for _ in range(args.repeats):
        for kind, (paths, _) in runs.items():
            start = time.perf_counter()
            result = compute_angles(paths, settings=AngleSettings(), runtime=runtime)
            times[kind].append(time.perf_counter() - start)
            records[kind] = len(result.records)
    print(f"{args.layers} layers, hidden {args.hidden}; MoE: {args.experts} experts of {args.expert_inter}; ")
    per = {}
    for kind, (_, n_params) in runs.items():
        wall = statistics.median(times[kind])
        per[kind] = wall / n_params * 1e6
        print(
            f"{kind:>5}: {n_params / 1e6:.2f} M parameters, {records[kind]} matrices compared, "
            f"median {wall:.2f} s over {args.repeats} runs ({min(times[kind]):.2f}-{max(times[kind]):.2f}), "
            f"{per[kind]:.3f} s per million parameters"
        )
    ratio = per["moe"] / per["dense"]
    print(f"ratio MoE / dense, time per parameter: {ratio:.2f} (target <= 1): {'met' if ratio <= 1 else 'NOT met'}")
    if not args.keep:
        shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
