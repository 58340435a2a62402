"""forgetdiag advise: the revert test on planted runs, the decision rule, the code it prints."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from typer.testing import CliRunner

from forgetdiag.analyses.advise import AdviceSettings, advise, decide_freeze
from forgetdiag.analyses.revert import revert_series, untie_head
from forgetdiag.checkpoints import find_checkpoints
from forgetdiag.cli import app
from forgetdiag.evaluate import encode, score
from forgetdiag.models import load_model
from forgetdiag.probes import ProbeItem, load_probe
from forgetdiag.runfile import load_run
from forgetdiag.training import freeze_bottom

from helpers import (
    TEST_SEED,
    assert_bad_input,
    assert_envelope,
    build,
    llama_config,
    make_tokenizer,
    save,
    teach,
    tree_digest,
    write_jsonl,
)

pytestmark = pytest.mark.planted  # outcomes of planted training runs (see helpers.teach)

NAMES = [f"n{k}" for k in range(48)]
CITIES = [f"c{k}" for k in range(6)]
ITEMS = [
    ProbeItem(f"what is the birth city of {n} answer :", f" {CITIES[(5 * k) % 6]}", n) for k, n in enumerate(NAMES)
]
runner = CliRunner()


def _noisy(model, layers: tuple[int, ...], scale: float = 3.0):
    """Add heavy noise to every matrix of some decoder layers (the planted forgetting)."""
    generator = torch.Generator().manual_seed(sum(layers))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(f".layers.{k}." in name for k in layers) and p.ndim == 2:
                p.add_(scale * p.std() * torch.randn(p.shape, generator=generator))
    return model


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A 4-layer model that knows ITEMS, and after-checkpoints damaged at the bottom (layer 0)
    and at the top (layers 2 and 3)."""
    root = tmp_path_factory.mktemp("advise")
    tok = make_tokenizer(None, NAMES + CITIES + ["what", "is", "the", "birth", "city", "of", "answer", ":"])
    model = build(llama_config(layers=4, vocab=tok.vocab_size, hidden=48, inter=96), seed=TEST_SEED)
    teach(model, tok, ITEMS)
    save(model, root / "before", tokenizer=tok)
    for name, layers, scale in (("after0", (0,), 3.0), ("after23", (2, 3), 30.0)):
        damaged = _noisy(load_model(find_checkpoints(root / "before")[0]), layers, scale)
        save(damaged, root / name, tokenizer=tok)
    save(load_model(find_checkpoints(root / "before")[0]), root / "same", tokenizer=tok)
    write_jsonl(root / "old.jsonl", [{"prompt": i.prompt, "answer": i.answer, "group": i.group} for i in ITEMS])
    for name, after in (("bottom", "after0"), ("top", "after23"), ("none", "same")):
        (root / name).mkdir()
        (root / name / "forgetdiag.toml").write_text(
            f'name = "{name}"\n[checkpoints]\nbefore = "../before"\nafter = "../{after}"\n'
            '[probes]\nold = "../old.jsonl"\n'
        )
    return root, tok


def _advice(root, name, **settings):
    spec = load_run(root / name)
    return advise(spec, load_probe(spec.probes["old"]), settings=AdviceSettings(**settings))


def test_planted_bottom_damage_is_advised_and_reverting_it_restores_everything(planted):
    root, _ = planted
    advice = _advice(root, "bottom")
    assert advice.accuracy_before == 1.0 and advice.accuracy_after < 0.5
    rows = {e.layer: e for e in advice.evidence}
    # reverting the embedding alone changes nothing (it was not touched); with layer 0 the
    # model is the before model again: exactly its accuracy, the whole loss restored
    assert rows[-1].reverted_accuracy == pytest.approx(advice.accuracy_after)
    assert rows[0].reverted_accuracy == 1.0 and rows[0].restored == 1.0
    assert advice.freeze_layers == 1 and advice.freeze_embedding
    assert [e.frozen for e in advice.evidence] == [True, True, False, False, False]
    assert advice.frozen_params == sum(
        p.numel()
        for n, p in load_model(find_checkpoints(root / "before")[0]).named_parameters()
        if "embed_tokens" in n or ".layers.0." in n
    )
    # context evidence is there: angles need a triple (none here: noted), features per layer
    assert any("angles skipped" in n for n in advice.warnings)
    assert all(e.cka is not None for e in advice.evidence if e.layer >= 0)
    assert advice.shift_start == 1  # the hidden states first move after layer 0


def test_damage_above_the_bottom_gets_no_advice(planted):
    root, _ = planted
    advice = _advice(root, "top", skip=("features",))
    assert not advice.advised and "not held by the bottom layers" in advice.reason
    assert advice.accuracy_after < 0.5
    assert [e.restored for e in advice.evidence[:3]] == [0.0, 0.0, 0.0]  # layers 0, 1 untouched
    assert advice.evidence[3].reverted_accuracy is None  # beyond max_share: not tested


