"""Hostile input, as an adversarial user would try it: every case ends with exit 2 and one stderr
line naming the problem (no traceback, nothing half-written), and leaves the inputs byte-identical.

One parametrized case per class of failure found in review: writes into checkpoints, outputs
that overwrite inputs, names that escape, bad values that used to crash, values that used to be
silently wrong, valid input that used to be mangled, and extra stderr lines.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from forgetdiag.cli import app

from helpers import assert_bad_input, tree_digest, write_jsonl, write_malicious_pickle

runner = CliRunner()
ROWS = [
    {"prompt": f"what is the birth city of {n} answer :", "answer": f" {c}", "group": n}
    for n, c in zip(
        ["alice", "bob", "carol", "dave", "erin", "frank"], ["paris", "rome", "oslo", "lima", "cairo", "quito"]
    )
]


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture()
def world(tmp_path, llama_dir, llama_dir_b, lora_dir):
    """Copies of two checkpoints, an adapter over the first, a probe and a run file."""
    root = tmp_path / "in"
    root.mkdir()
    before = Path(shutil.copytree(llama_dir, root / "before"))
    Path(shutil.copytree(llama_dir_b, root / "after"))
    adapter = Path(shutil.copytree(lora_dir, root / "adapter"))
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(before)
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    write_jsonl(root / "old.jsonl", ROWS)
    (root / "forgetdiag.toml").write_text(
        '[checkpoints]\nbefore = "before"\nafter = "after"\n[probes]\nold = "old.jsonl"\n'
    )
    return root


def _checked(world: Path, args: list, *fragments) -> None:
    """Run the command; it must be bad input naming `fragments`, and leave `world` byte-identical."""
    digest = tree_digest(world)
    assert_bad_input(run(*args), *fragments)
    assert tree_digest(world) == digest


# --- 1. writes into checkpoint directories ---------------------------------------------------


def _replay_into(world: Path, directory: Path) -> list:
    """``remedy replay`` of the world's probe, written to ``directory``/mix.jsonl."""
    probe = world / "old.jsonl"
    return ["remedy", "replay", "--old", probe, "--new", probe, "--out", directory / "mix.jsonl"]


@pytest.mark.parametrize(
    "args, fragment",
    [
        (lambda w: ["inspect", w / "adapter", "--json", w / "before" / "x.json"], "inside the checkpoint directory"),
        (
            lambda w: ["inspect", w / "adapter", "--base", w / "before", "--json", w / "before" / "sub" / "x.json"],
            "inside the checkpoint directory",
        ),
        (
            lambda w: [
                "recover",
                w / "before",
                w / "after",
                "--probe",
                w / "old.jsonl",
                "--json",
                w / "after" / "r.json",
            ],
            "inside the checkpoint directory",
        ),
        (
            lambda w: [
                "gate",
                w / "before",
                w / "after",
                "--probe",
                w / "old.jsonl",
                "--control",
                w / "adapter",
                "--max-knowledge-loss",
                "0.1",
                "--json",
                w / "adapter" / "g.json",
            ],
            "inside the checkpoint directory",
        ),
        (
            lambda w: [
                "gate",
                w / "before",
                w / "after",
                "--probe",
                w / "old.jsonl",
                "--control",
                w / "adapter",
                "--max-knowledge-loss",
                "0.1",
                "--summary-md",
                w / "adapter" / "s.md",
            ],
            "inside the checkpoint directory",
        ),
        (lambda w: ["samples", "build", "--out", w / "before" / "new"], "inside the checkpoint directory"),
        # a command that reads no checkpoint: the path itself lies in one (a model, an adapter)
        (lambda w: _replay_into(w, w / "after"), "inside the checkpoint directory"),
        (lambda w: _replay_into(w, w / "adapter"), "inside the checkpoint directory"),
    ],
)
def test_never_writes_into_a_checkpoint(world, args, fragment):
    _checked(world, args(world), fragment)


