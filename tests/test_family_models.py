"""Model analyses on the families of ``test_families``: ``landscape`` anchors exact on
mixture-of-experts models (experts written per expert, bound into transformers 5's fused 3-D
parameters) and on the multimodal wrappers, against a plain transformers forward pass of each
anchor; ``score``, ``features`` and ``recover`` on an MoE model; tied or not as transformers
decides; vocabularies grown before fine-tuning."""

from __future__ import annotations

import json
import re
import shutil
from types import SimpleNamespace

import pytest
import torch
from test_families import config
from typer.testing import CliRunner

from forgetdiag.analyses.angles import compute_angles
from forgetdiag.analyses.features import FeatureSettings, feature_shifts
from forgetdiag.analyses.landscape import LandscapeSettings, landscape
from forgetdiag.analyses.recovery import RecoverySettings, recover
from forgetdiag.checkpoints import find_checkpoints
from forgetdiag.cli import app
from forgetdiag.evaluate import score
from forgetdiag.models import load_model, tokenize_probe
from forgetdiag.probes import load_probe
from forgetdiag.runtime import Runtime

from helpers import assert_bad_input, build, llama_config, make_tokenizer, save, write_jsonl

runner = CliRunner()
NAMES = ["alice", "bob", "carol", "dave", "erin", "frank"]
CITIES = ["paris", "rome", "oslo", "lima", "cairo", "quito"]
ONE_POINT = LandscapeSettings(grid=(1, 1))


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    items = [{"prompt": f"what is the birth city of {a} answer :", "answer": f" {c}"} for a, c in zip(NAMES, CITIES)]
    return write_jsonl(tmp_path_factory.mktemp("probe") / "old.jsonl", items)


def perturbed(model, generator, scale=0.5):
    """Add scale * (each tensor's std) Gaussian noise to every parameter (3-D experts included)."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * (p.std() if p.numel() > 1 else 1.0) * torch.randn(p.shape, generator=generator))
    return model


def triple(root, cfg, tokenizer, **save_kwargs):
    """C0, C1, C2 of one model, each a noisy step from the one before (every tensor changes)."""
    model, generator, paths = build(cfg, seed=3), torch.Generator().manual_seed(0), []
    for k in range(3):
        step = perturbed(model, generator) if k else model
        paths.append(save(step, root / f"c{k}", tokenizer=tokenizer, **save_kwargs))
    return paths


def reference_model(path):
    """The checkpoint as a user loads it with transformers, wrappers whole (the reference)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    wrapped = getattr(AutoConfig.from_pretrained(path), "vision_config", None) is not None
    auto = AutoModelForImageTextToText if wrapped else AutoModelForCausalLM
    return auto.from_pretrained(path, dtype=torch.float32).eval()


def plain_loss(model, probe_path, tokenizer):
    """Mean completion-token (answer + EOS) cross-entropy by a plain forward pass."""
    total, count = 0.0, 0
    for row in map(json.loads, probe_path.read_text().splitlines()):
        prompt = tokenizer(row["prompt"])["input_ids"]
        answer = tokenizer(row["prompt"] + row["answer"])["input_ids"][len(prompt) :]
        ids = torch.tensor([prompt + answer + [tokenizer.eos_token_id]])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float()  # (answer + EOS, vocab)
        total += torch.nn.functional.cross_entropy(logits, ids[0, len(prompt) :], reduction="sum").item()
        count += len(answer) + 1
    return total / count


MODELS = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3", "llama4", "gemma3", "mistral3"]


@pytest.mark.parametrize("name", [*MODELS, "qwen2_vl", "qwen2_moe_fused"])
def test_landscape_anchors_are_exact(name, probe, tokenizer, tmp_path):
    """Each anchor's loss is the plain forward pass of that checkpoint; the anchors placed on the
    plane land on (1, 0) and (1, 1). qwen2_moe_fused: transformers 5's fused experts on disk."""
    fused = name.endswith("_fused")
    paths = triple(tmp_path, config(name.removesuffix("_fused")), tokenizer, save_original_format=not fused)
    result = landscape(*paths, [probe], trajectory=paths[1:], settings=ONE_POINT)
    for anchor, path in zip(result.anchors, paths):
        assert anchor.losses["old"] == pytest.approx(plain_loss(reference_model(path), probe, tokenizer), abs=1e-4)
    assert [(round(t.alpha, 5), round(t.beta, 5)) for t in result.trajectory] == [(1, 0), (1, 1)]
    if name in ("mixtral", "qwen2_moe", "olmoe"):  # written per expert, loaded fused
        assert any("blocks of fused expert parameters" in w for w in result.warnings), result.warnings
    if name in ("gemma3", "mistral3", "llama4", "qwen2_vl"):
        assert any("non-text towers" in w for w in result.warnings), result.warnings


