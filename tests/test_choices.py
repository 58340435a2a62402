"""Multiple-choice probes: the row formats, bad rows named by line, lm-eval's scoring reproduced by
hand, and every command that takes a probe taking one (recover, gate, landscape, features)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from forgetdiag import ProbeError, Runtime, load_probe
from forgetdiag.choices import encode_choices, score_choices, score_items
from forgetdiag.cli import app
from forgetdiag.evaluate import answer_loss, collate_batches
from forgetdiag.models import load_model, tokenize_probe
from forgetdiag.probes import ProbeItem

from helpers import assert_bad_input, write_jsonl

runner = CliRunner()
CITIES = ["paris", "rome", "oslo", "lima", "cairo", "quito"]
NAMES = ["alice", "bob", "carol", "dave", "erin", "frank"]


def rows(answer_as: str = "text"):
    """Six questions with 3 or 4 choices each (choices of unequal lengths), answers as text or index."""
    out = []
    for k, name in enumerate(NAMES):
        choices = [f" {c}" for c in (CITIES[k:] + CITIES[:k])[: 3 + k % 2]]
        right = (k * 5) % len(choices)
        answer = choices[right] if answer_as == "text" else right
        out.append(
            {
                "prompt": f"what is the birth city of {name} answer :",
                "choices": choices,
                "answer": answer,
                "group": name,
            }
        )
    return out


def test_text_and_index_answers_in_every_format_read_the_same(tmp_path):
    write_jsonl(tmp_path / "text.jsonl", rows("text"))
    write_jsonl(tmp_path / "index.jsonl", rows("index"))
    (tmp_path / "array.json").write_text(json.dumps(rows("index")))
    with open(tmp_path / "cell.csv", "w", newline="") as f:  # a `choices` cell holding a JSON list
        writer = csv.DictWriter(f, fieldnames=["prompt", "choices", "answer", "group"])
        writer.writeheader()
        writer.writerows({**r, "choices": json.dumps(r["choices"])} for r in rows("index"))
    with open(tmp_path / "columns.csv", "w", newline="") as f:  # choice_0..choice_3, empty cells at the end
        writer = csv.DictWriter(f, fieldnames=["prompt", "choice_0", "choice_1", "choice_2", "choice_3", "answer"])
        writer.writeheader()
        for r in rows("text"):
            writer.writerow(
                {"prompt": r["prompt"], "answer": r["answer"], **{f"choice_{j}": c for j, c in enumerate(r["choices"])}}
            )
    probes = {
        p: load_probe(tmp_path / p) for p in ("text.jsonl", "index.jsonl", "array.json", "cell.csv", "columns.csv")
    }
    reference = probes["text.jsonl"].items
    assert all(p.kind == "choice" and p.metrics == ("acc", "acc_norm") for p in probes.values())
    for name, probe in probes.items():
        strip = (lambda i: i) if name != "columns.csv" else (lambda i: ProbeItem(i.prompt, i.answer, None, i.choices))
        assert tuple(map(strip, probe.items)) == tuple(map(strip, reference)), name
    assert reference[1] == ProbeItem(
        "what is the birth city of bob answer :", " oslo", "bob", (" rome", " oslo", " lima", " cairo")
    )
    assert reference[1].answer_index == 1


@pytest.mark.parametrize(
    "row, message",
    [
        ({"prompt": "q", "answer": " a", "choices": " a, b"}, "row on line 2: 'choices' is str"),
        ({"prompt": "q", "answer": " a", "choices": None}, "row on line 2: 'choices' is NoneType"),
        ({"prompt": "q", "answer": " a", "choices": [" a"]}, "line 2: 'choices' has 1 choice(s)"),
        ({"prompt": "q", "answer": " z", "choices": [" a", " b"]}, "line 2: 'answer' ' z' is not among the 2 choices"),
        (
            {"prompt": "q", "answer": 2, "choices": [" a", " b"]},
            "line 2: 'answer' is the index 2, out of range for 2 choices",
        ),
        ({"prompt": "q", "answer": -1, "choices": [" a", " b"]}, "index -1, out of range"),
        ({"prompt": "q", "answer": True, "choices": [" a", " b"]}, "line 2: 'answer' is bool"),
        ({"prompt": "q", "answer": " a", "choices": [" a", " a"]}, "appears twice"),
        ({"prompt": "q", "answer": " a", "choices": [" a", 3]}, "line 2: choice 1 is 3"),
        ({"prompt": "q", "answer": " a"}, "line 2 is a prompt/answer row but the rows before it are multiple-choice"),
    ],
)
def test_bad_choice_rows_name_the_row(tmp_path, row, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [rows()[0], row])
    with pytest.raises(ProbeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_probe(path)


def test_bad_choice_rows_exit_2_with_one_line(tmp_path, llama_dir):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "q", "answer": 5, "choices": [" a", " b"]}])
    assert_bad_input(
        runner.invoke(app, ["score", str(llama_dir), "--probe", str(path)]), "bad.jsonl", "line 1", "index 5"
    )
    csv_path = tmp_path / "bad.csv"
    csv_path.write_text('prompt,choices,answer\nq,"[""a"", ""b""",a\n')
    assert_bad_input(runner.invoke(app, ["score", str(llama_dir), "--probe", str(csv_path)]), "line 2", "JSON list")


