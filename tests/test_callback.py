"""ForgettingCallback in real transformers Trainer runs on a tiny llama made here.

The planted truths: a model taught 16 facts (birth cities) is trained either on the same facts
(nothing to forget: exact match stays 1.0) or on 16 conflicting facts (every name gets the next
city: the old answers are overwritten, exact match falls to about 0). Every logged number is
checked against ``forgetdiag score`` run on the checkpoint the Trainer saved at that step.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from forgetdiag import ForgetdiagError, ForgettingCallback, load_run
from forgetdiag.cli import app
from forgetdiag.evaluate import encode
from forgetdiag.probes import ProbeItem

from helpers import build, llama_config, make_tokenizer, save, teach, write_jsonl

runner = CliRunner()
TEST_SEED = int(os.environ.get("FORGETDIAG_TEST_SEED", "0"))
NAMES, CITIES = [f"n{k}" for k in range(16)], [f"c{k}" for k in range(8)]
WORDS = ["what", "is", "the", "birth", "city", "of", "answer", ":", *NAMES, *CITIES]
EVERY = 5


def facts(shift: int) -> list[ProbeItem]:
    """Name k was born in city (k + shift) mod 8: shift 0 is the old task, shift 1 conflicts with it."""
    return [
        ProbeItem(f"what is the birth city of {n} answer :", f" {CITIES[(k + shift) % 8]}") for k, n in enumerate(NAMES)
    ]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tokenizer, the old-task probe file and a model that knows it (saved: the before checkpoint)."""
    root = tmp_path_factory.mktemp("callback")
    tokenizer = make_tokenizer(words=WORDS)
    config = llama_config(vocab=48)
    config.attention_dropout = 0.1  # training draws random numbers: the callback must not move them
    model = build(config, seed=TEST_SEED)
    teach(model, tokenizer, facts(0), seed=TEST_SEED)
    before = save(model, root / "before", tokenizer=tokenizer)
    probe = write_jsonl(root / "old.jsonl", [{"prompt": i.prompt, "answer": i.answer} for i in facts(0)])
    return root, tokenizer, before, probe


def dataset(tokenizer, items):
    rows = []
    for e in encode(tokenizer, items):
        ids = [*e.prompt_ids, *e.completion_ids]
        labels = [-100] * len(e.prompt_ids) + list(e.completion_ids)
        rows.append(
            {
                "input_ids": torch.tensor(ids),
                "labels": torch.tensor(labels),
                "attention_mask": torch.ones(len(ids), dtype=torch.long),
            }
        )
    return rows


def train(world, out: Path, *, shift: int, callback=None, steps=20, lr=1e-2, batch=8, model=None, **extra):
    """One Trainer run from the before checkpoint; returns (trainer, model)."""
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    root, tokenizer, before, _ = world
    model = model or AutoModelForCausalLM.from_pretrained(before)
    args = TrainingArguments(
        output_dir=str(out), max_steps=steps, per_device_train_batch_size=batch, learning_rate=lr,
        lr_scheduler_type="constant", logging_steps=EVERY, save_steps=EVERY, save_only_model=True,
        report_to="none", seed=TEST_SEED, use_cpu=True, disable_tqdm=True, **extra,
    )  # fmt: skip
    trainer = Trainer(
        model=model, args=args, train_dataset=dataset(tokenizer, facts(shift)), processing_class=tokenizer,
        callbacks=callback if isinstance(callback, list) else [callback] if callback is not None else None,
    )  # fmt: skip
    trainer.train()
    return trainer, model


def logged(trainer, key: str) -> dict[int, float]:
    return {e["step"]: e[key] for e in trainer.state.log_history if key in e}


class Recorder:
    """Stands for a reporting integration (TensorBoard, W&B...): keeps what on_log receives."""

    def __init__(self) -> None:
        self.received: list[dict] = []

    def __getattr__(self, event):
        return lambda *args, **kwargs: None

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not self.received:
            self.first_keys = set(logs)
        self.received.append({**logs, "step": state.global_step})


@pytest.fixture(scope="module")
def forgetting(world, tmp_path_factory):
    """The run that forgets (watched) and the same run unwatched."""
    out = tmp_path_factory.mktemp("forget") / "run"
    callback = ForgettingCallback({"old": world[3]}, every_steps=EVERY, before=world[2])
    recorder = Recorder()
    trainer, model = train(
        world, out, shift=1, callback=[recorder, callback]
    )  # the recorder first, as integrations are
    callback.recorder = recorder
    bare = tmp_path_factory.mktemp("bare") / "run"
    _, bare_model = train(world, bare, shift=1)
    return out, callback, trainer, model, bare, bare_model