def test_nothing_forgotten_gets_no_advice(planted):
    root, _ = planted
    advice = _advice(root, "none", skip=("features",))
    assert not advice.advised and "did not drop beyond noise" in advice.reason
    assert advice.accuracy_before == advice.accuracy_after == 1.0


def test_revert_series_equals_a_hand_assembled_model(planted):
    """Depth d of the series = the after model with embedding + layers < d from before."""
    root, tok = planted
    before, after = find_checkpoints(root / "before")[0], find_checkpoints(root / "after0")[0]
    encoded = encode(tok, ITEMS)
    b, a, series = revert_series(before, after, encoded, pad_id=0, depths=2)
    sb, sa = load_model(before).state_dict(), load_model(after).state_dict()
    for depth, got in enumerate(series):
        mixed = {
            k: (sb[k] if "embed_tokens" in k or any(f".layers.{i}." in k for i in range(depth)) else sa[k]) for k in sa
        }
        model = load_model(after)
        untie_head(model)  # advise reverts the input embedding only (the head keeps after's)
        model.load_state_dict(mixed)
        want = score(model, encoded, pad_id=0)
        assert got.exact_match == want.exact_match
        assert got.answer_loss == pytest.approx(want.answer_loss, rel=1e-6)
    assert a.exact_match == series[0].exact_match and b.exact_match == series[1].exact_match == 1.0


@pytest.mark.parametrize(
    "reverted, restore_min, want",
    [
        ([0.25, 0.70, 0.85], 0.5, 1),  # (0.70 - 0.20) / 0.70 = 0.71
        ([0.25, 0.70, 0.85], 0.8, 2),  # 0.93
        ([0.25, 0.70, 0.85], 0.95, None),
        ([0.60, 0.70, 0.85], 0.5, 0),  # the embedding alone: 0.57
    ],
)
def test_decide_freeze_by_hand(reverted, restore_min, want):
    depth, reason = decide_freeze(
        before=0.9,
        after=0.2,
        reverted=reverted,
        n_eval=1000,
        n_layers=4,
        settings=AdviceSettings(restore_min=restore_min),
    )
    assert depth == want, reason


def test_decide_freeze_respects_max_share():
    depth, reason = decide_freeze(
        before=0.9,
        after=0.2,
        reverted=[0.2, 0.2, 0.2, 0.9],
        n_eval=1000,
        n_layers=4,
        settings=AdviceSettings(max_share=0.5),
    )
    assert depth is None and "up to 2 layers" in reason


def test_printed_code_freezes_exactly_what_freeze_bottom_does(llama12_dir):
    """The snippet is executed on a 12-layer model: layer 1 frozen, layers 10 and 11 not."""
    (checkpoint,) = find_checkpoints(llama12_dir)
    from forgetdiag.analyses.freeze_code import code_snippets

    code = code_snippets(checkpoint, 2, True)
    namespace = {"model": load_model(checkpoint)}
    exec(code["torch"], namespace)
    frozen = sorted(n for n, p in namespace["model"].named_parameters() if not p.requires_grad)
    reference = load_model(checkpoint)
    assert frozen == sorted(freeze_bottom(reference, 2))
    assert any(".layers.1." in n for n in frozen) and not any(".layers.10." in n for n in frozen)
    assert "model.embed_tokens.weight" in frozen and "model.layers.0.*" in code["torch"]


def test_printed_peft_config_leaves_the_bottom_layers_out(llama12_dir):
    pytest.importorskip("peft")
    (checkpoint,) = find_checkpoints(llama12_dir)
    from forgetdiag.analyses.freeze_code import code_snippets

    namespace = {"model": load_model(checkpoint)}
    exec(code_snippets(checkpoint, 3, True)["peft"], namespace)
    adapted = {n.split(".layers.")[1].split(".")[0] for n, _ in namespace["model"].named_parameters() if "lora_A" in n}
    assert adapted == {str(k) for k in range(3, 12)}


