"""`forgetdiag magnitudes` (MIGU): per-unit activation magnitudes and top-unit overlaps.

Checked against a planted model whose chosen units respond to one task's tokens only, against
an independent numpy recomputation of n_i from transformers' hidden states and the layer's
weights (unbatched, so padding cannot hide), and for hooks that never outlive a pass.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from forgetdiag.analyses.activations import linear_modules, unit_magnitudes
from forgetdiag.analyses.magnitudes import magnitude_overlap, overlap, top_units
from forgetdiag.cli import app
from forgetdiag.errors import ForgetdiagError
from forgetdiag.evaluate import encode
from forgetdiag.models import Runtime
from forgetdiag.probes import load_probe, probe_from_pairs
from forgetdiag.render.magnitudes import magnitudes_sections, magnitudes_table

from helpers import assert_bad_input, assert_envelope, build, llama_config, save, tree_digest, write_jsonl

runner = CliRunner()
WORDS_A = ("alice", "bob", "carol", "dave")
WORDS_B = ("paris", "rome", "oslo", "lima")
SET_A, SET_B = range(10), range(10, 20)  # planted units of layer 0's q_proj
Q0 = "model.layers.0.self_attn.q_proj"


def rows(words, n=6, seed=0):
    rng = np.random.default_rng(seed)
    return [
        {
            "prompt": " ".join(rng.choice(words, size=rng.integers(1, 5))),
            "answer": " " + " ".join(rng.choice(words, size=rng.integers(1, 3))),
        }
        for _ in range(n)
    ]


@pytest.fixture(scope="module")
def probes(tmp_path_factory):
    root = tmp_path_factory.mktemp("magnitude_probes")
    a = write_jsonl(root / "task_a.jsonl", rows(WORDS_A, seed=1))
    b = write_jsonl(root / "task_b.jsonl", rows(WORDS_B, seed=2))
    (root / "copy").mkdir()
    a_copy = write_jsonl(root / "copy" / "task_a_again.jsonl", rows(WORDS_A, seed=1))
    return a, b, a_copy


@pytest.fixture(scope="module")
def planted(tmp_path_factory, tokenizer):
    """A llama whose layer-0 q_proj units 0-9 see only task-A tokens and 10-19 only task-B ones.

    Task-A words embed in hidden dims 0-7, task-B words in dims 8-15, every other token
    (BOS, EOS, ...) at zero; RMSNorm keeps each token in its dims, and q_proj rows 0-9 read
    dims 0-7 only, rows 10-19 dims 8-15 only, rows 20-31 dims 16-31 (always zero).
    """
    model = build(llama_config(), seed=30)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        embed = model.model.embed_tokens.weight  # (vocab, 32); tied with lm_head
        embed.zero_()
        for words, dims in ((WORDS_A, slice(0, 8)), (WORDS_B, slice(8, 16))):
            for word in words:
                embed[tokenizer.convert_tokens_to_ids(word), dims] = torch.randn(8, generator=g)
        q = model.model.layers[0].self_attn.q_proj.weight  # (32 out, 32 in)
        q.zero_()
        q[0:10, 0:8] = torch.randn(10, 8, generator=g)
        q[10:20, 8:16] = torch.randn(10, 8, generator=g)
        q[20:32, 16:32] = torch.randn(12, 16, generator=g)
    return save(model, tmp_path_factory.mktemp("planted_units") / "model", tokenizer=tokenizer)


def test_top_units_is_strictly_above_the_quantile():
    n = torch.arange(10, dtype=torch.float64)  # 0.7-quantile = 6.3
    assert top_units(n, 0.7).nonzero().flatten().tolist() == [7, 8, 9]
    tied = torch.tensor([0.0] * 8 + [1.0, 2.0])  # units a task never drives are never on top
    assert top_units(tied, 0.5).nonzero().flatten().tolist() == [8, 9]
    assert top_units(torch.zeros(5), 0.7).sum() == 0
    s = top_units(torch.rand(50, generator=torch.Generator().manual_seed(0)))
    assert overlap(s, s) == 1.0 and np.isnan(overlap(torch.zeros(3, dtype=torch.bool), s[:3]))


def test_planted_units_are_found_exactly(planted, probes):
    a, b, _ = probes
    result = magnitude_overlap(planted, [load_probe(a), load_probe(b)], runtime=Runtime(batch_size=4))
    q0 = next(m for m in result.checkpoints[0].modules if m.module == Q0)
    assert (q0.layer, q0.component, q0.units) == (0, "q", 32)
    assert q0.shared == ((10, 0), (0, 10))  # |S_a| = |S_b| = 10, nothing shared
    assert q0.halves == ((10, 10), (10, 10))  # each task's halves drive the same planted units
    assert q0.overlap(0, 1) == 0.0 and q0.chance(0, 1) == 10 / 32
    # and the sets are exactly the planted units
    from forgetdiag.checkpoints import find_checkpoints
    from forgetdiag.models import load_model, load_tokenizer

    ckpt = find_checkpoints(planted)[0]
    model, tok = load_model(ckpt), load_tokenizer(ckpt)
    for path, planted_set in ((a, SET_A), (b, SET_B)):
        mags = unit_magnitudes(model, encode(tok, load_probe(path)), pad_id=tok.pad_token_id, batch_size=4)
        n = mags.sums[Q0]
        assert top_units(n).nonzero().flatten().tolist() == list(planted_set)
        assert (n[[i for i in range(32) if i not in planted_set]] == 0).all()


def test_a_task_overlaps_itself_fully(planted, probes):
    a, b, a_copy = probes
    result = magnitude_overlap(
        planted, [load_probe(a), load_probe(b), load_probe(a_copy)], runtime=Runtime(batch_size=3)
    )
    records = [r for r in result.records() if {r["task_a"], r["task_b"]} == {"task_a", "task_a_again"}]
    assert len(records) == 2 * len(result.checkpoints[0].modules)
    assert all(r["overlap"] == 1.0 for r in records)
    assert all(m.overlap(0, 0) == 1.0 for m in result.checkpoints[0].modules)


def test_split_half_needs_two_groups(planted, probes, tmp_path):
    a, b, _ = probes
    one = write_jsonl(tmp_path / "one_group.jsonl", [dict(r, group="alice") for r in rows(WORDS_B, seed=4)])
    result = magnitude_overlap(planted, [load_probe(a), load_probe(one)])
    modules = result.checkpoints[0].modules
    assert all(m.halves[1] is None and np.isnan(m.split_half(1)) for m in modules)
    assert all(m.halves[0] is not None for m in modules)
    assert result.checkpoints[0].n_tokens[0] == sum(
        len(e.prompt_ids) + len(e.completion_ids) for e in encode(load_tokenizer_of(planted), load_probe(a))
    )


def load_tokenizer_of(path):
    from forgetdiag.checkpoints import find_checkpoints
    from forgetdiag.models import load_tokenizer

    return load_tokenizer(find_checkpoints(path)[0])


def numpy_llama_q(model, tokenizer, items, layer):
    """n of layer ``layer``'s q_proj from unbatched hidden states: numpy RMSNorm, then x W^T."""
    block = model.model.layers[layer]
    w = block.self_attn.q_proj.weight.detach().double().numpy()  # (out, in)
    gamma = block.input_layernorm.weight.detach().double().numpy()
    eps = model.config.rms_norm_eps
    total = np.zeros(w.shape[0])
    for e in items:
        ids = torch.tensor([e.prompt_ids + e.completion_ids])
        with torch.no_grad():
            h = model(input_ids=ids, output_hidden_states=True).hidden_states[layer][0].double().numpy()
        x = h / np.sqrt((h**2).mean(-1, keepdims=True) + eps) * gamma  # (T, in)
        total += np.abs(x @ w.T).sum(0)
    return total