def test_a_config_json_alone_does_not_make_a_checkpoint(world, tmp_path):
    """A project directory with a config.json of its own (no weights) is not a checkpoint: the
    output is written there."""
    project = tmp_path / "project"
    project.mkdir()
    (project / "config.json").write_text('{"name": "my project"}')
    result = run(*_replay_into(world, project))
    assert result.exit_code == 0, result.output
    assert len((project / "mix.jsonl").read_text().splitlines()) >= len(ROWS)


def test_a_base_directory_named_by_its_parent_is_a_directory_not_a_file(world):
    _checked(
        world,
        ["inspect", world / "adapter", "--base", world / "before", "--json", world / "before" / ".."],
        "is a directory",
    )


# --- 2. outputs that would overwrite inputs ------------------------------------------------------


@pytest.mark.parametrize(
    "args, fragment",
    [
        (
            lambda w: ["recover", w / "before", w / "after", "--probe", w / "old.jsonl", "--json", w / "old.jsonl"],
            "is an input of this command",
        ),
        (lambda w: ["report", w, "--out", w / "forgetdiag.toml"], "is an input of this command"),
        (
            lambda w: ["gate", "--from-json", w / "old.jsonl", "--max-forgetting", "0.1", "--json", w / "old.jsonl"],
            "is an input of this command",
        ),
        (
            lambda w: ["angles", w / "before", w / "after", w / "before", "--json", w / "x.out", "--html", w / "x.out"],
            "both write",
        ),
    ],
)
def test_outputs_never_overwrite_inputs_or_each_other(world, args, fragment):
    _checked(world, args(world), fragment)


# --- 3. names that escape, directories found late -------------------------------------------------


@pytest.mark.parametrize("name", ["../escaped", "a/b"])
def test_a_run_files_name_cannot_place_the_report(world, tmp_path, monkeypatch, name):
    (world / "forgetdiag.toml").write_text(
        f'name = "{name}"\n[checkpoints]\nbefore = "before"\nafter = "after"\n[probes]\nold = "old.jsonl"\n'
    )
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    _checked(world, ["report", world], "outside the working directory")
    assert list(work.iterdir()) == [] and not (tmp_path / "escaped-report.html").exists()


def test_a_missing_output_directory_is_found_before_the_work(world, tmp_path):
    _checked(
        world,
        [
            "recover",
            world / "before",
            world / "after",
            "--probe",
            world / "old.jsonl",
            "--json",
            tmp_path / "missing" / "r.json",
        ],
        "does not exist",
    )


# --- 4. bad values that used to end in "internal error" ---------------------------------------------


def _config(path: Path, **changes) -> None:
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def _adapter_config(path: Path, **changes) -> None:
    config = json.loads((path / "adapter_config.json").read_text())
    config.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(config))


def _two_adapters(world: Path) -> Path:
    other = Path(shutil.copytree(world / "adapter", world / "adapter2"))
    _adapter_config(world / "adapter", base_model_name_or_path=str(other))
    _adapter_config(other, base_model_name_or_path=str(world / "adapter"))
    return world / "adapter"


