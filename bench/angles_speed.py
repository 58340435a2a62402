"""Speed and memory of ``forgetdiag angles`` at TinyLlama-1.1B scale, against the naive way.

Generates a checkpoint triple C0, C1, C2 of TinyLlama-1.1B shape (22 layers, hidden 2048,
intermediate 5632, 32 heads with 4 key/value heads, vocab 32000, untied lm_head; bf16
safetensors, ~2.2 GB each; not committed) whose updates have a realistic low-rank-plus-noise
structure: per matrix a rank-16 part with power-law singular values on the hidden side, dense
noise holding ~10% of the energy, and the bf16 rounding of the stored weights on top. The second
update's hidden-side directions turn away from the first one's by a layer-dependent angle (near
orthogonal at the bottom, aligned at the top, as in the paper). Then, in one run:

(a) the naive way (the reference code's): load the three models with ``from_pretrained``, full
    SVD of every update, 99% of the energy, per-direction angles. A full SVD of every matrix
    takes hours on a small machine, so it runs over a deterministic subset (every matrix of the
    layers in ``--naive-layers``, default the first and the last, plus embed and lm_head), and
    its total is estimated as load time + two SVDs per matrix at the median time measured for
    that matrix's shape (SVD times on a shared machine vary ~5x), in wall and CPU time;
(b) ``forgetdiag angles C0 C1 C2`` in its default mode, under ``/usr/bin/time -v``;
(c) ``cat`` of the three checkpoints to /dev/null, first with the files evicted from the page
    cache (``posix_fadvise DONTNEED`` on these files only), then again warm;
(d) peak resident memory of (b); (b) is also run once more from a cold page cache;
(e) the float32 matrix products alone (random data of the same shapes, on all cores): one
    width-32 pass over both updates of every matrix, the least any rank-32 sketch costs, and the
    default mode's eight passes of width 64, to show how much of (b) is arithmetic.

It prints the ratios: default vs naive speed (target >= 20x), wall time vs warm cat (target
<= 3x), peak RSS (target < 2.5 GB), and the agreement of mean angles with the naive way, both
at the ranks forgetdiag used (same top-k from the naive full SVD) and where the naive 99%-energy
rank equals forgetdiag's rank.

Usage::

    python bench/angles_speed.py [--workdir bench/_work/angles_speed] [--keep] [--reuse]
                                 [--naive-layers 0,21] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _process import timed

LAYERS, HIDDEN, INTER, VOCAB, HEADS, KV_HEADS = 22, 2048, 5632, 32000, 32, 4
KV = HIDDEN // HEADS * KV_HEADS  # 256
SIGNAL_RANK, NOISE_SHARE, UPDATE_RMS, WEIGHT_STD = 16, 0.10, 1e-3, 0.02
# name suffix -> (stored shape (out, in), hidden side of the canonical (out, in) matrix)
MATRICES = {
    "self_attn.q_proj": ((HIDDEN, HIDDEN), "in"),
    "self_attn.k_proj": ((KV, HIDDEN), "in"),
    "self_attn.v_proj": ((KV, HIDDEN), "in"),
    "self_attn.o_proj": ((HIDDEN, HIDDEN), "out"),
    "mlp.gate_proj": ((INTER, HIDDEN), "in"),
    "mlp.up_proj": ((INTER, HIDDEN), "in"),
    "mlp.down_proj": ((HIDDEN, INTER), "out"),
}
GLOBALS = {"model.embed_tokens.weight": ((VOCAB, HIDDEN), "in"), "lm_head.weight": ((VOCAB, HIDDEN), "in")}
COMPONENT = {
    "self_attn.q_proj": "q",
    "self_attn.k_proj": "k",
    "self_attn.v_proj": "v",
    "self_attn.o_proj": "o",
    "mlp.gate_proj": "gate",
    "mlp.up_proj": "up",
    "mlp.down_proj": "down",
    "model.embed_tokens.weight": "embed",
    "lm_head.weight": "lm_head",
}


def all_matrices() -> dict[str, tuple[tuple[int, int], str]]:
    """Every weight matrix of the model: name -> (stored shape, hidden side)."""
    out = {"model.embed_tokens.weight": GLOBALS["model.embed_tokens.weight"]}
    for layer in range(LAYERS):
        for suffix, spec in MATRICES.items():
            out[f"model.layers.{layer}.{suffix}.weight"] = spec
    out["lm_head.weight"] = GLOBALS["lm_head.weight"]
    return out


def turn_deg(name: str) -> float:
    """How far update 2's signal directions turn from update 1's: 80 deg at the bottom and in
    the input embedding, 20 deg at the top layer and in lm_head."""
    match = re.search(r"\.layers\.(\d+)\.", name)
    if match is None:
        return 80.0 if "embed" in name else 20.0
    return 80.0 - 60.0 * int(match.group(1)) / (LAYERS - 1)


def _update(hidden_dirs, n: int, generator):
    """(hidden, n) low-rank-plus-noise update with RMS entry UPDATE_RMS."""
    import torch

    d, r = hidden_dirs.shape
    s = torch.arange(1, r + 1, dtype=torch.float32) ** -0.7  # (r,) power-law singular values
    right = torch.linalg.qr(torch.randn(n, r, generator=generator)).Q  # (n, r)
    signal = (hidden_dirs * s) @ right.T  # (d, n)
    noise = torch.randn(d, n, generator=generator)
    noise *= math.sqrt(NOISE_SHARE / (1 - NOISE_SHARE)) * signal.norm() / noise.norm()
    update = signal.add_(noise)
    return update.mul_(UPDATE_RMS * math.sqrt(d * n) / update.norm())


def generate(root: Path) -> list[Path]:
    """Write C0, C1 = C0 + U1, C2 = C1 + U2 (bf16 safetensors) under ``root``."""
    import torch
    from safetensors.torch import save_file

    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": HIDDEN,
        "intermediate_size": INTER,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "vocab_size": VOCAB,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "hidden_act": "silu",
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    generator = torch.Generator().manual_seed(0)
    states: list[dict] = [{}, {}, {}]
    for name, (shape, side) in all_matrices().items():
        w0 = torch.randn(shape, generator=generator) * WEIGHT_STD  # (out, in)
        d, n = (shape[1], shape[0]) if side == "in" else shape
        u1 = torch.linalg.qr(torch.randn(d, SIGNAL_RANK, generator=generator)).Q  # (d, r)
        fresh = torch.randn(d, SIGNAL_RANK, generator=generator)
        fresh -= u1 @ (u1.T @ fresh)  # orthogonal to u1
        fresh = torch.linalg.qr(fresh).Q
        t = math.radians(turn_deg(name))
        u2 = u1 * math.cos(t) + fresh * math.sin(t)  # principal angles to u1 all equal t
        weights = [w0.to(torch.bfloat16)]
        for dirs in (u1, u2):
            update = _update(dirs, n, generator)  # (d, n)
            update = update.T if side == "in" else update  # stored (out, in)
            weights.append((weights[-1].float() + update).to(torch.bfloat16))
            del update
        for state, w in zip(states, weights):
            state[name] = w
    for layer in range(LAYERS):  # RMSNorm weights, updated a little
        for norm in ("input_layernorm", "post_attention_layernorm"):
            for k, state in enumerate(states):
                state[f"model.layers.{layer}.{norm}.weight"] = (1 + 0.01 * k * torch.ones(HIDDEN)).bfloat16()
    for state in states:
        state["model.norm.weight"] = torch.ones(HIDDEN, dtype=torch.bfloat16)
    paths = []
    for k, state in enumerate(states):
        path = root / f"c{k}"
        path.mkdir(parents=True, exist_ok=True)
        save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
        (path / "config.json").write_text(json.dumps(config, indent=1))
        paths.append(path)
    return paths


def evict(paths: list[Path]) -> None:
    """Drop these files (only) from the page cache, so the next read comes from disk."""
    for p in paths:
        fd = os.open(p / "model.safetensors", os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def cat_seconds(paths: list[Path]) -> float:
    start = time.perf_counter()
    subprocess.run(["cat", *(str(p / "model.safetensors") for p in paths)], stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - start


def product_floor(cores: int) -> dict[str, float]:
    """(e) Seconds of float32 products ``A @ Omega`` alone, spread over ``cores``.

    For every matrix of both updates, oriented (hidden, n): one product with an (n, 32) test
    matrix, the least a rank-32 sketch of an update can cost (no oversampling, no power
    iteration), and the default mode's eight products of width 64 (range finder, 3 power
    iterations of two products each, projection). Times are medians of single-threaded
    products per shape on random data, so they hold whatever the reading costs.
    """
    import torch

    torch.set_num_threads(1)
    counts: dict[tuple[int, int], int] = {}
    for shape, side in all_matrices().values():
        oriented = (shape[1], shape[0]) if side == "in" else shape
        counts[oriented] = counts.get(oriented, 0) + 2  # two updates
    out = {}
    for width, passes in ((32, 1), (64, 8)):
        total = 0.0
        for (d, n), count in counts.items():
            a, omega = torch.randn(d, n), torch.randn(n, width)
            times = []
            for _ in range(3):
                start = time.perf_counter()
                a @ omega
                times.append(time.perf_counter() - start)
            total += count * passes * statistics.median(times)
        out[f"{passes}x{width}"] = total / cores
    return out


def naive_subset(layers: list[int]) -> list[str]:
    """The deterministic subset the naive way runs over: embed, every matrix of ``layers``, lm_head."""
    names = ["model.embed_tokens.weight"]
    names += [f"model.layers.{k}.{suffix}.weight" for k in layers for suffix in MATRICES]
    return names + ["lm_head.weight"]


def _direction_angles_naive(ua, ub):
    """Per-direction angles (deg) of the columns of ub to span(ua), as the reference did: arccos."""
    import torch

    cos = torch.linalg.vector_norm(ua.T.double() @ ub.double(), dim=0).clamp(max=1.0)  # (rb,)
    return torch.rad2deg(torch.arccos(cos))


def run_naive(paths: list[str], layers: list[int], ours_json: str, out: str) -> None:
    """(a), inside its own timed process: from_pretrained, full SVDs, 99% energy, angles."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()
    start, cpu = time.perf_counter(), time.process_time()
    states = [AutoModelForCausalLM.from_pretrained(p, dtype=torch.bfloat16).state_dict() for p in paths]
    load = {"wall": time.perf_counter() - start, "cpu": time.process_time() - cpu}
    ours = {r["param"]: r for r in json.loads(Path(ours_json).read_text())["records"]}
    specs = all_matrices()
    rows = []
    for name in naive_subset(layers):
        side = specs[name][1]
        start, cpu = time.perf_counter(), time.process_time()
        bases, svd = [], []
        for k in (0, 1):
            delta = states[k + 1][name].float() - states[k][name].float()  # (out, in)
            oriented = delta.T if side == "in" else delta  # (hidden, n)
            t, c = time.perf_counter(), time.process_time()
            u, s, _ = torch.linalg.svd(oriented, full_matrices=False)
            svd.append({"wall": time.perf_counter() - t, "cpu": time.process_time() - c})
            share = torch.cumsum(s.double() ** 2, 0) / (s.double() ** 2).sum()
            bases.append((u, int(torch.searchsorted(share, 0.99)) + 1))
        (ua, ra), (ub, rb) = bases
        angles99 = _direction_angles_naive(ua[:, :ra], ub[:, :rb])
        total = {"wall": time.perf_counter() - start, "cpu": time.process_time() - cpu}
        rec = ours[name]
        same_k = _direction_angles_naive(ua[:, : rec["rank_a"]], ub[:, : rec["rank_b"]])
        rows.append(
            {
                "param": name,
                "shape": list(specs[name][0]),
                "total": total,
                "svd": svd,
                "rank_a": ra,
                "rank_b": rb,
                "angle_deg": float(angles99.mean()),
                "same_k_angle_deg": float(same_k.mean()),
            }
        )
        print(f"naive {name}: {total['wall']:.1f} s, 99% ranks {ra}/{rb}", file=sys.stderr, flush=True)
    Path(out).write_text(json.dumps({"load": load, "rows": rows}, indent=1))


