"""Read one checkpoint's tensors lazily, one name at a time: tensor sources and :class:`Checkpoint`.

A model directory holds ``config.json`` and its weights: ``model.safetensors``, or shards named
by ``model.safetensors.index.json``; ``pytorch_model.bin`` is read only when pickles are allowed,
and then with ``torch.load(weights_only=True)``. Tensors are read with safetensors one at a time
(the file is memory-mapped while a tensor is read and unmapped afterwards), so memory holds a few
tensors, not whole models. Nothing is ever written into a checkpoint directory.

Finding checkpoints (Trainer runs, adapters, sequences) is :mod:`forgetdiag.checkpoints`.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from forgetdiag.architectures import (
    Family,
    TensorName,
    config_int,
    family_for,
    parse_name,
    text_config,
    tied_by_default,
)
from forgetdiag.errors import CheckpointError
from forgetdiag.layout import (  # noqa: F401 - re-exported: the file names are part of storage's API
    ADAPTER_CONFIG,
    PICKLE_FILE,
    PICKLE_INDEX,
    SAFETENSORS_FILE,
    SAFETENSORS_INDEX,
    TOKENIZER_FILES,
)
from forgetdiag.parts import experts_per_layer
from forgetdiag.sources import (  # noqa: F401 - re-exported: the sources are part of storage's API
    Header,
    PickleSource,
    SafetensorsSource,
    TensorMeta,
    load_pickle_weights,
    open_safetensors,
    read_header,
)

EXPECTED = (
    "expected a model directory (config.json + model.safetensors or a sharded "
    "model.safetensors.index.json), a Trainer output directory with checkpoint-N "
    "subdirectories, or a PEFT adapter directory (adapter_config.json)"
)


class Checkpoint:
    """One checkpoint: its config, tensor names, shapes and dtypes, and lazy tensor reads.

    Use :func:`forgetdiag.checkpoints.resolve_checkpoints` to build them. ``get`` returns a
    tensor in the requested dtype (float32 by default: the math never runs in bf16). For a LoRA
    adapter, ``get`` returns the merged weight base + dW, computed in memory, and ``delta`` the
    update alone.
    """

    def __init__(
        self,
        path: Path,
        *,
        config: dict[str, Any],
        source: Any,
        fmt: str,
        label: str | None = None,
        step: int | None = None,
    ) -> None:
        self.path = path
        self.config = config
        self.source = source
        self.format = fmt
        self.label = label or path.name
        self.step = step

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, format={self.format!r})"

    def with_label(self, label: str) -> Checkpoint:
        """The same checkpoint under another label (a copy; this one is left as it is)."""
        other = copy.copy(self)
        other.label = label
        return other

    @property
    def model_type(self) -> str | None:
        return self.config.get("model_type")

    @property
    def architecture(self) -> str:
        archs = self.config.get("architectures") or []
        return archs[0] if archs else (self.model_type or "unknown")

    @cached_property
    def family(self) -> Family:
        """The family of the text model (a wrapper's ``text_config.model_type`` first)."""
        inner = text_config(self.config).get("model_type")
        family = family_for(inner)
        return family if family.model_types or inner == self.model_type else family_for(self.model_type)

    @cached_property
    def text_config(self) -> dict[str, Any]:
        """The text model's settings (a wrapper's ``text_config`` over its top-level fields)."""
        return text_config(self.config)

    @property
    def n_layers(self) -> int | None:
        return config_int(self.config, "num_hidden_layers")

    @property
    def hidden_size(self) -> int | None:
        return config_int(self.config, "hidden_size")

    @cached_property
    def tied_embeddings(self) -> bool:
        """Whether lm_head is the input embedding, as transformers decides: the config's
        ``tie_word_embeddings`` (a wrapper's top level, else its ``text_config``), else the model
        class's default; and never when both are stored with different values (transformers
        then keeps them apart)."""
        tied = self.config.get("tie_word_embeddings", self.text_config.get("tie_word_embeddings"))
        tied = tied_by_default(self.config) if tied is None else bool(tied)
        if tied:
            stored = {self.parse(n).component: n for n in self.names if self.parse(n).kind == "weight"}
            if "embed" in stored and "lm_head" in stored:
                tied = self._same_values(stored["embed"], stored["lm_head"])
        return tied

    def _same_values(self, a: str, b: str) -> bool:
        if self.meta[a].shape != self.meta[b].shape:
            return False
        first, second = self.get(a, dtype=None), self.get(b, dtype=None)
        return first.dtype == second.dtype and torch.equal(first, second)

    @cached_property
    def experts(self) -> dict[int, int]:
        """Routed experts per mixture-of-experts layer (empty for a dense model)."""
        return experts_per_layer({n: m.shape for n, m in self.meta.items()}, self.family)

    @cached_property
    def towers(self) -> dict[str, list[str]]:
        """A wrapper's non-text towers (vision tower, projector...) and their tensor names."""
        out: dict[str, list[str]] = {}
        for name in self.names:
            tower = self.parse(name).tower
            if tower is not None:
                out.setdefault(tower, []).append(name)
        return out

    @property
    def meta(self) -> dict[str, TensorMeta]:
        return self.source.meta

    @property
    def names(self) -> list[str]:
        return list(self.source.meta)

    def parse(self, name: str) -> TensorName:
        """``name`` by layer, component and expert (parsed once per name: a 64-expert model has
        thousands of tensors, each asked about several times)."""
        parsed = self._parsed.get(name)
        if parsed is None:
            parsed = self._parsed[name] = parse_name(name, self.family)
        return parsed

    @cached_property
    def _parsed(self) -> dict[str, TensorName]:
        return {}

    def get(
        self, name: str, *, dtype: torch.dtype | None = torch.float32, device: str | torch.device = "cpu"
    ) -> torch.Tensor:
        """The tensor ``name`` as ``dtype`` (None: as stored) on ``device``."""
        if name not in self.source.meta:
            raise CheckpointError(f"{self.path}: no tensor named {name}")
        return self.source.get(name).to(device=device, dtype=dtype)

    def delta(
        self, name: str, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
    ) -> torch.Tensor | None:
        """For adapters, the update of ``name`` over the base (None if untouched)."""
        return None

    def prefetch(self, name: str) -> None:
        """Start reading ``name`` in the background where the source can (safetensors)."""
        prefetch = getattr(self.source, "prefetch", None)
        if prefetch is not None and name in self.source.meta:
            prefetch(name)

    @property
    def base(self) -> Checkpoint | None:
        return None

    @property
    def weight_files(self) -> list[Path]:
        return list(self.source.files)

    @property
    def size_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.weight_files)

    @property
    def n_params(self) -> int:
        return sum(numel(m.shape) for m in self.meta.values())

    @property
    def dtypes(self) -> list[str]:
        return sorted({m.dtype for m in self.meta.values()})

    @property
    def tokenizer_dir(self) -> Path | None:
        return self.path if any((self.path / f).is_file() for f in TOKENIZER_FILES) else None


