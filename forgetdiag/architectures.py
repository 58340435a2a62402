"""Model families described as data: which tensor is which part of which layer.

A checkpoint stores tensors under names such as ``model.layers.3.self_attn.q_proj.weight``.
Analyses need to know, for each name, the layer index, the component (q, k, v, o, gate, up,
down, router, embedding, ...), whether it belongs to one routed expert of a mixture-of-experts
layer, the storage layout (a torch ``Linear`` stores ``(out, in)``; GPT-2's ``Conv1D`` stores
``(in, out)``), which side of the matrix is the residual stream (hidden side), and how a fused
matrix splits into its true parts. All of that is data in :data:`FAMILIES`; adding a family
means adding an entry, not code. The matrices analyses compare are cut from the stored tensors
by :mod:`forgetdiag.parts`.

Layer indices are parsed with an anchored pattern (``.layers.10.`` is layer 10, never layer 1).
Multimodal wrappers (Gemma 3, Llama 4, Mistral 3, Qwen2-VL) keep the text model under a
``language_model`` prefix and its settings under ``text_config``; their vision towers and
projectors are named as towers and left out of the text analyses.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

# `.layers.12.` / `.h.3.` / `.blocks.0.` / `.layer.7.`, anchored on dots so that the index is
# read whole ('layers.1' never matches 'layers.10').
LAYER_PATTERN = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.(.+)$")
# One routed expert's module inside a layer: `mlp.experts.12.up_proj` is expert 12.
EXPERT_PATTERN = re.compile(r"(^|\.)experts\.(\d+)(?=\.|$)")
# The first module names of a multimodal wrapper's non-text parts (optionally under `model.`):
# their tensors are towers, never layers of the text model.
TOWERS = (
    "vision_tower",
    "vision_model",
    "visual",
    "multi_modal_projector",
    "audio_tower",
    "audio_model",
    "vision_encoder",
    "image_newline",
)


@dataclass(frozen=True)
class Split:
    """How a fused matrix holds several parts along its output axis.

    ``layout`` is ``"blocks"`` (contiguous blocks, e.g. GPT-2 ``c_attn`` = q|k|v, Phi-3
    ``qkv_proj``), ``"heads"`` (interleaved per head, e.g. GPT-NeoX and Bloom
    ``query_key_value``, whose rows reshape to ``(heads, parts, head_dim)``) or ``"grouped"``
    (Falcon: rows reshape to ``(groups, heads / groups + 2, head_dim)``, each group's query
    heads then its one key and one value head; ``groups`` is read from the row count, so the
    multi-query layout is one group and the old multi-head layout one group per head).
    ``sizes`` gives each block's size as a config expression (``"num_key_value_heads*head_dim"``);
    empty means equal blocks.
    """

    layout: str
    parts: tuple[str, ...]
    sizes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Component:
    """One kind of tensor inside a layer (or a global one such as the embedding).

    Attributes:
        name: short component name used in tables and JSON (``q``, ``gate``, ``router``...).
        stored: ``"out_in"`` (torch Linear / Embedding) or ``"in_out"`` (GPT-2 Conv1D, and
            Llama 4's fused experts).
        hidden_side: which side of the canonical ``(out, in)`` matrix is the residual stream,
            ``"in"`` (q/k/v/gate/up/fc_in/router, embeddings, lm_head) or ``"out"`` (o/down/fc_out).
        split: how a fused matrix divides into true parts, or None.
        routed: a routed expert's weight: one expert's 2-D matrix (its key holds
            ``experts.*``), or a 3-D tensor stacking every expert on its first axis.
    """

    name: str
    stored: str = "out_in"
    hidden_side: str = "in"
    split: Split | None = None
    routed: bool = False


@dataclass(frozen=True)
class Family:
    """The tensor naming of one model family.

    ``layer_components`` is keyed by the module path inside a layer (``self_attn.q_proj``;
    ``mlp.experts.*.up_proj`` for every expert); ``global_components`` by the last module name
    (``embed_tokens``, ``lm_head``).
    """

    name: str
    model_types: tuple[str, ...]
    layer_components: Mapping[str, Component]
    global_components: Mapping[str, Component] = field(default_factory=dict)


def _c(name: str, hidden_side: str = "in", stored: str = "out_in", split: Split | None = None, routed=False):
    return Component(name=name, stored=stored, hidden_side=hidden_side, split=split, routed=routed)


_EMBED = _c("embed")
_LM_HEAD = _c("lm_head")
_QKV = ("q", "k", "v")
_GATE_UP = Split("blocks", ("gate", "up"))
_GLOBALS = {"embed_tokens": _EMBED, "lm_head": _LM_HEAD}
_ATTENTION = {
    "self_attn.q_proj": _c("q"),
    "self_attn.k_proj": _c("k"),
    "self_attn.v_proj": _c("v"),
    "self_attn.o_proj": _c("o", "out"),
}
_MLP = {"mlp.gate_proj": _c("gate"), "mlp.up_proj": _c("up"), "mlp.down_proj": _c("down", "out")}
# DeepSeek's multi-head latent attention: q and kv pass through low-rank latents, whose
# matrices q_b and kv_b have no residual-stream side: their input (the latent) is compared.
_LATENT_ATTENTION = {
    "self_attn.q_a_proj": _c("q_a"),
    "self_attn.q_b_proj": _c("q_b"),
    "self_attn.kv_a_proj_with_mqa": _c("kv_a"),
    "self_attn.kv_b_proj": _c("kv_b"),
}


def _experts(prefix: str, gate: str, up: str, down: str, *, fused_stored: str = "out_in") -> dict[str, Component]:
    """A mixture-of-experts block under ``prefix``: its router, each expert's gate/up/down as
    transformers writes them (one 2-D tensor per expert), the fused 3-D tensors transformers 5
    holds in memory (``save_original_format=False`` writes them; Llama 4 stores them), and
    shared experts (``shared_expert`` in Qwen-MoE and Llama 4, ``shared_experts`` in DeepSeek)."""
    out = {
        f"{prefix}.experts.*.{gate}": _c("gate", routed=True),
        f"{prefix}.experts.*.{up}": _c("up", routed=True),
        f"{prefix}.experts.*.{down}": _c("down", "out", routed=True),
        f"{prefix}.experts.gate_up_proj": _c("gate_up", stored=fused_stored, split=_GATE_UP, routed=True),
        f"{prefix}.experts.down_proj": _c("down", "out", stored=fused_stored, routed=True),
        f"{prefix}.shared_expert_gate": _c("shared_router"),
    }
    for shared in ("shared_expert", "shared_experts"):
        out |= {
            f"{prefix}.{shared}.gate_proj": _c("shared_gate"),
            f"{prefix}.{shared}.up_proj": _c("shared_up"),
            f"{prefix}.{shared}.down_proj": _c("shared_down", "out"),
        }
    return out


_MOE = (
    _experts("mlp", "gate_proj", "up_proj", "down_proj")
    | {"mlp.gate": _c("router")}
    | _experts("block_sparse_moe", "w1", "w3", "w2")  # Mixtral's names on disk
    | {"block_sparse_moe.gate": _c("router")}
)

FAMILIES: tuple[Family, ...] = (
    Family(
        name="llama",
        model_types=(
            *("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "olmo", "olmo2"),
            *("granite", "smollm3", "stablelm", "gemma3", "mistral3"),
            *("qwen2_vl", "qwen2_vl_text", "qwen2_5_vl", "qwen2_5_vl_text"),
        ),
        layer_components=_ATTENTION | _MLP,
        global_components=_GLOBALS,
    ),
    Family(
        name="mixtral", model_types=("mixtral",), layer_components=_ATTENTION | _MLP | _MOE, global_components=_GLOBALS
    ),
    Family(
        name="qwen_moe",
        model_types=("qwen2_moe", "qwen3_moe", "olmoe"),
        layer_components=_ATTENTION | _MLP | _MOE,
        global_components=_GLOBALS,
    ),
    Family(
        name="deepseek",
        model_types=("deepseek_v2", "deepseek_v3"),
        layer_components=_ATTENTION | _LATENT_ATTENTION | _MLP | _MOE,
        global_components=_GLOBALS,
    ),
    Family(
        name="llama4",
        model_types=("llama4", "llama4_text"),
        layer_components=_ATTENTION
        | {f"feed_forward.{k.split('.', 1)[1]}": c for k, c in _MLP.items()}
        | _experts("feed_forward", "gate_proj", "up_proj", "down_proj", fused_stored="in_out")
        | {"feed_forward.router": _c("router")},
        global_components=_GLOBALS,
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
            "mlp.gate_up_proj": _c("gate_up", split=_GATE_UP),
            "mlp.down_proj": _c("down", "out"),
        },
        global_components=_GLOBALS,
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
    *(
        Family(
            name=name,
            model_types=types,
            layer_components={
                "self_attention.query_key_value": _c("qkv", split=Split(layout, _QKV)),
                "self_attention.dense": _c("o", "out"),
                "mlp.dense_h_to_4h": _c("fc_in"),
                "mlp.dense_4h_to_h": _c("fc_out", "out"),
            },
            global_components={"word_embeddings": _EMBED, "lm_head": _LM_HEAD},
        )
        for name, types, layout in (
            ("falcon", ("falcon", "RefinedWeb", "RefinedWebModel"), "grouped"),
            ("bloom", ("bloom",), "heads"),
        )
    ),
    Family(
        name="opt",
        model_types=("opt",),
        layer_components={
            "self_attn.q_proj": _c("q"),
            "self_attn.k_proj": _c("k"),
            "self_attn.v_proj": _c("v"),
            "self_attn.out_proj": _c("o", "out"),
            "fc1": _c("fc_in"),
            "fc2": _c("fc_out", "out"),
        },
        global_components=_GLOBALS | {"embed_positions": _c("pos_embed")},
    ),
    Family(
        name="gptj",
        model_types=("gptj",),
        layer_components={
            "attn.q_proj": _c("q"),
            "attn.k_proj": _c("k"),
            "attn.v_proj": _c("v"),
            "attn.out_proj": _c("o", "out"),
            "mlp.fc_in": _c("fc_in"),
            "mlp.fc_out": _c("fc_out", "out"),
        },
        global_components={"wte": _EMBED, "lm_head": _LM_HEAD},
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
        "word_embeddings": _EMBED,
        "lm_head": _LM_HEAD,
        "embed_out": _LM_HEAD,
    },
)


_ORDER = (
    *("embed", "pos_embed", "q", "q_a", "q_b", "k", "v", "kv_a", "kv_b", "o", "router", "gate", "up", "down"),
    *("fc_in", "fc_out", "shared_router", "shared_gate", "shared_up", "shared_down", "lm_head"),
)


def component_order(component: str) -> tuple[int, str]:
    """Sort key: the order components appear in a forward pass, unknown ones last."""
    return (_ORDER.index(component) if component in _ORDER else len(_ORDER), component)


def text_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The text model's settings: a wrapper's ``text_config`` over its top-level fields (the
    same dict for a plain language model)."""
    inner = config.get("text_config")
    return {**config, **inner} if isinstance(inner, Mapping) else dict(config)


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
    to ``num_attention_heads`` (GPT-2 style names ``n_embd``/``n_head`` are understood); a field
    a wrapper keeps under ``text_config`` is read there.
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
    "num_experts": ("num_local_experts", "num_experts", "n_routed_experts"),
}


