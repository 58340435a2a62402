"""Peak memory of streaming a checkpoint pair, next to loading both models with from_pretrained.

Generates a synthetic Llama-shaped checkpoint pair of about ``--size-gb`` each (fp32
safetensors, not committed), then runs the same computation (the Frobenius norm of every
tensor's update) three ways, each in a fresh process under ``/usr/bin/time -v``:

* ``baseline``: the interpreter with torch, transformers and forgetdiag imported, nothing read;
* ``stream``: ``forgetdiag.stream_tensors`` over the pair, one tensor name at a time;
* ``from_pretrained``: both models loaded with ``AutoModelForCausalLM.from_pretrained``.

Usage::

    python bench/stream_memory.py [--size-gb 1.0] [--workdir bench/_work] [--keep]

It prints max RSS and wall time per way, and the ratios. Target: streaming stays near the
baseline plus a few of the largest tensors, far below the size of the models.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

HIDDEN, INTER, VOCAB = 1024, 2816, 32000


def generate(root: Path, size_gb: float) -> tuple[Path, Path, int]:
    """Two fp32 Llama checkpoints (B = A + small noise) of about ``size_gb`` each."""
    import torch
    from safetensors.torch import save_file

    per_layer = 4 * HIDDEN * HIDDEN + 3 * HIDDEN * INTER + 2 * HIDDEN  # attention, MLP, norms
    fixed = 2 * VOCAB * HIDDEN + HIDDEN
    layers = max(1, round((size_gb * 2**30 / 4 - fixed) / per_layer))
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": HIDDEN,
        "intermediate_size": INTER,
        "num_hidden_layers": layers,
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
        "vocab_size": VOCAB,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
    }
    shapes = {
        "model.embed_tokens.weight": (VOCAB, HIDDEN),
        "lm_head.weight": (VOCAB, HIDDEN),
        "model.norm.weight": (HIDDEN,),
    }
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update(
            {
                p + "self_attn.q_proj.weight": (HIDDEN, HIDDEN),
                p + "self_attn.k_proj.weight": (HIDDEN, HIDDEN),
                p + "self_attn.v_proj.weight": (HIDDEN, HIDDEN),
                p + "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
                p + "mlp.gate_proj.weight": (INTER, HIDDEN),
                p + "mlp.up_proj.weight": (INTER, HIDDEN),
                p + "mlp.down_proj.weight": (HIDDEN, INTER),
                p + "input_layernorm.weight": (HIDDEN,),
                p + "post_attention_layernorm.weight": (HIDDEN,),
            }
        )
    generator = torch.Generator().manual_seed(0)
    a = {n: torch.randn(s, generator=generator) * 0.02 for n, s in shapes.items()}
    paths = []
    for name, state in (
        ("a", a),
        ("b", {n: t + 1e-3 * torch.randn(t.shape, generator=generator) for n, t in a.items()}),
    ):
        path = root / name
        path.mkdir(parents=True, exist_ok=True)
        save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
        (path / "config.json").write_text(json.dumps(config))
        paths.append(path)
        del state
    largest = max(t.numel() for t in a.values()) * 4
    return paths[0], paths[1], largest


def measure(way: str, a: str, b: str) -> None:
    """The work of one way, run inside the timed process; prints the total update norm."""
    import torch

    import forgetdiag

    if way == "baseline":
        import transformers  # noqa: F401  (import cost only)

        print("total 0")
        return
    total = 0.0
    if way == "stream":
        checkpoints = forgetdiag.find_sequence([a, b])
        for _, tensors in forgetdiag.stream_tensors(checkpoints):
            ta, tb = tensors
            total += float(torch.linalg.vector_norm(tb - ta)) ** 2
            del ta, tb, tensors  # let go before the next name is read
    else:
        from transformers import AutoModelForCausalLM

        ma = AutoModelForCausalLM.from_pretrained(a, dtype=torch.float32)
        mb = AutoModelForCausalLM.from_pretrained(b, dtype=torch.float32)
        sb = mb.state_dict()
        for name, ta in ma.state_dict().items():
            total += float(torch.linalg.vector_norm(sb[name] - ta)) ** 2
    print(f"total {total**0.5:.6f}")


def timed(way: str, a: Path, b: Path) -> dict:
    cmd = ["/usr/bin/time", "-v", sys.executable, __file__, "--measure", way, str(a), str(b)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    wall = time.perf_counter() - start
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    total = re.search(r"total (\S+)", proc.stdout).group(1)
    return {"way": way, "max_rss_mb": rss_kb / 1024, "wall_s": wall, "result": total}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gb", type=float, default=1.0)
    parser.add_argument("--workdir", type=Path, default=Path(__file__).parent / "_work" / "stream_memory")
    parser.add_argument("--keep", action="store_true", help="keep the generated checkpoints")
    parser.add_argument("--measure", nargs=3, metavar=("WAY", "A", "B"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        measure(*args.measure)
        return
    a, b, largest = generate(args.workdir, args.size_gb)
    size = (a / "model.safetensors").stat().st_size
    print(f"checkpoint pair: 2 x {size / 2**30:.2f} GiB fp32; largest tensor {largest / 2**20:.0f} MiB")
    rows = [timed(way, a, b) for way in ("baseline", "stream", "from_pretrained")]
    base = rows[0]["max_rss_mb"]
    print(f"{'way':<16}{'max RSS MiB':>12}{'over baseline':>15}{'wall s':>9}  result")
    for r in rows:
        print(
            f"{r['way']:<16}{r['max_rss_mb']:>12.0f}{r['max_rss_mb'] - base:>15.0f}{r['wall_s']:>9.1f}  {r['result']}"
        )
    stream, full = rows[1], rows[2]
    print(
        f"streaming uses {(stream['max_rss_mb'] - base) / (largest / 2**20):.1f} largest-tensor sizes "
        f"over the interpreter; from_pretrained x2 uses {(full['max_rss_mb'] - base) / (stream['max_rss_mb'] - base):.1f}x "
        f"the streaming overhead (models: {2 * size / 2**20:.0f} MiB)"
    )
    assert stream["result"] == full["result"], "the two ways disagree"
    if not args.keep:
        shutil.rmtree(args.workdir)


if __name__ == "__main__":
    main()
