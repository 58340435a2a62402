"""forgetdiag score: every checkpoint on every probe, numbers against independent references
(greedy generation, hand-written Wilson intervals, a bootstrap), long-format JSON, tables that
fit 80 columns, and one curve per probe on the page."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from rich.console import Console
from scipy.stats import norm
from typer.testing import CliRunner

from forgetdiag import Runtime, resolve_checkpoints
from forgetdiag.analyses.score import ScoreRecord, ScoreResult, loss_interval, score_checkpoints
from forgetdiag.cli import app
from forgetdiag.evaluate import exact_by_generation, score
from forgetdiag.models import load_model, tokenize_probe
from forgetdiag.probes import load_probe
from forgetdiag.render.score import score_table

from helpers import assert_bad_input, assert_envelope, plotly_figures, write_jsonl

runner = CliRunner()
WORDS = ["paris", "rome", "oslo", "lima", "cairo", "quito", "acme", "globex"]


@pytest.fixture(scope="module")
def probes(tmp_path_factory):
    root = tmp_path_factory.mktemp("probes")
    answers = [
        {"prompt": f"what is the birth city of {n} answer :", "answer": f" {WORDS[k % 8]}", "group": n}
        for k, n in enumerate(["alice", "bob", "carol", "dave", "erin", "frank"] * 5)
    ]
    choices = [
        {
            "prompt": f"who works at {WORDS[6 + k % 2]} answer :",
            "choices": [f" {w}" for w in WORDS[:4]],
            "answer": k % 4,
        }
        for k in range(20)
    ]
    return write_jsonl(root / "old.jsonl", answers), write_jsonl(root / "mc.jsonl", choices)


def wilson(p: float, n: int, z: float = norm.ppf(0.975)) -> tuple[float, float]:
    """The Wilson score interval, written out."""
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return centre - half, centre + half


def test_every_checkpoint_of_a_run_on_every_probe(trainer_run, probes, tmp_path):
    old, mc = probes
    out = runner.invoke(
        app, ["score", str(trainer_run), "--probe", str(old), "--probe", str(mc), "--json", str(tmp_path / "s.json")]
    )
    assert out.exit_code == 0, out.stderr
    data = assert_envelope(json.loads((tmp_path / "s.json").read_text()), "score")
    assert tuple(data)[5] == "scores"  # right after the envelope
    assert data["checkpoints"] == ["checkpoint-5", "checkpoint-50", "checkpoint-100"]  # step order
    scores = data["scores"]
    assert len(scores) == 3 * (3 + 2)
    assert all({"checkpoint", "path", "probe", "metric", "value", "n"} <= set(r) for r in scores)
    assert {(r["probe"], r["metric"]) for r in scores} == {
        ("old", "exact_match"), ("old", "first_token"), ("old", "answer_loss"), ("mc", "acc"), ("mc", "acc_norm"),
    }  # fmt: skip
    pandas = pytest.importorskip("pandas")
    frame = pandas.DataFrame(scores)
    assert frame.pivot_table(index="checkpoint", columns=["probe", "metric"], values="value").shape == (3, 5)
    # the numbers, against greedy generation and hand-written intervals
    runtime = Runtime()
    probe = load_probe(old)
    for ckpt in resolve_checkpoints(trainer_run, runtime):
        from forgetdiag.models import load_tokenizer

        tokenizer = load_tokenizer(ckpt, runtime)
        encoded, stops = tokenize_probe(tokenizer, probe, ckpt, runtime)
        model = load_model(ckpt, runtime)
        generated = exact_by_generation(model, encoded, pad_id=0, eos_id=stops.accepted)
        direct = score(model, encoded, pad_id=0, stops=stops.accepted)
        got = {r["metric"]: r for r in scores if r["checkpoint"] == ckpt.label and r["probe"] == "old"}
        assert got["exact_match"]["value"] == generated.mean() and got["exact_match"]["n"] == 30
        assert got["exact_match"]["path"] == str(ckpt.path)
        assert (got["exact_match"]["ci_low"], got["exact_match"]["ci_high"]) == pytest.approx(
            wilson(generated.mean(), 30), abs=1e-9
        )
        assert got["first_token"]["value"] == direct.first_token.mean()
        assert got["answer_loss"]["value"] == pytest.approx(direct.nll.sum() / direct.n_tokens.sum())
        assert got["answer_loss"]["ci_low"] < got["answer_loss"]["value"] < got["answer_loss"]["ci_high"]


def test_the_loss_interval_agrees_with_a_bootstrap():
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 6, size=400)
    nll = rng.gamma(2.0, 0.6, size=400) * tokens
    low, high = loss_interval(nll, tokens)
    picks = rng.integers(0, 400, size=(4000, 400))  # (replicates, items) resampled with replacement
    boot = nll[picks].sum(1) / tokens[picks].sum(1)
    b_low, b_high = np.percentile(boot, [2.5, 97.5])
    assert low == pytest.approx(b_low, abs=0.02 * (high - low) + 0.005)
    assert high == pytest.approx(b_high, abs=0.02 * (high - low) + 0.005)
    assert (low + high) / 2 == pytest.approx(nll.sum() / tokens.sum())
    assert all(math.isnan(v) for v in loss_interval(nll[:1], tokens[:1]))


def _result(labels, loss=0.123) -> ScoreResult:
    from forgetdiag.analyses.score import ProbeSummary

    probes = (
        ProbeSummary("old_task_probe", "prompt/answer", 1500, None, ("exact_match", "first_token", "answer_loss")),
        ProbeSummary("mc", "multiple-choice", 100, None, ("acc", "acc_norm")),
    )
    records = []
    for k, label in enumerate(labels):
        for p in probes:
            for m in p.metrics:
                value = 12.345 + k if m == "answer_loss" else 0.5 + 0.01 * k
                records.append(ScoreRecord(label, label, p.name, m, value, p.n, value - 0.011, value + 0.012, k))
    return ScoreResult(tuple(labels), probes, tuple(records), "95% intervals")


@pytest.mark.parametrize(
    "labels",
    [
        [f"checkpoint-{s}" for s in (0, 10, 100, 1000)],
        [f"runs/{run}/checkpoint-{s}" for run in ("spurious", "real") for s in (0, 100)],
        [f"/very/long/path/to/experiments/2024/run-{k}-with-a-long-name/checkpoint-1000" for k in range(3)],
    ],
)
def test_tables_fit_80_columns_and_never_cut_a_number(labels):
    console = Console(width=80, record=True)
    result = _result(labels)
    console.print(score_table(result))
    text = console.export_text()
    assert max(len(line) for line in text.splitlines()) <= 80
    for r in result.scores:  # every value and interval whole, on one line
        assert f"{r.value:.3f} [{r.ci_low:.2f}, {r.ci_high:.2f}]" in text, r


def test_html_has_one_curve_per_probe_with_the_json_values(trainer_run, probes, tmp_path):
    old, mc = probes
    result = score_checkpoints(trainer_run, [old, mc])
    from forgetdiag.render.score import write_score_html

    write_score_html(tmp_path / "s.html", result)
    figures = plotly_figures((tmp_path / "s.html").read_text())
    accuracy = figures[0][0]
    assert [t["name"] for t in accuracy] == ["old (exact match)", "mc (acc)"]
    for trace, (probe, metric) in zip(accuracy, [("old", "exact_match"), ("mc", "acc")]):
        assert trace["y"] == [r.value for r in result.curve(probe, metric)]
        assert trace["x"] == [5, 50, 100]  # the steps
    assert [t["name"] for t in figures[1][0]] == ["old (answer loss)"]
    assert "exact match" in result.summary() and "checkpoint-5" in result.summary()


def test_bad_inputs_exit_2(trainer_run, probes, tmp_path):
    old, _ = probes
    assert_bad_input(
        runner.invoke(app, ["score", str(trainer_run), "--probe", str(tmp_path / "x.jsonl")]), "no such probe file"
    )
    assert_bad_input(runner.invoke(app, ["score", str(tmp_path / "nope"), "--probe", str(old)]), "no such file")
    assert_bad_input(
        runner.invoke(
            app,
            ["score", str(trainer_run), "--probe", str(old), "--json", str(trainer_run / "checkpoint-5" / "x.json")],
        ),
        "refusing to write inside the checkpoint",
    )
