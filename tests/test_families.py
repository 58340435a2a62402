"""Model families as transformers writes them: mixture-of-experts (Mixtral, Qwen2/3-MoE, OLMoE,
DeepSeek-V2/V3, Llama 4), multimodal wrappers (Gemma 3, Mistral 3, Qwen2-VL, Qwen2.5-VL), Falcon's
and Bloom's fused q/k/v, StableLM, OPT and GPT-J. Each gets planted updates of known angle (in one
expert, one router, one fused q/k/v part) that ``angles`` must find within 0.5 degrees."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from forgetdiag.analyses.angles import compute_angles
from forgetdiag.architectures import family_for, parse_name
from forgetdiag.checkpoints import find_checkpoints
from forgetdiag.cli import app
from forgetdiag.nulls import baseline_direction_angle
from forgetdiag.parts import matrix_parts

from helpers import HIDDEN, HIGH, LOW, assert_bad_input, build, planted_run, planted_updates, save

runner = CliRunner()
TEXT = dict(
    hidden_size=HIDDEN,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=64,
    max_position_embeddings=64,
)
MOE = dict(num_experts_per_tok=2)
DEEPSEEK = dict(
    TEXT,
    num_key_value_heads=4,
    n_routed_experts=4,
    moe_intermediate_size=16,
    n_shared_experts=1,
    first_k_dense_replace=1,
    kv_lora_rank=16,
    qk_rope_head_dim=4,
    qk_nope_head_dim=4,
    v_head_dim=8,
    n_group=1,
    topk_group=1,
    **MOE,
)
VISION = dict(
    hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14
)
MROPE = {"rope_scaling": {"type": "mrope", "mrope_section": [1, 1, 2]}, "head_dim": 8}


def config(name):
    import transformers as t

    configs = {
        "mixtral": lambda: t.MixtralConfig(**TEXT, num_local_experts=4, **MOE),
        "qwen2_moe": lambda: t.Qwen2MoeConfig(
            **TEXT, num_experts=4, moe_intermediate_size=16, shared_expert_intermediate_size=48, **MOE
        ),
        "qwen3_moe": lambda: t.Qwen3MoeConfig(**TEXT, num_experts=4, moe_intermediate_size=16, **MOE),
        "olmoe": lambda: t.OlmoeConfig(**TEXT, num_experts=4, **MOE),
        "deepseek_v2": lambda: t.DeepseekV2Config(**DEEPSEEK, q_lora_rank=None),
        "deepseek_v3": lambda: t.DeepseekV3Config(**DEEPSEEK, q_lora_rank=16),
        "llama4": lambda: t.Llama4Config(
            text_config=dict(TEXT, head_dim=8, intermediate_size_mlp=64, num_local_experts=4, num_experts_per_tok=1),
            vision_config=dict(VISION, vision_output_dim=32, projector_input_dim=32, projector_output_dim=32),
            image_token_index=63,
        ),
        "gemma3": lambda: t.Gemma3Config(
            text_config=dict(TEXT, model_type="gemma3_text", head_dim=8),
            vision_config=dict(VISION, model_type="siglip_vision_model"),
            mm_tokens_per_image=4,
            image_token_index=63,
            boi_token_index=61,
            eoi_token_index=62,
        ),
        "mistral3": lambda: t.Mistral3Config(
            text_config=dict(TEXT, model_type="mistral", head_dim=8),
            vision_config=dict(VISION, model_type="pixtral", head_dim=8),
            image_token_index=63,
            spatial_merge_size=1,
        ),
        "qwen2_vl": lambda: t.Qwen2VLConfig(
            text_config=dict(TEXT, **MROPE),
            vision_config=dict(depth=1, embed_dim=16, hidden_size=HIDDEN, num_heads=2, mlp_ratio=2, patch_size=14),
            image_token_id=63,
            video_token_id=62,
            vision_start_token_id=61,
        ),
        "qwen2_5_vl": lambda: t.Qwen2_5_VLConfig(
            text_config=dict(TEXT, **MROPE),
            vision_config=dict(
                depth=1, hidden_size=16, out_hidden_size=HIDDEN, intermediate_size=32, num_heads=2, patch_size=14
            ),
            image_token_id=63,
            video_token_id=62,
            vision_start_token_id=61,
        ),
        "falcon_new": lambda: t.FalconConfig(
            hidden_size=HIDDEN,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_kv_heads=2,
            new_decoder_architecture=True,
            vocab_size=64,
        ),
        "falcon_mq": lambda: t.FalconConfig(
            hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4, multi_query=True, vocab_size=64
        ),
        "falcon_mha": lambda: t.FalconConfig(
            hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4, multi_query=False, vocab_size=64
        ),
        "bloom": lambda: t.BloomConfig(hidden_size=HIDDEN, n_layer=2, n_head=4, vocab_size=64),
        "stablelm": lambda: t.StableLmConfig(**TEXT),
        "opt": lambda: t.OPTConfig(
            hidden_size=HIDDEN,
            ffn_dim=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            vocab_size=64,
            word_embed_proj_dim=HIDDEN,
            max_position_embeddings=64,
        ),
        "gptj": lambda: t.GPTJConfig(n_embd=HIDDEN, n_layer=2, n_head=4, vocab_size=64, rotary_dim=4, n_positions=64),
    }
    return configs[name]()


# A plant: (model parameter, block of it, planted angles, n (the block's other side), seed,
# whether the block is stored (out=n, in=hidden) and takes the transposed update), and the key
# of the record that must find it: (stored tensor, part, expert).
L0, L1 = "model.layers.0", "model.layers.1"
ML0, ML1 = "model.language_model.layers.0", "model.language_model.layers.1"
ROUTER = (f"{L1}.mlp.gate.weight", (), HIGH, 4, 2, True)
PLANTS = {
    "mixtral": [
        (
            (f"{L0}.mlp.experts.gate_up_proj", (2, slice(0, 64)), LOW, 64, 1, True),
            (f"{L0}.block_sparse_moe.experts.2.w1.weight", None, 2),
        ),
        (ROUTER, (f"{L1}.block_sparse_moe.gate.weight", None, None)),
    ],
    "qwen2_moe": [
        (
            (f"{L0}.mlp.experts.gate_up_proj", (1, slice(16, 32)), LOW, 16, 1, True),
            (f"{L0}.mlp.experts.1.up_proj.weight", None, 1),
        ),
        (ROUTER, (f"{L1}.mlp.gate.weight", None, None)),
        (
            (f"{L1}.mlp.shared_expert.down_proj.weight", (), HIGH, 48, 3, False),
            (f"{L1}.mlp.shared_expert.down_proj.weight", None, None),
        ),
    ],
    "qwen3_moe": [
        ((f"{L0}.mlp.experts.down_proj", (3,), LOW, 16, 1, False), (f"{L0}.mlp.experts.3.down_proj.weight", None, 3)),
        (ROUTER, (f"{L1}.mlp.gate.weight", None, None)),
    ],
    "olmoe": [
        (
            (f"{L0}.mlp.experts.gate_up_proj", (0, slice(0, 64)), LOW, 64, 1, True),
            (f"{L0}.mlp.experts.0.gate_proj.weight", None, 0),
        ),
        (ROUTER, (f"{L1}.mlp.gate.weight", None, None)),
    ],
    "deepseek_v2": [
        (
            (f"{L1}.mlp.experts.gate_up_proj", (2, slice(0, 16)), LOW, 16, 1, True),
            (f"{L1}.mlp.experts.2.gate_proj.weight", None, 2),
        ),
        (ROUTER, (f"{L1}.mlp.gate.weight", None, None)),
    ],
    "deepseek_v3": [
        ((f"{L1}.mlp.experts.down_proj", (1,), LOW, 16, 1, False), (f"{L1}.mlp.experts.1.down_proj.weight", None, 1)),
        (ROUTER, (f"{L1}.mlp.gate.weight", None, None)),
    ],
    "llama4": [  # fused experts stored (experts, hidden, gate|up): expert 1's gate columns
        (
            (
                "language_model.model.layers.0.feed_forward.experts.gate_up_proj",
                (1, slice(None), slice(0, 64)),
                LOW,
                64,
                1,
                False,
            ),
            ("language_model.model.layers.0.feed_forward.experts.gate_up_proj", "gate", 1),
        ),
        (
            ("language_model.model.layers.1.feed_forward.router.weight", (), HIGH, 4, 2, True),
            ("language_model.model.layers.1.feed_forward.router.weight", None, None),
        ),
    ],
    **{
        name: [
            (
                (f"{ML0}.self_attn.q_proj.weight", (), LOW, 32, 1, True),
                (f"{prefix}layers.0.self_attn.q_proj.weight", None, None),
            ),
            (
                (f"{ML1}.mlp.down_proj.weight", (), HIGH, 64, 2, False),
                (f"{prefix}layers.1.mlp.down_proj.weight", None, None),
            ),
        ]
        for name, prefix in (
            ("gemma3", "language_model.model."),
            ("mistral3", "language_model.model."),
            ("qwen2_vl", "model."),
            ("qwen2_5_vl", "model."),
        )
    },
    "stablelm": [
        ((f"{L0}.self_attn.q_proj.weight", (), LOW, 32, 1, True), (f"{L0}.self_attn.q_proj.weight", None, None)),
        ((f"{L1}.mlp.down_proj.weight", (), HIGH, 64, 2, False), (f"{L1}.mlp.down_proj.weight", None, None)),
    ],
    "opt": [
        (
            ("model.decoder.layers.0.self_attn.q_proj.weight", (), LOW, 32, 1, True),
            ("model.decoder.layers.0.self_attn.q_proj.weight", None, None),
        ),
        (
            ("model.decoder.layers.1.fc2.weight", (), HIGH, 64, 2, False),
            ("model.decoder.layers.1.fc2.weight", None, None),
        ),
    ],
    "gptj": [
        (
            ("transformer.h.0.attn.q_proj.weight", (), LOW, 32, 1, True),
            ("transformer.h.0.attn.q_proj.weight", None, None),
        ),
        (
            ("transformer.h.1.mlp.fc_out.weight", (), HIGH, 128, 2, False),
            ("transformer.h.1.mlp.fc_out.weight", None, None),
        ),
    ],
}
QKV = "transformer.h.0.self_attention.query_key_value.weight"
# Fused q/k/v: the query rows and the key rows of each layout, as (view of the weight's rows,
# block of that view): Falcon's new layout groups each kv group's 2 query heads then its key and
# value head; its old multi-query layout has 4 query heads then one key and one value head; its
# old multi-head layout and Bloom's interleave q, k, v per head.
QKV_LAYOUTS = {
    "falcon_new": ((2, 4, 8, HIDDEN), (slice(None), slice(0, 2)), (slice(None), 2), 16),
    "falcon_mq": ((6, 8, HIDDEN), (slice(0, 4),), (4,), 8),
    "falcon_mha": ((4, 3, 8, HIDDEN), (slice(None), 0), (slice(None), 1), 32),
    "bloom": ((4, 3, 8, HIDDEN), (slice(None), 0), (slice(None), 1), 32),
}


def plant_in(params, k, plants):
    for (name, index, thetas, n, seed, transposed), _ in plants:
        update = planted_updates(thetas, n, seed)[k].float()  # (hidden, n)
        block = params[name].data[index] if index else params[name].data
        block += update.T if transposed else update


def plant_qkv(params, k, layout):
    shape, q_block, k_block, kv_rows = layout
    rows = params[QKV].data.view(shape)
    q, key = planted_updates(LOW, 32, 1)[k].float(), planted_updates(HIGH, kv_rows, 2)[k].float()
    rows[q_block] += q.T.reshape(rows[q_block].shape)  # the q rows in head order
    rows[k_block] += key.T.reshape(rows[k_block].shape)


def expected_of(name):
    if name in QKV_LAYOUTS:
        return {(QKV, "q", None): LOW, (QKV, "k", None): HIGH}
    return {key: plant[2] for plant, key in PLANTS[name]}


@pytest.fixture(scope="module", params=sorted([*PLANTS, *QKV_LAYOUTS]))
def family_run(request, tmp_path_factory):
    name = request.param
    if name in QKV_LAYOUTS:
        plant = lambda params, k: plant_qkv(params, k, QKV_LAYOUTS[name])
    else:
        plant = lambda params, k: plant_in(params, k, PLANTS[name])
    return name, planted_run(tmp_path_factory.mktemp(name), config(name), plant)


def test_planted_angles_come_back_in_every_family(family_run):
    name, paths = family_run
    result = compute_angles(paths)
    records = {(r.param, r.part, r.expert): r for r in result.records}
    for key, thetas in expected_of(name).items():
        r = records[key]
        assert r.status == "ok" and r.rank_a == 3 and r.rank_b == 3, (key, r.status)
        assert np.allclose(sorted(r.principal_deg), thetas, atol=0.5), (key, r.principal_deg)
        assert np.allclose(sorted(r.direction_deg), thetas, atol=0.5), (key, r.direction_deg)
        assert r.baseline_deg == pytest.approx(baseline_direction_angle(3, HIDDEN))
    untouched = [r for key, r in records.items() if key not in expected_of(name)]
    assert untouched and all(r.status == "no_update" for r in untouched)
    assert result.family != "generic" and all(r.layer is not None or r.expert is None for r in result.records)


def test_experts_carry_their_index_and_routers_their_component(family_run):
    name, paths = family_run
    result = compute_angles(paths)
    experts = [r for r in result.records if r.expert is not None]
    if name in QKV_LAYOUTS or name in ("gemma3", "mistral3", "qwen2_vl", "qwen2_5_vl", "stablelm", "opt", "gptj"):
        assert not experts
        return
    assert {r.component for r in experts} == {"gate", "up", "down"}
    layers = {r.layer for r in experts}
    for layer in layers:  # every expert of every MoE layer, once per component
        for component in ("gate", "up", "down"):
            assert sorted(r.expert for r in experts if r.layer == layer and r.component == component) == [0, 1, 2, 3]
    assert {r.layer for r in result.records if r.component == "router"} == layers
    summary = {(e["layer"], e["component"]): e for e in result.to_dict()["experts"]}
    (plant, (_, _, expert)), *_ = PLANTS[name]
    planted = next(r for r in experts if r.expert == expert and r.status == "ok")
    row = summary[(planted.layer, planted.component)]
    assert row["moved_most"][0] == expert and row["n_ok"] == 1 and row["n_experts"] == 4
    assert row["median_deg"] == pytest.approx(planted.angle_deg)


@pytest.mark.parametrize("name", ["gemma3", "llama4", "qwen2_vl"])
def test_wrappers_read_text_config_and_leave_the_vision_tower_out(name, tmp_path):
    path = save(build(config(name)), tmp_path / name)
    (ckpt,) = find_checkpoints(path)
    assert ckpt.n_layers == 2 and ckpt.hidden_size == HIDDEN and ckpt.family.name in ("llama", "llama4")
    assert ckpt.towers and all(ckpt.parse(n).layer is None for names in ckpt.towers.values() for n in names)
    text = [n for n in ckpt.names if ckpt.parse(n).layer is not None]
    assert {ckpt.parse(n).layer for n in text} == {0, 1} and all(ckpt.parse(n).tower is None for n in text)
    result = runner.invoke(app, ["inspect", str(path), "--json", "-"])
    assert result.exit_code == 0, result.stderr
    (info,) = json.loads(result.stdout)["checkpoints"]
    assert info["n_layers"] == 2 and info["towers"] and "q" in info["components"]
    assert any("left out" in w for w in json.loads(result.stdout)["warnings"])


def test_fused_expert_tensors_on_disk_split_per_expert(tmp_path):
    """save_pretrained(save_original_format=False) writes transformers 5's fused 3-D experts."""
    plants = PLANTS["qwen2_moe"][:1]
    paths = planted_run(tmp_path, config("qwen2_moe"), lambda p, k: plant_in(p, k, plants), save_original_format=False)
    (ckpt,) = find_checkpoints(paths[0])
    fused = "model.layers.0.mlp.experts.gate_up_proj"
    assert ckpt.meta[fused].shape == (4, 32, HIDDEN) and ckpt.experts == {0: 4, 1: 4}
    result = compute_angles(paths)
    r = next(r for r in result.records if (r.param, r.part, r.expert) == (fused, "up", 1))
    assert np.allclose(sorted(r.principal_deg), LOW, atol=0.5)
    assert {(x.part, x.expert) for x in result.records if x.param == fused} == {
        (p, e) for p in ("gate", "up") for e in range(4)
    }