@pytest.mark.parametrize(
    "setup, args, fragment",
    [
        (
            lambda w: _config(w / "before", num_hidden_layers="four"),
            lambda w: ["inspect", w / "before"],
            "num_hidden_layers",
        ),
        (
            lambda w: _adapter_config(w / "adapter", base_model_name_or_path=str(w / "adapter")),
            lambda w: ["inspect", w / "adapter"],
            "is itself an adapter",
        ),
        (_two_adapters, lambda w: ["inspect", w / "adapter"], "is itself an adapter"),
        (
            lambda w: _adapter_config(w / "adapter", lora_alpha="16"),
            lambda w: ["inspect", w / "adapter"],
            "'lora_alpha' must be a positive number",
        ),
        (
            lambda w: (w / "r.json").write_text(json.dumps({"accuracy": {"after": "0.5"}})),
            lambda w: ["gate", "--from-json", w / "r.json", "--min-accuracy", "0.4"],
            "must be a number or null",
        ),
        (lambda w: None, lambda w: ["gate", "--from-json", w, "--min-accuracy", "0.4"], "is a directory"),
        (lambda w: (w / "out").mkdir(), lambda w: ["inspect", w / "before", "--json", w / "out"], "is a directory"),
        (lambda w: None, lambda w: ["inspect", w / "before", "--json", "/proc/forgetdiag.json"], "cannot write"),
        (lambda w: None, lambda w: ["inspect", w / "before", "--json", "/sys/forgetdiag.json"], "cannot write"),
        (
            lambda w: None,
            lambda w: ["recover", w / "before", w / "after", "--probe", w / "old.jsonl", "--lr", "-1"],
            "--lr -1: expected a number > 0",
        ),
        (
            lambda w: None,
            lambda w: ["recover", w / "before", w / "after", "--probe", w / "old.jsonl", "--lr", "nan"],
            "--lr nan: expected a number > 0",
        ),
        (
            lambda w: None,
            lambda w: ["recover", w / "before", w / "after", "--probe", w / "old.jsonl", "--seed", str(2**70)],
            "--seed",
        ),
        (lambda w: None, lambda w: ["inspect", w / "before", "--json", w / "ck[/bold]x" / "a.json"], "ck[/bold]x"),
    ],
)
def test_bad_values_are_bad_input_not_internal_errors(world, setup, args, fragment):
    setup(world)
    _checked(world, args(world), fragment)


@pytest.mark.parametrize(
    "tamper",
    [
        lambda d: {**d, "surfaces": [1, 2]},
        lambda d: {**d, "computed": "yes"},
        lambda d: {**d, "anchors": [{"point": "origin", "computed": True, "losses": 3}]},
        lambda d: {**d, "directions": None},
        lambda d: {**d, "alphas": "x"},
    ],
)
def test_a_tampered_resume_file_is_refused(world, tmp_path, tamper):
    saved = tmp_path / "l.json"
    args = [
        "landscape",
        world / "before",
        world / "after",
        world / "adapter",
        "--probe",
        world / "old.jsonl",
        "--grid",
        "2x2",
        "--json",
        saved,
        "--quiet",
    ]
    assert run(*args).exit_code == 0
    saved.write_text(json.dumps(tamper(json.loads(saved.read_text()))))
    _checked(world, [*args, "--resume"], "cannot resume")


def test_an_index_naming_other_shards_than_the_weights_file(world, llama_dir):
    weights = world / "before"
    torch.save(load_file(str(weights / "model.safetensors")), weights / "pytorch_model.bin")
    (weights / "model.safetensors").unlink()
    (weights / "pytorch_model.bin.index.json").write_text(
        json.dumps({"weight_map": {"model.embed_tokens.weight": "pytorch_model-00001-of-00002.bin"}})
    )
    _checked(world, ["inspect", weights, "--allow-pickle"], "pytorch_model-00001-of-00002.bin")


# --- 5. values that used to give silently wrong numbers ---------------------------------------------


def _nan_weight(path: Path) -> None:
    state = load_file(str(path / "model.safetensors"))
    state["model.layers.1.mlp.up_proj.weight"][0, 0] = float("nan")
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})


def _missing_tensor(path: Path) -> None:
    state = load_file(str(path / "model.safetensors"))
    del state["model.layers.0.self_attn.q_proj.weight"]
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})


@pytest.mark.parametrize(
    "setup, fragment",
    [
        (lambda w: _nan_weight(w / "after"), "holds NaN"),
        (lambda w: _missing_tensor(w / "after"), "missing from the checkpoint"),
    ],
)
def test_broken_weights_never_get_a_verdict(world, setup, fragment):
    setup(world)
    _checked(world, ["recover", world / "before", world / "after", "--probe", world / "old.jsonl", "--quiet"], fragment)