@pytest.mark.parametrize("name", ["qwen2_moe", "mixtral"])
def test_score_on_moe_is_a_plain_forward_pass(name, probe, tokenizer, tmp_path):
    path = save(build(config(name), seed=1), tmp_path / name, tokenizer=tokenizer)
    (ckpt,) = find_checkpoints(path)
    encoded, stops = tokenize_probe(tokenizer, load_probe(probe), ckpt, Runtime())
    scores = score(load_model(ckpt), encoded, pad_id=tokenizer.pad_token_id, batch_size=4, stops=stops.accepted)
    assert scores.answer_loss == pytest.approx(plain_loss(reference_model(path), probe, tokenizer), rel=1e-5)


def test_features_and_recover_run_on_moe(probe, tokenizer, tmp_path):
    before, after, _ = triple(tmp_path, config("qwen2_moe"), tokenizer)
    shifts = feature_shifts([before, after], load_probe(probe), settings=FeatureSettings(k=2))
    assert shifts.n_layers == 2 and len(shifts.pairs) == 1
    result = recover(before, after, load_probe(probe), settings=RecoverySettings(lr=5e-4, min_steps=2, seeds=1))
    assert result.to_dict()["analysis"] == "recover"


# --- tied or not, as transformers decides ------------------------------------------------------


def _drop_key(path, key):
    cfg = json.loads((path / "config.json").read_text())
    cfg.pop(key, None)
    (path / "config.json").write_text(json.dumps(cfg))


def test_untied_head_without_the_config_key_is_compared(tmp_path):
    """Llama's class default is untied (transformers 5): with the key absent, lm_head is a
    weight of its own, as transformers loads it; Gemma's default is tied."""
    from transformers import AutoConfig

    model, generator, paths = build(llama_config(tied=False)), torch.Generator().manual_seed(0), []
    for k in range(3):
        paths.append(save(perturbed(model, generator, 0.1) if k else model, tmp_path / f"c{k}"))
        _drop_key(paths[-1], "tie_word_embeddings")
    (ckpt,) = find_checkpoints(paths[0])
    assert ckpt.tied_embeddings is AutoConfig.from_pretrained(paths[0]).tie_word_embeddings is False
    records = compute_angles(paths).records
    assert {r.component for r in records} >= {"embed", "lm_head"}


def test_stored_head_that_differs_is_never_called_tied(tmp_path):
    path = save(build(llama_config(tied=False)), tmp_path / "m")
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": True}))
    (ckpt,) = find_checkpoints(path)
    assert not ckpt.tied_embeddings
    same = save(build(llama_config(tied=True)), tmp_path / "tied")
    assert find_checkpoints(same)[0].tied_embeddings


# --- vocabularies grown before fine-tuning -------------------------------------------------------

NEW_TOKENS = ["<tool>", "</tool>"]


@pytest.fixture(scope="module")
def grown(tmp_path_factory, tokenizer):
    """before (vocabulary of the tokenizer), after and after2: two tool tokens added, the
    embeddings resized (tied), then trained; and a model with a tokenizer of other words."""
    root = tmp_path_factory.mktemp("grown")
    model = build(llama_config(vocab=len(tokenizer)), seed=5)
    before = save(model, root / "before", tokenizer=tokenizer)
    big = make_tokenizer()
    big.add_tokens(NEW_TOKENS)
    model.resize_token_embeddings(len(big), mean_resizing=False)
    generator = torch.Generator().manual_seed(1)
    after = save(perturbed(model, generator, 0.3), root / "after", tokenizer=big)
    after2 = save(perturbed(model, generator, 0.3), root / "after2", tokenizer=big)
    other = make_tokenizer(words=[w[::-1] for w in NAMES + CITIES + ["what", "is", "the"]])
    stranger = save(build(llama_config(vocab=len(tokenizer)), seed=6), root / "stranger", tokenizer=other)
    return {"before": before, "after": after, "after2": after2, "stranger": stranger, "big": big}


def test_features_use_the_larger_tokenizer_with_a_note(grown, probe):
    notes = []
    settings = FeatureSettings(k=2)
    result = feature_shifts([grown["before"], grown["after"]], load_probe(probe), settings=settings, warn=notes.append)
    assert result.pairs and any("extends" in n for n in notes), notes


def test_angles_compare_the_old_rows(grown, tokenizer):
    from safetensors.torch import load_file

    result = compute_angles([grown["before"], grown["after"], grown["after2"]])
    (embed,) = [r for r in result.records if r.component == "embed"]
    name = "model.embed_tokens.weight"
    before, after = (load_file(str(grown[k] / "model.safetensors"))[name] for k in ("before", "after"))
    assert embed.norm_a == pytest.approx(float((after[: len(tokenizer)] - before).norm()), rel=1e-5)
    assert any(f"the first {len(tokenizer)} rows are compared" in w for w in result.warnings), result.warnings


