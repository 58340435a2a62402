"""forgetdiag against lm-evaluation-harness itself: the same checkpoint, the same task files, the
same accuracies (lm-eval's HF backend on the CPU, local data files only, nothing downloaded).

The checkpoint is a tiny Llama with a byte-level BPE tokenizer (answers are several tokens, a
space merges with the word after it, "\\n" is a token), taught the birth cities of half of the
people: accuracies sit far from 0 and 1, so agreement item by item means something.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from forgetdiag.cli import app
from forgetdiag.probes import ProbeItem, load_probe

from helpers import TEST_SEED, assert_bad_input, save, teach

lm_eval = pytest.importorskip("lm_eval")

N_PEOPLE, N_CITIES = 64, 16
NAMES = [f"n{k}" for k in range(N_PEOPLE)]
CITIES = [f"c{k}" for k in range(N_CITIES)]
FACTS = [(n, CITIES[(3 * k) % N_CITIES]) for k, n in enumerate(NAMES)]
PROMPT = "what is the birth city of {name} answer:"


def bpe_tokenizer(texts):
    """A byte-level BPE tokenizer trained on ``texts``, adding BOS to every input (as Llama's)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<pad>", "<bos>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", tok.token_to_id("<bos>"))]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")


def choices_of(k: int, city: str) -> tuple[list[str], int]:
    """Four choices of unequal lengths (c3, c13, "c9 or c4"), the right one at position k % 4:
    dividing by the length favours the long one, so acc_norm differs from acc."""
    j = CITIES.index(city)
    at = lambda d: CITIES[(j + d) % N_CITIES]
    others = [at(5), at(10), f"{at(13)} or {at(7)}"]
    label = k % 4
    return others[:label] + [city] + others[label:], label


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """(checkpoint dir, task dir): the model taught the first half of the facts; task files."""
    from transformers import LlamaConfig

    from helpers import build

    root = tmp_path_factory.mktemp("lm_eval")
    texts = [PROMPT.format(name=n) + f" {c}\n" for n, c in FACTS] * 4
    tokenizer = bpe_tokenizer(texts)
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=len(tokenizer), max_position_embeddings=128, tie_word_embeddings=True,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    model = build(config, seed=7 + TEST_SEED)
    taught = [ProbeItem(PROMPT.format(name=n), f" {c}") for n, c in FACTS[: N_PEOPLE // 2]]
    teach(model, tokenizer, taught, epochs=150, lr=3e-3, seed=7)
    ckpt = save(model, root / "model", tokenizer=tokenizer)
    docs = []
    for k, (name, city) in enumerate(FACTS):
        choices, label = choices_of(k, city)
        docs.append({"name": name, "city": city, "choices": choices, "label": label})
    data = root / "tasks" / "people.jsonl"
    data.parent.mkdir()
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    common = {
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test",
        "doc_to_text": PROMPT.replace("{name}", "{{name}}"),
    }
    tasks = {
        "gen.yaml": {
            **common,
            "task": "fd_gen",
            "output_type": "generate_until",
            "doc_to_target": "{{city}}",
            "generation_kwargs": {"until": ["\n"], "do_sample": False, "max_gen_toks": 8},
            "filter_list": [
                {"name": "strip", "filter": [{"function": "remove_whitespace"}, {"function": "take_first"}]}
            ],
            "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
        },
        "mc.yaml": {
            **common,
            "task": "fd_mc",
            "output_type": "multiple_choice",
            "doc_to_choice": "{{choices}}",
            "doc_to_target": "label",
            "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}],
        },
        "ppl.yaml": {**common, "task": "fd_ppl", "output_type": "loglikelihood", "doc_to_target": " {{city}}"},
    }
    for file, spec in tasks.items():
        (data.parent / file).write_text(json.dumps(spec))  # JSON is YAML
    return ckpt, data.parent


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def run_lm_eval(ckpt, tasks_dir, names):
    """lm-eval's own simple_evaluate, HF backend on the CPU, BOS added as forgetdiag adds it."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    return simple_evaluate(
        model="hf",
        model_args=f"pretrained={ckpt},dtype=float32,add_bos_token=True",
        tasks=names,
        task_manager=TaskManager(include_path=str(tasks_dir), include_defaults=False),
        device="cpu",
        batch_size=16,
        log_samples=True,
    )


def score_json(runner, ckpt, *probes):
    result = runner.invoke(app, ["score", str(ckpt), *(a for p in probes for a in ("--probe", str(p))), "--json", "-"])
    assert result.exit_code == 0, result.stderr
    return {(r["probe"], r["metric"]): r["value"] for r in json.loads(result.stdout)["scores"]}


@pytest.mark.slow
@pytest.mark.planted
def test_score_equals_lm_eval_on_generate_until_and_multiple_choice(world, runner):
    ckpt, tasks = world
    ours = score_json(runner, ckpt, tasks / "gen.yaml", tasks / "mc.yaml")
    theirs = run_lm_eval(ckpt, tasks, ["fd_gen", "fd_mc"])
    gen, mc = theirs["results"]["fd_gen"], theirs["results"]["fd_mc"]
    # not trivial: the taught half is right, most of the rest is not
    assert 0.45 <= gen["exact_match,strip"] <= 0.75 and 0.45 <= mc["acc,none"] <= 0.9
    assert ours[("gen", "exact_match")] == pytest.approx(gen["exact_match,strip"], abs=1e-12)
    assert ours[("mc", "acc")] == pytest.approx(mc["acc,none"], abs=1e-12)
    assert ours[("mc", "acc_norm")] == pytest.approx(mc["acc_norm,none"], abs=1e-12)
    # item by item, and the log-likelihood of every choice
    from forgetdiag import Runtime, resolve_checkpoints
    from forgetdiag.choices import score_items
    from forgetdiag.models import load_model, load_tokenizer, tokenize_probe

    runtime = Runtime()
    (checkpoint,) = resolve_checkpoints(ckpt, runtime)
    model, tokenizer = load_model(checkpoint, runtime), load_tokenizer(checkpoint, runtime)
    probes = {name: load_probe(tasks / f"{name}.yaml") for name in ("gen", "mc")}
    scores = {}
    for name, probe in probes.items():
        encoded, stops = tokenize_probe(tokenizer, probe, checkpoint, runtime)
        scores[name] = score_items(model, encoded, pad_id=0, stops=stops.accepted)
    gen_samples = sorted(theirs["samples"]["fd_gen"], key=lambda s: s["doc_id"])
    mc_samples = sorted(theirs["samples"]["fd_mc"], key=lambda s: s["doc_id"])
    assert [bool(s["exact_match"]) for s in gen_samples] == scores["gen"].exact.tolist()
    assert [bool(s["acc"]) for s in mc_samples] == scores["mc"].acc.tolist()
    assert [bool(s["acc_norm"]) for s in mc_samples] == scores["mc"].acc_norm.tolist()
    assert scores["mc"].acc.tolist() != scores["mc"].acc_norm.tolist()  # the length division decides some items
    their_ll = np.array([[float(r[0][0]) for r in s["resps"]] for s in mc_samples])  # (docs, choices)
    np.testing.assert_allclose(np.stack(scores["mc"].loglik), their_ll, atol=1e-4)
    assert probes["gen"].stop_strings == ("\n",)


@pytest.mark.slow
def test_task_files_turn_into_rows_as_lm_eval_builds_them(world):
    _, tasks = world
    gen, mc = load_probe(tasks / "gen.yaml"), load_probe(tasks / "mc.yaml")
    assert gen.kind == "answer" and mc.kind == "choice" and len(gen) == len(mc) == N_PEOPLE
    name, city = FACTS[5]
    assert gen.items[5] == ProbeItem(PROMPT.format(name=name) + " ", city)  # prompt + target_delimiter
    choices, label = choices_of(5, city)
    assert mc.items[5].choices == tuple(choices) and mc.items[5].answer_index == label


def test_task_file_of_another_output_type_is_refused(world, runner):
    ckpt, tasks = world
    result = runner.invoke(app, ["score", str(ckpt), "--probe", str(tasks / "ppl.yaml")])
    assert_bad_input(result, "ppl.yaml", "output_type loglikelihood", "generate_until and multiple_choice")


def test_task_file_without_lm_eval_is_refused(world, runner, monkeypatch):
    import sys

    ckpt, tasks = world
    monkeypatch.setitem(sys.modules, "lm_eval.tasks", None)  # importing it now fails, as when not installed
    result = runner.invoke(app, ["score", str(ckpt), "--probe", str(tasks / "mc.yaml")])
    assert_bad_input(result, "mc.yaml", "lm-evaluation-harness", "pip install 'forgetdiag[lm-eval]'")


@pytest.fixture
def runner():
    from typer.testing import CliRunner

    os.environ.setdefault("COLUMNS", "80")
    return CliRunner()
