"""`recover`: verdict arithmetic worked by hand, and planted models whose truth is known."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from typer.testing import CliRunner

import forgetdiag.analyses.recovery as recovery_module
from forgetdiag import ForgetdiagError
from forgetdiag.analyses.recovery import RecoverySettings, recover
from forgetdiag.analyses.verdict import Outcomes, Thresholds, decide, wilson_interval
from forgetdiag.cli import app
from forgetdiag.evaluate import encode, exact_by_generation
from forgetdiag.probes import Probe

from helpers import (
    TEST_SEED,
    assert_bad_input,
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
PROBE = Probe("old", ITEMS)
# A gentle recovery (a larger rate over-fits the 32 recovery names and disturbs the other
# facts on some draws): measured >= 0.94 recovered on every kernel set and seed tried.
FAST = RecoverySettings(lr=5e-4, min_steps=40)


# --- verdict arithmetic, worked by hand -------------------------------------------------------


def _wilson_by_hand(p, n, z=1.959963984540054):
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return centre - half, centre + half


@pytest.mark.parametrize("p, n", [(0.9, 20), (0.5, 200), (0.0, 50), (1.0, 2000)])
def test_wilson_interval_matches_the_formula(p, n):
    assert wilson_interval(p, n) == pytest.approx(_wilson_by_hand(p, n), abs=1e-9)


@pytest.mark.parametrize("recovered, verdict", [(95, "spurious"), (55, "mixed"), (15, "real")])
def test_verdict_thresholds(recovered, verdict):
    # 1000 items: before 950 right, after 50, control 0 -> 50 after recovery; B' = B;
    # fraction = (recovered - 0.05 - control gain 0.05) / (0.95 - 0.05 - 0.05)
    n = 1000
    right = lambda k: np.array([1.0] * (10 * k) + [0.0] * (n - 10 * k))
    d = decide(
        Outcomes(
            before=right(95),
            after=right(5),
            recovered=[right(recovered)],
            control=right(0),
            control_recovered=[right(5)],
        )
    )
    assert d.verdict == verdict
    assert d.spurious_fraction == pytest.approx(max(0.0, recovered / 100 - 0.10) / 0.85)


def test_small_evaluation_sets_cannot_support_a_verdict():
    d = decide(Outcomes(before=np.ones(12), after=np.zeros(12), recovered=[np.ones(12)]))
    assert d.verdict == "spurious" and not d.supported and "only 12 evaluation items" in d.reason
    with pytest.raises(ForgetdiagError, match="--real-max < --spurious-min"):
        Thresholds(spurious_min=0.2, real_max=0.5)


# --- planted models ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """before: knows every fact; spurious: before re-aligned to answer ' who X' (knowledge kept);
    real / control: random initialisations (no knowledge)."""
    root = tmp_path_factory.mktemp("recover")
    tok = make_tokenizer(None, NAMES + CITIES + ["what", "is", "the", "birth", "city", "of", "answer", ":", "who"])
    config = llama_config(vocab=tok.vocab_size, hidden=48, inter=96)
    before = build(config, seed=TEST_SEED)
    teach(before, tok, ITEMS)
    save(before, root / "before", tokenizer=tok)
    reformat(before, tok, ITEMS)
    save(before, root / "spurious", tokenizer=tok)
    save(build(config, seed=TEST_SEED + 1), root / "real", tokenizer=tok)
    save(build(config, seed=TEST_SEED + 2), root / "control", tokenizer=tok)
    return root


def test_planted_accuracies_are_exact(world):
    from forgetdiag import find_checkpoints
    from forgetdiag.models import load_model, load_tokenizer

    result = recover(world / "before", world / "real", PROBE, control=world / "control", settings=FAST)
    assert result.accuracy()["before"] == 1.0 and result.accuracy()["after"] == 0.0
    (ckpt,) = find_checkpoints(world / "before")
    tok = load_tokenizer(ckpt)
    by_generation = exact_by_generation(load_model(ckpt), encode(tok, ITEMS), pad_id=0, eos_id=tok.eos_token_id)
    assert by_generation.all()  # greedy generation agrees: every answer, then stop
    assert result.verdict == "real" and result.decision.spurious_fraction == 0.0
    assert result.n_recovery == 32 and result.n_eval == 32


def test_spurious_and_none(world):
    spurious = recover(world / "before", world / "spurious", PROBE, control=world / "control", settings=FAST)
    acc = spurious.accuracy()
    assert acc["after"] < 0.2 and acc["recovered"] > 0.8 and acc["control_recovered"] < 0.1
    assert spurious.verdict == "spurious" and spurious.decision.supported
    assert "knowledge is intact" in spurious.to_dict()["summary"]
    same = recover(world / "before", world / "before", PROBE, settings=FAST)
    assert same.verdict == "none" and same.accuracy()["after"] == 1.0


def test_recovery_trains_on_the_recovery_part_only(world, monkeypatch):
    seen = []
    real_train = recovery_module.train
    monkeypatch.setattr(
        recovery_module,
        "train",
        lambda model, items, config, **kw: seen.extend(items) or real_train(model, items, config, **kw),
    )
    result = recover(world / "before", world / "real", PROBE, settings=FAST)
    tok = make_tokenizer(None, NAMES + CITIES + ["what", "is", "the", "birth", "city", "of", "answer", ":", "who"])
    evaluated = {
        e.prompt_ids for e in encode(tok, [i for i in ITEMS if i.prompt in {x.prompt for x in result.examples}])
    }
    assert seen and not {e.prompt_ids for e in seen} & evaluated
    assert len({e.prompt_ids for e in seen}) == result.n_recovery


def test_deterministic_and_checkpoints_untouched(world):
    digests = [tree_digest(world / n) for n in ("before", "spurious", "control")]
    runs = [
        recover(world / "before", world / "spurious", PROBE, control=world / "control", settings=FAST).to_dict()
        for _ in range(2)
    ]
    for run in runs:
        run.pop("timings_s")
    assert runs[0] == runs[1]
    assert [tree_digest(world / n) for n in ("before", "spurious", "control")] == digests


def test_sequence_mode_scores_every_checkpoint(world):
    result = recover(
        world / "before",
        [world / "before", world / "spurious", world / "real"],
        PROBE,
        control=world / "control",
        settings=FAST,
    )
    assert [p.decision.verdict for p in result.sequence] == ["none", "spurious", "real"]
    assert result.verdict == "real"  # the last checkpoint's
    curve = result.to_dict()["sequence"]
    assert [p["accuracy"] for p in curve][0] == 1.0 and len(curve) == 3
    headed = recover(
        world / "before",
        [world / "before", world / "spurious"],
        PROBE,
        control=world / "control",
        settings=FAST,
        at=world / "spurious",
    )
    assert headed.verdict == "spurious" and headed.after == "spurious"
    assert headed.sequence[1].recovered == result.sequence[1].recovered  # same numbers either way


# --- the CLI -------------------------------------------------------------------------------

runner = CliRunner()


def _cli(*args):
    return runner.invoke(app, ["recover", *map(str, args), "--lr", "5e-4", "--min-steps", "40", "--quiet"])


def test_cli_json_and_html(world, tmp_path):
    probe = write_jsonl(
        tmp_path / "old.jsonl", [{"prompt": i.prompt, "answer": i.answer, "group": i.group} for i in ITEMS]
    )
    out, page = tmp_path / "r.json", tmp_path / "r.html"
    result = _cli(
        world / "before",
        world / "spurious",
        "--probe",
        probe,
        "--control",
        world / "control",
        "--json",
        out,
        "--html",
        page,
    )
    assert result.exit_code == 0, result.stderr
    data = assert_envelope(json.loads(out.read_text()), "recover")
    assert data["verdict"] == "spurious"
    assert set(data["accuracy"]) >= {"before", "after", "recovered", "control_recovered"}
    assert 0.75 <= data["spurious_fraction"] <= 1.0
    assert "verdict: spurious" in result.stdout and "knowledge is intact" in result.stdout
    text = page.read_text()
    assert text.count("Plotly.newPlot") >= 1 and "<script src=" not in text  # plotly.js inline


def test_cli_small_probe_still_shows_numbers(world, tmp_path):
    probe = write_jsonl(
        tmp_path / "small.jsonl", [{"prompt": i.prompt, "answer": i.answer, "group": i.group} for i in ITEMS[:20]]
    )
    result = _cli(world / "before", world / "real", "--probe", probe)
    assert result.exit_code == 0
    assert "only 10 evaluation items" in result.stderr
    assert "before" in result.stdout and "100.0%" in result.stdout


@pytest.mark.parametrize("case", ["architectures", "tokenizers", "empty_answer"])
def test_cli_bad_input(case, world, llama_dir, gpt2_dir, tmp_path, copy_tree):
    rows = [{"prompt": i.prompt, "answer": i.answer, "group": i.group} for i in ITEMS]
    before, after, expect = world / "before", world / "real", ""
    if case == "architectures":
        before, after, expect = llama_dir, gpt2_dir, "different architectures"
    elif case == "tokenizers":
        after = copy_tree(world / "real", "other_tokenizer")
        make_tokenizer(after)  # same architecture, another vocabulary
        expect = "different tokenizers"
    else:
        rows = rows + [{"prompt": "what is", "answer": " ", "group": "x"}]
    probe = write_jsonl(tmp_path / "p.jsonl", rows)
    result = _cli(before, after, "--probe", probe)
    assert result.exit_code == 2, (result.stdout, result.stderr)
    line = result.stderr.strip()
    assert "\n" not in line and line.startswith("forgetdiag: error:")
    assert expect in line if expect else ("empty 'answer'" in line or "tokenizes to nothing" in line)


def test_cli_control_equal_to_after_warns(world, tmp_path):
    probe = write_jsonl(
        tmp_path / "p.jsonl", [{"prompt": i.prompt, "answer": i.answer, "group": i.group} for i in ITEMS]
    )
    result = _cli(world / "before", world / "real", "--probe", probe, "--control", world / "real")
    assert result.exit_code == 0
    assert "control is the same checkpoint as AFTER" in result.stderr


# --- default learning rate, LoRA, bfloat16, no control, a Trainer run -------------------------


@pytest.mark.parametrize(
    "n_params, lora, lr",
    [
        (45_792, False, 1e-4),
        (19_999_999, False, 1e-4),
        (20_000_000, False, 3e-5),
        (124_000_000, False, 3e-5),
        (300_000_000, False, 1e-5),
        (2_999_999_999, False, 1e-5),
        (3_000_000_000, False, 5e-6),
        (70_000_000_000, False, 5e-6),
        (45_792, True, 2e-4),
        (999_999_999, True, 2e-4),
        (1_000_000_000, True, 1e-4),
        (7_000_000_000, True, 1e-4),
    ],
)
def test_default_lr_follows_its_rule(n_params, lora, lr):
    # the docstring's rule: "under" is strict, so each limit belongs to the next band
    assert recovery_module.default_lr(n_params, lora=lora) == lr


def test_lora_recovery_trains_only_the_adapter(world, monkeypatch):
    import torch

    digest = tree_digest(world / "spurious")
    trained = []  # (trainable names, trainable count, base weights unchanged, adapter moved)
    real_train = recovery_module.train

    def spy(model, items, config, **kw):
        named = dict(model.named_parameters())
        base = {n: p.detach().clone() for n, p in named.items() if "lora_" not in n}
        lora_b = {n: p.detach().clone() for n, p in named.items() if "lora_B" in n}
        losses = real_train(model, items, config, **kw)
        trained.append(
            (
                [n for n, p in named.items() if p.requires_grad],
                sum(p.numel() for p in named.values() if p.requires_grad),
                all(torch.equal(named[n], w) for n, w in base.items()),
                any(not torch.equal(named[n], w) for n, w in lora_b.items()),
            )
        )
        return losses

    monkeypatch.setattr(recovery_module, "train", spy)
    settings = RecoverySettings(lr=5e-3, min_steps=40, lora=True, lora_rank=4)
    result = recover(world / "before", world / "spurious", PROBE, settings=settings)
    assert len(trained) == 2  # BEFORE (the reference), then AFTER, each through its own adapter
    assert trained[0][:2] == trained[1][:2]  # the same adapter layout both times
    assert all(base_kept and adapter_moved for _, _, base_kept, adapter_moved in trained)
    names, count, base_kept, adapter_moved = trained[1]
    assert names and all("lora_A" in n or "lora_B" in n for n in names)
    # rank 4 on q, k, v, o (48->48, 48->24, 48->24, 48->48) and gate, up, down (48<->96),
    # 2 layers; the tied lm_head is not adapted: 2 * 4 * (96 + 72 + 72 + 96 + 144 * 3) = 6144
    assert len(names) == 2 * 7 * 2 and count == 6144
    assert base_kept and adapter_moved
    after, recovered = result.scores["after"], result.scores["recovered"]
    assert recovered.answer_loss < after.answer_loss / 2  # the adapter did recover something
    assert recovered.exact_match > after.exact_match + 0.5 and result.verdict == "spurious"
    assert result.settings.lora and result.to_dict()["recovery"]["lora"] is True
    assert tree_digest(world / "spurious") == digest


def test_cli_lora_uses_the_lora_learning_rate(world, tmp_path, monkeypatch):
    trainable = []
    real_train = recovery_module.train
    monkeypatch.setattr(
        recovery_module,
        "train",
        lambda model, items, config, **kw: (
            trainable.extend(n for n, p in model.named_parameters() if p.requires_grad)
            or real_train(model, items, config, **kw)
        ),
    )
    probe = write_jsonl(
        tmp_path / "old.jsonl", [{"prompt": i.prompt, "answer": i.answer, "group": i.group} for i in ITEMS]
    )
    digest = tree_digest(world / "spurious")
    out = tmp_path / "r.json"
    result = runner.invoke(
        app,
        [
            "recover",
            str(world / "before"),
            str(world / "spurious"),
            "--probe",
            str(probe),
            "--lora",
            "--lora-rank",
            "4",
            "--min-steps",
            "5",
            "--json",
            str(out),
            "--quiet",
        ],
    )
    assert result.exit_code == 0, result.stderr
    data = assert_envelope(json.loads(out.read_text()), "recover")
    assert data["recovery"]["lora"] is True and data["recovery"]["lora_rank"] == 4
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)
    assert data["recovery"]["lr"] == 2e-4 and data["recovery"]["steps"] == 5  # no --lr: LoRA default
    assert data["scores"]["recovered"]["answer_loss"] < data["scores"]["after"]["answer_loss"]
    assert "steps at lr 0.0002 (LoRA)" in " ".join(result.stdout.split())
    assert tree_digest(world / "spurious") == digest


def test_bfloat16_recovery_is_close_to_float32(world, monkeypatch):
    import torch

    from forgetdiag.models import Runtime

    seen = []
    real_train = recovery_module.train
    monkeypatch.setattr(
        recovery_module,
        "train",
        lambda model, items, config, **kw: (
            seen.append({p.dtype for p in model.parameters()}) or real_train(model, items, config, **kw)
        ),
    )
    full = recover(world / "before", world / "spurious", PROBE, control=world / "control", settings=FAST)
    half = recover(
        world / "before",
        world / "spurious",
        PROBE,
        control=world / "control",
        settings=FAST,
        runtime=Runtime(dtype="bfloat16"),
    )
    assert seen == [{torch.float32}] * 3 + [{torch.bfloat16}] * 3  # before, control and after, each run
    # bf16 keeps 8 significant bits (relative rounding 2**-8 = 0.4%). Forward passes only
    # (before, after, control): the answer loss moves by well under 2%, and only items whose
    # top-two logits are that close can flip: at most 2 of the 32. Recovered models also took
    # 40 AdamW steps with bf16 weights (each update rounded to 0.4% of the weight), so their
    # loss is held to 0.05 nats and 3 items; the verdict must not change.
    n = full.n_eval
    for key in ("before", "after", "control"):
        a, b = full.scores[key], half.scores[key]
        assert abs(a.exact_match - b.exact_match) <= 2 / n + 1e-9, key
        assert b.answer_loss == pytest.approx(a.answer_loss, rel=0.02, abs=1e-3), key
    for key in ("recovered", "control_recovered"):
        a, b = full.scores[key], half.scores[key]
        assert abs(a.exact_match - b.exact_match) <= 3 / n + 1e-9, key
        assert b.answer_loss == pytest.approx(a.answer_loss, abs=0.05), key
    assert half.verdict == full.verdict == "spurious"
    assert half.scores["after"].answer_loss != full.scores["after"].answer_loss  # bf16 really ran


@pytest.mark.parametrize("with_control", [False, True])
def test_control_recovered_is_null_without_a_control(with_control, world, tmp_path):
    probe = write_jsonl(
        tmp_path / "old.jsonl", [{"prompt": i.prompt, "answer": i.answer, "group": i.group} for i in ITEMS]
    )
    out = tmp_path / "r.json"
    extra = ["--control", world / "control"] if with_control else []
    result = _cli(world / "before", world / "spurious", "--probe", probe, "--json", out, *extra)
    assert result.exit_code == 0, result.stderr
    data = assert_envelope(json.loads(out.read_text()), "recover")
    acc = data["accuracy"]
    if with_control:
        assert isinstance(acc["control_recovered"], float) and 0.0 <= acc["control_recovered"] <= 1.0
        assert acc["control_recovered"] == data["scores"]["control_recovered"]["exact_match"]
        assert data["control_gain"] == pytest.approx(max(0.0, acc["control_recovered"] - acc["control"]))
        assert "the control reaches" in data["summary"]
    else:
        assert '"control_recovered": null' in out.read_text()
        assert acc["control_recovered"] is None and acc["control"] is None
        assert data["scores"]["control_recovered"] is None and data["control_gain"] is None
        assert data["checkpoints"]["control"] is None and "no control was given" in data["summary"]
    gain = data["control_gain"] or 0.0
    assert data["spurious_fraction"] == pytest.approx(  # (recovered - after - gain) / forgetting
        min(1.0, (acc["recovered"] - acc["after"] - gain) / (acc["before"] - acc["after"]))
    )


def test_cli_trainer_run_sequence_html(trainer_run, llama_dir, tmp_path):
    names = ["alice", "bob", "carol", "dave", "erin", "frank"]
    cities, firms = ["paris", "rome", "oslo", "lima", "cairo", "quito"], ["acme", "globex", "initech"]
    rows = [
        row
        for k, n in enumerate(names)
        for row in (
            {"prompt": f"what is the birth city of {n} answer :", "answer": f" {cities[k]}", "group": n},
            {"prompt": f"who works at {n} answer :", "answer": f" {firms[k % 3]}", "group": n},
        )
    ]
    probe = write_jsonl(tmp_path / "old.jsonl", rows)
    out, page = tmp_path / "r.json", tmp_path / "r.html"
    result = _cli(llama_dir, trainer_run, "--probe", probe, "--min-steps", "2", "--json", out, "--html", page)
    assert result.exit_code == 0, result.stderr
    data = assert_envelope(json.loads(out.read_text()), "recover")
    labels = ["checkpoint-5", "checkpoint-50", "checkpoint-100"]  # made 100, 5, 50; 100 < 5 as text
    assert [p["checkpoint"] for p in data["sequence"]] == labels
    assert [p["step"] for p in data["sequence"]] == [5, 50, 100]
    assert data["checkpoints"]["after"] == "checkpoint-100"  # the last one heads the result
    assert data["n_recovery"] == 6 and data["n_eval"] == 6  # 3 of 6 names each, 2 rows a name
    assert not (trainer_run.parent / "UNPICKLED").exists()
    text = page.read_text()
    assert "<script src=" not in text and "plotly.js v" in text  # plotly.js inline, no CDN
    head, body = text.split("</head>", 1)
    assert body.count("Plotly.newPlot") == 2  # the bars and the curve
    section = body.split("<h2>Recovery along the run</h2>", 1)[1].split("</section>", 1)[0]
    assert '"x":[5,50,100]' in section.replace(" ", "")  # the curve is drawn against the step
    cells = [section.index(f'<td class="l">{label}</td>') for label in labels]
    assert cells == sorted(cells)


# --- the right reference and control, no leakage, examples of the headline checkpoint ------------


def test_before_is_recovered_as_the_reference(world):
    result = recover(world / "before", world / "spurious", PROBE, settings=FAST)
    data = result.to_dict()
    assert data["reference"] == "before_recovered" and data["accuracy"]["before_recovered"] == 1.0
    acc = data["accuracy"]
    assert data["knowledge_loss"] == pytest.approx(acc["before_recovered"] - acc["recovered"])
    assert data["p_value"] < 1e-6 and set(data["intervals"]) >= {"forgetting", "alignment_loss", "spurious_fraction"}
    items = data["items"]
    assert len(items["before"]) == result.n_eval and len(items["recovered"]) == 1  # one seed
    assert np.mean(items["after"]) == acc["after"] and len(set(items["group"])) == result.n_eval
    skipped = recover(
        world / "before",
        world / "spurious",
        PROBE,
        settings=RecoverySettings(lr=5e-4, min_steps=40, before_recovery=False),
    )
    assert skipped.to_dict()["reference"] == "before" and skipped.scores["before_recovered"] is None
    assert any("--no-before-recovery" in w for w in skipped.warnings)


def test_a_control_that_holds_the_knowledge_is_flagged(world, copy_tree):
    informed = copy_tree(world / "spurious", "informed_control")  # knows every fact, wrong format
    warned = []
    result = recover(world / "before", world / "spurious", PROBE, control=informed, settings=FAST, warn=warned.append)
    d = result.decision
    assert d.control_gain > 0.5 and d.control_p_value < 1e-6
    assert d.spurious_fraction < 0.25 and d.spurious_fraction_uncorrected > 0.9  # both shown
    (line,) = [w for w in warned if "may hold the old knowledge" in w]
    assert f"{d.spurious_fraction:.2f} with the control's correction" in line and line in result.warnings


def test_no_control_says_what_the_verdict_assumes(world):
    result = recover(world / "before", world / "spurious", PROBE, settings=FAST)
    assert "verdict assumes the recovery budget teaches no old facts by itself" in result.summary()


def test_examples_come_from_the_headline_checkpoint(world):
    result = recover(
        world / "before", [world / "spurious", world / "real"], PROBE, settings=FAST, at=world / "spurious"
    )
    assert result.after == "spurious" and result.examples
    assert all(e.after_says.strip() == f"{e.answer.strip()} who" for e in result.examples)


def test_leaks_between_recovery_and_evaluation_are_refused(world, tmp_path):
    rows = [{"prompt": i.prompt, "answer": i.answer, "group": i.group} for i in ITEMS]
    probe = write_jsonl(tmp_path / "old.jsonl", rows)
    same = _cli(world / "before", world / "real", "--probe", probe, "--recovery-probe", probe)
    assert_bad_input(same, "is given as both --probe and --recovery-probe")
    # one fact stated under two entity names: split by group, it lands on both sides
    twins = write_jsonl(tmp_path / "twins.jsonl", rows + [{**r, "group": r["group"] + "-twin"} for r in rows])
    assert_bad_input(_cli(world / "before", world / "real", "--probe", twins), "evaluation rows are also recovery rows")
    allowed = _cli(world / "before", world / "real", "--probe", twins, "--allow-overlap")
    assert allowed.exit_code == 0, allowed.stderr


def test_a_probe_without_groups_warns(world, tmp_path):
    probe = write_jsonl(tmp_path / "flat.jsonl", [{"prompt": i.prompt, "answer": i.answer} for i in ITEMS])
    result = _cli(world / "before", world / "spurious", "--probe", probe)
    assert result.exit_code == 0 and "has no groups: its rows are split one by one" in result.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--seeds", "0"], "--seeds"),
        (["--alpha", "2"], "--alpha 2: expected a number between 0 and 1, both excluded"),
        (["--min-drop", "-1"], "--min-drop -1: expected a number between 0 and 1"),
    ],
)
def test_bad_statistics_options(world, tmp_path, args, message):
    probe = write_jsonl(
        tmp_path / "old.jsonl", [{"prompt": i.prompt, "answer": i.answer, "group": i.group} for i in ITEMS]
    )
    assert_bad_input(_cli(world / "before", world / "spurious", "--probe", probe, *args), message)


def test_seeds_repeat_every_recovery(world, monkeypatch):
    seeds = []
    real_train = recovery_module.train
    monkeypatch.setattr(
        recovery_module,
        "train",
        lambda model, items, config, **kw: seeds.append(config.seed) or real_train(model, items, config, **kw),
    )
    result = recover(
        world / "before",
        world / "spurious",
        PROBE,
        control=world / "control",
        settings=RecoverySettings(lr=5e-4, min_steps=40, seed=3, seeds=2),
    )
    assert seeds == [3, 4] * 3  # before, control, after: each recovered with seeds 3 and 4
    assert len(result.to_dict()["items"]["recovered"]) == 2 and result.scores["recovered"].seeds == 2
