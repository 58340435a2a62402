"""The sample builder (world, tokenizer, a miniature build, the CLI) and the truths that the
committed ``sample_checkpoints/`` carry, measured with the package's own scoring and training."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from forgetdiag import ForgetdiagError, find_checkpoints, load_probe, recover
from forgetdiag.analyses.recovery import RecoverySettings
from forgetdiag.runfile import load_run
from forgetdiag.samples import world as bio
from forgetdiag.samples.build import SampleConfig, build_samples
from forgetdiag.samples.tokenizer import train_tokenizer

SAMPLES = Path(__file__).resolve().parents[1] / "sample_checkpoints"


# --- the world -------------------------------------------------------------------------------


def test_world_is_deterministic_per_seed():
    assert bio.make_world(3) == bio.make_world(3)
    assert bio.make_world(3) != bio.make_world(4)
    people = bio.make_world(3).a_train[:5]
    assert bio.biographies(people, 2, seed=1) == bio.biographies(people, 2, seed=1)
    assert bio.biographies(people, 2, seed=1) != bio.biographies(people, 2, seed=2)


def test_groups_are_disjoint_and_sized():
    world = bio.make_world(0, n_a=100, n_b=40, n_c=30)
    groups = [world.a_train, world.a_heldout, world.b, world.c]
    assert [len(g) for g in groups] == [50, 50, 40, 30]
    names = [p.name for g in groups for p in g]
    assert len(set(names)) == len(names) == 170
    tokens = lambda people: {word for p in people for word in p.name.split()}
    assert not tokens(world.group_a) & tokens(world.b + world.c)  # no shared name word
    for person in world.everyone:  # each company sits in one city
        assert world.company_cities[person.company] == person.company_city


def test_biographies_state_every_fact_with_every_template_in_varied_order():
    world = bio.make_world(1)
    person = world.a_train[0]
    texts = bio.biographies([person], 200, seed=0)
    used, first_facts = set(), set()
    for text in texts:
        sentences = re.split(r"(?<=\.) ", text)
        assert len(sentences) == len(bio.ATTRIBUTES)
        assert all(person.name in s for s in sentences)  # the full name in every sentence
        for attribute in bio.ATTRIBUTES:
            filled = [t.format(name=person.name, value=person.fact(attribute)) for t in bio.TEMPLATES[attribute]]
            hits = [k for k, f in enumerate(filled) if f in sentences]
            assert len(hits) == 1, (attribute, text)
            used.add((attribute, hits[0]))
            if filled[hits[0]] == sentences[0]:
                first_facts.add(attribute)
    assert used == {(a, k) for a in bio.ATTRIBUTES for k in range(len(bio.TEMPLATES[a]))}
    assert first_facts == set(bio.ATTRIBUTES)  # sentences are permuted


def test_qa_items_cover_every_attribute_of_every_person():
    world = bio.make_world(2, n_a=10, n_b=4, n_c=2)
    items = bio.qa_items(world.b)
    assert len(items) == len(world.b) * len(bio.ATTRIBUTES)
    person = world.b[1]
    mine = [i for i in items if i.group == person.name]
    assert [i.prompt for i in mine] == [f"What is the {a} of {person.name}?\nAnswer:" for a in bio.ATTRIBUTES]
    assert [i.answer for i in mine] == [" " + person.fact(a) for a in bio.ATTRIBUTES]


def test_contradicted_people_differ_in_every_fact():
    world = bio.make_world(0)
    liars = bio.contradicted(world, world.group_a, seed=7)
    assert liars == bio.contradicted(world, world.group_a, seed=7)
    for old, new in zip(world.group_a, liars):
        assert new.name == old.name
        assert all(new.fact(a) != old.fact(a) for a in bio.ATTRIBUTES)
        assert world.company_cities[new.company] == new.company_city


def test_tokenizer_is_word_level_and_loads_offline(tmp_path):
    from transformers import AutoTokenizer

    world = bio.make_world(0, n_a=20, n_b=4, n_c=4)
    train_tokenizer(bio.vocabulary_texts(world)).save_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    prompt, answer = bio.qa_pair(world.a_heldout[0], "birth date")  # " March 3, 1987"
    ids = tok(prompt + answer)["input_ids"]
    assert ids[0] == tok.bos_token_id and tok.unk_token_id not in ids
    assert ids[: len(tok(prompt)["input_ids"])] == tok(prompt)["input_ids"]
    assert len(ids) - len(tok(prompt)["input_ids"]) == 4  # month, day, comma, year
    assert tok.decode(ids, skip_special_tokens=True) == " " + prompt + answer
    text = bio.biography(world.a_train[0], random.Random(0))
    assert tok.unk_token_id not in tok(text)["input_ids"]
    assert {tok.pad_token_id, tok.unk_token_id, tok.bos_token_id, tok.eos_token_id} == {0, 1, 2, 3}


# --- a miniature build (seconds): the layout and the tools that read it -------------------


@pytest.fixture(scope="module")
def miniature(tmp_path_factory):
    out = tmp_path_factory.mktemp("mini") / "samples"
    threads = torch.get_num_threads()
    truths = build_samples(out, SampleConfig.miniature(seed=1))
    assert torch.get_num_threads() == threads  # restored after the build
    return out, truths


def test_miniature_build_layout(miniature):
    from transformers import AutoModelForCausalLM

    out, truths = miniature
    steps = SampleConfig.miniature().saved_steps()
    assert steps == (0, 2, 4, 6)
    assert not list(out.parent.glob(".samples.building-*"))  # the temporary tree was renamed
    for run in ("spurious", "real"):
        spec = load_run(out / run)
        assert spec.expected_verdict == run and spec.before.name == "checkpoint-0"
        assert spec.control == (out / "control").resolve() and spec.run == (out / run).resolve()
        assert [p.name for p in spec.landscape] == ["checkpoint-0", "checkpoint-2", "checkpoint-6"]
        assert sorted(spec.probes) == ["new", "old", "recovery"]
        found = find_checkpoints(out / run)
        assert [c.path.name for c in found] == [f"checkpoint-{s}" for s in steps]
    assert not list(out.rglob("*.bin")) and not list(out.rglob("*.pt"))
    model = AutoModelForCausalLM.from_pretrained(out / "real" / "checkpoint-4", local_files_only=True)
    assert next(model.parameters()).dtype == torch.bfloat16
    old, recovery = (
        load_probe(out / "probes" / "task0_heldout.jsonl"),
        load_probe(out / "probes" / "task0_recovery.jsonl"),
    )
    assert len(old) == len(recovery) == 10 * len(bio.ATTRIBUTES)
    assert not set(old.groups) & set(recovery.groups)
    assert old.items[0].answer.startswith(" ")
    record = json.loads((out / "measurements.json").read_text())
    assert record["config"]["seed"] == 1 and len(record["truths"]) == len(truths) == 1 + 2 * len(steps)


def test_build_is_deterministic(miniature, tmp_path):
    out, _ = miniature
    again = tmp_path / "again"
    build_samples(again, SampleConfig.miniature(seed=1))
    for path in (
        Path("spurious/checkpoint-6/model.safetensors"),
        Path("control/model.safetensors"),
        Path("probes/task1_real.jsonl"),
        Path("real/forgetdiag.toml"),
    ):
        assert (again / path).read_bytes() == (out / path).read_bytes(), path


def test_freeze_keeps_the_embedding_and_bottom_layers_of_task1(tmp_path):
    """--freeze 1 (the remedy freeze): the spurious run's task 1 leaves the embedding and
    layer 0 bit-identical and trains layer 1; the real run is trained as shipped."""
    from dataclasses import replace

    from safetensors.torch import load_file

    out = tmp_path / "frozen"
    build_samples(out, replace(SampleConfig.miniature(seed=1), freeze_layers=1))
    for run in ("spurious", "real"):
        start = load_file(out / run / "checkpoint-0" / "model.safetensors")
        end = load_file(out / run / "checkpoint-6" / "model.safetensors")
        same = {k for k in start if torch.equal(start[k], end[k])}
        bottom = {k for k in start if "embed_tokens" in k or ".layers.0." in k}
        assert bottom <= same if run == "spurious" else not bottom & same
        assert not {k for k in start if ".layers.1." in k and k.endswith("proj.weight")} & same
    record = json.loads((out / "measurements.json").read_text())
    assert record["config"]["remedy"] == "freeze" and record["remedy"]["frozen_tensors"] == len(bottom)


def test_build_refuses_a_non_empty_directory(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(ForgetdiagError, match="non-empty directory"):
        build_samples(tmp_path, SampleConfig.miniature())
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_cli_builds_and_refuses(tmp_path, monkeypatch):
    import forgetdiag.samples.build as build  # the command imports it when it runs
    from forgetdiag.cli import app

    monkeypatch.setattr(build, "SampleConfig", SampleConfig.miniature)
    runner = CliRunner()
    out = tmp_path / "empty"
    out.mkdir()  # an existing empty directory is fine
    result = runner.invoke(app, ["samples", "build", "--out", str(out), "--seed", "2", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "checkpoint-6" in result.output and "recovered" in result.output
    assert json.loads((out / "measurements.json").read_text())["config"]["seed"] == 2
    result = runner.invoke(app, ["samples", "build", "--out", str(out), "--quiet"])
    assert result.exit_code == 2
    assert "refusing to build into an existing non-empty directory" in result.output


# --- the committed samples: the truths they carry ------------------------------------------
# Measured with forgetdiag itself: `recover` with the run file's probes and control, the
# recovery budget of the samples' README (one epoch over half of group A, lr 1e-4, batch 32).

PAPER = RecoverySettings(epochs=1, lr=1e-4, batch_size=32)


def _recover(run: str, after, settings=PAPER, **kwargs):
    spec = load_run(SAMPLES / run)
    return recover(
        spec.before,
        after,
        load_probe(spec.probes["old"]),
        control=spec.control,
        recovery_probe=load_probe(spec.probes["recovery"]),
        settings=settings,
        **kwargs,
    )


@pytest.fixture(scope="module")
def spurious():
    spec = load_run(SAMPLES / "spurious")
    return _recover("spurious", [spec.run / "checkpoint-10", spec.run / "checkpoint-50", spec.after], at=spec.after)


@pytest.fixture(scope="module")
def real():
    spec = load_run(SAMPLES / "real")
    return _recover("real", [spec.run / "checkpoint-50", spec.after], at=spec.after)


def test_committed_samples_layout():
    files = [p for p in SAMPLES.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 30 * 2**20
    assert not [p for p in files if p.suffix in (".bin", ".pt", ".pth", ".pkl")]
    for run in ("spurious", "real"):
        spec = load_run(SAMPLES / run)
        assert spec.expected_verdict == run
        assert [p.name for p in spec.landscape][0] == "checkpoint-0"
        assert len(find_checkpoints(SAMPLES / run)) >= 6


def test_committed_samples_load_offline_with_auto_classes(monkeypatch):
    """Every shipped checkpoint loads with AutoModelForCausalLM and AutoTokenizer, offline, and
    its tokenizer covers the probes' words (no unknown tokens in a probe prompt and answer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    item = load_probe(SAMPLES / "probes" / "task0_heldout.jsonl").items[0]
    dirs = sorted(p.parent for p in SAMPLES.rglob("config.json"))
    assert len(dirs) == 13  # 6 checkpoints per run and the control
    for path in dirs:
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        assert model.config.model_type == "llama" and model.config.vocab_size >= len(tok)
        ids = tok(item.prompt + item.answer)["input_ids"]
        assert tok.unk_token_id not in ids and len(ids) > 5, path


