"""`forgetdiag tokens`: per-token log-probabilities of the new data under the old model.

The log-probabilities are checked against a plain transformers forward pass (one unpadded
sequence at a time, log_softmax at the positions that predict each answer token), the mask file
against the tokenizer's own tokens, and, when the sample checkpoints exist, the claim that data
contradicting the old facts is far harder for the old model than data about new people.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from forgetdiag.analyses.tokens import TokenSettings, mask_records, token_difficulty
from forgetdiag.cli import app
from forgetdiag.errors import ForgetdiagError
from forgetdiag.models import Runtime
from forgetdiag.probes import load_probe
from forgetdiag.render.tokens import tokens_sections

from helpers import WORDS, assert_bad_input, assert_envelope, tree_digest, write_jsonl

runner = CliRunner()
SAMPLES = Path(__file__).resolve().parents[1] / "sample_checkpoints"


def data_rows(n=9, seed=0):
    """Prompts of 1-6 words and answers of 1-3 words (the word-level tokenizer: one token each)."""
    rng = np.random.default_rng(seed)
    words = [w for w in WORDS if w != ":"]
    return [
        {
            "prompt": " ".join(rng.choice(words, size=rng.integers(1, 7))),
            "answer": " " + " ".join(rng.choice(words, size=rng.integers(1, 4))),
        }
        for _ in range(n)
    ]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("tokens_data") / "new_task.jsonl", data_rows())


def reference_logprobs(path, tokenizer, rows):
    """Per row: (C,) log p of answer tokens + EOS from an unpadded transformers forward pass."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path).eval()
    out = []
    for row in rows:
        n_prompt = len(tokenizer(row["prompt"])["input_ids"])
        ids = tokenizer(row["prompt"] + row["answer"])["input_ids"] + [tokenizer.eos_token_id]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0].double()  # (T, V)
        logp = torch.log_softmax(logits, dim=-1)
        # the token at position t is predicted by the logits at t - 1
        out.append(np.array([float(logp[t - 1, ids[t]]) for t in range(n_prompt, len(ids))]))
    return out


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_logprobs_equal_a_plain_forward_pass(family, llama_dir, gpt2_dir, tokenizer, data_file):
    path = llama_dir if family == "llama" else gpt2_dir
    rows = [json.loads(line) for line in data_file.read_text().splitlines()]
    result = token_difficulty(path, load_probe(data_file), runtime=Runtime(batch_size=4))  # padded
    expected = reference_logprobs(path, tokenizer, rows)
    assert [e.index for e in result.examples] == list(range(len(rows)))
    for example, ref in zip(result.examples, expected):
        np.testing.assert_allclose(example.logprobs, ref, atol=1e-5, rtol=0)
    flat = np.concatenate(expected)
    s = result.stats()
    assert s["n_tokens"] == flat.size
    assert s["n_below"] == int((flat < math.log(0.01)).sum())
    assert s["median_logprob"] == pytest.approx(float(np.median(flat)), abs=1e-5)


def test_hardest_lists_are_ordered(llama_dir, data_file):
    result = token_difficulty(llama_dir, load_probe(data_file), settings=TokenSettings(top=4, threshold=0.02))
    flat = np.sort(result.logprobs())
    hardest = result.hardest_tokens()
    assert [t.logprob for t in hardest] == pytest.approx(flat[:4].tolist())
    for t in hardest:  # each names its token and position in input_ids
        example = result.examples[t.example]
        assert example.pieces[t.position] == t.token and t.position >= example.n_prompt
    means = [e.mean_logprob() for e in result.hardest_examples()]
    assert means == sorted(means) and means[0] == min(e.mean_logprob() for e in result.examples)
    assert sum(f["hard"] for f in result.frequent_hard(k=1000)) == result.stats()["n_below"]
    assert [s.title for s in tokens_sections(result)][:3] == [
        "Token difficulty under the old model",
        "Hardest tokens",
        "Hardest examples",
    ]


def run_cli(*args):
    return runner.invoke(app, ["tokens", *map(str, args)])


