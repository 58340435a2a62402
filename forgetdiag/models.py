"""Load a checkpoint as a runnable model and its tokenizer (offline, no remote code by default).

Models come from ``transformers`` (``AutoModelForCausalLM.from_pretrained`` on the local
directory, safetensors only unless pickles were allowed). A LoRA adapter is merged in memory:
the base is loaded and ``scale * B @ A`` added to the targeted weights; nothing is written.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from forgetdiag.architectures import config_int
from forgetdiag.errors import CheckpointError
from forgetdiag.runtime import Runtime
from forgetdiag.storage import Checkpoint


@contextlib.contextmanager
def quiet_transformers():
    """No transformers progress bars, info logs or Python warnings inside the block."""
    import warnings

    import transformers

    logging = transformers.utils.logging
    level, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.set_verbosity(level)
        if bars:
            logging.enable_progress_bar()


# transformers' from_pretrained is not thread-safe: it builds the model under process-wide
# switches (the default dtype, skipped weight initialisation, parameters on the meta device),
# so two threads loading at once get each other's meta tensors ("Cannot copy out of meta
# tensor"; reproduced with two threads loading a tiny Llama 40 times each). Loads take turns.
_LOAD_LOCK = threading.Lock()


def load_model(checkpoint: Checkpoint, runtime: Runtime | None = None):
    """The checkpoint as an ``AutoModelForCausalLM`` in eval mode, as ``runtime`` says.

    Args:
        checkpoint: from :func:`forgetdiag.resolve_checkpoints`.
        runtime: device, compute dtype (float32 by default; bfloat16 on a GPU halves memory)
            and whether the checkpoint's own code may run (never by default).

    Raises:
        CheckpointError: transformers cannot load it, a weight the model needs is missing from
            the checkpoint (transformers would fill it with random values), or a weight holds
            NaN or Inf.
    """
    runtime = runtime or Runtime()
    source = checkpoint.base or checkpoint
    with _LOAD_LOCK, quiet_transformers():
        try:
            model, info = model_class(source).from_pretrained(
                str(source.path),
                dtype=runtime.torch_dtype,
                local_files_only=True,
                use_safetensors=source.format == "safetensors",
                output_loading_info=True,
                trust_remote_code=runtime.trust_remote_code,
                **device_map_options(runtime),
            )
        except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
            msg = " ".join(str(exc).split())[:300]
            hint = " (pass --trust-remote-code if you trust its code)" if "trust_remote_code" in msg else ""
            raise CheckpointError(f"{source.path}: transformers cannot load this model{hint}: {msg}") from None
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        raise CheckpointError(
            f"{source.path}: {len(missing)} weights the model needs are missing "
            f"from the checkpoint (first: {missing[0]}); transformers would fill "
            "them with random values. Expected a complete checkpoint"
        )
    if checkpoint.base is not None:
        _merge_adapter(model, checkpoint)
    _require_finite_parameters(model, checkpoint)
    if runtime.device_map is not None:
        return model.eval()  # accelerate placed every layer: inputs go to the first one's device
    return model.to(runtime.torch_device).eval()


def device_map_options(runtime: Runtime) -> dict:
    """``from_pretrained`` arguments of ``--device-map``: accelerate's big-model loading places
    the layers over every visible GPU (then CPU RAM) as they are read, so a model larger than
    one GPU loads without first sitting whole in CPU memory. Nothing without ``--device-map``."""
    if runtime.device_map is None:
        return {}
    try:
        import accelerate  # noqa: F401 - transformers needs it for any device_map
    except ImportError:
        raise CheckpointError("--device-map needs accelerate: pip install 'forgetdiag[accelerate]'") from None
    return {"device_map": runtime.device_map}


def model_class(checkpoint: Checkpoint):
    """The transformers auto class that loads ``checkpoint`` for text analyses.

    ``AutoModelForCausalLM``, which also loads some multimodal wrappers whole (Gemma 3) or as
    their text model (Llama 4); a wrapper it does not know (Mistral 3, Qwen2-VL) is loaded
    whole with ``AutoModelForImageTextToText``: text-only inputs run its language model, and
    the vision tower sits idle.
    """
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    model_type = checkpoint.model_type
    known = model_type in CONFIG_MAPPING and CONFIG_MAPPING[model_type] in MODEL_FOR_CAUSAL_LM_MAPPING
    if known or "text_config" not in checkpoint.config:
        return AutoModelForCausalLM
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText


@torch.no_grad()
def _require_finite_parameters(model, checkpoint: Checkpoint) -> None:
    """Refuse NaN/Inf weights, naming the first one (as ``inspect`` and ``angles`` do)."""
    from forgetdiag.streaming import require_finite

    for name, param in model.named_parameters():
        require_finite(param.detach(), name, checkpoint)


def preload_classes(checkpoint: Checkpoint) -> None:
    """Import the transformers classes a checkpoint needs, in the calling thread.

    transformers imports its modules lazily on first attribute access, which is not safe when
    two threads do it at once: call this before running analyses in parallel threads.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig  # noqa: F401
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    model_type = (checkpoint.base or checkpoint).model_type
    if model_type in CONFIG_MAPPING and CONFIG_MAPPING[model_type] in MODEL_FOR_CAUSAL_LM_MAPPING:
        MODEL_FOR_CAUSAL_LM_MAPPING[CONFIG_MAPPING[model_type]]  # imports the modelling module


