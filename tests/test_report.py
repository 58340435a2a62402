"""`report`: one offline page for a whole run; rendered in real headless Chromium."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from forgetdiag.cli import app
from forgetdiag.render import output

from browser import CHROMIUM, render
from helpers import (
    TEST_SEED,
    assert_envelope,
    build,
    llama_config,
    make_tokenizer,
    qa_items,
    reformat,
    save,
    teach,
    tree_digest,
    write_jsonl,
)

pytestmark = pytest.mark.planted  # outcomes of planted training runs (see helpers.teach)

NAMES, CITIES, ITEMS = qa_items()
XSS = "<script>document.body.setAttribute('data-pwned','1')</script>"
ALERT = "<script>alert(1)</script>"  # the probe; escaped, it reads:
ALERT_ESCAPED = "&lt;script&gt;alert(1)&lt;/script&gt;"
EVIL_NAME = "<img src=x onerror=\\\"document.body.setAttribute('data-pwned','2')\\\">"
runner = CliRunner()
RECOVERY = ["--lr", "5e-4", "--min-steps", "40"]  # gentle: the planted verdict holds on every kernel set


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A run whose task 1 re-formats the answers (spurious forgetting), with a run file."""
    root = tmp_path_factory.mktemp("report")
    tok = make_tokenizer(None, NAMES + CITIES + ["what", "is", "the", "birth", "city", "of", "answer", ":", "who"])
    config = llama_config(vocab=tok.vocab_size, hidden=48, inter=96)
    model = build(config, seed=TEST_SEED)
    teach(model, tok, ITEMS)
    run = root / "run"
    save(model, run / "checkpoint-0", tokenizer=tok)
    for step in (5, 10):
        shifted = reformat(model, tok, ITEMS, epochs=10, seed=step)
        save(model, run / f"checkpoint-{step}", tokenizer=tok)
    save(build(config, seed=TEST_SEED + 1), root / "control", tokenizer=tok)
    rows = [{"prompt": i.prompt, "answer": i.answer, "group": i.group} for i in ITEMS]
    # The 41st of 65 groups comes first in the seed-0 evaluation part, whose first rows the report
    # shows as recover's examples: the script prompts go there so the page must show them.
    rows[40:40] = [{"prompt": p, "answer": " c1", "group": "xss"} for p in (XSS, ALERT)]
    write_jsonl(root / "old.jsonl", rows)
    write_jsonl(root / "new.jsonl", [{"prompt": i.prompt, "answer": i.answer} for i in shifted])
    (run / "forgetdiag.toml").write_text(f'''name = "{EVIL_NAME}"
description = "planted: answers re-formatted, knowledge kept"
expected_verdict = "spurious"
[checkpoints]
before = "checkpoint-0"
after = "checkpoint-5"
control = "../control"
run = "."
landscape = ["checkpoint-0", "checkpoint-5", "checkpoint-10"]
[probes]
old = "../old.jsonl"
new = "../new.jsonl"
''')
    return root


