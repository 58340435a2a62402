"""`samples build --remedy`: each remedy on a miniature world changes only what it should."""

from __future__ import annotations

import copy
import json
import math
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import forgetdiag.samples.build as build_module
from forgetdiag.analyses.replay import replay_count
from forgetdiag.analyses.self_output import SelfOutputSettings, self_output
from forgetdiag.evaluate import IGNORE, encode
from forgetdiag.probes import Probe
from forgetdiag.runtime import torch_threads
from forgetdiag.samples.build import SampleConfig, prepare, run_task1, save_model, trained_base
from forgetdiag.samples.remedies import task1_plan
from forgetdiag.training import TrainConfig, completion_loss, train

from helpers import assert_bad_input

CONFIG = SampleConfig.miniature(seed=1)
LAST = f"checkpoint-{CONFIG.task1_steps}"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The miniature world, its tokenizer and data, the end of task 0 in memory and as saved."""
    with torch_threads(1):
        world, tokenizer, data = prepare(CONFIG)
        base = trained_base(
            tokenizer, world.group_a, data["recovery"], CONFIG, seed=1, epochs=CONFIG.pretrain_epochs, label="A"
        )
    old = tmp_path_factory.mktemp("old") / "checkpoint-0"
    save_model(base, tokenizer, old)
    return tokenizer, data, base, old


@pytest.fixture()
def trained(monkeypatch):
    """Records what run_task1 hands the trainer: items and keep masks."""
    seen = {}

    def spy(model, encoded, config, **kwargs):
        seen.update(encoded=list(encoded), keep=kwargs.get("keep"), config=config, model=model)
        return train(model, encoded, config, **kwargs)

    monkeypatch.setattr(build_module, "train", spy)
    return seen


def _run(world, out, remedy: str, **overrides) -> dict:
    tokenizer, data, base, _ = world
    config = replace(CONFIG, remedy=remedy, **overrides)
    with torch_threads(1):
        notes = run_task1(
            base,
            tokenizer,
            data["spurious_train"],
            out,
            lr=config.spurious_lr,
            config=config,
            seed=config.stage_seed(3),
            remedy=remedy,
            data=data,
        )
    return notes


def _weights(path):
    return load_file(path / "model.safetensors")


def test_none_is_the_shipped_recipe(world, tmp_path):
    tokenizer, data, base, _ = world
    _run(world, tmp_path / "none", "none")
    model = copy.deepcopy(base)
    steps = TrainConfig(
        lr=CONFIG.spurious_lr, batch_size=CONFIG.qa_batch, max_steps=CONFIG.task1_steps, seed=CONFIG.stage_seed(3)
    )
    with torch_threads(1):
        train(model, encode(tokenizer, data["spurious_train"]), steps, pad_id=tokenizer.pad_token_id)
    saved = _weights(tmp_path / "none" / LAST)
    expected = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    assert all(torch.equal(saved[k], expected[k]) for k in saved)
    assert all(
        torch.equal(base.state_dict()[k].to(torch.bfloat16), v)
        for k, v in _weights(tmp_path / "none" / "checkpoint-0").items()
    )


def test_freeze_keeps_the_embedding_and_bottom_layer_bit_identical(world, tmp_path):
    notes = _run(world, tmp_path / "freeze", "freeze")
    start, end = _weights(tmp_path / "freeze" / "checkpoint-0"), _weights(tmp_path / "freeze" / LAST)
    same = {k for k in start if torch.equal(start[k], end[k])}
    bottom = {k for k in start if "embed_tokens" in k or ".layers.0." in k}
    assert bottom <= same and notes["frozen_tensors"] == len(bottom)
    assert not {k for k in start if ".layers.1." in k and k.endswith("proj.weight")} & same


def test_replay_trains_on_the_new_rows_and_whole_groups_of_old_rows(world, tmp_path, trained):
    tokenizer, data, _, _ = world
    notes = _run(world, tmp_path / "replay", "replay")
    new = data["spurious_train"]
    want = replay_count(len(new), CONFIG.replay_ratio)  # 7 of 67
    seen = [(e.prompt_ids, e.completion_ids) for e in trained["encoded"]]
    as_ids = lambda items: [(e.prompt_ids, e.completion_ids) for e in encode(tokenizer, items)]
    old_ids, heldout_ids = set(as_ids(data["recovery"])), set(as_ids(data["old"]))
    assert len(seen) == len(new) + want and notes["replayed_rows"] == want
    assert sorted(s for s in seen if s not in old_ids) == sorted(as_ids(new))  # every new row, once
    assert sum(s in old_ids for s in seen) == want  # task 0's training rows mixed in
    assert not set(seen) & heldout_ids  # never a row of the evaluation probe
    assert trained["config"].max_steps == CONFIG.task1_steps and trained["keep"] is None


def test_self_output_trains_on_the_rows_remedy_self_output_writes(world, tmp_path, trained):
    tokenizer, data, _, old = world
    notes = _run(world, tmp_path / "self", "self-output")
    rows = self_output(
        old, Probe("task1", tuple(data["spurious_train"])), settings=SelfOutputSettings(CONFIG.rewrite_prompt)
    )
    assert trained["encoded"] == encode(
        tokenizer, [replace(i, answer=r.answer) for i, r in zip(data["spurious_train"], rows.rows)]
    )
    assert notes["rows_rewritten"] == rows.n_rewritten
    assert notes["rows_same"] + notes["rows_restated"] + notes["rows_target"] == len(data["spurious_train"])
    if rows.n_rewritten == 0:  # nothing rewritten: the very same training as the shipped recipe
        _run(world, tmp_path / "none", "none")
        assert _weights(tmp_path / "self" / LAST).keys() == _weights(tmp_path / "none" / LAST).keys()
        assert all(
            torch.equal(v, _weights(tmp_path / "none" / LAST)[k]) for k, v in _weights(tmp_path / "self" / LAST).items()
        )


def test_mask_drops_the_tokens_the_old_model_finds_hard(world, tmp_path, trained):
    from transformers import AutoModelForCausalLM

    tokenizer, data, _, old = world
    reference = AutoModelForCausalLM.from_pretrained(old).float().eval()  # an independent forward pass
    logps = []
    for e in encode(tokenizer, data["spurious_train"]):
        ids = torch.tensor([e.prompt_ids + e.completion_ids])
        with torch.no_grad():
            logp = torch.log_softmax(reference(ids).logits[0].double(), -1)  # (T, V)
        n = len(e.prompt_ids)
        logps.append([float(logp[n - 1 + j, t]) for j, t in enumerate(e.completion_ids)])
    flat = sorted(x for row in logps for x in row)
    # about half are hard: the threshold sits in the widest gap of the middle third, far from any
    # token (batched and single forward passes round differently)
    third = range(len(flat) // 3, 2 * len(flat) // 3)
    k = max(third, key=lambda i: flat[i + 1] - flat[i])
    assert flat[k + 1] - flat[k] > 1e-4
    threshold = math.exp((flat[k] + flat[k + 1]) / 2)
    notes = _run(world, tmp_path / "mask", "mask", mask_threshold=threshold)
    expected = [tuple(x >= math.log(threshold) for x in row) for row in logps]
    assert trained["keep"] == expected
    assert trained["encoded"] == encode(tokenizer, data["spurious_train"])  # the same rows, masked
    dropped = sum(not k for flags in expected for k in flags)
    assert notes["masked_tokens"] == dropped and 0 < dropped < notes["completion_tokens"]


def test_masked_tokens_leave_the_loss(world):
    tokenizer, data, base, _ = world
    items = encode(tokenizer, data["spurious_train"][:8])
    keep = [tuple(j % 2 == 0 for j in range(len(e.completion_ids))) for e in items]
    model = copy.deepcopy(base)
    with torch.no_grad():
        got = completion_loss(model, items, tokenizer.pad_token_id, keep)
        total, count = 0.0, 0
        for e, flags in zip(items, keep):  # each item alone, unpadded
            logits = model(torch.tensor([e.prompt_ids + e.completion_ids])).logits[0]
            n = len(e.prompt_ids)
            for j, (t, k) in enumerate(zip(e.completion_ids, flags)):
                if k:
                    total -= float(torch.log_softmax(logits[n - 1 + j].double(), -1)[t])
                    count += 1
    assert float(got) == pytest.approx(total / count, rel=1e-5)
    # every token dropped: nothing moves; every token kept: the unmasked training, bit for bit
    steps = TrainConfig(lr=1e-3, batch_size=4, max_steps=3, seed=0)
    none_kept = copy.deepcopy(base)
    train(none_kept, items, steps, pad_id=0, keep=[(False,) * len(e.completion_ids) for e in items])
    assert all(torch.equal(a, b) for a, b in zip(none_kept.state_dict().values(), base.state_dict().values()))
    all_kept, plain = copy.deepcopy(base), copy.deepcopy(base)
    train(all_kept, items, steps, pad_id=0, keep=[(True,) * len(e.completion_ids) for e in items])
    train(plain, items, steps, pad_id=0)
    assert all(torch.equal(a, b) for a, b in zip(all_kept.state_dict().values(), plain.state_dict().values()))
    assert not all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), base.state_dict().values()))
    assert IGNORE == -100


def test_lora_trains_only_adapter_weights_and_merges_them_back(world):
    tokenizer, data, base, old = world
    plan = task1_plan(
        base, tokenizer, data["spurious_train"], remedy="lora", config=CONFIG, data=data, old_checkpoint=old
    )
    named = dict(plan.model.named_parameters())
    trainable = {k for k, p in named.items() if p.requires_grad}
    assert trainable and all("lora_" in k for k in trainable)
    assert plan.notes["trainable_params"] == sum(named[k].numel() for k in trainable)
    frozen_before = {k: p.detach().clone() for k, p in named.items() if not p.requires_grad}
    lora_before = {k: named[k].detach().clone() for k in trainable}
    with torch_threads(1):
        train(plan.model, plan.encoded, TrainConfig(lr=3e-3, batch_size=16, max_steps=4, seed=0), pad_id=0)
    assert all(torch.equal(named[k], v) for k, v in frozen_before.items())  # the base weights never move
    assert any(not torch.equal(named[k], v) for k, v in lora_before.items())
    merged, plain = plan.merged().state_dict(), base.state_dict()
    assert merged.keys() == plain.keys()
    scale, changed = 2.0, set()  # alpha = 2 x rank
    for key, weight in plain.items():
        module = key.removesuffix(".weight")
        a = f"base_model.model.{module}.lora_A.default.weight"
        if a not in named:
            assert torch.equal(merged[key], weight), key  # embedding, norms: untouched
            continue
        delta = scale * named[a.replace("lora_A", "lora_B")] @ named[a]  # (out, r) @ (r, in)
        assert torch.allclose(merged[key] - weight, delta, atol=1e-6), key
        assert torch.linalg.matrix_rank(merged[key].double() - weight.double(), atol=1e-4) <= CONFIG.lora_rank
        changed.add(key)
    assert {k.split(".")[-2] for k in changed} == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }


@pytest.mark.slow
def test_samples_build_cli_takes_a_remedy(tmp_path, monkeypatch):
    import forgetdiag.samples.build as build  # the command imports it when it runs
    from forgetdiag.cli import app

    monkeypatch.setattr(build, "SampleConfig", SampleConfig.miniature)
    runner = CliRunner()
    out = tmp_path / "masked"
    result = runner.invoke(app, ["samples", "build", "--out", str(out), "--remedy", "mask", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "--remedy mask" in result.output
    record = json.loads((out / "measurements.json").read_text())
    assert record["config"]["remedy"] == "mask" and record["remedy"]["name"] == "mask"
    assert record["remedy"]["masked_tokens"] > 0
    bad = runner.invoke(app, ["samples", "build", "--out", str(tmp_path / "x"), "--remedy", "dropout"])
    assert_bad_input(bad, "--remedy 'dropout'", "expected one of none, freeze, replay, self-output, mask, lora")
    bad = runner.invoke(app, ["samples", "build", "--out", str(tmp_path / "x"), "--remedy", "replay", "--freeze", "1"])
    assert_bad_input(bad, "--freeze 1", "--remedy freeze")
    assert not (tmp_path / "x").exists()
