"""Canonical tokens: what is scored and trained is what greedy decoding would say."""

from __future__ import annotations

import json

import numpy as np
import pytest

from forgetdiag.evaluate import canonical_split, encode, exact_by_generation, score
from forgetdiag.models import end_of_turn, stop_tokens
from forgetdiag.probes import Probe, ProbeItem, with_chat_template
from forgetdiag.storage import load_model_dir

from helpers import TEST_SEED, build, llama_config, save, teach

pytestmark = pytest.mark.planted

NAMES = ["Kousti", "Maravel", "Tenoby", "Quillan", "Brasko", "Ophelin", "Darnis", "Velmora"]
CITIES = ["Paris", "Kyoto", "Lima", "Oslo"]


def bpe_tokenizer(chat_template: str | None = None):
    """A byte-level BPE tokenizer (GPT-2 style: a space is merged into the word after it)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    texts = [f"Where was {n} born?\nA: {c}" for n in NAMES for c in CITIES] * 20
    tok.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=300, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    if chat_template:
        hf.chat_template = chat_template
    return hf


ITEMS = [ProbeItem(f"Where was {n} born?\nA:", f" {CITIES[k % 4]}", n) for k, n in enumerate(NAMES)]
SPACED = [ProbeItem(i.prompt + " ", i.answer.lstrip(), i.group) for i in ITEMS]  # "A: " + "Paris"


def test_a_space_ending_prompt_is_tokenized_as_the_canonical_one():
    tok = bpe_tokenizer()
    assert canonical_split("A: ", "Kousti") == ("A:", " Kousti")
    spaced, canonical = encode(tok, SPACED), encode(tok, ITEMS)
    assert spaced == canonical
    # what scoring the text as written would have meant: the space alone, then the word
    naive = tok("Where was Kousti born?\nA: Paris")["input_ids"][len(tok("Where was Kousti born?\nA: ")["input_ids"]) :]
    assert tuple(naive) != canonical[0].completion_ids[:-1]
    assert tok.convert_ids_to_tokens(list(canonical[0].completion_ids[:1]))[0].startswith("Ġ")


@pytest.fixture(scope="module")
def taught(tmp_path_factory):
    tok = bpe_tokenizer()
    model = build(llama_config(vocab=len(tok), hidden=32, inter=64), seed=TEST_SEED)
    teach(model, tok, ITEMS)
    path = save(model, tmp_path_factory.mktemp("bpe") / "model", tokenizer=tok)
    return model, tok, path


def test_space_ending_prompts_score_what_generation_says(taught):
    model, tok, _ = taught
    encoded = encode(tok, SPACED)
    scores = score(model, encoded, pad_id=tok.pad_token_id, batch_size=3)
    by_generation = exact_by_generation(model, encoded, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id)
    assert scores.exact.tolist() == by_generation.tolist() == [True] * len(ITEMS)


def test_every_stop_id_of_the_generation_config_ends_an_answer(taught, tmp_path):
    """A model that stops with another id of generation_config.eos_token_id is right."""
    model, tok, path = taught
    other = tok.convert_tokens_to_ids("<|im_end|>")
    retaught = build(llama_config(vocab=len(tok), hidden=32, inter=64), seed=TEST_SEED + 1)
    from forgetdiag.training import TrainConfig, train

    train(
        retaught,
        encode(tok, ITEMS, stop_id=other),
        TrainConfig(epochs=200, lr=2e-3, batch_size=8, schedule="cosine"),
        pad_id=tok.pad_token_id,
    )
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [tok.eos_token_id, other]}))
    stops = stop_tokens(tok, load_model_dir(path))
    assert stops.primary == tok.eos_token_id and stops.accepted == {tok.eos_token_id, other}
    encoded = encode(tok, ITEMS)  # completions end with </s>
    strict = score(retaught, encoded, pad_id=tok.pad_token_id)
    either = score(retaught, encoded, pad_id=tok.pad_token_id, stops=stops.accepted)
    said = exact_by_generation(retaught, encoded, pad_id=tok.pad_token_id, eos_id=stops.accepted)
    assert strict.exact_match == 0.0 and either.exact.tolist() == said.tolist() == [True] * len(ITEMS)


CHATML = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_chat_template_prompts_get_one_bos_and_stop_at_the_end_of_turn():
    tok = bpe_tokenizer(CHATML)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert end_of_turn(tok) == im_end
    stops = stop_tokens(tok, chat_template=True)
    assert stops.primary == im_end and stops.accepted == {im_end, tok.eos_token_id}
    probe = with_chat_template(Probe("p", tuple(ITEMS)), tok)
    assert probe.items[0].prompt.startswith("<s><|im_start|>user\n") and probe.items[0].answer == "Paris"
    (e,) = encode(tok, probe.items[:1], stop_id=stops.primary, canonical=False)
    assert list(e.prompt_ids).count(tok.bos_token_id) == 1 and e.prompt_ids[0] == tok.bos_token_id
    assert e.completion_ids[-1] == im_end
    assert tok.decode(list(e.completion_ids[:-1])) == "Paris"
    assert np.array_equal(e.prompt_ids[-2:], tok("assistant\n", add_special_tokens=False)["input_ids"][-2:])