@pytest.fixture(scope="module")
def report(tiny_run, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("report_out")
    before = tree_digest(tiny_run)
    result = runner.invoke(
        app,
        [
            "report",
            str(tiny_run / "run"),
            "--out",
            str(out_dir / "r.html"),
            "--json",
            str(out_dir / "r.json"),
            "--grid",
            "3",
            *RECOVERY,
            "--quiet",
        ],
    )
    assert result.exit_code == 0, (result.stdout, result.stderr)
    assert tree_digest(tiny_run) == before  # nothing written into the run
    return out_dir, result


def test_report_json_twin(report):
    out_dir, result = report
    data = assert_envelope(json.loads((out_dir / "r.json").read_text()), "report")
    assert data["verdict"] == "spurious" and data["recover"]["verdict"] == "spurious"
    assert set(data["timings_s"]) == {"recover", "angles", "landscape", "features", "total"}
    assert data["skipped"] == {}
    assert len(data["fingerprints"]) == 4  # three run checkpoints and the control
    assert data["command"].startswith("forgetdiag report")
    for part in ("recover", "angles", "landscape", "features"):  # each analysis keeps its own envelope
        assert_envelope(data[part], part)
    assert data["landscape"]["alphas"] and data["angles"]["records"] and data["features"]
    assert "Time by analysis" in result.stdout and "r.html" in result.stdout


def _numbers(data):
    """A report's JSON without what depends on the clock."""
    if isinstance(data, dict):
        return {k: _numbers(v) for k, v in data.items() if k not in ("timings_s", "command")}
    if isinstance(data, list):
        return [_numbers(v) for v in data]
    return data


def test_overlapped_analyses_give_the_sequential_numbers(report, tiny_run):
    """The CLI ran recover alongside the others (a one-thread model on a multi-core CPU);
    the API, one after the other, must give every number identically."""
    from forgetdiag.analyses.recovery import RecoverySettings
    from forgetdiag.analyses.report import ReportSettings, _can_overlap, build_report
    from forgetdiag.checkpoints import find_checkpoints
    from forgetdiag.models import Runtime
    from forgetdiag.runfile import load_run

    if (os.cpu_count() or 1) >= 2:
        assert _can_overlap(find_checkpoints(tiny_run / "run"), Runtime())
    assert not _can_overlap(find_checkpoints(tiny_run / "run"), Runtime(threads=4))
    assert not _can_overlap(find_checkpoints(tiny_run / "run"), Runtime(dtype="bfloat16"))
    out_dir, _ = report
    cli = json.loads((out_dir / "r.json").read_text())
    settings = ReportSettings(recovery=RecoverySettings(lr=5e-4, min_steps=40), grid=3, overlap=False)
    api = json.loads(output.to_json(build_report(load_run(tiny_run / "run"), settings=settings).to_dict()))
    assert _numbers(api) == _numbers(cli)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (.ci/run installs it)")
def test_report_renders_offline_in_chromium(report, tmp_path_factory):
    out_dir, _ = report
    page = out_dir / "r.html"
    source = page.read_text()
    n_figures = source.count('class="plotly-graph-div"')
    artifacts = Path(os.environ.get("FORGETDIAG_ARTIFACTS") or tmp_path_factory.mktemp("artifacts"))
    artifacts.mkdir(parents=True, exist_ok=True)
    shot = artifacts / "report.png"
    rendered = render(page, shot)
    print(f"report screenshot: {shot}")
    assert n_figures >= 8
    assert rendered.count(r'class="[^"]*js-plotly-plot') == n_figures  # every plot drawn
    assert rendered.count(r'class="main-svg"') >= n_figures
    assert rendered.console_errors == []
    assert "spurious forgetting: the old knowledge is intact" in rendered.dom
    assert "data-pwned" not in rendered.dom.replace("setAttribute('data-pwned'", "")  # text, never run
    assert "&lt;img src=x onerror=" in rendered.dom  # the run's name, shown as text
    assert ALERT_ESCAPED in rendered.dom and ALERT not in rendered.dom  # a probe prompt, as text
    assert shot.stat().st_size > 10_000


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (.ci/run installs it)")
def test_probe_prompt_with_a_script_shows_as_text(tmp_path):
    from forgetdiag.render import html

    page = html.write_page(
        tmp_path / "x.html", "probe", [html.Section("examples", [html.table(["prompt", "answer"], [[XSS, " c1"]])])]
    )
    rendered = render(page, tmp_path / "x.png", height=600)
    assert "&lt;script&gt;document.body.setAttribute" in rendered.dom
    assert 'data-pwned="1"' not in rendered.dom and rendered.console_errors == []


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (.ci/run installs it)")
def test_console_messages_and_failed_loads_are_caught(tmp_path):
    """The "no console errors" checks above can fail: any console message, and any resource
    that does not load (offline, a CDN script is one), is reported."""
    pages = {
        "boom": '<script>console.error("boom")</script><p>x</p>',
        "missing": '<img src="missing.png"><script src="https://cdn.plot.ly/plotly.min.js"></script>',
        "clean": "<p>nothing to say</p>",
    }
    console = {}
    for name, body in pages.items():
        page = tmp_path / f"{name}.html"
        page.write_text(f"<!DOCTYPE html><html><head><title>{name}</title></head><body>{body}</body></html>")
        console[name] = render(page, tmp_path / f"{name}.png", height=200).console_errors
    assert len(console["boom"]) == 1 and '"boom"' in console["boom"][0]
    failed = " ".join(console["missing"])
    assert len(console["missing"]) == 2 and "Failed to load resource" in failed
    assert (tmp_path / "missing.png").as_uri() in failed and "cdn.plot.ly" in failed
    assert console["clean"] == []


def test_user_text_is_escaped_in_the_source(report):
    out_dir, _ = report
    shown = [e["prompt"] for e in json.loads((out_dir / "r.json").read_text())["recover"]["examples"]]
    assert XSS in shown and ALERT in shown  # the page has to show them
    source = (out_dir / "r.html").read_text()
    assert XSS not in source and ALERT not in source and "<img src=x" not in source
    assert ALERT_ESCAPED in source and "&lt;script&gt;document.body.setAttribute(" in source
    assert "&lt;img src=x" in source


def test_missing_inputs_are_skipped_with_a_note(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run / "run", run)
    shutil.copytree(tiny_run / "control", tmp_path / "control")
    shutil.copy(tiny_run / "old.jsonl", tmp_path / "old.jsonl")
    (run / "forgetdiag.toml").write_text(
        'name = "partial"\n[checkpoints]\nbefore = "checkpoint-0"\n'
        'after = "checkpoint-5"\n[probes]\nold = "../old.jsonl"\n'
    )
    result = runner.invoke(
        app,
        [
            "report",
            str(run),
            "--out",
            str(tmp_path / "p.html"),
            "--json",
            str(tmp_path / "p.json"),
            "--skip",
            "features",
            "--lr",
            "1e-3",
            "-q",
        ],
    )
    assert result.exit_code == 0, result.stderr
    data = json.loads((tmp_path / "p.json").read_text())
    assert data["recover"] is not None and data["features"] is None
    assert data["skipped"]["features"] == "skipped on request"
    assert "three single checkpoints" in data["skipped"]["angles"]
    assert "landscape skipped" in result.stderr


def test_report_from_options(tiny_run, tmp_path):
    result = runner.invoke(
        app,
        [
            "report",
            "--before",
            str(tiny_run / "run" / "checkpoint-0"),
            "--after",
            str(tiny_run / "run" / "checkpoint-10"),
            "--probe",
            str(tiny_run / "old.jsonl"),
            "--out",
            str(tmp_path / "o.html"),
            "--skip",
            "landscape",
            "--skip",
            "angles",
            "--skip",
            "features",
            "--lr",
            "1e-3",
            "-q",
        ],
    )
    assert result.exit_code == 0, result.stderr
    assert (tmp_path / "o.html").is_file() and "checkpoint-10" in result.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["report", "/nonexistent"], "no run description"),
        (["report", "--skip", "everything"], "--skip everything"),
    ],
)
def test_report_bad_input(args, message):
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_interrupted_write_leaves_no_file(tmp_path, monkeypatch):
    target = tmp_path / "report.html"
    target.write_text("old report")

    def interrupted(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(output.os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        output.write_atomic(target, "<html>new, half written" * 1000)
    assert target.read_text() == "old report"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html"]  # no temporary left
    with pytest.raises(KeyboardInterrupt):
        output.write_atomic(tmp_path / "fresh.html", "x")
    assert not (tmp_path / "fresh.html").exists()