@pytest.mark.parametrize("name", sorted(QKV_LAYOUTS))
def test_fused_qkv_parts_are_the_rows_the_modelling_code_uses(name):
    """The q, k and v rows forgetdiag cuts from query_key_value are those the model's attention
    reads as queries, keys and values (its own split code, run on the fused projection)."""
    model = build(config(name))
    attention = model.transformer.h[0].self_attention
    weight = attention.query_key_value.weight.detach()
    parts = {
        p.part: p
        for p in matrix_parts(
            parse_name(QKV, family_for(model.config.model_type)), tuple(weight.shape), model.config.to_dict()
        )
    }
    x = torch.randn(1, 5, HIDDEN)
    fused = (x @ weight.T).view(1, 5, -1, 8)  # the modelling code's (..., slots, head_dim)
    if name == "falcon_new":
        grouped = fused.view(1, 5, attention.num_kv_heads, -1, 8)
        q, k, v = grouped[..., :-2, :].flatten(-3, -2), grouped[..., -2, :], grouped[..., -1, :]
    elif name == "falcon_mq":
        q, k, v = fused.split([4, 1, 1], dim=-2)
    else:
        q, k, v = fused.unflatten(-2, (4, 3)).unbind(-2)
    for part, states in (("q", q), ("k", k), ("v", v)):
        ours = x @ parts[part].extract(weight).T  # (1, 5, rows of the part)
        assert torch.allclose(ours, states.flatten(-2), atol=1e-6), part