@pytest.mark.planted
def test_scores_are_logged_at_the_configured_steps_and_match_forgetdiag_score(forgetting, world, tmp_path):
    out, callback, trainer, *_ = forgetting
    exact = logged(trainer, "forgetdiag/old/exact_match")
    assert sorted(exact) == [0, 5, 10, 15, 20]
    for metric in ("first_token", "answer_loss"):
        assert sorted(logged(trainer, f"forgetdiag/old/{metric}")) == [0, 5, 10, 15, 20]
    assert exact[0] == 1.0 and exact[20] <= 0.25  # planted: taught, then overwritten
    received = {
        e["step"]: e["forgetdiag/old/exact_match"]
        for e in callback.recorder.received
        if "forgetdiag/old/exact_match" in e
    }
    assert received == exact  # what a reporting integration gets
    assert "step" not in callback.recorder.first_keys  # the step-0 entry looks like the Trainer's own
    result = runner.invoke(
        app, ["score", str(out), "--probe", str(world[3]), "--json", str(tmp_path / "s.json"), "--quiet"]
    )
    assert result.exit_code == 0, result.stderr
    records = json.loads((tmp_path / "s.json").read_text())["scores"]
    assert {r["step"] for r in records} == {5, 10, 15, 20}
    for r in records:  # an independent pass: the checkpoint as saved, loaded by forgetdiag score
        value = logged(trainer, f"forgetdiag/old/{r['metric']}")[r["step"]]
        assert value == pytest.approx(r["value"], abs=1e-6), (r, value)


@pytest.mark.planted
def test_the_alarm_fires_on_the_run_that_forgets(forgetting, world):
    out, callback, trainer, *_ = forgetting
    (alarm,) = callback.alarms
    assert alarm.probe == "old" and alarm.start == 1.0 and alarm.now < 0.5 and alarm.p_value < 0.01
    assert alarm.checkpoint == str(out / f"checkpoint-{alarm.step}")  # scoring steps are save steps
    assert (
        alarm.command
        == f"forgetdiag recover {world[2].resolve()} {out}/checkpoint-{alarm.step} --probe {world[3].resolve()}"
    )
    entries = logged(trainer, "forgetdiag/old/alarm")
    assert entries == {alarm.step: alarm.command}


@pytest.mark.planted
def test_no_alarm_on_a_run_that_keeps_the_old_task(world, tmp_path):
    callback = ForgettingCallback({"old": world[3]}, alarm_drop=0.05)  # every_steps: the logging steps (5)
    trainer, _ = train(world, tmp_path / "run", shift=0, steps=10, lr=1e-3, callback=callback)
    assert callback.alarms == []
    assert logged(trainer, "forgetdiag/old/exact_match") == {0: 1.0, 5: 1.0, 10: 1.0}
    assert not logged(trainer, "forgetdiag/old/alarm")


def test_same_weights_and_checkpoint_files_with_and_without_the_callback(forgetting):
    out, _, _, model, bare, bare_model = forgetting
    watched, unwatched = model.state_dict(), bare_model.state_dict()
    assert watched.keys() == unwatched.keys()
    assert all(torch.equal(watched[k], unwatched[k]) for k in watched)
    for step in (5, 10, 15, 20):  # nothing of the callback's inside a checkpoint directory
        ours, theirs = out / f"checkpoint-{step}", bare / f"checkpoint-{step}"
        assert sorted(p.name for p in ours.iterdir()) == sorted(p.name for p in theirs.iterdir())
        assert (ours / "model.safetensors").read_bytes() == (theirs / "model.safetensors").read_bytes()
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == ["forgetdiag.toml"]


def test_the_run_file_is_read_back_and_drives_score_and_report(forgetting, world, tmp_path):
    out, *_ = forgetting
    spec = load_run(out)
    assert spec.before == world[2].resolve() and spec.run == out.resolve()
    assert spec.after == (out / "checkpoint-20").resolve() and spec.probes == {"old": world[3].resolve()}
    result = runner.invoke(app, ["score", str(out), "--json", str(tmp_path / "s.json"), "--quiet"])
    assert result.exit_code == 0, result.stderr
    data = json.loads((tmp_path / "s.json").read_text())
    assert data["checkpoints"] == ["before", "checkpoint-5", "checkpoint-10", "checkpoint-15", "checkpoint-20"]
    skip = [a for name in ("angles", "landscape", "features") for a in ("--skip", name)]
    args = ["report", str(out), "--out", str(tmp_path / "r.html"), "--json", str(tmp_path / "r.json"), "--quiet"]
    result = runner.invoke(app, [*args, *skip, "--min-steps", "5"])
    assert result.exit_code == 0, result.stderr
    assert json.loads((tmp_path / "r.json").read_text())["recover"] is not None