def test_mask_lines_up_with_the_tokenizer(llama_dir, tokenizer, data_file, tmp_path):
    digests = [tree_digest(llama_dir), tree_digest(data_file.parent)]
    mask, out = tmp_path / "mask.jsonl", tmp_path / "t.json"
    threshold = 0.02
    result = run_cli(
        llama_dir,
        "--data",
        data_file,
        "--threshold",
        threshold,
        "--write-mask",
        mask,
        "--json",
        out,
        "--html",
        tmp_path / "t.html",
        "-q",
    )
    assert result.exit_code == 0, result.stderr
    assert "answer tokens" in result.stdout and "Hardest tokens" in result.stdout
    rows = [json.loads(line) for line in data_file.read_text().splitlines()]
    records = [json.loads(line) for line in mask.read_text().splitlines()]
    assert [r["index"] for r in records] == list(range(len(rows)))
    dropped = 0
    for row, rec in zip(rows, records):
        ids = tokenizer(row["prompt"] + row["answer"])["input_ids"] + [tokenizer.eos_token_id]
        n_prompt = len(tokenizer(row["prompt"])["input_ids"])
        assert rec["input_ids"] == ids and rec["n_prompt"] == n_prompt
        assert rec["tokens"] == tokenizer.convert_ids_to_tokens(ids)
        assert len(rec["logprobs"]) == len(rec["keep"]) == len(rec["labels"]) == len(ids)
        assert rec["logprobs"][:n_prompt] == [None] * n_prompt and all(rec["keep"][:n_prompt])
        for t in range(n_prompt, len(ids)):
            hard = rec["logprobs"][t] < math.log(threshold)
            assert rec["keep"][t] is (not hard)
            assert rec["labels"][t] == (-100 if hard else ids[t])
            dropped += hard
        assert rec["labels"][:n_prompt] == [-100] * n_prompt
    data = assert_envelope(json.loads(out.read_text()), "tokens")
    assert data["n_below"] == dropped and data["threshold"] == threshold
    assert len(data["examples"]) == len(rows)
    assert [tree_digest(llama_dir), tree_digest(data_file.parent)] == digests


def test_cli_bad_input(llama_dir, trainer_run, data_file, tmp_path):
    empty = write_jsonl(
        tmp_path / "empty.jsonl",
        [{"prompt": "who is alice", "answer": "paris"}, {"prompt": "who is bob", "answer": "  "}],
    )
    assert_bad_input(run_cli(llama_dir, "--data", empty), "empty 'answer'")
    assert_bad_input(run_cli(llama_dir, "--data", data_file, "--threshold", "0"), "between 0 and 1")
    assert_bad_input(run_cli(trainer_run, "--data", data_file), "must be one checkpoint")
    assert_bad_input(
        run_cli(llama_dir, "--data", data_file, "--write-mask", llama_dir / "m.jsonl"), "refusing to write inside"
    )
    with pytest.raises(ForgetdiagError, match="between 0 and 1"):
        token_difficulty(llama_dir, load_probe(data_file), settings=TokenSettings(threshold=1.5))


def test_mask_records_from_python(llama_dir, data_file):
    result = token_difficulty(
        llama_dir, load_probe(data_file), settings=TokenSettings(threshold=0.999)
    )  # drops every scored token
    for rec in mask_records(result):
        n = rec["n_prompt"]
        assert not any(rec["keep"][n:]) and rec["labels"] == [-100] * len(rec["input_ids"])


def sample_paths():
    old = SAMPLES / "real" / "checkpoint-0"
    probes = SAMPLES / "probes"
    return old, probes / "task1_real.jsonl", probes / "task1_spurious.jsonl"


@pytest.mark.slow
def test_real_data_is_far_harder_than_spurious_data():
    """Contradicting facts about known people vs facts about new people, under the task-0 model."""
    old, real, spurious = sample_paths()
    runtime = Runtime(threads=1)
    hard = token_difficulty(old, load_probe(real), runtime=runtime).stats()
    easy = token_difficulty(old, load_probe(spurious), runtime=runtime).stats()
    # measured (docs/tokens.md): 43.9% vs 25.5% of tokens below p = 0.01, 95% vs 60% of the
    # examples hold one, mean log-prob -3.99 vs -2.44 nats
    assert hard["share_below"] > easy["share_below"] + 0.1
    share = lambda s: s["examples_with_hard_token"] / s["n_examples"]
    assert share(hard) > share(easy) + 0.2
    assert hard["mean_logprob"] < easy["mean_logprob"] - 1.0
