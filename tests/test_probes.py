"""Probe files: formats, validation with line numbers, splits that keep groups whole."""

from __future__ import annotations

import csv
import json

import pytest

from forgetdiag import ProbeError, load_probe, split_probe
from forgetdiag.probes import Probe, ProbeFields, ProbeItem, with_chat_template

from helpers import make_tokenizer, write_jsonl

ROWS = [{"prompt": f"q{k} of p{k // 3}?", "answer": f" a{k}", "group": f"p{k // 3}"} for k in range(30)]


def test_jsonl_json_and_csv_read_the_same(tmp_path):
    write_jsonl(tmp_path / "p.jsonl", ROWS)
    (tmp_path / "p.json").write_text(json.dumps(ROWS))
    with open(tmp_path / "p.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["prompt", "answer", "group"])
        writer.writeheader()
        writer.writerows(ROWS)
    probes = [load_probe(tmp_path / f"p.{ext}") for ext in ("jsonl", "json", "csv")]
    assert probes[0].items == probes[1].items == probes[2].items
    assert probes[0].items[4] == ProbeItem("q4 of p1?", " a4", "p1")
    assert probes[0].name == "p" and len(probes[0]) == 30


def test_field_names_are_configurable(tmp_path):
    write_jsonl(tmp_path / "p.jsonl", [{"question": "Q?", "target": " A", "entity": "e"}])
    probe = load_probe(tmp_path / "p.jsonl", fields=ProbeFields(prompt="question", answer="target", group="entity"))
    assert probe.items == (ProbeItem("Q?", " A", "e"),)


@pytest.mark.parametrize(
    "content, message",
    [
        ("", "empty probe file"),
        ("  \n\n", "empty probe file"),
        ('{"prompt": "a", "answer": "b"}\n{"prompt": "c", "answer": \n', "invalid JSON on line 2"),
        ('{"prompt": "a", "answer": "b"}\n\n{"prompt": "c"}\n', "line 3 has no 'answer' field"),
        ('{"prompt": "a", "answer": "   "}\n', "empty 'answer'"),
        ('["not", "objects"]', "expected an object"),
        ('{"prompt": "a", "answer": "b"}\n[1, 2]\n', "line 2 is list"),
    ],
)
def test_bad_probe_files_say_what_and_where(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(ProbeError, match=message):
        load_probe(path)


def test_missing_probe_file(tmp_path):
    with pytest.raises(ProbeError, match="no such probe file"):
        load_probe(tmp_path / "nope.jsonl")


def test_split_keeps_groups_whole_and_is_seeded():
    probe = Probe("p", tuple(ProbeItem(r["prompt"], r["answer"], r["group"]) for r in ROWS))
    recovery, evaluation = split_probe(probe, seed=3)
    rec_groups = {i.group for i in recovery.items}
    eval_groups = {i.group for i in evaluation.items}
    assert not rec_groups & eval_groups
    assert len(rec_groups) == 5 and len(eval_groups) == 5  # half of 10 groups each
    assert len(recovery) + len(evaluation) == 30
    assert split_probe(probe, seed=3) == (recovery, evaluation)
    assert split_probe(probe, seed=4) != (recovery, evaluation)


def test_split_by_shots_takes_whole_groups_until_enough():
    probe = Probe("p", tuple(ProbeItem(r["prompt"], r["answer"], r["group"]) for r in ROWS))
    recovery, evaluation = split_probe(probe, n_recovery=4, n_eval=9, seed=0)
    assert len(recovery) == 6  # two groups of 3: the first group alone (3) is not enough
    assert len(evaluation) == 9
    assert not {i.group for i in recovery.items} & {i.group for i in evaluation.items}


def test_rows_without_group_split_by_row():
    probe = Probe("p", tuple(ProbeItem(f"q{k}", f" a{k}") for k in range(10)))
    recovery, evaluation = split_probe(probe, n_recovery=3, seed=0)
    assert len(recovery) == 3 and len(evaluation) == 7
    assert not set(recovery.items) & set(evaluation.items)


def test_chat_template_wraps_prompts():
    tokenizer = make_tokenizer()
    tokenizer.chat_template = "{% for m in messages %}<{{ m.role }}> {{ m.content }}{% endfor %}<assistant>"
    probe = with_chat_template(Probe("p", (ProbeItem("hi", " there"),)), tokenizer)
    # the reply starts right after the generation prompt: no leading space (an instruct model says
    # "Paris" after "assistant\n", not " Paris")
    assert probe.items[0].prompt == "<user> hi<assistant>" and probe.items[0].answer == "there"
    with pytest.raises(ProbeError, match="no chat template"):
        with_chat_template(probe, make_tokenizer())