@torch.no_grad()
def _merge_adapter(model, checkpoint: Checkpoint) -> None:
    params = dict(model.named_parameters(remove_duplicate=False))
    for name in checkpoint.names:
        delta = checkpoint.delta(name)
        if delta is None:
            continue
        param = params.get(name)
        if param is None:
            raise CheckpointError(
                f"{checkpoint.path}: adapter updates {name}, which the loaded model has no parameter for"
            )
        # merge in float32, then round once to the compute dtype
        param.copy_((param.to(torch.float32) + delta.to(param.device)).to(param.dtype))


def load_tokenizer(checkpoint: Checkpoint, runtime: Runtime | None = None):
    """The tokenizer saved with the checkpoint (or ``runtime.tokenizer``), with a pad token set."""
    from transformers import AutoTokenizer

    runtime = runtime or Runtime()
    where = Path(runtime.tokenizer) if runtime.tokenizer is not None else checkpoint.tokenizer_dir
    if where is None:
        raise CheckpointError(
            f"{checkpoint.path}: no tokenizer files (expected tokenizer.json or "
            "tokenizer_config.json next to the weights); pass --tokenizer DIR"
        )
    with quiet_transformers():
        try:
            tokenizer = AutoTokenizer.from_pretrained(
                str(where), local_files_only=True, trust_remote_code=runtime.trust_remote_code
            )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{where}: cannot load the tokenizer: {' '.join(str(exc).split())[:300]}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
    return tokenizer


def same_tokenizer(a, b) -> bool:
    """True when two tokenizers map every token to the same id (vocab and special tokens)."""
    return a.get_vocab() == b.get_vocab() and a.all_special_ids == b.all_special_ids


def extends(big, small) -> bool:
    """True when ``big``'s vocabulary holds every token of ``small`` under the same id, and more
    (tokens added before fine-tuning: chat or tool tokens, embeddings resized)."""
    old, new = small.get_vocab(), big.get_vocab()
    return len(new) > len(old) and all(new.get(token) == i for token, i in old.items())


def shared_tokenizer(checkpoints, runtime: Runtime, *, warn=None):
    """The one tokenizer that serves every checkpoint of ``checkpoints``.

    Every checkpoint's own tokenizer must be the first one's, or extend it (or be extended by
    it): the vocabulary grew, the old tokens kept their ids. The largest is then used for every
    model (``warn`` says so): a probe of the old task tokenizes the same with both, and
    :func:`tokenize_probe` refuses ids a checkpoint's vocabulary does not hold. With
    ``runtime.tokenizer`` set, that one tokenizer serves all and nothing is compared.

    Raises:
        CheckpointError: two checkpoints ship different tokenizers (the message names
            ``--tokenizer``).
    """
    tokenizer, owner = load_tokenizer(checkpoints[0], runtime), checkpoints[0]
    if runtime.tokenizer is not None:
        return tokenizer
    first = tokenizer
    for other in checkpoints[1:]:
        if other.tokenizer_dir is None:
            continue
        theirs = load_tokenizer(other, runtime)
        if same_tokenizer(tokenizer, theirs) or extends(tokenizer, theirs):
            continue
        if not extends(theirs, tokenizer):
            raise CheckpointError(
                f"{owner.label} and {other.label} use different tokenizers (neither vocabulary extends the "
                "other with the same ids); expected one tokenizer for every checkpoint compared: pass "
                "--tokenizer DIR to use one tokenizer for all"
            )
        tokenizer, owner = theirs, other
    if tokenizer is not first and warn is not None:
        warn(
            f"the tokenizer of {owner.label} extends that of {checkpoints[0].label} ({len(tokenizer)} tokens "
            f"against {len(first)}; the old tokens keep their ids): it tokenizes the probes for every checkpoint"
        )
    return tokenizer


@dataclass(frozen=True)
class Stops:
    """The tokens that end an answer.

    ``primary`` ends every completion that is scored and trained on; the model saying any id in
    ``accepted`` where the completion stops counts as stopping.
    """

    primary: int | None
    accepted: frozenset[int]


_MARK = "\u2063forgetdiag-answer\u2063"  # text no template adds by itself


