"""PEFT LoRA adapters read as checkpoints: dW = scale * B @ A over a base model, in memory.

An adapter directory holds ``adapter_config.json`` and ``adapter_model.safetensors`` whose keys
look like ``base_model.model.<module>.lora_A.weight`` (r, in) and ``...lora_B.weight`` (out, r).
The update of ``<module>.weight`` is ``scale * B @ A`` with ``scale = lora_alpha / r``
(``lora_alpha / sqrt(r)`` with rsLoRA), transposed for GPT-2 Conv1D targets (fan_in_fan_out)
and for embeddings (``lora_embedding_A`` (r, vocab), ``lora_embedding_B`` (hidden, r)). Full
tensors saved next to the LoRA pairs (``modules_to_save``, resized embeddings) replace the
base's. The merged weights are never written anywhere.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import torch

from forgetdiag.errors import CheckpointError
from forgetdiag.layout import ADAPTER_PICKLE, ADAPTER_SAFETENSORS
from forgetdiag.storage import (
    ADAPTER_CONFIG,
    Checkpoint,
    SafetensorsSource,
    TensorMeta,
    load_model_dir,
    load_pickle_weights,
    read_json,
    safetensors_names,
)

_PREFIX = "base_model.model."
_LORA_KEY = re.compile(
    r"^(?P<module>.+)\.(?P<which>lora_A|lora_B)\.weight$|"
    r"^(?P<emodule>.+)\.(?P<ewhich>lora_embedding_A|lora_embedding_B)$"
)


class LoraSource:
    """The tensors of base + adapter: names and shapes of the base, merged values on read."""

    def __init__(
        self,
        base: Checkpoint,
        adapter_dir: Path,
        adapter_config: dict[str, Any],
        adapter_tensors: dict[str, torch.Tensor],
    ) -> None:
        self.base = base
        self.adapter_dir = adapter_dir
        self.config = adapter_config
        self.pairs: dict[str, dict[str, torch.Tensor]] = {}  # base weight name -> {"A","B"}
        self.embedding_targets: set[str] = set()
        self.replaced: dict[str, torch.Tensor] = {}
        for key, tensor in adapter_tensors.items():
            self._add(key.removeprefix(_PREFIX), tensor)
        for name, pair in self.pairs.items():
            if set(pair) != {"A", "B"}:
                raise CheckpointError(f"{adapter_dir}: adapter has lora_A without lora_B (or the reverse) for {name}")
            if name not in base.meta:
                raise CheckpointError(
                    f"{adapter_dir}: adapter targets {name}, which the base model "
                    f"{base.path} does not have (expected the adapter's own base)"
                )
        self.meta = dict(base.meta)
        for name, tensor in self.replaced.items():
            self.meta[name] = TensorMeta(tuple(tensor.shape), str(tensor.dtype).removeprefix("torch."), None)
        self.files = [
            *base.weight_files,
            *(adapter_dir / f for f in (ADAPTER_SAFETENSORS, ADAPTER_PICKLE) if (adapter_dir / f).is_file()),
        ]

    def _add(self, key: str, tensor: torch.Tensor) -> None:
        match = _LORA_KEY.match(key)
        if match is None:
            if "lora_" in key or "magnitude" in key:
                raise CheckpointError(
                    f"{self.adapter_dir}: unsupported adapter tensor {key} (expected plain LoRA: lora_A / lora_B pairs)"
                )
            # a full tensor saved with the adapter (modules_to_save, resized embedding)
            self.replaced[key.replace(".base_layer.", ".")] = tensor
            return
        module = match.group("module") or match.group("emodule")
        which = (match.group("which") or match.group("ewhich"))[-1]  # "A" or "B"
        name = module.removesuffix(".base_layer") + ".weight"
        if match.group("emodule"):
            self.embedding_targets.add(name)
        self.pairs.setdefault(name, {})[which] = tensor

    def scale(self, name: str, r: int) -> float:
        """``lora_alpha / r`` (or ``/ sqrt(r)`` with rsLoRA), honouring ``alpha_pattern``."""
        module = name.removesuffix(".weight")
        alpha = self.config.get("lora_alpha", 8)
        for pattern, value in (self.config.get("alpha_pattern") or {}).items():
            if re.match(rf"(.*\.)?({pattern})$", module):
                alpha = value
                break
        return alpha / math.sqrt(r) if self.config.get("use_rslora") else alpha / r

    def delta(self, name: str) -> torch.Tensor | None:
        """The update of stored tensor ``name`` in its stored layout, in float32 (None if untouched)."""
        pair = self.pairs.get(name)
        if pair is None:
            return None
        a, b = pair["A"].to(torch.float32), pair["B"].to(torch.float32)  # (r, in), (out, r)
        delta = self.scale(name, a.shape[0]) * (b @ a)  # (out, in) in Linear terms
        transposed = name in self.embedding_targets or self.config.get("fan_in_fan_out", False)
        delta = delta.T if transposed else delta
        expected = self.base.meta[name].shape
        if tuple(delta.shape) != expected:
            raise CheckpointError(
                f"{self.adapter_dir}: LoRA update of {name} has shape {tuple(delta.shape)}, the base tensor {expected}"
            )
        return delta


class LoraCheckpoint(Checkpoint):
    """A LoRA adapter over its base model, read as a checkpoint of merged weights."""

    source: LoraSource

    @property
    def base(self) -> Checkpoint:
        return self.source.base

    @property
    def rank(self) -> int:
        return int(self.source.config.get("r", 0))

    @property
    def targets(self) -> list[str]:
        return sorted(self.source.pairs)

    def delta(
        self, name: str, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
    ) -> torch.Tensor | None:
        if name in self.source.replaced:
            return self.get(name, dtype=dtype, device=device) - self.base.get(name, dtype=dtype, device=device)
        delta = self.source.delta(name)
        return None if delta is None else delta.to(device=device, dtype=dtype)

    def prefetch(self, name: str) -> None:
        if name not in self.source.replaced:
            self.base.prefetch(name)  # the adapter's own factors are in memory

    def get(self, name: str, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> torch.Tensor:
        if name not in self.meta:
            raise CheckpointError(f"{self.path}: no tensor named {name}")
        if name in self.source.replaced:
            return self.source.replaced[name].to(device=device, dtype=dtype)
        base = self.base.get(name, dtype=torch.float32, device=device)
        delta = self.delta(name, device=device)
        return (base if delta is None else base + delta).to(dtype)

    @property
    def tokenizer_dir(self) -> Path | None:
        own = Checkpoint.tokenizer_dir.fget(self)
        return own or self.base.tokenizer_dir


def load_adapter(
    path: Path,
    *,
    base: str | Path | None = None,
    allow_pickle: bool = False,
    label: str | None = None,
    step: int | None = None,
) -> LoraCheckpoint:
    """A :class:`LoraCheckpoint` for a PEFT adapter directory.

    The base model is ``base`` when given, else the adapter's ``base_model_name_or_path``
    (a local directory, absolute or relative to the current directory or the adapter's).
    """
    config = read_json(path / ADAPTER_CONFIG, ADAPTER_CONFIG)
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise CheckpointError(f"{path}: adapter type {peft_type} is not supported (expected LORA)")
    if config.get("use_dora"):
        raise CheckpointError(
            f"{path}: DoRA adapters are not supported (their update is not "
            "scale * B @ A); merge the adapter and point forgetdiag at the result"
        )
    _check_config(path, config)
    base_ckpt = _base_checkpoint(path, config, base, allow_pickle)
    source = LoraSource(base_ckpt, path, config, _adapter_tensors(path, allow_pickle))
    return LoraCheckpoint(path, config=base_ckpt.config, source=source, fmt="lora", label=label, step=step)


def _base_checkpoint(path: Path, config: dict[str, Any], base, allow_pickle: bool) -> Checkpoint:
    if base is None:
        named = config.get("base_model_name_or_path")
        if not named or not isinstance(named, str):
            raise CheckpointError(f"{path}: adapter_config.json names no base model; pass --base DIR")
        candidates = [Path(named), path / named]
        found = next((c for c in candidates if (c / "config.json").is_file() or (c / ADAPTER_CONFIG).is_file()), None)
        if found is None:
            raise CheckpointError(
                f"{path}: the adapter's base model '{named}' is not a local "
                "directory (forgetdiag never downloads); pass --base DIR"
            )
        base = found
    base = Path(base)
    if (base / ADAPTER_CONFIG).is_file():  # also ends an adapter naming itself, or two naming each other
        raise CheckpointError(
            f"{path}: its base {base} is itself an adapter; expected a full model "
            "directory (config.json + weights) as the base: pass --base DIR"
        )
    if not base.is_dir():
        raise CheckpointError(f"{path}: the base model {base} is not a directory; pass --base DIR")
    return load_model_dir(base, allow_pickle=allow_pickle)


def _check_config(path: Path, config: dict[str, Any]) -> None:
    """The adapter config's numbers are numbers (a string alpha would scale by nonsense)."""
    for key in ("r", "lora_alpha"):
        value = config.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0):
            raise CheckpointError(f"{path / ADAPTER_CONFIG}: '{key}' must be a positive number, found {value!r}")
    for key in ("alpha_pattern", "rank_pattern"):
        pattern = config.get(key) or {}
        if not isinstance(pattern, dict) or any(
            isinstance(v, bool) or not isinstance(v, (int, float)) for v in pattern.values()
        ):
            raise CheckpointError(
                f"{path / ADAPTER_CONFIG}: '{key}' must map module patterns to numbers, found {pattern!r}"
            )


def _adapter_tensors(path: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    if (path / ADAPTER_SAFETENSORS).is_file():
        source = SafetensorsSource(safetensors_names(path / ADAPTER_SAFETENSORS))
        return {name: source.get(name) for name in source.meta}  # adapters are small
    if (path / ADAPTER_PICKLE).is_file():
        if not allow_pickle:
            raise CheckpointError(
                f"{path}: adapter weights are a pickle ({ADAPTER_PICKLE}); pass "
                "--allow-pickle to load them with torch.load(weights_only=True)"
            )
        return load_pickle_weights(path / ADAPTER_PICKLE)
    raise CheckpointError(f"{path}: adapter_config.json without {ADAPTER_SAFETENSORS}")
