"""`forgetdiag remedy`: replay mixes (exact counts and exclusion on planted data) and self-output
rows from a tiny model whose greedy answers are planted."""

from __future__ import annotations

import json
from collections import Counter
from fractions import Fraction

import pytest
from typer.testing import CliRunner

from forgetdiag import ForgetdiagError, load_probe
from forgetdiag.analyses.replay import ReplaySettings, replay_count, replay_mix
from forgetdiag.analyses.self_output import SelfOutputSettings, self_output
from forgetdiag.cli import app
from forgetdiag.probes import Probe, ProbeItem
from forgetdiag.runtime import Runtime

from helpers import assert_bad_input, assert_envelope, build, llama_config, make_tokenizer, save, teach, write_jsonl

runner = CliRunner()


# --- replay ------------------------------------------------------------------------------------


def _old_new():
    """30 old groups of 3 rows (g0..g29), 90 new rows; the evaluation holds groups g0..g9, and a
    row of its own (group e) whose text is old row (g20, 0) up to whitespace."""
    old = Probe("old", tuple(ProbeItem(f"q {g} {k}", f" a{g}.{k}", f"g{g}") for g in range(30) for k in range(3)))
    new = Probe("new", tuple(ProbeItem(f"new {k}", f" b{k}", f"n{k}") for k in range(90)))
    evaluation = Probe(
        "eval",
        tuple(ProbeItem(f"q {g} {k}", f" a{g}.{k}", f"g{g}") for g in range(10) for k in range(3))
        + (ProbeItem("q  20 0", "a20.0 ", "e"),),
    )
    return old, new, evaluation


def test_replay_count_is_the_share_of_the_output_rounded_half_up():
    # hand-worked: K = floor(r * N / (1 - r) + 1/2)
    assert replay_count(90, 0.1) == 10  # 10 / 100 exactly
    assert replay_count(1500, 0.1) == 167  # 166.67
    assert replay_count(10, 0.2) == 3  # 2.5 rounds up
    assert replay_count(3, 0.5) == 3
    assert replay_count(1, 0.01) == 1  # at least one row
    for n in (7, 90, 1500):
        for r in (0.05, 0.1, 0.25, 0.5, 0.9):
            k = replay_count(n, r)
            exact = Fraction(str(r)) * n / (1 - Fraction(str(r)))
            assert abs(k - exact) <= Fraction(1, 2) or (exact < Fraction(1, 2) and k == 1)  # the nearest count
            assert abs(Fraction(k, n + k) - Fraction(str(r))) < Fraction(1, n + k)  # the share within a row


def test_replay_mix_is_exact_and_never_replays_the_evaluation():
    old, new, evaluation = _old_new()
    mix = replay_mix(old, new, exclude=evaluation, settings=ReplaySettings(ratio=0.1, seed=3))
    replayed = [r for r in mix.rows if r.source == "old"]
    assert len(mix.rows) == 100 and len(replayed) == mix.n_replayed == 10 and mix.share == 0.1
    assert Counter((r.prompt, r.answer) for r in mix.rows if r.source == "new") == Counter(
        (i.prompt, i.answer) for i in new.items
    )
    assert mix.n_excluded == 31  # groups g0..g9 (30 rows) and the one row equal up to whitespace
    assert not {r.group for r in replayed} & {f"g{g}" for g in range(10)}
    assert ("q 20 0", " a20.0") not in {(r.prompt, r.answer) for r in replayed}
    old_rows = {(i.prompt, i.answer, i.group) for i in old.items}
    assert all((r.prompt, r.answer, r.group) in old_rows for r in replayed)
    # by group: whole groups of 3, the last one cut to its first row (10 = 3 + 3 + 3 + 1)
    sizes = sorted(Counter(r.group for r in replayed).values())
    assert sizes == [1, 3, 3, 3] and mix.replayed_groups == 4
    cut = next(g for g, n in Counter(r.group for r in replayed).items() if n == 1)
    assert next(r for r in replayed if r.group == cut).prompt.endswith(" 0") or cut == "g20"
    # seeded: the same seed gives the same rows in the same order, another seed other rows
    again = replay_mix(old, new, exclude=evaluation, settings=ReplaySettings(ratio=0.1, seed=3))
    assert again.rows == mix.rows
    other = replay_mix(old, new, exclude=evaluation, settings=ReplaySettings(ratio=0.1, seed=4))
    assert {r for r in other.rows if r.source == "old"} != set(replayed)
    assert [r.source for r in mix.rows] != ["new"] * 90 + ["old"] * 10  # shuffled together