def end_of_turn(tokenizer) -> int | None:
    """The special token a chat template puts after an assistant's reply (``<|im_end|>``,
    ``<|eot_id|>``, ``<end_of_turn>``...), or None."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _MARK}]
    try:
        text = tokenizer.apply_chat_template(turns, tokenize=False)
    except Exception:
        return None
    if _MARK not in text:
        return None
    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}))
    ids = tokenizer(text.split(_MARK, 1)[1], add_special_tokens=False)["input_ids"]
    return next((i for i in ids if i in special), None)


def generation_stops(checkpoint: Checkpoint) -> set[int]:
    """``eos_token_id`` of the checkpoint's ``generation_config.json`` (an id or a list), if any."""
    import json

    file = (checkpoint.base or checkpoint).path / "generation_config.json"
    try:
        value = json.loads(file.read_text(encoding="utf-8")).get("eos_token_id")
    except (OSError, ValueError, AttributeError):
        return set()
    values = value if isinstance(value, list) else [value]
    return {v for v in values if isinstance(v, int) and not isinstance(v, bool)}


def stop_tokens(tokenizer, checkpoint: Checkpoint | None = None, *, chat_template: bool = False) -> Stops:
    """What ends an answer for this model: the tokenizer's EOS, every id of the generation
    config's ``eos_token_id``, and with a chat template its end-of-turn token (then the primary
    one: what the model says after a reply in its own format)."""
    accepted = set() if checkpoint is None else generation_stops(checkpoint)
    if tokenizer.eos_token_id is not None:
        accepted.add(tokenizer.eos_token_id)
    primary = tokenizer.eos_token_id
    if chat_template and (turn := end_of_turn(tokenizer)) is not None:
        accepted.add(turn)
        primary = turn
    return Stops(primary, frozenset(accepted))


def stop_string_ids(tokenizer, strings) -> set[int]:
    """Token ids whose text starts with one of ``strings``: saying one of them ends the answer
    where a generation loop that stops on those strings would cut it (an lm-eval task's ``until``)."""
    strings = [s for s in strings if s]
    if not strings:
        return set()
    found = set()
    for token_id in range(len(tokenizer)):
        text = tokenizer.decode([token_id])
        if any(text.startswith(s) for s in strings):
            found.add(token_id)
    return found


def tokenize_probe(tokenizer, probe, checkpoint: Checkpoint, runtime: Runtime, *, warn=None):
    """A probe's items as token ids the way every analysis scores and trains them.

    With ``runtime.chat_template`` each prompt becomes a user turn and the answer the assistant's
    reply, stopped by the template's end-of-turn token; otherwise the prompt's trailing
    whitespace moves into the answer (canonical tokens) and the EOS stops it. A multiple-choice
    probe gives :class:`forgetdiag.choices.EncodedChoice` items: every choice without a stop, the
    right one as the completion. A probe with stop strings (an lm-eval task's ``until``) also
    accepts, where an answer stops, any token whose text starts with one of them.

    Returns:
        ``(encoded items, Stops)``.
    """
    from forgetdiag.evaluate import encode, model_context
    from forgetdiag.probes import with_chat_template

    if runtime.chat_template:
        probe = with_chat_template(probe, tokenizer)
    stops = stop_tokens(tokenizer, checkpoint, chat_template=runtime.chat_template)
    if probe.stop_strings:
        stops = Stops(stops.primary, stops.accepted | stop_string_ids(tokenizer, probe.stop_strings))
    common = {
        "max_length": model_context(checkpoint.text_config),
        "truncate": runtime.truncate_prompts,
        "canonical": not runtime.chat_template,
        "warn": warn,
    }
    if probe.kind == "choice":
        from forgetdiag.choices import encode_choices

        encoded = encode_choices(tokenizer, probe.items, **common)
        rows = [[id_ for o in e.options for id_ in (*o.prompt_ids, *o.completion_ids)] for e in encoded]
    else:
        encoded = encode(tokenizer, probe, stop_id=stops.primary, **common)
        rows = [[*e.prompt_ids, *e.completion_ids] for e in encoded]
    require_known_ids(rows, checkpoint)
    return encoded, stops


def require_known_ids(rows, checkpoint: Checkpoint) -> None:
    """Refuse token ids beyond ``checkpoint``'s vocabulary (a token added after it), naming the row."""
    vocab = checkpoint_vocabulary(checkpoint)
    for row, ids in enumerate(rows, start=1):
        if vocab is not None and ids and max(ids) >= vocab:
            raise CheckpointError(
                f"probe row {row} uses token id {max(ids)}, which {checkpoint.label}'s vocabulary of {vocab} "
                "does not hold (a token added after it); expected probes written with the tokens every "
                "checkpoint knows"
            )


def checkpoint_vocabulary(checkpoint: Checkpoint) -> int | None:
    """Rows of the checkpoint's input embedding (its vocabulary as stored), else the config's."""
    for name, meta in (checkpoint.base or checkpoint).meta.items():
        if checkpoint.parse(name).component == "embed" and len(meta.shape) == 2:
            return meta.shape[0]
    return config_int(checkpoint.config, "vocab_size")