def test_printed_trainer_recipe_freezes_the_advised_parameters_and_trains_only_the_rest(llama12_dir, tmp_path):
    """The Trainer snippet is executed as printed: one real Trainer step on a 12-layer model."""
    from transformers import TrainingArguments

    from forgetdiag.analyses.freeze_code import code_snippets

    (checkpoint,) = find_checkpoints(llama12_dir)
    model = load_model(checkpoint).train()
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.randint(4, 64, (4, 8), generator=torch.Generator().manual_seed(0))  # (batch, seq)
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=1,
        learning_rate=1e-2,
        per_device_train_batch_size=4,
        report_to="none",
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        use_cpu=True,
    )
    namespace = {
        "model": model,
        "training_args": args,
        "train_dataset": [{"input_ids": row, "labels": row} for row in ids],
    }
    exec(code_snippets(checkpoint, 2, True)["trainer"], namespace)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == set(freeze_bottom(load_model(checkpoint), 2))
    assert "model.layers.1.mlp.up_proj.weight" in frozen and "model.embed_tokens.weight" in frozen
    assert not any(".layers.10." in n for n in frozen)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    optimized = [p for group in namespace["trainer"].optimizer.param_groups for p in group["params"]]
    assert sorted(map(id, optimized)) == sorted(map(id, trainable.values()))
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), start[n])}
    assert changed == set(trainable)  # the step moved every trainable tensor and no frozen one


ORTHOGONAL = {"embed": ("embed_tokens",), 0: (), 1: ("proj",), 2: ("q_proj", "down_proj")}


def _unit(n: int, generator, against=None):
    v = torch.randn(n, generator=generator, dtype=torch.float64)
    if against is not None:
        v -= (v @ against) * against
    return v / v.norm()


@pytest.fixture(scope="module")
def landscape_run(planted, tmp_path_factory):
    """Origin = the planted before model; x = origin + a rank-one update a b^T of every matrix of
    the embedding and layers 0-2; y = x + a late rank-one update, along a b^T (0 deg) or along
    c d^T with c _|_ a and d _|_ b (90 deg on either side) where ORTHOGONAL says. Layer 3 does
    not move."""
    root, tok = planted
    out = tmp_path_factory.mktemp("advise_angles")
    generator = torch.Generator().manual_seed(7)
    x, y = (load_model(find_checkpoints(root / "before")[0]) for _ in range(2))
    with torch.no_grad():
        for (name, px), py in zip(x.named_parameters(), y.parameters()):
            layer = (
                "embed"
                if "embed_tokens" in name
                else (int(name.split(".layers.")[1].split(".")[0]) if ".layers." in name else None)
            )
            if px.ndim != 2 or layer not in ORTHOGONAL:
                continue
            a, b = _unit(px.shape[0], generator), _unit(px.shape[1], generator)
            early = torch.outer(a, b)  # (out, in), rank one
            late = (
                torch.outer(_unit(px.shape[0], generator, a), _unit(px.shape[1], generator, b))
                if any(k in name for k in ORTHOGONAL[layer])
                else 0.5 * early
            )
            px.add_(early.float())
            py.add_((early + late).float())
    save(x, out / "x", tokenizer=tok)
    save(y, out / "y", tokenizer=tok)
    (out / "forgetdiag.toml").write_text(
        f'name = "angles"\n[checkpoints]\nbefore = "{root / "before"}"\nafter = "{out / "x"}"\n'
        f'landscape = ["{root / "before"}", "{out / "x"}", "{out / "y"}"]\n'
        f'[probes]\nold = "{root / "old.jsonl"}"\n'
    )
    return out, x


def test_angle_evidence_per_layer_matches_a_planted_update_of_known_angle(landscape_run):
    """Per layer: the mean over its matrices of 0 (late update along the early one) and 90 deg
    (orthogonal), the chance angle of a rank-one subspace in R^48, and their ratio."""
    import numpy as np

    out, model = landscape_run
    advice = _advice(out.parent, out.name, skip=("features",))
    assert not any("angles skipped" in n for n in advice.warnings)
    # chance: E[arccos |<u, a>|] for a uniform unit u in R^d, density ~ sin^(d-2) (independent
    # of forgetdiag.linalg)
    d = model.config.hidden_size
    theta = np.linspace(0.0, np.pi / 2, 200_001)
    weight = np.sin(theta) ** (d - 2)
    chance = float(np.degrees(np.trapezoid(theta * weight, theta) / np.trapezoid(weight, theta)))
    rows = {e.layer: e for e in advice.evidence}
    for layer, key in ((-1, "embed"), (0, 0), (1, 1), (2, 2)):
        names = [
            n
            for n, p in model.named_parameters()
            if p.ndim == 2 and ("embed_tokens" in n if key == "embed" else f".layers.{key}." in n)
        ]
        want = 90.0 * sum(any(k in n for k in ORTHOGONAL[key]) for n in names) / len(names)
        row = rows[layer]
        assert row.angle_deg == pytest.approx(want, abs=1e-3), layer
        assert row.baseline_deg == pytest.approx(chance, rel=1e-6), layer
        assert row.departure == pytest.approx(want / chance, abs=1e-5), layer
    assert rows[2].angle_deg == pytest.approx(90.0 * 2 / 7, abs=1e-3)  # q_proj, down_proj of 7
    assert rows[3].angle_deg is rows[3].baseline_deg is rows[3].departure is None  # no update


