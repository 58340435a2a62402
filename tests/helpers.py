"""Builders of tiny ("pico") models and checkpoints for the tests; nothing is downloaded."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

WORDS = [
    "what",
    "is",
    "the",
    "birth",
    "city",
    "of",
    "alice",
    "bob",
    "carol",
    "dave",
    "erin",
    "frank",
    "answer",
    ":",
    "paris",
    "rome",
    "oslo",
    "lima",
    "cairo",
    "quito",
    "who",
    "works",
    "at",
    "acme",
    "globex",
    "initech",
]


def make_tokenizer(path: Path | None = None, words=WORDS):
    """A word-level tokenizer with [PAD] [UNK] [BOS] [EOS], BOS added to every input."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]", "[BOS]", "[EOS]"])
    tok.train_from_iterator([" ".join(words)], trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="[BOS] $A", special_tokens=[("[BOS]", tok.token_to_id("[BOS]"))]
    )
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="[BOS]", eos_token="[EOS]", pad_token="[PAD]", unk_token="[UNK]"
    )
    if path is not None:
        hf.save_pretrained(path)
    return hf


def llama_config(*, layers=2, hidden=32, heads=4, kv_heads=2, inter=64, vocab=64, tied=True):
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        vocab_size=vocab,
        max_position_embeddings=64,
        tie_word_embeddings=tied,
        bos_token_id=2,
        eos_token_id=3,
        pad_token_id=0,
    )


def gpt2_config(*, layers=2, hidden=32, heads=4, vocab=64):
    from transformers import GPT2Config

    return GPT2Config(
        n_embd=hidden, n_layer=layers, n_head=heads, vocab_size=vocab, n_positions=64, bos_token_id=2, eos_token_id=3
    )


def neox_config(*, layers=2, hidden=32, heads=4, inter=64, vocab=64):
    from transformers import GPTNeoXConfig

    return GPTNeoXConfig(
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        vocab_size=vocab,
        max_position_embeddings=64,
        bos_token_id=2,
        eos_token_id=3,
        tie_word_embeddings=False,
    )


def build(config, seed=0):
    """A randomly initialised causal LM for ``config`` (seeded), in eval mode; a multimodal
    wrapper (a config with a ``vision_config``) is built whole, vision tower included, as its
    published checkpoints are (AutoModelForCausalLM would build Llama 4's text model alone)."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    torch.manual_seed(seed)
    if getattr(config, "vision_config", None) is not None:
        return AutoModelForImageTextToText.from_config(config).eval()
    return AutoModelForCausalLM.from_config(config).eval()


def save(model, path: Path, *, tokenizer=None, dtype=None, **kwargs) -> Path:
    """save_pretrained (safetensors) quietly, optionally cast and with a tokenizer."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(path, **kwargs)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path


def save_pickle_only(model, path: Path) -> Path:
    """A legacy checkpoint: config.json + pytorch_model.bin, no safetensors."""
    path.mkdir(parents=True, exist_ok=True)
    model.config.to_json_file(path / "config.json")
    torch.save({k: v.clone() for k, v in model.state_dict().items()}, path / "pytorch_model.bin")
    return path