def _config_int(config: Mapping[str, Any], key: str) -> int:
    for where in (config, config.get("text_config")):
        if isinstance(where, Mapping):
            for alias in _ALIASES.get(key, (key,)):
                if isinstance(where.get(alias), int) and not isinstance(where.get(alias), bool):
                    return int(where[alias])
    if key == "head_dim":
        return _config_int(config, "hidden_size") // _config_int(config, "num_attention_heads")
    if key == "num_key_value_heads":
        return _config_int(config, "num_attention_heads")
    raise KeyError(f"config has no field {key!r}")


def config_int(config: Mapping[str, Any], key: str, default: int | None = None) -> int | None:
    """A config integer by canonical name (aliases and ``text_config`` understood), or ``default``."""
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
        expert: the routed expert's index for one expert's tensor, else None (a fused 3-D
            tensor holds every expert: its parts carry the index).
        tower: the first module name of a non-text tower (``vision_tower``...), else None.
    """

    name: str
    layer: int | None
    component: str
    kind: str
    spec: Component | None
    expert: int | None = None
    tower: str | None = None

    @property
    def is_matrix_weight(self) -> bool:
        """True for the weight matrices analyses compare (not norms, biases or unknown tensors)."""
        return self.spec is not None and self.kind in ("weight", "") and self.tower is None


def tower_of(name: str) -> str | None:
    """The non-text tower a tensor or parameter belongs to (``vision_tower``...), else None."""
    first = name.split(".", 2)
    head = first[1] if first[0] == "model" and len(first) > 1 else first[0]
    return head if head in TOWERS else None


def parse_name(name: str, family: Family) -> TensorName:
    """Name a stored tensor by layer index, component and (for routed experts) expert index.

    Example:
        >>> parse_name("model.layers.10.mlp.up_proj.weight", family_for("llama")).layer
        10
    """
    module, _, kind = name.rpartition(".")
    if not module:
        module, kind = name, ""
    tower = tower_of(name)
    if tower is not None:
        return TensorName(name, None, tower, kind, None, tower=tower)
    match = LAYER_PATTERN.search(name)
    if match:
        layer = int(match.group(1))
        inner = match.group(2).rpartition(".")[0] or match.group(2)
        spec, expert = family.layer_components.get(inner), None
        if spec is None and kind not in ("weight", "bias"):  # a bare fused parameter (experts.down_proj)
            spec, inner, kind = family.layer_components.get(match.group(2)), match.group(2), ""
        if spec is None and (found := EXPERT_PATTERN.search(inner)):
            expert = int(found.group(2))
            spec = family.layer_components.get(EXPERT_PATTERN.sub(r"\1experts.*", inner, count=1))
        return TensorName(name, layer, spec.name if spec else inner, kind, spec, expert if spec else None)
    last = module.rpartition(".")[2]
    spec = family.global_components.get(last)
    return TensorName(name, None, spec.name if spec else last, kind, spec)