def test_replay_refuses_a_ratio_the_old_rows_cannot_fill():
    old, new, evaluation = _old_new()
    fits = replay_mix(old, new, exclude=evaluation, settings=ReplaySettings(ratio=0.39))
    assert fits.n_replayed == 58  # 57.54 rounded, of the 59 left after the exclusion
    with pytest.raises(ForgetdiagError, match="needs 135 old rows; old has 59 .31 left out"):
        replay_mix(old, new, exclude=evaluation, settings=ReplaySettings(ratio=0.6))
    for bad in (0, 1, -0.1, 1.5, float("nan")):
        with pytest.raises(ForgetdiagError, match="--ratio"):
            ReplaySettings(ratio=bad)


def test_replay_cli_writes_a_probe_file_and_its_json(tmp_path):
    old, new, evaluation = _old_new()
    paths = {}
    for probe in (old, new, evaluation):
        rows = [{"prompt": i.prompt, "answer": i.answer, "group": i.group} for i in probe.items]
        paths[probe.name] = write_jsonl(tmp_path / f"{probe.name}.jsonl", rows)
    out, report = tmp_path / "mix.jsonl", tmp_path / "mix.json"
    args = ["remedy", "replay", "--old", str(paths["old"]), "--new", str(paths["new"]), "--out", str(out)]
    result = runner.invoke(app, [*args, "--exclude", str(paths["eval"]), "--seed", "3", "--json", str(report)])
    assert result.exit_code == 0, result.output
    mix = replay_mix(old, new, exclude=evaluation, settings=ReplaySettings(ratio=0.1, seed=3))
    assert [json.loads(line) for line in out.read_text().splitlines()] == [r.to_dict() for r in mix.rows]
    assert len(load_probe(out)) == 100  # any trainer reading the probe format reads it
    data = assert_envelope(json.loads(report.read_text()), "replay")
    assert data["n_replayed"] == 10 and data["n_excluded"] == 31 and data["share_old"] == 0.1
    assert "10 replayed rows" in result.stdout


@pytest.mark.parametrize("ratio", ["0", "1", "-0.2", "1.5"])
def test_replay_cli_refuses_a_ratio_outside_0_1(tmp_path, ratio):
    old = write_jsonl(tmp_path / "old.jsonl", [{"prompt": "p", "answer": " a", "group": "g"}])
    new = write_jsonl(tmp_path / "new.jsonl", [{"prompt": "q", "answer": " b"}])
    out = tmp_path / "mix.jsonl"
    args = ["remedy", "replay", "--old", str(old), "--new", str(new), "--out", str(out), "--ratio", ratio]
    assert_bad_input(runner.invoke(app, args), "--ratio", "between 0 and 1")
    assert not out.exists()


def test_replay_cli_refuses_an_exclusion_that_is_not_a_probe_and_an_output_that_is_an_input(tmp_path):
    old = write_jsonl(tmp_path / "old.jsonl", [{"prompt": f"p{k}", "answer": " a", "group": f"g{k}"} for k in range(9)])
    new = write_jsonl(tmp_path / "new.jsonl", [{"prompt": "q", "answer": " b"}])
    before = {p: p.read_bytes() for p in (old, new)}
    run = lambda *extra, out=tmp_path / "mix.jsonl": runner.invoke(
        app, ["remedy", "replay", "--old", str(old), "--new", str(new), "--out", str(out), *extra]
    )
    toml = tmp_path / "run.toml"
    toml.write_text('name = "x"\n')
    assert_bad_input(run("--exclude", str(toml)), "--exclude", "invalid JSON on line 1")
    rows = write_jsonl(tmp_path / "rows.jsonl", [{"question": "p0", "reply": " a"}])
    assert_bad_input(run("--exclude", str(rows)), "--exclude", "no 'prompt' field")
    assert_bad_input(run("--exclude", str(tmp_path / "missing.jsonl")), "--exclude", "no such probe file")
    for target in (old, new):
        assert_bad_input(run(out=target), "--out", "is an input of this command")
    assert_bad_input(run("--exclude", str(rows), out=rows), "--out", "is an input of this command")
    assert {p: p.read_bytes() for p in (old, new)} == before and not (tmp_path / "mix.jsonl").exists()


# --- self-output -------------------------------------------------------------------------------
# The old model is taught (helpers.teach, asserted exact) what to say: its own answers to four
# prompts, and its restatements when shown three of the targets.

TEMPLATE = "{prompt}{answer} {prompt}"
PROMPT = "what is the birth city of {} answer :"
TAUGHT = {"alice": " paris", "bob": " rome", "carol": " oslo", "dave": " lima"}  # what it says
TARGETS = {"alice": " paris", "bob": " oslo", "carol": " lima", "dave": " quito"}  # the new data
RESTATES = {"bob": " oslo", "carol": " lima city", "dave": " rome"}  # shown the target, it says