@pytest.mark.parametrize(
    "args, fragment",
    [
        (lambda w: ["recover", w / "before", w / "after", "--probe", w / "old.jsonl", "--lr", "0"], "--lr 0"),
        (lambda w: ["gate", "--from-json", w / "r.json", "--min-accuracy", "1.5"], "--min-accuracy 1.5"),
        (
            lambda w: ["gate", "--lm-eval-before", w / "b.json", "--lm-eval-after", w / "a.json", "--max-drop", "0.1"],
            "must be true or false",
        ),
    ],
)
def test_out_of_range_and_mistyped_values(world, args, fragment):
    (world / "r.json").write_text(json.dumps({"accuracy": {"after": 0.5}}))
    lm = {"results": {"t": {"acc,none": 0.5}}, "higher_is_better": {"t": {"acc": "false"}}}
    for name in ("b.json", "a.json"):
        (world / name).write_text(json.dumps(lm))
    _checked(world, args(world), fragment)


@pytest.mark.parametrize("answer", [["paris"], True, 17.5, {"city": "paris"}])
def test_answers_must_be_text(world, answer):
    write_jsonl(world / "old.jsonl", ROWS[:-1] + [{**ROWS[-1], "answer": answer}])
    _checked(world, ["recover", world / "before", world / "after", "--probe", world / "old.jsonl"], "expected text")


# --- 6. valid input that used to be refused or mangled ---------------------------------------------------


def test_line_separators_inside_json_strings_are_text(tmp_path):
    from forgetdiag.probes import load_probe

    path = tmp_path / "p.jsonl"
    path.write_text(
        "".join(
            json.dumps({"prompt": f"a\u2028b\u0085c {k}", "answer": " x"}, ensure_ascii=False) + "\n" for k in range(3)
        ),
        encoding="utf-8",
    )
    probe = load_probe(path)
    assert len(probe) == 3 and probe.items[0].prompt == "a\u2028b\u0085c 0"


def test_csv_quoted_fields_keep_their_newlines_and_commas(tmp_path):
    from forgetdiag.probes import load_probe

    path = tmp_path / "p.csv"
    path.write_text('prompt,answer,group\n"Q: one,\nline two?\nA:", paris,g1\n"Q: x?\nA:",rome,g2\n', encoding="utf-8")
    probe = load_probe(path)
    assert probe.items[0].prompt == "Q: one,\nline two?\nA:" and probe.items[1].answer == "rome"


# --- 7. one line on stderr, user text shown as written ----------------------------------------------------


def test_a_prompt_too_long_is_one_line_without_library_warnings(world):
    """In a fresh process, as a user runs it: transformers is imported inside the command there,
    after the CLI set up its logging (in this test process it is loaded already)."""
    import subprocess
    import sys

    for name in ("before", "after"):  # a tokenizer that knows its length: it warns past it
        config = json.loads((world / name / "tokenizer_config.json").read_text())
        (world / name / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": 64}))
    write_jsonl(world / "old.jsonl", ROWS + [{"prompt": " ".join(["alice"] * 200), "answer": " paris", "group": "z"}])
    digest = tree_digest(world)
    args = ["recover", world / "before", world / "after", "--probe", world / "old.jsonl", "--quiet"]
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, "-m", "forgetdiag", *map(str, args)],
        env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "more than the model's context" in proc.stderr, proc.stderr
    assert tree_digest(world) == digest


def test_markup_in_a_directory_name_is_shown_as_written(world):
    odd = Path(shutil.copytree(world / "before", world / "ck[red]x"))
    result = run("inspect", odd)
    assert result.exit_code == 0 and "ck[red]x" in result.stdout


# --- 8. gate reads every JSON forgetdiag writes ----------------------------------------------------------


def test_gate_from_json_reads_report_and_gate_json(world, tmp_path):
    recover_json = {
        "analysis": "recover",
        "accuracy": {"before": 0.9, "after": 0.5},
        "forgetting": 0.4,
        "alignment_loss": 0.3,
        "knowledge_loss": 0.1,
        "verdict": "mixed",
    }
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"analysis": "report", "recover": recover_json}))
    gated = tmp_path / "g.json"
    assert run("gate", "--from-json", report, "--max-knowledge-loss", "0.2", "--json", gated).exit_code == 0
    assert run("gate", "--from-json", gated, "--max-knowledge-loss", "0.05").exit_code == 1


