"""`gate`: thresholds on recovery numbers and on lm-evaluation-harness scores; exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from forgetdiag.analyses.gate import GateThresholds, gate_lm_eval, gate_recovery, lm_eval_scores
from forgetdiag.cli import app
from forgetdiag.errors import ForgetdiagError

from helpers import assert_bad_input, assert_envelope, write_jsonl

RECOVER = {
    "verdict": "spurious",
    "accuracy": {"before": 0.98, "after": 0.12, "recovered": 0.91, "control_recovered": 0.02},
    "forgetting": 0.86,
    "alignment_loss": 0.79,
    "knowledge_loss": 0.07,
    "p_value": 1e-12,
    "intervals": {"alignment_loss": [0.74, 0.84], "knowledge_loss": [0.04, 0.10]},
}


def _lm_eval(acc, ppl, acc_se=0.01):
    return {
        "results": {
            "arc_easy": {
                "alias": "arc_easy",
                "acc,none": acc,
                "acc_stderr,none": acc_se,
                "acc_norm,none": acc + 0.02,
                "acc_norm_stderr,none": "N/A",
            },
            "wikitext": {"word_perplexity,none": ppl, "word_perplexity_stderr,none": "N/A", "bits_per_byte,none": 0.9},
        },
        "higher_is_better": {"arc_easy": {"acc": True, "acc_norm": True}, "wikitext": {"word_perplexity": False}},
    }


def test_recovery_thresholds():
    result = gate_recovery(RECOVER, GateThresholds(max_alignment_loss=0.10, max_knowledge_loss=0.10, min_accuracy=0.8))
    by_name = {c.name: c for c in result.checks}
    assert not by_name["alignment loss"].passed and by_name["alignment loss"].value == 0.79
    assert by_name["knowledge loss"].passed
    assert not by_name["accuracy after"].passed and by_name["accuracy after"].op == ">="
    assert not result.passed and len(result.failed) == 2
    assert gate_recovery(RECOVER, GateThresholds(max_knowledge_loss=0.1)).passed


def test_no_threshold_is_an_error():
    with pytest.raises(ForgetdiagError, match="no threshold given"):
        gate_recovery(RECOVER, GateThresholds())


def test_lm_eval_parsing_honours_higher_is_better_and_stderr():
    scores = lm_eval_scores(_lm_eval(0.7, 20.0), "x")
    assert scores[("arc_easy", "acc,none")] == {"value": 0.7, "stderr": 0.01, "higher_is_better": True}
    assert scores[("arc_easy", "acc_norm,none")]["stderr"] is None  # "N/A"
    assert scores[("wikitext", "word_perplexity,none")]["higher_is_better"] is False
    assert ("wikitext", "bits_per_byte,none") not in scores  # direction unknown: left out


def test_lm_eval_gate_directions():
    # accuracy drops 0.05; perplexity rises by 3 (worse) -> both are drops
    result = gate_lm_eval(_lm_eval(0.70, 20.0), _lm_eval(0.65, 23.0), max_drop=0.04)
    drops = {c.name: c for c in result.checks}
    assert drops["arc_easy acc,none drop"].value == pytest.approx(0.05)
    assert drops["wikitext word_perplexity,none drop"].value == pytest.approx(3.0)
    assert not result.passed
    # a perplexity that falls is an improvement: a negative drop passes
    better = gate_lm_eval(_lm_eval(0.70, 20.0), _lm_eval(0.70, 18.0), max_drop=0.01)
    assert better.passed


def test_lm_eval_gate_sigmas_widen_the_allowance():
    # drop 0.03, stderr 0.02 each -> combined 0.0283; allowed 0.01 + 1 x 0.0283 = 0.0383
    result = gate_lm_eval(
        _lm_eval(0.70, 20, 0.02), _lm_eval(0.67, 20, 0.02), max_drop=0.01, sigmas=1.0, metrics=("acc",)
    )
    (check,) = result.checks
    assert check.threshold == pytest.approx(0.01 + (2 * 0.02**2) ** 0.5) and check.passed


runner = CliRunner()


def test_cli_exit_codes_and_summary(tmp_path):
    saved = tmp_path / "recover.json"
    saved.write_text(json.dumps(RECOVER))
    md, out = tmp_path / "summary.md", tmp_path / "gate.json"
    failing = runner.invoke(
        app,
        [
            "gate",
            "--from-json",
            str(saved),
            "--max-alignment-loss",
            "0.10",
            "--max-knowledge-loss",
            "0.10",
            "--summary-md",
            str(md),
            "--json",
            str(out),
        ],
    )
    assert failing.exit_code == 1
    assert "threshold broken: alignment loss = 0.7900 breaks <= 0.1" in failing.stderr
    assert "FAIL" in md.read_text() and "knowledge loss" in md.read_text()
    assert assert_envelope(json.loads(out.read_text()), "gate")["passed"] is False
    passing = runner.invoke(app, ["gate", "--from-json", str(saved), "--max-knowledge-loss", "0.10"])
    assert passing.exit_code == 0 and "PASSED" in passing.stdout


def test_cli_lm_eval(tmp_path):
    before, after = tmp_path / "b.json", tmp_path / "a.json"
    before.write_text(json.dumps(_lm_eval(0.70, 20.0)))
    after.write_text(json.dumps(_lm_eval(0.69, 20.5)))
    args = ["gate", "--lm-eval-before", str(before), "--lm-eval-after", str(after)]
    assert runner.invoke(app, [*args, "--max-drop", "0.02", "--lm-eval-task", "arc_easy"]).exit_code == 0
    assert runner.invoke(app, [*args, "--max-drop", "0.02"]).exit_code == 1  # perplexity +0.5


@pytest.mark.parametrize(
    "args, message",
    [
        (["gate", "--max-drop", "0.1"], "options for lm-eval scores only (--max-drop); give --lm-eval-before"),
        (["gate", "--min-accuracy", "0.5"], "expected BEFORE AFTER --probe"),
        (["gate", "--lm-eval-before", "x.json", "--max-drop", "0.1"], "needs --lm-eval-before, --lm-eval-after"),
        (["gate", "--from-json", "missing.json", "--min-accuracy", "0.5"], "no such recover JSON file"),
        (
            [
                "gate",
                "--from-json",
                "r.json",
                "--max-knowledge-loss",
                "0.1",
                "--max-drop",
                "0.1",
                "--lm-eval-task",
                "x",
            ],
            "options for lm-eval scores only (--max-drop, --lm-eval-task)",
        ),
    ],
)
def test_cli_bad_input(args, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "extra, named",
    [
        (["--min-accuracy", "0.8"], "--min-accuracy"),
        (["--max-alignment-loss", "0.1", "--max-knowledge-loss", "0.05"], "--max-alignment-loss, --max-knowledge-loss"),
        (["--max-forgetting", "0.1"], "--max-forgetting"),
        (["--from-json", "recover.json"], "--from-json"),
    ],
)
def test_cli_lm_eval_refuses_recovery_thresholds(extra, named, tmp_path):
    """Recovery thresholds mean nothing for lm-eval scores: refused, never silently ignored."""
    before, after = tmp_path / "b.json", tmp_path / "a.json"
    before.write_text(json.dumps(_lm_eval(0.70, 20.0)))
    after.write_text(json.dumps(_lm_eval(0.40, 20.0)))  # would fail --max-drop: refusal comes first
    result = runner.invoke(
        app, ["gate", "--lm-eval-before", str(before), "--lm-eval-after", str(after), "--max-drop", "0.02", *extra]
    )
    assert_bad_input(result, named, "cannot be combined with --lm-eval-before", "--max-drop only")


def test_cli_every_threshold_holds_on_each_probe(tmp_path, monkeypatch):
    """Several --probe: one recovery per probe, each check named after its probe, the gate fails
    when any probe breaks a threshold."""
    import forgetdiag.analyses.gate as gate_module

    numbers = {
        "facts": RECOVER,
        "skills": {**RECOVER, "verdict": "real", "knowledge_loss": 0.40, "intervals": {"knowledge_loss": [0.35, 0.45]}},
    }
    ran = []

    class Recovered:
        timings: dict = {}

        def __init__(self, file):
            self.file = file
            self.decision = type("Decision", (), {"supported": True, "reason": ""})()

        def to_dict(self):
            return numbers[self.file.stem]

    def fake_recover(before, after, probe, **kwargs):  # probe: loaded once, by the gate
        file = Path(probe.path)
        ran.append((str(before), [str(a) for a in after], file.name, kwargs["recovery_probe"]))
        return Recovered(file)

    monkeypatch.setattr(gate_module, "recover", fake_recover)
    probes = [write_jsonl(tmp_path / f"{n}.jsonl", [{"prompt": "q", "answer": "a"}]) for n in numbers]
    out = tmp_path / "gate.json"
    result = runner.invoke(
        app,
        [
            "gate",
            "b",
            "a",
            "--probe",
            str(probes[0]),
            "--probe",
            str(probes[1]),
            "--max-knowledge-loss",
            "0.10",
            "--json",
            str(out),
        ],
    )
    assert result.exit_code == 1, (result.stdout, result.stderr)
    assert ran == [("b", ["a"], "facts.jsonl", None), ("b", ["a"], "skills.jsonl", None)]
    checks = {c["name"]: c["passed"] for c in json.loads(out.read_text())["checks"]}
    assert checks == {"facts: knowledge loss": True, "skills: knowledge loss": False}
    assert result.stderr.strip() == (
        "forgetdiag: threshold broken: skills: knowledge loss = 0.4000 breaks <= 0.1 (95% interval 0.350 to 0.450)"
    )
    assert "skills: recovery verdict real" in result.stdout
    # one recovery probe cannot serve two probes; a missing probe file fails before any recovery
    ran.clear()
    two = ["gate", "b", "a", "--probe", str(probes[0]), "--probe", str(probes[1]), "--max-knowledge-loss", "0.1"]
    assert_bad_input(
        runner.invoke(app, [*two, "--recovery-probe", str(probes[0])]),
        "--recovery-probe pairs with one --probe; found 2 probes",
    )
    result = runner.invoke(
        app,
        [
            "gate",
            "b",
            "a",
            "--probe",
            str(probes[0]),
            "--probe",
            str(tmp_path / "missing.jsonl"),
            "--max-knowledge-loss",
            "0.1",
        ],
    )
    assert result.exit_code == 2 and "missing.jsonl" in result.stderr and ran == []


# --- on the shipped samples --------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    "run, failed, passed",
    [
        ("spurious", ["alignment loss"], ["knowledge loss"]),  # knowledge intact, alignment undone
        ("real", ["knowledge loss"], ["alignment loss"]),  # recovery gives back almost nothing
    ],
)
def test_gate_on_the_samples(run, failed, passed, tmp_path):
    """The spurious run breaks an alignment-loss threshold and keeps a knowledge-loss one;
    the real run breaks the knowledge-loss threshold (docs/science.md, 3.2)."""
    from forgetdiag.runfile import load_run

    spec = load_run(Path(__file__).resolve().parents[1] / "sample_checkpoints" / run)
    out = tmp_path / "gate.json"
    result = runner.invoke(
        app,
        [
            "gate",
            str(spec.before),
            str(spec.after),
            "--probe",
            str(spec.probes["old"]),
            "--recovery-probe",
            str(spec.probes["recovery"]),
            "--control",
            str(spec.control),
            "--max-alignment-loss",
            "0.10",
            "--max-knowledge-loss",
            "0.05",
            "--json",
            str(out),
            "--quiet",
        ],
    )
    assert result.exit_code == 1, (result.stdout, result.stderr)
    checks = {c["name"]: c for c in json.loads(out.read_text())["checks"]}
    assert [n for n, c in checks.items() if not c["passed"]] == failed
    assert [n for n, c in checks.items() if c["passed"]] == passed
    for name in failed:
        assert f"threshold broken: {name}" in result.stderr