def test_peft_model_with_gradient_accumulation(world, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from forgetdiag.choices import score_items
    from forgetdiag.evaluate import encode as encode_items

    base = AutoModelForCausalLM.from_pretrained(world[2])
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_alpha=16))
    callback = ForgettingCallback({"old": world[3]}, every_steps=2)
    trainer, model = train(
        world,
        tmp_path / "run",
        shift=1,
        steps=6,
        lr=2e-2,
        model=model,
        callback=callback,
        batch=4,
        gradient_accumulation_steps=2,
    )
    loss = logged(trainer, "forgetdiag/old/answer_loss")
    assert sorted(loss) == [0, 2, 4, 6]
    model.eval()
    now = score_items(model, encode_items(world[1], facts(0)), pad_id=0)  # the adapted model, scored here
    assert loss[6] == pytest.approx(now.answer_loss, abs=1e-6) and loss[6] > loss[0]
    assert model.training is False and (tmp_path / "run" / "forgetdiag.toml").is_file()


def test_fixed_subset_and_freeze_layers(world, tmp_path):
    first = ForgettingCallback({"old": world[3]}, max_items=5, seed=3)
    again = ForgettingCallback({"old": world[3]}, max_items=5, seed=3)
    assert len(first.watched["old"].probe) == 5 and first.watched["old"].probe.items == again.watched["old"].probe.items
    callback = ForgettingCallback({"old": world[3]}, every_steps=2, freeze_layers=1)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(world[2])
    start = {k: v.clone() for k, v in model.state_dict().items()}
    train(world, tmp_path / "run", shift=1, steps=2, model=model, callback=callback)
    after = model.state_dict()
    assert "model.embed_tokens.weight" in callback.frozen
    assert torch.equal(after["model.embed_tokens.weight"], start["model.embed_tokens.weight"])
    assert torch.equal(after["model.layers.0.mlp.up_proj.weight"], start["model.layers.0.mlp.up_proj.weight"])
    assert not torch.equal(after["model.layers.1.mlp.up_proj.weight"], start["model.layers.1.mlp.up_proj.weight"])


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"probes": {"old": "/nonexistent/old.jsonl"}}, "/nonexistent/old.jsonl"),
        ({"tokenizer": "/nonexistent/tokenizer"}, "/nonexistent/tokenizer"),
        ({"every_steps": 0}, "every_steps"),
        ({"metric": "acc"}, "metric acc"),
    ],
)
def test_bad_input_fails_at_construction_in_one_line(world, kwargs, fragment):
    kwargs = {"probes": {"old": world[3]}, **kwargs}
    with pytest.raises(ForgetdiagError) as info:
        ForgettingCallback(**kwargs)
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_score_without_probe_needs_a_run_file(world):
    from helpers import assert_bad_input

    assert_bad_input(runner.invoke(app, ["score", str(world[2])]), "no --probe given", "forgetdiag.toml")


def test_a_multiple_choice_probe_logs_acc(world, tmp_path):
    from transformers import AutoModelForCausalLM

    from forgetdiag.choices import encode_choices, score_items

    rows = [{"prompt": i.prompt, "choices": [" c0", " c1", " c2", " c3"], "answer": i.answer} for i in facts(0)[:4]]
    probe = write_jsonl(tmp_path / "mc.jsonl", rows)
    callback = ForgettingCallback({"mc": probe}, every_steps=2)
    model = AutoModelForCausalLM.from_pretrained(world[2])
    trainer, model = train(world, tmp_path / "run", shift=1, steps=2, model=model, callback=callback)
    acc = logged(trainer, "forgetdiag/mc/acc")
    assert sorted(acc) == [0, 2] and acc[0] == 1.0  # the taught facts, before any update
    assert sorted(logged(trainer, "forgetdiag/mc/acc_norm")) == [0, 2]
    model.eval()
    items = [type(i)(i.prompt, i.answer, None, (" c0", " c1", " c2", " c3")) for i in facts(0)[:4]]
    now = score_items(model, encode_choices(world[1], items), pad_id=0)
    assert acc[2] == now.value("acc") and logged(trainer, "forgetdiag/mc/answer_loss")[2] == pytest.approx(
        now.answer_loss, abs=1e-6
    )