def test_choice_scores_are_lm_evals_by_hand(llama_dir, tokenizer):
    """Each pair scored alone (no padding, no batch) by a plain forward pass: summed log-probs,
    argmax, argmax per character; the batched scorer must agree."""
    model = load_model(load_probe_checkpoint(llama_dir), Runtime())
    items = [ProbeItem(r["prompt"], r["answer"], None, tuple(r["choices"])) for r in rows()]
    encoded = encode_choices(tokenizer, items)
    got = score_choices(model, encoded, batch_size=5)  # pairs of several items share a batch
    for k, item in enumerate(items):
        ll = []
        for choice in item.choices:
            prompt = tokenizer(item.prompt)["input_ids"]
            continuation = tokenizer(item.prompt + choice)["input_ids"][len(prompt) :]
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([prompt + continuation])).logits[0].double(), -1)
            ll.append(sum(float(logp[len(prompt) - 1 + j, t]) for j, t in enumerate(continuation)))
        ll = np.array(ll)
        np.testing.assert_allclose(got.loglik[k], ll, atol=1e-5)
        assert got.acc[k] == (np.argmax(ll) == item.answer_index)
        assert got.acc_norm[k] == (np.argmax(ll / [len(c) for c in item.choices]) == item.answer_index)
        assert got.nll[k] == pytest.approx(-ll[item.answer_index], abs=1e-5)


def load_probe_checkpoint(path):
    from forgetdiag import resolve_checkpoints

    return resolve_checkpoints(path, Runtime(), single="model")


def test_whitespace_at_the_end_of_the_prompt_moves_into_the_choices(tokenizer):
    """lm-eval's rule (and the exact-match path's): 'answer :' + ' rome' and 'answer : ' + 'rome'
    are the same tokens; acc_norm divides by the choice as written."""
    a = encode_choices(tokenizer, [ProbeItem("birth city answer :", " rome", None, (" paris", " rome"))])[0]
    b = encode_choices(tokenizer, [ProbeItem("birth city answer : ", "rome", None, ("paris", "rome"))])[0]
    assert a.options == b.options and a.answer == b.answer == 1
    assert a.lengths == (6, 5) and b.lengths == (5, 4)
    assert all(e.completion_ids[-1] != tokenizer.eos_token_id for e in a.options)  # a choice has no stop


def test_text_and_index_probes_give_the_same_numbers(tmp_path, llama_dir):
    text = write_jsonl(tmp_path / "text.jsonl", rows("text"))
    index = write_jsonl(tmp_path / "index.jsonl", rows("index"))
    out = runner.invoke(app, ["score", str(llama_dir), "--probe", str(text), "--probe", str(index), "--json", "-"])
    assert out.exit_code == 0, out.stderr
    records = json.loads(out.stdout)["scores"]
    by = {(r["probe"], r["metric"]): (r["value"], r["ci_low"], r["ci_high"]) for r in records}
    assert {m for _, m in by} == {"acc", "acc_norm"}
    for metric in ("acc", "acc_norm"):
        assert by[("text", metric)] == by[("index", metric)]


def test_the_right_choice_is_what_recovery_trains_on_and_landscape_measures(llama_dir, tokenizer):
    from forgetdiag import resolve_checkpoints
    from forgetdiag.probes import Probe

    probe = Probe("mc", tuple(ProbeItem(r["prompt"], r["answer"], None, tuple(r["choices"])) for r in rows()))
    checkpoint = resolve_checkpoints(llama_dir, Runtime(), single="model")
    encoded, _ = tokenize_probe(tokenizer, probe, checkpoint, Runtime())
    for item, e in zip(probe.items, encoded):
        assert e.completion_ids == e.options[item.answer_index].completion_ids  # the right choice, no stop
    model = load_model(checkpoint, Runtime())
    scores = score_items(model, encoded, pad_id=0)
    assert answer_loss(model, collate_batches(encoded, pad_id=0)) == pytest.approx(scores.answer_loss, rel=1e-6)