def numel(shape: Iterable[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def read_json(file: Path, what: str) -> dict[str, Any]:
    """A JSON object from ``file``, or a CheckpointError naming the file and the problem."""
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{file}: invalid JSON in {what} (line {exc.lineno}: {exc.msg})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{file}: cannot read {what} ({exc})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{file}: expected a JSON object in {what}, found {type(data).__name__}")
    return data


# Sizes the analyses read from a config: each must be a whole number where present.
_CONFIG_SIZES = (
    "num_hidden_layers",
    "n_layer",
    "hidden_size",
    "n_embd",
    "d_model",
    "num_attention_heads",
    "n_head",
    "num_key_value_heads",
    "head_dim",
    "intermediate_size",
    "vocab_size",
    "max_position_embeddings",
)


def _check_config_sizes(config: dict[str, Any], file: Path) -> None:
    for key in _CONFIG_SIZES:
        value = config.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise CheckpointError(f"{file}: '{key}' must be a whole number >= 0, found {value!r}")


def load_model_dir(
    path: Path, *, allow_pickle: bool = False, label: str | None = None, step: int | None = None
) -> Checkpoint:
    """A :class:`Checkpoint` for a model directory (config.json + weights)."""
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{path}: no config.json; {EXPECTED}")
    config = read_json(config_file, "config.json")
    _check_config_sizes(config, config_file)
    if (path / SAFETENSORS_INDEX).is_file():
        index = read_json(path / SAFETENSORS_INDEX, SAFETENSORS_INDEX)
        weight_map = index.get("weight_map")
        if (
            not isinstance(weight_map, dict)
            or not weight_map
            or not all(isinstance(v, str) for v in weight_map.values())
        ):
            raise CheckpointError(
                f"{path / SAFETENSORS_INDEX}: expected a non-empty 'weight_map' of tensor names to shard files"
            )
        files = {name: path / shard for name, shard in weight_map.items()}
        absent = sorted({str(f.name) for f in files.values() if not f.is_file()})
        if absent:
            raise CheckpointError(f"{path}: shard {absent[0]} named in {SAFETENSORS_INDEX} is missing")
        return Checkpoint(
            path, config=config, source=SafetensorsSource(files), fmt="safetensors", label=label, step=step
        )
    if (path / SAFETENSORS_FILE).is_file():
        source = SafetensorsSource(safetensors_names(path / SAFETENSORS_FILE))
        return Checkpoint(path, config=config, source=source, fmt="safetensors", label=label, step=step)
    pickles = _pickle_files(path)
    if pickles:
        if not allow_pickle:
            raise CheckpointError(
                f"{path}: holds only pickle weights ({pickles[0].name}); refusing "
                "to unpickle by default: convert to safetensors, or pass "
                "--allow-pickle to load them with torch.load(weights_only=True)"
            )
        return Checkpoint(path, config=config, source=PickleSource(pickles), fmt="pickle", label=label, step=step)
    raise CheckpointError(
        f"{path}: found config.json but no weights; expected {SAFETENSORS_FILE} or {SAFETENSORS_INDEX}"
    )


def safetensors_names(file: Path) -> dict[str, Path]:
    """Every tensor name in one safetensors file, mapped to that file."""
    with open_safetensors(file) as handle:
        return {name: file for name in handle.keys()}  # noqa: SIM118 - not iterable


def _pickle_files(path: Path) -> list[Path]:
    if (path / PICKLE_INDEX).is_file():
        index = read_json(path / PICKLE_INDEX, PICKLE_INDEX)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{path / PICKLE_INDEX}: expected a 'weight_map' of tensor names to shard files")
        shards = sorted(set(weight_map.values()))
        absent = [s for s in shards if not (path / s).is_file()]
        if absent:
            # transformers would read the index too: never load another file than it names
            raise CheckpointError(f"{path}: shard {absent[0]} named in {PICKLE_INDEX} is missing")
        return [path / s for s in shards]
    return [path / PICKLE_FILE] if (path / PICKLE_FILE).is_file() else []