def test_table_fits_80_columns_and_summarises_experts(tmp_path):
    paths = planted_run(tmp_path, config("qwen2_moe"), lambda p, k: plant_in(p, k, PLANTS["qwen2_moe"]))
    out = tmp_path / "a.json"
    page = tmp_path / "a.html"
    result = runner.invoke(app, ["angles", *map(str, paths), "--json", str(out), "--html", str(page), "--quiet"])
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80 and "…" not in result.stdout
    for column in ("q", "router", "shared_router", "shared_down"):
        assert any(f" {column} " in f" {line} " for line in lines), column
    row = next(line for line in lines if line.split()[:2] == ["0", "up"])
    assert row.split()[-2:] == ["1", "(100%)"] and "1/4" in row  # expert 1 moved, alone
    data = json.loads(out.read_text())
    assert sum(r["expert"] is not None for r in data["records"]) == 2 * 3 * 4
    assert all("expert" in r for r in data["records"])
    html = page.read_text()
    assert "Routed experts per layer and component" in html and "mlp.experts.1.up_proj" not in html


def test_different_expert_counts_exit_2_in_one_line(tmp_path):
    import transformers as t

    four = save(build(config("qwen2_moe")), tmp_path / "four")
    eight = save(build(t.Qwen2MoeConfig(**TEXT, num_experts=8, moe_intermediate_size=16, **MOE)), tmp_path / "eight")
    assert_bad_input(runner.invoke(app, ["angles", str(four), str(eight), str(four)]), "experts")
    cfg = json.loads((eight / "config.json").read_text())
    del cfg["num_experts"]  # the tensors still tell
    (eight / "config.json").write_text(json.dumps(cfg))
    assert_bad_input(runner.invoke(app, ["inspect", str(four), str(eight)]), "layer 0 holds 4 experts")