def naive_estimate(naive: dict, clock: str) -> float:
    """Seconds the naive way would take over every matrix: load time + for each matrix two
    full SVDs at the median time measured for its shape, plus the median time spent around
    them (differences, angles). Medians, because SVD times on a shared machine vary ~5x."""
    by_shape: dict[tuple, list[float]] = {}
    around = []
    for row in naive["rows"]:
        by_shape.setdefault(tuple(row["shape"]), []).extend(t[clock] for t in row["svd"])
        around.append(row["total"][clock] - sum(t[clock] for t in row["svd"]))
    per_svd = {shape: statistics.median(times) for shape, times in by_shape.items()}
    return naive["load"][clock] + sum(
        2 * per_svd[tuple(shape)] + statistics.median(around) for shape, _ in all_matrices().values()
    )


def agreement(naive: dict, ours: dict) -> dict:
    """|mean angle difference| at the same ranks, and where the 99%-energy ranks equal ours."""
    records = {r["param"]: r for r in ours["records"]}
    same_k = [abs(row["same_k_angle_deg"] - records[row["param"]]["angle_deg"]) for row in naive["rows"]]
    match = [
        abs(row["angle_deg"] - records[row["param"]]["angle_deg"])
        for row in naive["rows"]
        if (row["rank_a"], row["rank_b"]) == (records[row["param"]]["rank_a"], records[row["param"]]["rank_b"])
    ]
    return {
        "n": len(same_k),
        "same_k_max": max(same_k),
        "same_k_mean": sum(same_k) / len(same_k),
        "rank_match_n": len(match),
        "rank_match_max": max(match) if match else None,
        "naive_ranks": sorted(r for row in naive["rows"] for r in (row["rank_a"], row["rank_b"])),
    }