@pytest.fixture(scope="module")
def mc_probe(tmp_path_factory):
    """24 multiple-choice rows about 24 people (one group each)."""
    root = tmp_path_factory.mktemp("mc")
    out = []
    for k in range(24):
        name = NAMES[k % 6]
        choices = [f" {c}" for c in CITIES[:4]]
        out.append(
            {
                "prompt": f"what is the birth city of {name} {k} answer :",
                "choices": choices,
                "answer": k % 4,
                "group": f"p{k}",
            }
        )
    return write_jsonl(root / "mc.jsonl", out)


def test_recover_on_a_choice_probe_decides_on_acc(llama_dir, llama_dir_b, mc_probe, tmp_path):
    base = [
        "recover",
        str(llama_dir),
        str(llama_dir_b),
        "--probe",
        str(mc_probe),
        "--min-steps",
        "2",
        "--no-before-recovery",
    ]
    out = runner.invoke(app, [*base, "--json", str(tmp_path / "r.json")])
    assert out.exit_code == 0, out.stderr
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["metric"] == "acc" and data["recovery"]["metric"] == "acc"
    after = data["scores"]["after"]
    assert after["exact_match"] is None and 0 <= after["acc"] <= 1 and after["acc_norm"] is not None
    assert data["accuracy"]["after"] == after["acc"]
    assert np.mean(data["items"]["after"]) == pytest.approx(after["acc"])
    out = runner.invoke(app, [*base, "--metric", "acc_norm", "--json", str(tmp_path / "n.json")])
    assert out.exit_code == 0 and json.loads((tmp_path / "n.json").read_text())["metric"] == "acc_norm"
    refused = runner.invoke(app, [*base, "--metric", "exact_match"])
    assert_bad_input(refused, "--metric exact_match", "multiple-choice probe", "acc, acc_norm")


def test_gate_landscape_and_features_take_a_choice_probe(llama_dir, llama_dir_b, trainer_run, mc_probe):
    gate = runner.invoke(
        app,
        ["gate", str(llama_dir), str(llama_dir_b), "--probe", str(mc_probe), "--min-accuracy", "0", "--json", "-"],
    )
    assert gate.exit_code == 0, gate.stderr
    assert json.loads(gate.stdout)["numbers"]["accuracy"]["after"] is not None
    land = runner.invoke(
        app,
        [
            "landscape",
            *(str(trainer_run / f"checkpoint-{s}") for s in (5, 50, 100)),
            "--probe",
            str(mc_probe),
            "--grid",
            "3x3",
            "--json",
            "-",
        ],
    )
    assert land.exit_code == 0, land.stderr
    features = runner.invoke(
        app, ["features", str(llama_dir), str(llama_dir_b), "--probe", str(mc_probe), "--k", "2", "--json", "-"]
    )
    assert features.exit_code == 0, features.stderr
    assert json.loads(features.stdout)["analysis"] == "features"


def test_a_recovery_probe_of_the_other_kind_is_refused(llama_dir, llama_dir_b, mc_probe, tmp_path):
    answers = write_jsonl(tmp_path / "answers.jsonl", [{"prompt": "q", "answer": " a", "group": "x"}])
    out = runner.invoke(
        app, ["recover", str(llama_dir), str(llama_dir_b), "--probe", str(mc_probe), "--recovery-probe", str(answers)]
    )
    assert_bad_input(out, "prompt/answer rows", "multiple-choice rows")


def test_report_takes_a_choice_probe_and_its_metric(llama_dir, llama_dir_b, mc_probe, tmp_path):
    base = ["report", "--before", str(llama_dir), "--after", str(llama_dir_b), "--probe", str(mc_probe)]
    base += ["--min-steps", "2", "--out", str(tmp_path / "r.html"), "-q"]  # one pair: recover only
    out = runner.invoke(app, [*base, "--metric", "acc_norm", "--json", str(tmp_path / "r.json")])
    assert out.exit_code == 0, out.stderr
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["recover"]["metric"] == "acc_norm" and 0 <= data["recover"]["scores"]["after"]["acc_norm"] <= 1
    assert "metric acc_norm" in (tmp_path / "r.html").read_text()
    assert_bad_input(runner.invoke(app, [*base, "--metric", "first_token"]), "--metric first_token", "acc, acc_norm")
