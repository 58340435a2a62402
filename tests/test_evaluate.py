"""Scoring and training core: teacher-forced exact match equals greedy generation; losses equal
a plain transformers forward pass."""

from __future__ import annotations

import pytest
import torch

from forgetdiag import ProbeError
from forgetdiag.evaluate import encode, exact_by_generation, generate_greedy, score
from forgetdiag.probes import ProbeItem
from forgetdiag.training import TrainConfig, lr_factor, train

from helpers import TEST_SEED, build, llama_config, make_tokenizer, teach

NAMES = ["alice", "bob", "carol", "dave", "erin", "frank"]
CITIES = ["paris", "rome", "oslo", "lima", "cairo", "quito"]
ITEMS = [ProbeItem(f"what is the birth city of {n} answer :", f" {c}") for n, c in zip(NAMES, CITIES)]
# the model learns 4 of these; two more share a prompt with a different answer (it must miss them)
TAUGHT = ITEMS[:4]
WRONG = [ProbeItem(ITEMS[0].prompt, " rome"), ProbeItem(ITEMS[1].prompt, " who works")]


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def trained(tok):
    model = build(llama_config(vocab=tok.vocab_size), seed=TEST_SEED)
    teach(model, tok, TAUGHT)
    return model


def _plain_loss(model, encoded):
    """Mean completion-token cross-entropy by a plain transformers forward with labels."""
    total, count = 0.0, 0
    for e in encoded:
        ids = torch.tensor([e.prompt_ids + e.completion_ids])
        labels = ids.clone()
        labels[0, : len(e.prompt_ids)] = -100
        with torch.no_grad():
            total += model(input_ids=ids, labels=labels).loss.item() * len(e.completion_ids)
        count += len(e.completion_ids)
    return total / count


def test_encode_splits_prompt_and_completion(tok):
    (e,) = encode(tok, [ITEMS[0]])
    assert e.prompt_ids[0] == tok.bos_token_id
    assert e.completion_ids == (tok.convert_tokens_to_ids("paris"), tok.eos_token_id)
    (no_eos,) = encode(tok, [ITEMS[0]], add_eos=False)
    assert no_eos.completion_ids == e.completion_ids[:-1]


@pytest.mark.planted
def test_exact_match_equals_greedy_generation(trained, tok):
    items = ITEMS + WRONG
    encoded = encode(tok, items)
    scores = score(trained, encoded, pad_id=tok.pad_token_id, batch_size=3)
    by_batch = exact_by_generation(trained, encoded, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id, batch_size=3)
    one_by_one = exact_by_generation(trained, encoded, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id, batch_size=1)
    assert scores.exact.tolist() == by_batch.tolist() == one_by_one.tolist()
    assert scores.exact[:4].all() and not scores.exact[6:].any()  # taught right, planted wrong
    said = generate_greedy(trained, encoded[:1], pad_id=tok.pad_token_id, eos_id=tok.eos_token_id)
    assert tok.decode(said[0], skip_special_tokens=True) == "paris"


@pytest.mark.planted
def test_answer_loss_and_first_token_equal_a_plain_forward(trained, tok):
    encoded = encode(tok, ITEMS + WRONG)
    scores = score(trained, encoded, pad_id=tok.pad_token_id, batch_size=4)
    assert scores.answer_loss == pytest.approx(_plain_loss(trained, encoded), rel=1e-5)
    for k, e in enumerate(encoded):
        with torch.no_grad():
            logits = trained(input_ids=torch.tensor([e.prompt_ids])).logits[0, -1]
        assert bool(scores.first_token[k]) == (int(logits.argmax()) == e.completion_ids[0])


@pytest.mark.planted
def test_batch_size_does_not_change_scores(trained, tok):
    encoded = encode(tok, ITEMS + WRONG)
    a = score(trained, encoded, pad_id=tok.pad_token_id, batch_size=1)
    b = score(trained, encoded, pad_id=tok.pad_token_id, batch_size=8)
    assert a.exact.tolist() == b.exact.tolist()
    torch.testing.assert_close(torch.tensor(a.nll), torch.tensor(b.nll), rtol=1e-5, atol=1e-5)


def test_prompt_longer_than_context(tok):
    long = ProbeItem("what " * 70, " paris")
    with pytest.raises(ProbeError, match="more than the model's context of 64"):
        encode(tok, [long], max_length=64)
    warnings = []
    (e,) = encode(tok, [long], max_length=64, truncate=True, warn=warnings.append)
    assert len(e.prompt_ids) + len(e.completion_ids) == 64
    assert len(warnings) == 1 and "1 prompts" in warnings[0]


def test_answer_that_tokenizes_to_nothing(tok):
    with pytest.raises(ProbeError, match="tokenizes to nothing"):
        encode(tok, [ProbeItem("what is", "   ")])


def test_training_is_deterministic_and_leaves_global_rng_alone(tok):
    encoded = encode(tok, TAUGHT)
    state = torch.random.get_rng_state()
    runs = []
    for _ in range(2):
        model = build(llama_config(vocab=tok.vocab_size), seed=0)
        torch.random.set_rng_state(state)
        runs.append(
            train(model, encoded, TrainConfig(epochs=3, lr=1e-3, batch_size=3, seed=5), pad_id=tok.pad_token_id)
        )
        assert torch.equal(torch.random.get_rng_state(), state)
    assert runs[0] == runs[1] and len(runs[0]) == 6


def test_frozen_parameters_do_not_move(tok):
    model = build(llama_config(vocab=tok.vocab_size), seed=0)
    model.model.embed_tokens.requires_grad_(False)
    before = model.model.embed_tokens.weight.clone()
    train(model, encode(tok, TAUGHT), TrainConfig(epochs=2, lr=1e-2, batch_size=2), pad_id=0)
    assert torch.equal(before, model.model.embed_tokens.weight)


def test_learning_rate_schedules():
    assert lr_factor(0, 10, schedule="constant", warmup=0) == 1.0
    assert lr_factor(0, 10, schedule="linear", warmup=2) == 0.5
    assert lr_factor(6, 10, schedule="linear", warmup=2) == pytest.approx(0.5)
    assert lr_factor(2, 10, schedule="cosine", warmup=2) == pytest.approx(1.0)
    assert lr_factor(10, 10, schedule="cosine", warmup=2) == pytest.approx(0.0)


def test_models_load_safely_from_two_threads(llama_dir):
    """from_pretrained is not thread-safe (process-wide meta-device and init switches); the
    report loads models in two threads, so load_model serialises loads. Without that, two
    threads loading this model 10 times each failed with meta tensors in every run tried."""
    import threading

    from forgetdiag import find_checkpoints
    from forgetdiag.models import load_model, preload_classes

    (ckpt,) = find_checkpoints(llama_dir)
    preload_classes(ckpt)
    reference = load_model(ckpt).state_dict()
    errors = []

    def load_many():
        for _ in range(10):
            try:
                model = load_model(ckpt)
                if any(not torch.equal(t, reference[k]) for k, t in model.state_dict().items()):
                    errors.append("weights differ")
            except Exception as exc:
                errors.append(f"{type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=load_many) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