def _restate_prompt(name: str) -> str:
    return TEMPLATE.replace("{prompt}", PROMPT.format(name)).replace("{answer}", TARGETS[name])


@pytest.fixture(scope="module")
def planted_old(tmp_path_factory):
    tokenizer = make_tokenizer()
    model = build(llama_config(vocab=len(tokenizer)), seed=0)
    items = [ProbeItem(PROMPT.format(n), a) for n, a in TAUGHT.items()]
    items += [ProbeItem(_restate_prompt(n), a) for n, a in RESTATES.items()]
    teach(model, tokenizer, items)
    return save(model, tmp_path_factory.mktemp("planted") / "old", tokenizer=tokenizer)


def _new() -> Probe:
    return Probe("new", tuple(ProbeItem(PROMPT.format(n), a, n) for n, a in TARGETS.items()))


@pytest.mark.planted
def test_self_output_rows_follow_the_planted_answers(planted_old):
    result = self_output(planted_old, _new(), settings=SelfOutputSettings(rewrite_prompt=TEMPLATE))
    rows = {r.group: r for r in result.rows}
    assert {n: r.self_output for n, r in rows.items()} == TAUGHT  # the old model's greedy answers
    assert [r.prompt for r in result.rows] == [PROMPT.format(n) for n in TARGETS]
    assert rows["alice"].outcome == "same" and rows["alice"].answer == " paris"
    # bob: restated as the target itself; carol: restated in other words that keep the target
    assert rows["bob"].outcome == "restated" and rows["bob"].answer == " oslo" and not rows["bob"].rewritten
    assert rows["carol"].outcome == "restated" and rows["carol"].answer == " lima city" and rows["carol"].rewritten
    # dave: the restatement (" rome") lost the target: the target is kept
    assert rows["dave"].outcome == "target" and rows["dave"].answer == " quito"
    assert rows["dave"].restatement == " rome"
    assert result.counts() == {"same": 1, "restated": 2, "target": 1} and result.n_rewritten == 1
    assert "1 rows rewritten" in result.summary()
    assert all(r.target == TARGETS[r.group] for r in result.rows)
    # batching does not change a word
    one = self_output(
        planted_old, _new(), settings=SelfOutputSettings(rewrite_prompt=TEMPLATE), runtime=Runtime(batch_size=1)
    )
    assert one.rows == result.rows


@pytest.mark.planted
def test_self_output_without_a_rewrite_prompt_keeps_every_target(planted_old):
    result = self_output(planted_old, _new())
    assert [r.answer for r in result.rows] == list(TARGETS.values())
    assert [r.self_output for r in result.rows] == list(TAUGHT.values())
    assert result.counts() == {"same": 1, "restated": 0, "target": 3} and result.n_rewritten == 0
    assert "0 rows rewritten" in result.summary()


@pytest.mark.planted
def test_self_output_cli_writes_rows_and_refuses_bad_input(planted_old, tmp_path):
    new = write_jsonl(
        tmp_path / "new.jsonl", [{"prompt": i.prompt, "answer": i.answer, "group": i.group} for i in _new().items]
    )
    out, report = tmp_path / "self.jsonl", tmp_path / "self.json"
    args = ["remedy", "self-output", str(planted_old), "--new", str(new), "--out", str(out)]
    result = runner.invoke(app, [*args, "--rewrite-prompt", TEMPLATE, "--json", str(report), "--batch-size", "2"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [set(r) >= {"prompt", "answer", "group", "self_output", "target", "outcome"} for r in rows] == [True] * 4
    assert [r["answer"] for r in rows] == [" paris", " oslo", " lima city", " quito"]
    assert [r["self_output"] for r in rows] == list(TAUGHT.values())
    assert len(load_probe(out)) == 4
    data = assert_envelope(json.loads(report.read_text()), "self-output")
    assert data["n_rewritten"] == 1 and data["n_same"] == 1 and "1 rows rewritten" in data["summary"]
    assert_bad_input(runner.invoke(app, [*args[:-1], str(new)]), "--out", "is an input of this command")
    inside = ["remedy", "self-output", str(planted_old), "--new", str(new), "--out", str(planted_old / "x.jsonl")]
    assert_bad_input(runner.invoke(app, inside), "--out", "checkpoint directory")
    assert_bad_input(runner.invoke(app, [*args, "--rewrite-prompt", "{prompt} again"]), "--rewrite-prompt", "{answer}")
    assert_bad_input(runner.invoke(app, [*args, "--max-new-tokens", "0"]), "--max-new-tokens")