def test_landscape_runs_on_the_common_rows(grown, probe, tokenizer):
    """Every anchor is its checkpoint on the common rows with the two new rows held at after2's
    values (the model is loaded from the last anchor with the most rows): its loss is that
    model's plain forward pass, built here by hand."""
    from transformers import AutoModelForCausalLM

    paths = [grown["before"], grown["after"], grown["after2"]]
    result = landscape(*paths, [probe], settings=ONE_POINT)
    assert any("vocabulary grew" in w for w in result.warnings), result.warnings
    last = AutoModelForCausalLM.from_pretrained(grown["after2"], dtype=torch.float32).get_input_embeddings().weight
    old = len(tokenizer)
    for anchor, path in zip(result.anchors, paths):
        reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        reference.resize_token_embeddings(len(grown["big"]), mean_resizing=False)
        with torch.no_grad():
            reference.get_input_embeddings().weight[old:] = last[old:]  # tied: lm_head too
        assert anchor.losses["old"] == pytest.approx(plain_loss(reference, probe, tokenizer), abs=1e-4)
    assert result.anchors[0].losses["old"] != pytest.approx(
        plain_loss(reference_model(grown["before"]), probe, tokenizer), abs=1e-4
    )  # the new rows matter (their logits enter the softmax): the reference is not before itself


def test_a_different_tokenizer_exits_2_naming_the_option(grown, probe):
    result = runner.invoke(
        app, ["features", str(grown["before"]), str(grown["stranger"]), "--probe", str(probe), "--k", "2"]
    )
    assert_bad_input(result, "--tokenizer")


# --- advise's freeze and evidence on MoE layers; duplicates ----------------------------------------


@pytest.mark.parametrize("name", ["qwen2_moe", "mixtral", "gemma3"])
def test_freeze_code_freezes_whole_moe_layers_and_leaves_towers_alone(name, tmp_path):
    """The printed loop, run on the model, freezes exactly the embedding and every parameter of
    text layer 0 (router, shared expert, fused 3-D experts), never the vision tower's layer 0."""
    from forgetdiag.analyses.freeze_code import code_snippets

    model = build(config(name))
    (ckpt,) = find_checkpoints(save(model, tmp_path / name))
    namespace = {"model": model}
    exec(code_snippets(ckpt, 1, True)["torch"], namespace)
    embedding = model.get_input_embeddings().weight
    for param_name, param in model.named_parameters():
        in_layer_0 = re.search(r"(^model\.|language_model\.)layers\.0\.", param_name) is not None
        assert param.requires_grad == (not in_layer_0 and param is not embedding), param_name


def test_advise_counts_a_components_experts_once():
    """Layer evidence is the mean over the layer's matrices with the routed experts of a
    component counted once, by their median: (10 + median(20, 30, 40, 80, 90)) / 2 = 25."""
    from forgetdiag.analyses.advise import angle_evidence

    def record(component, angle, expert=None):
        return SimpleNamespace(
            status="ok",
            angle_deg=angle,
            baseline_deg=60.0,
            layer=0,
            component=component,
            expert=expert,
            param=component,
        )

    records = [record("q", 10.0), *(record("up", a, e) for e, a in enumerate([20.0, 30.0, 40.0, 80.0, 90.0]))]
    assert angle_evidence(records)[0] == (pytest.approx(25.0), pytest.approx(60.0))


def test_identical_checkpoints_are_reported_as_duplicates(tmp_path):
    model, generator = build(llama_config()), torch.Generator().manual_seed(0)
    c0 = save(model, tmp_path / "c0")
    c1 = save(perturbed(model, generator, 0.1), tmp_path / "c1")
    c2 = shutil.copytree(c1, tmp_path / "c2")
    result = runner.invoke(app, ["inspect", str(c0), str(c1), str(c2), "--json", "-"])
    assert result.exit_code == 0, result.stderr
    info = json.loads(result.stdout)["checkpoints"]
    assert info[0]["duplicate_of"] is None and info[1]["duplicate_of"] is None
    assert info[2]["duplicate_of"] == info[1]["label"]
    angles = compute_angles([c0, c1, c2])
    assert any("identical bytes" in w for w in angles.warnings)
    assert all(r.status == "no_update_b" for r in angles.records)  # the zero update, as said


def test_magnitudes_leave_experts_and_routers_out_with_a_note(probe, tokenizer, tmp_path):
    from forgetdiag.analyses.magnitudes import magnitude_overlap

    path = save(build(config("qwen2_moe"), seed=2), tmp_path / "moe", tokenizer=tokenizer)
    rows = probe.read_text().splitlines()
    halves = [write_jsonl(tmp_path / f"t{k}.jsonl", [json.loads(r) for r in rows[k::2]]) for k in range(2)]
    result = magnitude_overlap(path, [load_probe(h) for h in halves])
    measured = {(m.layer, m.component, m.units) for m in result.checkpoints[0].modules}
    assert measured == {(layer, c, u) for layer in (0, 1) for c, u in (("q", 32), ("k", 16), ("v", 16), ("o", 32))}
    assert any("routed experts (4 per layer in 2 layers) and their routers" in w for w in result.warnings)