def test_cli_advise_json_html_and_untouched_inputs(planted, tmp_path):
    root, _ = planted
    digest = tree_digest(root)
    result = runner.invoke(
        app,
        [
            "advise",
            str(root / "bottom"),
            "--json",
            str(tmp_path / "a.json"),
            "--html",
            str(tmp_path / "a.html"),
            "--skip",
            "features",
            "--quiet",
        ],
    )
    assert result.exit_code == 0, (result.stdout, result.stderr)
    data = assert_envelope(json.loads((tmp_path / "a.json").read_text()), "advise")
    assert data["advised"] and data["freeze_layers"] == 1
    assert data["evidence"][1]["reverted_accuracy"] == 1.0
    assert "requires_grad_(False)" in data["code"]["torch"]
    assert "Freeze the input embedding and the bottom 1 of 4 layers" in " ".join(result.stdout.split())
    # the measured alternatives come next to the freeze advice, with where they were measured
    assert "docs/remedy.md" in "".join(result.stdout.split())
    page = (tmp_path / "a.html").read_text()
    assert "Evidence per depth" in page and "plotly" in page and "requires_grad_(False)" in page
    assert "docs/remedy.md" in page
    assert tree_digest(root) == digest


def test_cli_advise_bad_input(planted, tmp_path):
    root, _ = planted
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "forgetdiag.toml").write_text(
        f'name = "x"\n[checkpoints]\nbefore = "{root / "before"}"\nafter = "{root / "after0"}"\n'
    )
    run = lambda *a: runner.invoke(app, ["advise", *map(str, a)])
    assert_bad_input(run(tmp_path / "run"), "no old-task probe")
    assert_bad_input(run(root / "bottom", "--restore-min", "1.5"), "--restore-min")
    assert_bad_input(run(root / "bottom", "--skip", "landscape"), "--skip landscape")
    assert_bad_input(run(tmp_path / "nothing"), "no run description")
    assert_bad_input(run(root / "bottom", "--json", root / "before" / "a.json"), "before")


def test_samples_config_rejects_a_freeze_deeper_than_the_model():
    from forgetdiag.errors import ForgetdiagError
    from forgetdiag.samples.build import SampleConfig

    with pytest.raises(ForgetdiagError, match="--freeze 5: expected 0 to 4"):
        SampleConfig(freeze_layers=5)
    assert replace(SampleConfig(), freeze_layers=4).freeze_layers == 4


@pytest.mark.slow
def test_advice_on_the_shipped_samples():
    """Spurious run: the embedding and layer 0 (the depth whose retraining keeps task 0 in
    bench/freeze_experiment.py); real run: no advice."""
    from pathlib import Path

    samples = Path(__file__).resolve().parents[1] / "sample_checkpoints"
    spurious = _advice(samples, "spurious", skip=("angles", "features"))
    assert spurious.freeze_layers == 1 and spurious.freeze_embedding
    rows = {e.layer: e for e in spurious.evidence}
    assert rows[0].restored >= 0.5 > rows[-1].restored
    real = _advice(samples, "real", skip=("angles", "features"))
    assert not real.advised and "not held by the bottom layers" in real.reason


@pytest.mark.planted
def test_tied_revert_moves_the_input_embedding_only(tmp_path):
    """With tied embeddings, depth d reverts the input embedding and layers < d, bit for bit,
    while the output head keeps the after weights (it is no longer the same tensor)."""
    tok = make_tokenizer(None, NAMES[:8] + CITIES)
    model = build(llama_config(layers=3, vocab=tok.vocab_size, hidden=32, inter=64), seed=TEST_SEED)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    save(model, tmp_path / "before", tokenizer=tok)
    before_state = {k: v.clone() for k, v in model.state_dict().items()}
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=generator))
    save(model, tmp_path / "after", tokenizer=tok)
    after_state = {k: v.clone() for k, v in model.state_dict().items()}
    before, after = find_checkpoints(tmp_path / "before")[0], find_checkpoints(tmp_path / "after")[0]
    seen = {}

    def observe(depth, m):
        seen[depth] = {k: v.detach().clone() for k, v in m.state_dict().items()}
        seen[depth]["head"] = m.get_output_embeddings().weight.detach().clone()

    revert_series(before, after, encode(tok, ITEMS[:8]), pad_id=0, depths=2, observe=observe)
    embed = "model.embed_tokens.weight"
    for depth, state in seen.items():
        assert torch.equal(state[embed], before_state[embed])
        assert torch.equal(state["head"], after_state[embed])  # the head did not move
        for name, value in state.items():
            if ".layers." in name:
                layer = int(name.split(".layers.")[1].split(".")[0])
                want = before_state[name] if layer < depth else after_state[name]
                assert torch.equal(value, want), (depth, name)
