"""The CLI: exit codes, one-line errors, JSON output, and input trees left byte-identical."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from forgetdiag.cli import app

from helpers import assert_bad_input, assert_envelope, tree_digest, write_malicious_pickle

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_inspect_model_dir(llama_dir):
    result = run("inspect", llama_dir)
    assert result.exit_code == 0, result.stderr
    assert "LlamaForCausalLM" in result.stdout and "2 layers, hidden 32" in result.stdout
    assert "embed q k v o gate up down" in result.stdout
    assert "All weights finite" in result.stdout


def test_inspect_json_to_stdout(trainer_run):
    result = run("inspect", trainer_run, "--json", "-")
    assert result.exit_code == 0, result.stderr
    data = assert_envelope(json.loads(result.stdout), "inspect")
    assert [c["label"] for c in data["checkpoints"]] == ["checkpoint-5", "checkpoint-50", "checkpoint-100"]
    assert [c["step"] for c in data["checkpoints"]] == [5, 50, 100]
    assert data["compatible"] is True and data["checkpoints"][0]["tokenizer"] is True
    assert not (trainer_run.parent / "UNPICKLED").exists()


def test_inspect_json_file_and_lora(lora_dir, llama_dir, tmp_path):
    out = tmp_path / "out.json"
    result = run("inspect", llama_dir, lora_dir, "--json", out)
    assert result.exit_code == 0, result.stderr
    data = json.loads(out.read_text())
    assert data["checkpoints"][1]["lora"]["rank"] == 4
    assert data["checkpoints"][1]["lora"]["targets"] == 6  # 3 modules x 2 layers
    assert "LoRA r=4 alpha=8" in result.stdout


def test_inspect_pickle_needs_the_flag(pickle_dir):
    assert_bad_input(run("inspect", pickle_dir), "--allow-pickle")
    assert run("inspect", pickle_dir, "--allow-pickle").exit_code == 0


@pytest.mark.parametrize(
    "case", ["missing", "empty", "config_only", "truncated", "garbage", "malicious_pickle", "nan", "architectures"]
)
def test_bad_input_exits_2_with_one_line(case, llama_dir, gpt2_dir, copy_tree, tmp_path):
    args = []
    if case == "missing":
        args, expect = [tmp_path / "nope"], "no such file"
    elif case == "empty":
        (tmp_path / "empty").mkdir()
        args, expect = [tmp_path / "empty"], "empty directory"
    elif case == "architectures":
        args, expect = [llama_dir, gpt2_dir], "different architectures"
    else:
        bad = copy_tree(llama_dir, "bad")
        weights = bad / "model.safetensors"
        if case == "config_only":
            weights.unlink()
            expect = "no weights"
        elif case == "truncated":
            weights.write_bytes(weights.read_bytes()[:1000])
            expect = "not a readable safetensors"
        elif case == "garbage":
            weights.write_bytes(b"\xff" * 64)
            expect = "not a readable safetensors"
        elif case == "malicious_pickle":
            weights.unlink()
            write_malicious_pickle(bad / "pytorch_model.bin", tmp_path / "PWNED")
            args, expect = ["--allow-pickle"], "weights_only"
        elif case == "nan":
            state = load_file(str(weights))
            state["model.norm.weight"][0] = float("inf")
            save_file(state, str(weights), metadata={"format": "pt"})
            expect = "model.norm.weight holds Inf"
        args = [bad, *args]
    out = tmp_path / "out.json"
    assert_bad_input(run("inspect", *args, "--json", out), expect)
    assert not out.exists()
    assert not (tmp_path / "PWNED").exists()


def test_refuses_to_write_into_a_checkpoint(llama_dir):
    before = tree_digest(llama_dir)
    assert_bad_input(
        run("inspect", llama_dir, "--json", llama_dir / "inspect.json"),
        "refusing to write inside the checkpoint directory",
    )
    assert tree_digest(llama_dir) == before


def test_inputs_stay_byte_identical(llama_dir, lora_dir, trainer_run, tmp_path):
    roots = [llama_dir, lora_dir, trainer_run]
    before = [tree_digest(r) for r in roots]
    assert run("inspect", llama_dir, lora_dir, "--json", tmp_path / "a.json").exit_code == 0
    assert run("inspect", trainer_run, "--json", tmp_path / "b.json").exit_code == 0
    assert [tree_digest(r) for r in roots] == before


@pytest.mark.parametrize(
    "args, expect",
    [
        (["inspect"], "Missing argument"),
        (["inspect", ".", "--bogus"], "No such option: --bogus"),
        (["angles", "a", "b", "c", "--rank", "many"], "Invalid value for '--rank'"),
        (["recover", "a", "b", "--shots", "0"], "Invalid value for '--shots'"),
        (["nosuch"], "No such command 'nosuch'"),
    ],
)
def test_usage_errors_exit_2_with_one_line(args, expect):
    result = run(*args)
    assert_bad_input(result, expect, "--help')")


def test_no_arguments_prints_help():
    result = run()
    assert result.exit_code == 2 and "Usage:" in result.output and "recover" in result.output


PEOPLE = ["alice", "bob", "carol", "dave", "erin", "frank"]
CITIES = ["paris", "rome", "oslo", "lima", "cairo", "quito"]


def _probe_rows():
    return [
        {"prompt": f"what is the birth city of {p} answer :", "answer": f" {c}", "group": p}
        for p in PEOPLE
        for c in CITIES[:2]
    ]


@pytest.mark.parametrize(
    "case, expect",
    [
        ("empty", "empty probe file"),
        ("invalid_json", "line 3"),
        ("no_answer", "answer"),
        ("too_long", "context"),
    ],
)
def test_bad_probes_exit_2_with_one_line_and_write_nothing(case, expect, llama_dir, llama_dir_b, tmp_path):
    rows = _probe_rows()
    probe = tmp_path / "probe.jsonl"
    if case == "empty":
        probe.write_text("")
    elif case == "invalid_json":
        lines = [json.dumps(r) for r in rows]
        lines[2] = '{"prompt": "what is", "answer": '
        probe.write_text("\n".join(lines) + "\n")
    elif case == "no_answer":
        probe.write_text("".join(json.dumps({"prompt": r["prompt"], "group": r["group"]}) + "\n" for r in rows))
    else:  # 100 words: more than the tiny models' context of 64 positions
        rows[0]["prompt"] = " ".join(["what"] * 100) + " answer :"
        probe.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out, page = tmp_path / "out.json", tmp_path / "out.html"
    before = tree_digest(llama_dir)
    result = run("recover", llama_dir, llama_dir_b, "--probe", probe, "--json", out, "--html", page, "--quiet")
    assert_bad_input(result, expect)
    assert not out.exists() and not page.exists()
    assert tree_digest(llama_dir) == before


def test_recover_and_gate_leave_their_inputs_byte_identical(llama_dir, llama_dir_b, tmp_path):
    probe = tmp_path / "probe.jsonl"
    probe.write_text("".join(json.dumps(r) + "\n" for r in _probe_rows()))
    roots = [llama_dir, llama_dir_b]
    before = [tree_digest(r) for r in roots]
    common = ["--probe", probe, "--control", llama_dir_b, "--shots", 4, "--epochs", 1, "--quiet"]
    recovered = run(
        "recover", llama_dir, llama_dir_b, *common, "--json", tmp_path / "r.json", "--html", tmp_path / "r.html"
    )
    assert recovered.exit_code == 0, recovered.stderr
    gated = run(
        "gate",
        llama_dir,
        llama_dir_b,
        *[a for a in common if a != "--epochs" and a != 1],
        "--max-forgetting",
        1.0,
        "--json",
        tmp_path / "g.json",
    )
    assert gated.exit_code == 0, gated.stderr
    assert json.loads((tmp_path / "g.json").read_text())["passed"] is True
    assert [tree_digest(r) for r in roots] == before


def test_console_script_and_module_entry_point(llama_dir):
    proc = subprocess.run(
        [sys.executable, "-m", "forgetdiag", "inspect", str(llama_dir), "--json", "-"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["checkpoints"][0]["n_layers"] == 2
    proc = subprocess.run(
        [sys.executable, "-m", "forgetdiag", "inspect", "/nonexistent/x"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and proc.stdout == ""


def test_internal_errors_exit_1_without_traceback(llama_dir, monkeypatch):
    import forgetdiag.analyses.inspect as cmd  # the command imports it when it runs

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(cmd, "inspect_checkpoints", broken)
    result = run("inspect", llama_dir)
    assert result.exit_code == 1
    assert "internal error: RuntimeError: boom" in result.stderr and "Traceback" not in result.stderr