def report(
    sizes: float,
    cats: tuple[float, float],
    ours: dict,
    ours_cold: dict,
    naive_run: dict,
    naive: dict,
    agree: dict,
    workers: str,
    floor: dict[str, float],
) -> None:
    cold, warm = cats
    estimate, estimate_cpu = naive_estimate(naive, "wall"), naive_estimate(naive, "cpu")
    ranks = agree["naive_ranks"]
    lines = [
        f"checkpoint triple: 3 x {sizes / 3 / 2**30:.2f} GiB bf16 (TinyLlama-1.1B shape), "
        f"{len(all_matrices())} matrices x 2 updates; forgetdiag threads: {workers}",
        f"(c) cat > /dev/null: first (evicted from page cache) {cold:.1f} s, second (warm) {warm:.1f} s",
        f"(b) forgetdiag angles, default mode: {ours['wall_s']:.1f} s wall ({ours['cpu_s']:.0f} s CPU), "
        f"peak RSS {ours['max_rss_gb']:.2f} GB; from a cold page cache: {ours_cold['wall_s']:.1f} s, "
        f"{ours_cold['max_rss_gb']:.2f} GB",
        f"(a) naive: subset of {len(naive['rows'])} matrices measured in {naive_run['wall_s']:.0f} s wall "
        f"(3 models loaded in {naive['load']['wall']:.1f} s, peak RSS {naive_run['max_rss_gb']:.2f} GB); "
        f"estimated for all matrices: {estimate:.0f} s wall, {estimate_cpu:.0f} s CPU",
        f"    naive 99%-energy ranks over the subset: min {ranks[0]}, median {ranks[len(ranks) // 2]}, "
        f"max {ranks[-1]} (forgetdiag default: top {ours.get('rank', 32)})",
        f"(e) float32 products alone, on all cores: one width-32 pass over both updates of every matrix "
        f"(the least any rank-32 sketch costs) {floor['1x32']:.1f} s = {floor['1x32'] / warm:.1f}x warm cat; "
        f"the default's 8 passes of width 64: {floor['8x64']:.1f} s = {floor['8x64'] / ours['wall_s']:.0%} "
        "of (b)'s wall time",
        "",
        f"speed, default vs naive (estimated): {estimate / ours['wall_s']:.1f}x wall time, "
        f"{estimate_cpu / ours['cpu_s']:.1f}x CPU time  (target >= 20x)",
        f"wall time vs warm cat: {ours['wall_s'] / warm:.1f}x  (target <= 3x); "
        f"cold vs cold cat: {ours_cold['wall_s'] / cold:.1f}x",
        f"peak RSS: {ours['max_rss_gb']:.2f} GB  (target < 2.5 GB)",
        f"mean per-direction angle vs the naive full SVD at the same ranks ({agree['n']} matrices): "
        f"max |diff| {agree['same_k_max']:.3f} deg, mean {agree['same_k_mean']:.3f} deg  (target <= 1 deg)",
        f"where the naive 99%-energy ranks equal forgetdiag's: {agree['rank_match_n']} matrices"
        + ("" if agree["rank_match_max"] is None else f", max |diff| {agree['rank_match_max']:.3f} deg"),
    ]
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path(__file__).parent / "_work" / "angles_speed")
    parser.add_argument("--keep", action="store_true", help="keep the generated checkpoints")
    parser.add_argument("--reuse", action="store_true", help="reuse checkpoints kept by --keep")
    parser.add_argument(
        "--naive-layers",
        default=f"0,{LAYERS - 1}",
        help="layers whose matrices the naive way runs over (comma-separated)",
    )
    parser.add_argument("--threads", default=None, help="forwarded to forgetdiag angles --threads")
    parser.add_argument("--naive", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    layers = [int(k) for k in args.naive_layers.split(",")]
    if args.naive:  # the timed subprocess of (a): C0 C1 C2 OURS_JSON OUT
        run_naive(args.naive[:3], layers, args.naive[3], args.naive[4])
        return
    work = args.workdir
    paths = [work / f"c{k}" for k in range(3)]
    if not (args.reuse and all((p / "model.safetensors").is_file() for p in paths)):
        start = time.perf_counter()
        paths = generate(work)
        print(f"generated {work} in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    sizes = sum((p / "model.safetensors").stat().st_size for p in paths)
    evict(paths)
    cats = (cat_seconds(paths), cat_seconds(paths))
    extra = ["--threads", args.threads] if args.threads else []
    cmd = [sys.executable, "-m", "forgetdiag", "angles", *map(str, paths), "--quiet", *extra]
    _, ours = timed([*cmd, "--json", str(work / "ours.json")])
    evict(paths)
    _, ours_cold = timed([*cmd, "--json", str(work / "ours_cold.json")])
    _, naive_run = timed(
        [
            sys.executable,
            __file__,
            "--naive-layers",
            args.naive_layers,
            "--naive",
            *map(str, paths),
            str(work / "ours.json"),
            str(work / "naive.json"),
        ]
    )
    ours_data = json.loads((work / "ours.json").read_text())
    naive = json.loads((work / "naive.json").read_text())
    ours["rank"] = ours_data["settings"]["rank"]
    cores = int(args.threads) if args.threads else len(os.sched_getaffinity(0))
    report(
        sizes,
        cats,
        ours,
        ours_cold,
        naive_run,
        naive,
        agreement(naive, ours_data),
        args.threads or "default (all cores)",
        product_floor(cores),
    )
    if not args.keep:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
