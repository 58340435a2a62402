"""Does a mixture-of-experts model make ``forgetdiag angles`` slower per parameter than a dense one?

For each configuration ``LxH:I`` (``--configs``, default ``4x64:32 1x512:512``) builds, from
transformers configs, two checkpoint triples C0, C1, C2 of the same parameter count (not
committed; in ``--workdir``):

* an OLMoE-style model: ``L`` layers of hidden ``H``, each with ``--experts`` routed experts of
  intermediate size ``I`` and a router; saved by ``save_pretrained``, so every expert's gate, up
  and down are separate 2-D tensors (transformers 5 writes them so, while the loaded model holds
  fused 3-D ones);
* a Llama-style dense model of the same hidden size whose MLP intermediate size is
  ``experts * I``: the same MLP parameters in three big matrices per layer instead of
  ``3 * experts`` small ones (the MoE model has the router on top, <1% more).

Every 2-D weight gets two updates, each a random rank-8 matrix plus dense noise holding ~10% of
its energy (so every basis keeps the default 32 directions). Then ``compute_angles`` runs on
each triple ``--repeats`` times in this process, alternating, and the script prints the median
wall time, the time per million parameters, how the experts' bases were computed, and the ratio
MoE / dense (target: at most 1, i.e. the experts cost no more per parameter than dense matrices).

The two default sizes sit on either side of the switch between exact and randomized bases
(``forgetdiag.linalg.update_basis``: exact when rank + oversample > min(d, n) / 8). At 64:32
every expert is exact: one float64 eigendecomposition of its 32 x 32 Gram matrix per update,
where a dense 64 x 2048 matrix needs one 64 x 64 for all its columns; the script times the
LAPACK calls those exact bases and their angles need, and nothing else, as that configuration's
floor (:func:`lapack_floor`). At
512:512 the experts, like those of released MoE models (OLMoE 2048 x 1024, Qwen3-MoE 2048 x 768,
Mixtral 4096 x 14336), take the randomized path.

Usage::

    python bench/angles_moe.py [--configs 4x64:32 1x512:512] [--experts 64] [--repeats 5]
                               [--threads N] [--workdir bench/_work/angles_moe] [--keep]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from forgetdiag import AngleSettings, Runtime, compute_angles  # noqa: E402
from forgetdiag.runtime import torch_threads  # noqa: E402


def build(kind: str, size: Size, args) -> torch.nn.Module:
    import transformers
    from transformers import AutoModelForCausalLM, LlamaConfig, OlmoeConfig

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    common = dict(
        hidden_size=size.hidden,
        num_hidden_layers=size.layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=args.vocab,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    if kind == "moe":
        config = OlmoeConfig(
            **common, intermediate_size=size.expert_inter, num_experts=args.experts, num_experts_per_tok=2
        )
    else:
        config = LlamaConfig(**common, intermediate_size=args.experts * size.expert_inter)
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


def make_run(kind: str, size: Size, root: Path, args) -> tuple[list[Path], int]:
    model = build(kind, size, args)
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


@dataclass(frozen=True)
class Size:
    layers: int
    hidden: int
    expert_inter: int

    @classmethod
    def parse(cls, text: str) -> Size:
        layers, rest = text.split("x")
        hidden, inter = rest.split(":")
        return cls(int(layers), int(hidden), int(inter))

    def __str__(self) -> str:
        return f"{self.layers}x{self.hidden}:{self.expert_inter}"


def lapack_floor(size: Size, args) -> float:
    """CPU seconds of the LAPACK calls alone that the experts' exact bases and angles need in
    one run, per (layer, component): a batched float64 eigendecomposition of the (experts, m, m)
    Gram matrices for each of the two updates, and the two batched SVDs of the principal angles
    (m = min(d, n), d = hidden): what no reorganisation of the Python around them removes."""
    d, m = size.hidden, min(size.hidden, size.expert_inter)
    x = torch.randn(args.experts, d, m, dtype=torch.float64)
    gram = x.mT @ x
    calls = 3 * size.layers  # gate, up, down

    def once() -> None:
        torch.linalg.eigh(gram)
        torch.linalg.eigh(gram)
        torch.linalg.svdvals(gram)  # cosines: (m, m)
        torch.linalg.svdvals(x)  # sines: (d, m)

    with torch_threads(1):  # as each worker runs them
        once()
        start = time.process_time()
        for _ in range(calls):
            once()
        return time.process_time() - start


def bench(size: Size, args, runtime: Runtime) -> float:
    """Prints one configuration's figures; returns the ratio MoE / dense per parameter."""
    workdir = args.workdir / str(size).replace(":", "_")
    shutil.rmtree(workdir, ignore_errors=True)
    runs = {kind: make_run(kind, size, workdir, args) for kind in ("moe", "dense")}
    times: dict[str, list[float]] = {kind: [] for kind in runs}
    results = {}
    for _ in range(args.repeats):
        for kind, (paths, _) in runs.items():
            start = time.perf_counter()
            results[kind] = compute_angles(paths, settings=AngleSettings(), runtime=runtime)
            times[kind].append(time.perf_counter() - start)
    experts = [r for r in results["moe"].records if r.expert is not None]
    methods = sorted({r.method_a for r in experts if r.method_a})
    print(
        f"{size}: {size.layers} layers of hidden {size.hidden}; MoE: {args.experts} experts of {size.expert_inter} "
        f"({len(experts)} expert records, bases {'/'.join(methods)})"
    )
    per = {}
    for kind, (_, n_params) in runs.items():
        wall = statistics.median(times[kind])
        per[kind] = wall / n_params * 1e6
        print(
            f"  {kind:>5}: {n_params / 1e6:.2f} M parameters, {len(results[kind].records)} matrices compared, "
            f"median {wall:.2f} s over {args.repeats} runs ({min(times[kind]):.2f}-{max(times[kind]):.2f}), "
            f"{per[kind]:.3f} s per million parameters"
        )
    if "exact" in methods:
        floor = lapack_floor(size, args)
        workers = results["moe"].workers
        print(
            f"  floor: the LAPACK calls of the experts' exact bases and angles alone take {floor:.2f} s of CPU, "
            f"{floor / workers:.2f} s over {workers} workers: {floor / workers / statistics.median(times['dense']):.1f}x "
            "the whole dense run"
        )
    ratio = per["moe"] / per["dense"]
    print(f"  ratio MoE / dense, time per parameter: {ratio:.2f} (target <= 1): {'met' if ratio <= 1 else 'NOT met'}")
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return ratio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", type=Size.parse, nargs="+", default=[Size(4, 64, 32), Size(1, 512, 512)])
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--workdir", type=Path, default=ROOT / "bench" / "_work" / "angles_moe")
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    runtime = Runtime(threads=args.threads)
    ratios = {str(size): bench(size, args, runtime) for size in args.configs}
    print("ratios MoE / dense per parameter: " + ", ".join(f"{k} {v:.2f}" for k, v in ratios.items()))


if __name__ == "__main__":
    main()