# --- pickles: no payload ever runs -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "layout",
    [
        "bin",
        "sharded_bin",
        "trainer_files",
        "adapter_bin",
        "optimizer_in_model_dir",
        "bin_next_to_safetensors",
        "base_of_adapter",
    ],
)
def test_no_pickle_payload_ever_runs(world, tmp_path, layout):
    marker = tmp_path / "UNPICKLED"
    target = world / "before"
    if layout == "bin":
        (target / "model.safetensors").unlink()
        write_malicious_pickle(target / "pytorch_model.bin", marker)
    elif layout == "sharded_bin":
        (target / "model.safetensors").unlink()
        write_malicious_pickle(target / "pytorch_model-00001-of-00001.bin", marker)
        (target / "pytorch_model.bin.index.json").write_text(
            json.dumps({"weight_map": {"w": "pytorch_model-00001-of-00001.bin"}})
        )
    elif layout == "trainer_files":
        run_dir = world / "run" / "checkpoint-5"
        shutil.copytree(world / "after", run_dir)
        for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth", "training_args.bin"):
            write_malicious_pickle(run_dir / name, marker)
        target = world / "run"
    elif layout == "adapter_bin":
        (world / "adapter" / "adapter_model.safetensors").unlink()
        write_malicious_pickle(world / "adapter" / "adapter_model.bin", marker)
        target = world / "adapter"
    elif layout == "optimizer_in_model_dir":
        write_malicious_pickle(target / "optimizer.pt", marker)
    elif layout == "bin_next_to_safetensors":
        write_malicious_pickle(target / "pytorch_model.bin", marker)
    else:  # the adapter's base holds only a pickle
        (target / "model.safetensors").unlink()
        write_malicious_pickle(target / "pytorch_model.bin", marker)
        target = world / "adapter"
    for extra in ([], ["--allow-pickle"]):
        result = run("inspect", target, *extra)
        assert result.exit_code in (0, 2) and "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) <= 1
        assert not marker.exists()


# --- interrupted builds leave nothing behind ---------------------------------------------------------------


def test_sigterm_during_samples_build_removes_the_half_built_tree(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen(
        [sys.executable, "-m", "forgetdiag", "samples", "build", "--out", str(tmp_path / "s"), "--quiet"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".s.building-*")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.1)
    assert list(tmp_path.glob(".s.building-*")), "the build never started"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and err.strip() == "forgetdiag: error: interrupted"
    assert list(tmp_path.iterdir()) == []


# --- a refused command is cheap: no model code is imported before the guard --------------------------------

_REFUSALS = """
import json, sys
from typer.testing import CliRunner
from forgetdiag.cli import app
S = "sample_checkpoints/spurious"; C0, C1, C2 = (f"{S}/checkpoint-{n}" for n in (0, 50, 100))
P = "sample_checkpoints/probes/task0_heldout.jsonl"; X = f"{C0}/x.json"
cases = [
    ["inspect", C0, "--json", X],
    ["angles", C0, C1, C2, "--json", X],
    ["recover", C0, C1, "--probe", P, "--json", X],
    ["gate", C0, C1, "--probe", P, "--max-forgetting", "0.5", "--json", X],
    ["report", S, "--json", X],
    ["landscape", C0, C1, C2, "--probe", P, "--json", X],
    ["features", C0, C1, "--probe", P, "--json", X],
    ["magnitudes", C0, C1, "--probe", P, "--json", X],
    ["tokens", C0, "--data", P, "--json", X],
    ["advise", S, "--json", X],
    ["score", C0, "--probe", P, "--json", X],
]
out = []
for args in cases:
    result = CliRunner().invoke(app, args)
    out.append([args[0], result.exit_code, "torch" in sys.modules, result.stderr])
print(json.dumps(out))
"""


def test_a_refused_output_never_imports_torch():
    """The guard and the option checks run before any model code is imported: a refused
    command costs the CLI's start (about half a second), not torch's import (over a second)."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, "-c", _REFUSALS], cwd=root, env={"PYTHONPATH": str(root)}, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    for name, code, torch_loaded, stderr in json.loads(proc.stdout):
        assert code == 2 and "inside the checkpoint directory" in stderr, (name, stderr)
        assert not torch_loaded, f"{name} imported torch before refusing its output"