class Boom:
    """Unpickling this runs code that writes ``marker``: a stand-in for a malicious pickle."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def write_malicious_pickle(file: Path, marker: Path) -> Path:
    """A file that would create ``marker`` if anyone unpickled it without weights_only."""
    torch.save({"weight": torch.zeros(2), "payload": Boom(str(marker))}, file)
    return file


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` (relative path -> digest): to prove nothing changed."""
    out = {}
    for file in sorted(p for p in Path(root).rglob("*") if p.is_file()):
        out[str(file.relative_to(root))] = hashlib.sha256(file.read_bytes()).hexdigest()
    return out


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def assert_bad_input(result, *fragments):
    """Exit 2, exactly one stderr line naming the problem, no traceback, nothing on stdout."""
    assert result.exit_code == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("forgetdiag: error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert "Traceback" not in result.stderr and result.stdout == ""


def plotly_figures(page: str) -> list[tuple[list, dict]]:
    """(data, layout) of every ``Plotly.newPlot`` call in the page's body, parsed as JSON."""
    decoder, figures = json.JSONDecoder(), []
    for call in page.split("<body>", 1)[1].split("Plotly.newPlot(")[1:]:
        values, pos = [], 0
        for _ in range(3):  # the div id, the traces, the layout
            while call[pos] in " \t\n,":
                pos += 1
            value, pos = decoder.raw_decode(call, pos)
            values.append(value)
        figures.append((values[1], values[2]))
    return figures


# --- planted runs: tiny models trained to a known truth ----------------------------------------
# Their outcome must not depend on the CPU's kernels (AVX-512, AVX2 or plain builds round
# differently) or on the thread count: every recipe below was chosen for its margin, measured
# over ATEN_CPU_CAPABILITY=default/avx2/avx512 and FORGETDIAG_TEST_SEED=0..5 (see Development
# in the README). FORGETDIAG_TEST_SEED offsets every seed of a planted run, so that CI can run
# the planted tests on other draws too.
TEST_SEED = int(os.environ.get("FORGETDIAG_TEST_SEED", "0"))


def qa_items(n_names: int = 64, n_cities: int = 16, stride: int = 3):
    """(names, cities, items): 'what is the birth city of nK answer :' -> ' cJ', one group a name.

    16 cities: a model that learned only the answer's format guesses right 1 time in 16."""
    from forgetdiag.probes import ProbeItem

    names = [f"n{k}" for k in range(n_names)]
    cities = [f"c{k}" for k in range(n_cities)]
    items = tuple(
        ProbeItem(f"what is the birth city of {n} answer :", f" {cities[(stride * k) % n_cities]}", n)
        for k, n in enumerate(names)
    )
    return names, cities, items


def _train_until_exact(
    model, tokenizer, items, *, epochs: int, lr: float, seed: int, what: str, schedule: str = "cosine"
) -> None:
    """Train on ``items`` (``schedule`` first, then cosine rounds at half the rate while an item
    is still missed, at most four rounds in all); then assert that every item is answered exactly.

    A cosine schedule ends with small steps, so the model settles whatever the kernels'
    rounding; the extra rounds catch the rare draw that settles one item short."""
    from forgetdiag.evaluate import encode, score
    from forgetdiag.training import TrainConfig, train

    encoded = encode(tokenizer, items)
    for round_ in range(4):
        train(
            model,
            encoded,
            TrainConfig(
                epochs=epochs,
                lr=lr / 2**round_,
                batch_size=16,
                schedule=schedule if round_ == 0 else "cosine",
                seed=seed + TEST_SEED + 1000 * round_,
            ),
            pad_id=0,
        )
        learned = score(model, encoded, pad_id=0).exact_match
        if learned == 1.0:
            return
    raise AssertionError(f"planted run did not {what} ({learned:.3f} exact after four rounds)")


def teach(model, tokenizer, items, *, epochs: int = 200, lr: float = 2e-3, seed: int = 0) -> None:
    """Train ``model`` until it answers every item exactly (asserted)."""
    _train_until_exact(model, tokenizer, items, epochs=epochs, lr=lr, seed=seed, what="learn its items")


def reformat(model, tokenizer, items, *, suffix: str = " who", epochs: int = 20, lr: float = 2e-3, seed: int = 0):
    """Spurious forgetting planted: train ``model`` to follow the old answer with ``suffix``
    instead of stopping.

    Every fact is still said where it was (asserted), only the stop changed: the knowledge is
    intact by construction, and re-aligning it means learning where to stop again, the same
    for every entity (a change in front of the answer instead moves where the fact must be
    recalled, and whether recovery finds it there varied with the draw). Returns the
    re-formatted items."""
    from forgetdiag.probes import ProbeItem

    shifted = [ProbeItem(i.prompt, i.answer + suffix, i.group) for i in items]
    _train_until_exact(
        model,
        tokenizer,
        shifted,
        epochs=epochs,
        lr=lr,
        seed=seed,
        schedule="constant",
        what="keep every fact while re-formatting",
    )
    return shifted


ENVELOPE = ("analysis", "schema_version", "summary", "warnings", "timings_s")


def assert_envelope(data: dict, analysis: str) -> dict:
    """A command's JSON starts with the envelope every result shares (forgetdiag.results)."""
    assert tuple(data)[:5] == ENVELOPE, tuple(data)[:6]
    assert data["analysis"] == analysis and data["schema_version"] == 2
    assert isinstance(data["summary"], str) and data["summary"]
    assert isinstance(data["warnings"], list) and all(isinstance(w, str) for w in data["warnings"])
    assert isinstance(data["timings_s"], dict)
    assert all(isinstance(v, float) and v >= 0 for v in data["timings_s"].values())
    assert not {"seconds", "wall_s", "notes"} & set(data)
    return data


# --- planted updates of known angle --------------------------------------------------------
HIDDEN = 32
LOW, HIGH = (0.0, 30.0, 60.0), (30.0, 60.0, 90.0)  # planted principal angles, rank 3
SINGULAR = torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64) * 0.05


def orthonormal(rows: int, cols: int, generator: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(rows, cols, dtype=torch.float64, generator=generator)).Q


def planted_updates(thetas, n: int, seed: int, hidden: int = HIDDEN) -> tuple[torch.Tensor, torch.Tensor]:
    """Two (hidden, n) rank-3 updates U1 S V1^T and U2 S V2^T whose hidden-side bases have the
    principal angles ``thetas``: u2_i = cos t_i u1_i + sin t_i w_i, w orthogonal to U1."""
    g = torch.Generator().manual_seed(seed)
    frame = orthonormal(hidden, 6, g)  # (hidden, 6)
    t = torch.deg2rad(torch.tensor(thetas, dtype=torch.float64))
    u1, u2 = frame[:, :3], frame[:, :3] * torch.cos(t) + frame[:, 3:] * torch.sin(t)
    return ((u1 * SINGULAR) @ orthonormal(n, 3, g).T, (u2 * SINGULAR) @ orthonormal(n, 3, g).T)


def planted_run(root, config, plant, seed=0, **save_kwargs):
    """Save C0, C1 = C0 + dW1, C2 = C1 + dW2, where ``plant(state, k)`` adds update k in place
    to the model's parameters (written here by hand for each family's layout)."""
    model = build(config, seed=seed)
    paths = []
    for k in range(3):
        if k:
            with torch.no_grad():
                plant(dict(model.named_parameters()), k - 1)
        paths.append(save(model, root / f"c{k}", **save_kwargs))
    return paths
