"""Hidden states at the last prompt token, for the embedding output and every layer.

Forward hooks copy the last position of each decoder layer's output, so memory holds
(layers, batch, hidden) numbers, never the (layers, batch, tokens, hidden) that transformers'
``output_hidden_states`` materialises. Layer 0 is the embedding output; the last index is after
the final norm, as ``output_hidden_states`` numbers them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from forgetdiag.errors import CheckpointError, ForgetdiagError, ProbeError
from forgetdiag.evaluate import Encoded, batches_by_length, collate, has_bos_text
from forgetdiag.probes import Probe
from forgetdiag.runtime import ProgressFn, Warn

METHODS = ("hooks", "output_hidden_states")


def encode_prompts(
    tokenizer,
    probe: Probe,
    *,
    max_length: int | None = None,
    truncate: bool = False,
    canonical: bool = True,
    warn: Warn | None = None,
) -> list[Encoded]:
    """Prompt token ids only (features never see the answer), as ``Encoded(prompt, ())``.

    The prompts are tokenized as scoring tokenizes them (:func:`forgetdiag.evaluate.encode`):
    trailing whitespace belongs to the answer (unless ``canonical`` is off, for chat
    templates), and a prompt that holds the BOS text gets no second BOS; the last prompt
    token is the one whose hidden state predicts the answer.

    Raises:
        ProbeError: a prompt with no tokens, or longer than the context without ``truncate``.
    """
    encoded, cut = [], 0
    for row, item in enumerate(probe.items, start=1):
        text = item.prompt.rstrip() if canonical else item.prompt
        ids = tokenizer(text, add_special_tokens=not has_bos_text(tokenizer, text))["input_ids"]
        if not ids:
            raise ProbeError(
                f"probe row {row}: the prompt {item.prompt!r} tokenizes to nothing; expected at least one token"
            )
        if max_length is not None and len(ids) > max_length:
            if not truncate:
                raise ProbeError(
                    f"probe row {row}: the prompt is {len(ids)} tokens, more than the "
                    f"model's context of {max_length}; shorten it or pass "
                    "--truncate-prompts to drop its oldest tokens"
                )
            ids, cut = ids[-max_length:], cut + 1
        encoded.append(Encoded(tuple(ids), ()))
    if cut and warn is not None:
        warn(f"{cut} prompts were longer than the model's context of {max_length} tokens and lost their oldest tokens")
    return encoded


def decoder_layers(model) -> torch.nn.ModuleList:
    """The decoder blocks of a causal LM: the ModuleList of ``num_hidden_layers`` equal blocks,
    looked for in its text decoder first (a multimodal wrapper's vision tower has layers too)."""
    n = getattr(model.config.get_text_config(), "num_hidden_layers", None)
    try:
        roots = [model.get_decoder()]
    except (AttributeError, NotImplementedError, TypeError):
        roots = []
    for root in [*roots, model.base_model]:
        for module in root.modules():
            if isinstance(module, torch.nn.ModuleList) and len(module) == n and len({type(m) for m in module}) == 1:
                return module
    raise CheckpointError(
        f"cannot find the {n} decoder layers of {type(model).__name__}; "
        "expected a ModuleList of num_hidden_layers blocks (use method "
        "'output_hidden_states' for this architecture)"
    )


class _LastToken:
    """Forward hooks that copy the last position of the embedding output and each layer's
    output. The copy (not a view) lets the full (batch, tokens, hidden) tensor be freed."""

    def __init__(self, layers: torch.nn.ModuleList) -> None:
        self.states: list[torch.Tensor] = []  # each (B, d)
        self.handles = [layers[0].register_forward_pre_hook(self._input, with_kwargs=True)]
        # the last block's output is replaced by the final-norm output, as in transformers
        self.handles += [layer.register_forward_hook(self._output) for layer in layers[:-1]]

    def _input(self, module, args, kwargs) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]  # (B, T, d)
        self.states.append(hidden[:, -1].clone())

    def _output(self, module, args, output) -> None:
        hidden = output[0] if isinstance(output, tuple) else output  # (B, T, d)
        self.states.append(hidden[:, -1].clone())

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _forward_last(model, batch, recorder: _LastToken | None) -> torch.Tensor:
    """(n_layers + 1, B, d) hidden states at the last position of one left-padded batch."""
    inputs = dict(batch.model_inputs(), use_cache=False)
    if recorder is None:
        out = model.base_model(**inputs, output_hidden_states=True)
        return torch.stack([h[:, -1] for h in out.hidden_states])
    recorder.states.clear()
    last = model.base_model(**inputs).last_hidden_state[:, -1]  # (B, d) after the final norm
    return torch.stack([*recorder.states, last])


@torch.inference_mode()
def extract_features(
    model,
    prompts: Sequence[Encoded],
    *,
    pad_id: int,
    batch_size: int = 64,
    method: str = "hooks",
    progress: ProgressFn | None = None,
    label: str = "hidden states",
) -> torch.Tensor:
    """Hidden states at the last prompt token, for the embedding output and every layer.

    Args:
        model: a transformers causal LM (its device and dtype are used).
        prompts: from :func:`encode_prompts` (completions are ignored).
        pad_id: any valid token id (padding is on the left and masked).
        batch_size: prompts per forward pass (batched by length to limit padding).
        method: ``hooks`` keeps one position per layer; ``output_hidden_states`` asks
            transformers for every position of every layer (same numbers, more memory).
        progress: ``progress(label, done, total)`` per batch.

    Returns:
        (n_layers + 1, n, d) float32 on the CPU, rows in the order of ``prompts``.
    """
    if method not in METHODS:
        raise ForgetdiagError(f"method must be one of {', '.join(METHODS)}, not {method!r}")
    device = next(model.parameters()).device
    recorder = _LastToken(decoder_layers(model)) if method == "hooks" else None
    prompts = [Encoded(p.prompt_ids, ()) for p in prompts]
    groups = batches_by_length(prompts, batch_size)
    out = None
    try:
        for done, idx in enumerate(groups):
            batch = collate([prompts[k] for k in idx], pad_id, device)
            states = _forward_last(model, batch, recorder).float().cpu()  # (L + 1, B, d)
            if out is None:
                out = torch.empty(states.shape[0], len(prompts), states.shape[2])  # (L + 1, n, d)
            out[:, idx] = states
            if progress is not None:
                progress(label, done + 1, len(groups))
    finally:
        if recorder is not None:
            recorder.remove()
    if out is None:
        raise ProbeError("no prompts to run; expected a probe with at least one row")
    return out
