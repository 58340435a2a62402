"""A small word-level tokenizer trained locally on the world's texts.

Words are split the GPT-2 way (byte-level pre-tokenizer, a leading space kept in the word, so
" Paris" is one token) and every distinct word is one id: an answer's tokens never merge with
the prompt's, and decoding gives the text back exactly. A space is added at the start of every
text so that a name is the same token at the start of a biography and inside a question.
``[BOS]`` starts every encoded text (``add_special_tokens=True``); ``[EOS]`` ends answers.

The result is a ``transformers.PreTrainedTokenizerFast``: ``save_pretrained(dir)`` writes
``tokenizer.json`` and ``tokenizer_config.json``, and ``AutoTokenizer.from_pretrained(dir)``
loads it back offline.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

PAD, UNK, BOS, EOS = "[PAD]", "[UNK]", "[BOS]", "[EOS]"
SPECIAL_TOKENS = (PAD, UNK, BOS, EOS)  # ids 0, 1, 2, 3


def train_tokenizer(texts: Iterable[str], *, model_max_length: int = 256):
    """A word-level ``PreTrainedTokenizerFast`` whose vocabulary is every word of ``texts``.

    Args:
        texts: the corpus (see :func:`forgetdiag.samples.world.vocabulary_texts`).
        model_max_length: recorded in the tokenizer config (the model's context).
    """
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    # min_frequency=1: every word is kept; ids are assigned by frequency then lexically.
    trainer = trainers.WordLevelTrainer(
        vocab_size=1_000_000, min_frequency=1, special_tokens=list(SPECIAL_TOKENS), show_progress=False
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, tok.token_to_id(BOS))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        model_max_length=model_max_length,
    )
