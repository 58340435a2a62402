"""Model families described as data: which tensor is which part of which layer.

A checkpoint stores tensors under names such as ``model.layers.3.self_attn.q_proj.weight``.
Analyses need to know, for each name, the layer index, the component (q, k, v, o, gate, up,
down, embedding, ...), the storage layout (a torch ``Linear`` stores ``(out, in)``; GPT-2's
``Conv1D`` stores ``(in, out)``), which side of the matrix is the residual stream (hidden side),
and how a fused matrix splits into its true parts. All of that is data in :data:`FAMILIES`;
adding a family means adding an entry, not code.

Layer indices are parsed with an anchored pattern (``.layers.10.`` is layer 10, never layer 1).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

# `.layers.12.` / `.h.3.` / `.blocks.0.` / `.layer.7.`, anchored on dots so that the index is
# read whole ('layers.1' never matches 'layers.10').
LAYER_PATTERN = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class Split:
    """How a fused matrix holds several parts along its output axis.

    ``layout`` is ``"blocks"`` (contiguous blocks, e.g. GPT-2 ``c_attn`` = q|k|v, Phi-3
    ``qkv_proj``) or ``"heads"`` (interleaved per head, e.g. GPT-NeoX ``query_key_value``,
    whose rows reshape to ``(heads, parts, head_dim)``). ``sizes`` gives each block's size as a
    config expression (``"num_key_value_heads*head_dim"``); empty means equal blocks.
    """

    layout: str
    parts: tuple[str, ...]
    sizes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Component:
    """One kind of tensor inside a layer (or a global one such as the embedding).

    Attributes:
        name: short component name used in tables and JSON (``q``, ``gate``, ``embed``...).
        stored: ``"out_in"`` (torch Linear / Embedding) or ``"in_out"`` (GPT-2 Conv1D).
        hidden_side: which side of the canonical ``(out, in)`` matrix is the residual stream,
            ``"in"`` (q/k/v/gate/up/fc_in, embeddings, lm_head) or ``"out"`` (o/down/fc_out).
        split: how a fused matrix divides into true parts, or None.
    """

    name: str
    stored: str = "out_in"
    hidden_side: str = "in"
    split: Split | None = None


@dataclass(frozen=True)
class Family:
    """The tensor naming of one model family.

    ``layer_components`` is keyed by the module path inside a layer (``self_attn.q_proj``);
    ``global_components`` by the last module name (``embed_tokens``, ``lm_head``).
    """

    name: str
    model_types: tuple[str, ...]
    layer_components: Mapping[str, Component]
    global_components: Mapping[str, Component] = field(default_factory=dict)


def _c(name: str, hidden_side: str = "in", stored: str = "out_in", split: Split | None = None):
    return Component(name=name, stored=stored, hidden_side=hidden_side, split=split)


_EMBED = _c("embed")
_LM_HEAD = _c("lm_head")
_QKV = ("q", "k", "v")

FAMILIES: tuple[Family, ...] = (
    Family(
        name="llama",
        model_types=(
            "llama",
            "mistral",
            "mixtral",
            "qwen2",
            "qwen3",
            "gemma",
            "gemma2",
            "gemma3_text",
            "olmo",
            "olmo2",
            "granite",
            "smollm3",
        ),
        layer_components={
            "self_attn.q_proj": _c("q"),
            "self_attn.k_proj": _c("k"),
            "self_attn.v_proj": _c("v"),
            "self_attn.o_proj": _c("o", "out"),
            "mlp.gate_proj": _c("gate"),
            "mlp.up_proj": _c("up"),
            "mlp.down_proj": _c("down", "out"),
        },
        global_components={"embed_tokens": _EMBED, "lm_head": _LM_HEAD},
    ),
    Family(
        name="phi3",
        model_types=("phi3",),
        layer_components={
            "self_attn.qkv_proj": _c(
                "qkv",
                split=Split(
                    "blocks",
                    _QKV,
                    ("num_attention_heads*head_dim", "num_key_value_heads*head_dim", "num_key_value_heads*head_dim"),
                ),
            ),
            "self_attn.o_proj": _c("o", "out"),
            "mlp.gate_up_proj": _c("gate_up", split=Split("blocks", ("gate", "up"))),
            "mlp.down_proj": _c("down", "out"),
        },
        global_components={"embed_tokens": _EMBED, "lm_head": _LM_HEAD},
    ),
    Family(
        name="gpt2",
        model_types=("gpt2",),
        layer_components={
            "attn.c_attn": _c("qkv", stored="in_out", split=Split("blocks", _QKV)),
            "attn.c_proj": _c("o", "out", stored="in_out"),
            "mlp.c_fc": _c("fc_in", stored="in_out"),
            "mlp.c_proj": _c("fc_out", "out", stored="in_out"),
        },
        global_components={"wte": _EMBED, "wpe": _c("pos_embed"), "lm_head": _LM_HEAD},
    ),
    Family(
        name="gpt_neox",
        model_types=("gpt_neox",),
        layer_components={
            "attention.query_key_value": _c("qkv", split=Split("heads", _QKV)),
            "attention.dense": _c("o", "out"),
            "mlp.dense_h_to_4h": _c("fc_in"),
            "mlp.dense_4h_to_h": _c("fc_out", "out"),
        },
        global_components={"embed_in": _EMBED, "embed_out": _LM_HEAD, "lm_head": _LM_HEAD},
    ),
)

# Used when a checkpoint's model_type is not in FAMILIES: layers are still parsed; components
# are named after their module and the hidden side is guessed from the shape.
GENERIC = Family(
    name="generic",
    model_types=(),
    layer_components={},
    global_components={
        "embed_tokens": _EMBED,
        "wte": _EMBED,
        "embed_in": _EMBED,
        "lm_head": _LM_HEAD,
        "embed_out": _LM_HEAD,
    },
)


_ORDER = ("embed", "pos_embed", "q", "k", "v", "o", "gate", "up", "down", "fc_in", "fc_out", "lm_head")


def component_order(component: str) -> tuple[int, str]:
    """Sort key: the order components appear in a forward pass, unknown ones last."""
    return (_ORDER.index(component) if component in _ORDER else len(_ORDER), component)


def tied_by_default(config: Mapping[str, Any]) -> bool:
    """Whether transformers ties lm_head to the input embedding when ``config.json`` does not say.

    The model type's own config class decides (Llama: untied, GPT-2: tied); an unknown type gets
    ``PretrainedConfig``'s default, tied.
    """
    try:
        from transformers import CONFIG_MAPPING

        return bool(CONFIG_MAPPING[config.get("model_type")]().tie_word_embeddings)
    except Exception:
        return True


def family_for(model_type: str | None) -> Family:
    """The :class:`Family` whose ``model_types`` include ``model_type`` (else :data:`GENERIC`)."""
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    return GENERIC


def config_value(config: Mapping[str, Any], expression: str) -> int:
    """Evaluate a product such as ``"num_key_value_heads*head_dim"`` over config fields.

    ``head_dim`` defaults to ``hidden_size // num_attention_heads`` and ``num_key_value_heads``
    to ``num_attention_heads`` (GPT-2 style names ``n_embd``/``n_head`` are understood).
    """
    value = 1
    for token in expression.split("*"):
        value *= int(token) if token.isdigit() else _config_int(config, token)
    return value


_ALIASES = {
    "hidden_size": ("hidden_size", "n_embd", "d_model"),
    "num_attention_heads": ("num_attention_heads", "n_head"),
    "num_hidden_layers": ("num_hidden_layers", "n_layer"),
    "vocab_size": ("vocab_size",),
}


def _config_int(config: Mapping[str, Any], key: str) -> int:
    for alias in _ALIASES.get(key, (key,)):
        if config.get(alias) is not None:
            return int(config[alias])
    if key == "head_dim":
        return _config_int(config, "hidden_size") // _config_int(config, "num_attention_heads")
    if key == "num_key_value_heads":
        return _config_int(config, "num_attention_heads")
    raise KeyError(f"config has no field {key!r}")


def config_int(config: Mapping[str, Any], key: str, default: int | None = None) -> int | None:
    """A config integer by canonical name (aliases understood), or ``default`` if absent."""
    try:
        return _config_int(config, key)
    except KeyError:
        return default


@dataclass(frozen=True)
class TensorName:
    """What a stored tensor is: its layer, component and layout.

    Attributes:
        name: the name in the checkpoint file.
        layer: layer index, or None for global tensors (embeddings, final norm, lm_head).
        component: component name (``q``, ``qkv``, ``embed``...; for unknown tensors the module
            path inside the layer, such as ``input_layernorm``).
        kind: ``"weight"``, ``"bias"`` or the name's last part.
        spec: the :class:`Component` if the family knows this tensor, else None.
    """

    name: str
    layer: int | None
    component: str
    kind: str
    spec: Component | None

    @property
    def is_matrix_weight(self) -> bool:
        """True for the weight matrices analyses compare (not norms, biases or unknown tensors)."""
        return self.spec is not None and self.kind == "weight"


def parse_name(name: str, family: Family) -> TensorName:
    """Name a stored tensor by layer index and component.

    Example:
        >>> parse_name("model.layers.10.mlp.up_proj.weight", family_for("llama")).layer
        10
    """
    module, _, kind = name.rpartition(".")
    if not module:
        module, kind = name, ""
    match = LAYER_PATTERN.search(name)
    if match:
        layer = int(match.group(1))
        inner = match.group(2).rpartition(".")[0] or match.group(2)
        spec = family.layer_components.get(inner)
        return TensorName(name, layer, spec.name if spec else inner, kind, spec)
    last = module.rpartition(".")[2]
    spec = family.global_components.get(last)
    return TensorName(name, None, spec.name if spec else last, kind, spec)


@dataclass(frozen=True)
class MatrixPart:
    """One weight matrix an analysis compares: a whole tensor, or one true part of a fused one.

    ``extract`` turns the stored tensor into this part's canonical ``(out, in)`` matrix;
    ``oriented`` into the ``(hidden, other)`` matrix whose columns live in the residual stream.
    """

    tensor: TensorName
    part: str | None
    component: str
    hidden_side: str
    rows: tuple[int, ...] | None  # the canonical rows of this part, None = all

    @property
    def name(self) -> str:
        return self.tensor.name if self.part is None else f"{self.tensor.name}[{self.part}]"

    @property
    def layer(self) -> int | None:
        return self.tensor.layer

    def extract(self, stored: torch.Tensor) -> torch.Tensor:
        """The canonical ``(out, in)`` matrix of this part from the stored tensor."""
        canonical = stored.T if self.tensor.spec.stored == "in_out" else stored
        return canonical if self.rows is None else canonical[list(self.rows)]

    def oriented(self, stored: torch.Tensor) -> torch.Tensor:
        """This part with the residual-stream axis first: ``(hidden, other)``."""
        canonical = self.extract(stored)
        return canonical.T if self.hidden_side == "in" else canonical


def matrix_parts(
    tensor: TensorName, shape: tuple[int, ...], config: Mapping[str, Any], *, guess: bool = False
) -> list[MatrixPart]:
    """The comparable matrices inside one stored weight (several for fused q/k/v).

    With ``guess`` (used for families not in :data:`FAMILIES`), an unknown 2-D weight with one
    hidden-size side is taken as a torch Linear whose hidden side is that one.
    """
    if guess and tensor.spec is None and tensor.kind == "weight" and len(shape) == 2:
        tensor = _guessed(tensor, shape, config)
    spec = tensor.spec
    if not tensor.is_matrix_weight or len(shape) != 2:
        return []
    n_out = shape[1] if spec.stored == "in_out" else shape[0]
    if spec.split is None:
        return [MatrixPart(tensor, None, spec.name, spec.hidden_side, None)]
    rows = split_rows(spec.split, n_out, config)
    return [MatrixPart(tensor, part, part, spec.hidden_side, tuple(idx)) for part, idx in rows.items()]


_OUTPUT_SIDE_HINTS = ("o_proj", "out_proj", "down", "dense_4h_to_h", "c_proj", "fc2", "wo", "dense")


def _guessed(tensor: TensorName, shape: tuple[int, ...], config: Mapping[str, Any]) -> TensorName:
    hidden = config_int(config, "hidden_size")
    out_is_hidden, in_is_hidden = shape[0] == hidden, shape[1] == hidden
    if not (out_is_hidden or in_is_hidden):
        return tensor
    if out_is_hidden and in_is_hidden:
        last = tensor.component.rpartition(".")[2]
        side = "out" if any(h in last for h in _OUTPUT_SIDE_HINTS) else "in"
    else:
        side = "in" if in_is_hidden else "out"
    return TensorName(
        tensor.name, tensor.layer, tensor.component, tensor.kind, Component(tensor.component, hidden_side=side)
    )


def split_rows(split: Split, n_out: int, config: Mapping[str, Any]) -> dict[str, list[int]]:
    """Canonical row indices of each part of a fused matrix with ``n_out`` output rows."""
    n_parts = len(split.parts)
    if split.layout == "blocks":
        sizes = [config_value(config, s) for s in split.sizes] if split.sizes else [n_out // n_parts] * n_parts
        if sum(sizes) != n_out:
            raise ValueError(f"fused matrix has {n_out} rows, expected {sum(sizes)} = {sizes}")
        starts = [sum(sizes[:i]) for i in range(n_parts)]
        return {p: list(range(s, s + n)) for p, s, n in zip(split.parts, starts, sizes)}
    if split.layout == "heads":
        heads = config_value(config, "num_attention_heads")
        head_dim = n_out // (heads * n_parts)
        if heads * n_parts * head_dim != n_out:
            raise ValueError(f"fused matrix has {n_out} rows, not {heads} heads x {n_parts} parts")
        # rows reshape to (heads, parts, head_dim): part p of head h is rows
        # (h * parts + p) * head_dim ... + head_dim
        return {
            p: [(h * n_parts + i) * head_dim + j for h in range(heads) for j in range(head_dim)]
            for i, p in enumerate(split.parts)
        }
    raise ValueError(f"unknown split layout {split.layout!r}")