def numpy_gpt2_attn(model, items, layer):
    """n of GPT-2's Conv1D c_attn of ``layer``: numpy LayerNorm, then x W + b (W is (in, out))."""
    block = model.transformer.h[layer]
    w, bias = (block.attn.c_attn.weight.detach().double().numpy(), block.attn.c_attn.bias.detach().double().numpy())
    ln_w, ln_b = block.ln_1.weight.detach().double().numpy(), block.ln_1.bias.detach().double().numpy()
    total = np.zeros(w.shape[1])
    for e in items:
        ids = torch.tensor([e.prompt_ids + e.completion_ids])
        with torch.no_grad():
            h = model(input_ids=ids, output_hidden_states=True).hidden_states[layer][0].double().numpy()
        x = (h - h.mean(-1, keepdims=True)) / np.sqrt(h.var(-1, keepdims=True) + model.config.layer_norm_epsilon)
        total += np.abs((x * ln_w + ln_b) @ w + bias).sum(0)
    return total


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_magnitudes_match_an_independent_recomputation(family, llama_dir, gpt2_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    path = llama_dir if family == "llama" else gpt2_dir
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    items = encode(
        tokenizer, probe_from_pairs([(r["prompt"], r["answer"]) for r in rows(WORDS_A + WORDS_B, n=7, seed=3)])
    )
    mags = unit_magnitudes(model, items, pad_id=tokenizer.pad_token_id, batch_size=3)  # padded
    if family == "llama":
        name, expected = "model.layers.1.self_attn.q_proj", numpy_llama_q(model, tokenizer, items, 1)
    else:
        name, expected = "transformer.h.1.attn.c_attn", numpy_gpt2_attn(model, items, 1)
    np.testing.assert_allclose(mags.sums[name].numpy(), expected, rtol=1e-5)
    assert mags.n_tokens == sum(len(e.prompt_ids) + len(e.completion_ids) for e in items)
    # one accumulator vector per linear layer, nothing else kept
    modules = linear_modules(model)
    assert set(mags.sums) == set(modules) and mags.skipped == ()
    for n, m in modules.items():
        units = m.weight.shape[1] if family == "gpt2" else m.out_features
        assert mags.sums[n].shape == (units,) and mags.sums[n].dtype == torch.float64


def count_hooks(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_hooks_are_removed_even_on_error(gpt2_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(gpt2_dir).eval()
    before = count_hooks(model)
    items = encode(tokenizer, probe_from_pairs([("who is alice", " paris")] * 5))
    unit_magnitudes(model, items, pad_id=0, batch_size=2)
    assert count_hooks(model) == before

    def boom(*_):
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        unit_magnitudes(model, items, pad_id=0, batch_size=2, progress=boom)
    assert count_hooks(model) == before
    names = set(linear_modules(model, include_head=True)) - set(linear_modules(model))
    assert names == {"lm_head"}  # the head only on request; GPT-2's Conv1D layers are linear
    assert {n.rsplit(".", 1)[-1] for n in linear_modules(model)} == {"c_attn", "c_proj", "c_fc"}


def test_overlap_moves_along_a_run(trainer_run, probes):
    a, b, _ = probes
    result = magnitude_overlap(trainer_run, [load_probe(a), load_probe(b)], runtime=Runtime(batch_size=8))
    assert [c.label for c in result.checkpoints] == ["checkpoint-5", "checkpoint-50", "checkpoint-100"]
    n_modules = len(result.checkpoints[0].modules)
    assert n_modules == 14  # 2 layers x q k v o gate up down
    assert len(result.records()) == 3 * n_modules * 2 and len(result.trend()) == 3 * 2
    data = json.loads(json.dumps(result.to_dict()))
    assert data["records"][0].keys() >= {"checkpoint", "module", "layer", "task_a", "task_b", "overlap", "chance"}
    sections = magnitudes_sections(result)
    assert [s.title for s in sections] == ["Top-unit overlap (MIGU)", "Overlap along the run"]
    assert magnitudes_table(result) is not None


def run_cli(*args):
    return runner.invoke(app, ["magnitudes", *map(str, args)])


def test_cli_json_html_and_untouched_inputs(planted, probes, tmp_path):
    a, b, _ = probes
    digests = [tree_digest(planted), tree_digest(a.parent)]
    out, page = tmp_path / "m.json", tmp_path / "m.html"
    result = run_cli(planted, "--probe", a, "--probe", b, "--json", out, "--html", page, "-q")
    assert result.exit_code == 0, result.stderr
    assert "A = task_a, B = task_b" in result.stdout and "A→B" in result.stdout
    data = assert_envelope(json.loads(out.read_text()), "magnitudes")
    q0 = [r for r in data["records"] if r["module"] == Q0]
    assert [(r["top_a"], r["shared"]) for r in q0] == [(10, 0), (10, 0)]
    text = page.read_text()
    assert "Top-unit overlap" in text and "<script src=" not in text and "Plotly.newPlot" in text
    assert [tree_digest(planted), tree_digest(a.parent)] == digests


def test_cli_bad_input(planted, probes, tmp_path):
    a, b, _ = probes
    assert_bad_input(run_cli(planted, "--probe", a), "needs at least 2 probes")
    empty = write_jsonl(tmp_path / "empty.jsonl", [{"prompt": "who is alice", "answer": ""}])
    assert_bad_input(run_cli(planted, "--probe", a, "--probe", empty), "empty 'answer'")
    assert_bad_input(run_cli(planted, "--probe", a, "--probe", b, "--quantile", "1.5"), "between 0 and 1")
    (tmp_path / "other").mkdir()
    same = write_jsonl(tmp_path / "other" / "task_a.jsonl", rows(WORDS_A))
    assert_bad_input(run_cli(planted, "--probe", a, "--probe", same), "both named 'task_a'")
    assert_bad_input(
        run_cli(planted, "--probe", a, "--probe", b, "--json", planted / "x.json"), "refusing to write inside"
    )


def test_one_probe_from_python_is_a_clear_error(planted, probes):
    with pytest.raises(ForgetdiagError, match="at least 2 probes"):
        magnitude_overlap(planted, [load_probe(probes[0])])