@pytest.mark.parametrize("energy", [None, 0.9])
def test_batched_experts_equal_one_matrix_at_a_time(energy, tmp_path, monkeypatch):
    """The routed experts' bases and angles computed in batch (angle_batch) are those of the
    per-matrix path (linalg.update_basis, principal_angles, direction_angles), expert by expert,
    on a run where every expert changes."""
    import forgetdiag.analyses.angles as angles_module
    from forgetdiag.analyses.angles import AngleSettings

    def noise(params, k):
        g = torch.Generator().manual_seed(k)
        for p in params.values():
            p.add_(0.01 * torch.randn(p.shape, generator=g))

    paths = planted_run(tmp_path, config("qwen2_moe"), noise)
    settings = AngleSettings(energy=energy)
    batched = compute_angles(paths, settings=settings).records
    monkeypatch.setattr(angles_module, "group_key", lambda *args: None)
    single = compute_angles(paths, settings=settings).records
    assert [(r.param, r.part, r.expert) for r in batched] == [(r.param, r.part, r.expert) for r in single]
    experts = [(b, s) for b, s in zip(batched, single) if s.expert is not None]
    assert len(experts) == 2 * 3 * 4 and all(s.ok for _, s in experts)
    for b, s in experts:
        assert (b.status, b.rank_a, b.rank_b, b.method_a) == (s.status, s.rank_a, s.rank_b, s.method_a)
        assert b.norm_a == pytest.approx(s.norm_a, rel=1e-6) and b.energy_b == pytest.approx(s.energy_b, rel=1e-9)
        np.testing.assert_allclose(b.direction_deg, s.direction_deg, atol=1e-9)
        np.testing.assert_allclose(b.principal_deg, s.principal_deg, atol=1e-9)
        assert b.direction == pytest.approx(s.direction, abs=1e-9)
        assert b.principal_baseline_deg == s.principal_baseline_deg and b.baseline_deg == s.baseline_deg