@pytest.mark.slow
@pytest.mark.planted
def test_task0_is_learned_then_forgotten_in_both_runs(spurious, real):
    for result in (spurious, real):
        acc = result.accuracy()
        assert acc["before"] >= 0.85 and acc["after"] <= 0.3


@pytest.mark.slow
@pytest.mark.planted
def test_spurious_run_recovers_far_above_control(spurious):
    control = spurious.accuracy()["control_recovered"]
    assert control <= 0.15
    for point in spurious.sequence:  # early and middle task-1 checkpoints
        rec = point.recovered.exact_match
        assert rec >= 0.85 and rec >= control + 0.6, point.label
        assert point.decision.verdict == "spurious", point.label
    assert spurious.verdict == "spurious" and spurious.decision.supported


@pytest.mark.slow
@pytest.mark.planted
def test_real_run_does_not_recover(real):
    acc = real.accuracy()
    assert acc["recovered"] <= acc["control_recovered"] + 0.1 and acc["recovered"] <= 0.2
    assert real.verdict == "real"
    for point in real.sequence:  # a middle task-1 checkpoint and the last one
        assert point.recovered.exact_match <= 0.2 and point.decision.verdict == "real", point.label


@pytest.mark.slow
@pytest.mark.planted
def test_before_against_itself_is_none():
    spec = load_run(SAMPLES / "spurious")
    # nothing was forgotten, whatever the recovery does: a small budget decides it as well
    small = RecoverySettings(epochs=1, lr=1e-4, batch_size=32, shots=300, n_eval=500)
    assert _recover("spurious", spec.before, settings=small).verdict == "none"
