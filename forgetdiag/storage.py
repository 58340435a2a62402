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
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from forgetdiag.architectures import Family, TensorName, config_int, family_for, parse_name, tied_by_default
from forgetdiag.errors import CheckpointError

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_FILE = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"
ADAPTER_CONFIG = "adapter_config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
EXPECTED = (
    "expected a model directory (config.json + model.safetensors or a sharded "
    "model.safetensors.index.json), a Trainer output directory with checkpoint-N "
    "subdirectories, or a PEFT adapter directory (adapter_config.json)"
)

_DTYPE_NAMES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
}
_MAX_HEADER = 100_000_000  # bytes; the format's own limit


@dataclass(frozen=True)
class TensorMeta:
    """Shape and dtype of a stored tensor, read from the file header without loading data."""

    shape: tuple[int, ...]
    dtype: str
    file: Path | None


@dataclass(frozen=True)
class Header:
    """A safetensors file's header: its raw bytes and where each tensor's data lies.

    The format: an 8-byte little-endian header length, the JSON header, then the data, which
    each entry's ``data_offsets`` locate relative to the end of the header.
    """

    raw: bytes
    spans: dict[str, tuple[int, int]]  # name -> absolute byte range in the file


def read_header(file: Path) -> Header:
    """The header of one safetensors file (the one place the format is parsed by hand)."""
    try:
        with open(file, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > _MAX_HEADER:
                raise ValueError(f"header of {length} bytes")
            raw = handle.read(length)
        entries = json.loads(raw)
        spans = {
            name: (8 + length + e["data_offsets"][0], 8 + length + e["data_offsets"][1])
            for name, e in entries.items()
            if name != "__metadata__"
        }
    except (OSError, struct.error, ValueError, KeyError, TypeError, IndexError) as exc:
        raise CheckpointError(
            f"{file}: not a readable safetensors file ({exc}); expected a "
            "complete safetensors file as written by save_pretrained"
        ) from None
    return Header(raw, spans)


class SafetensorsSource:
    """Tensors of one or several safetensors files; headers are read once, data per call."""

    def __init__(self, files_by_name: dict[str, Path]) -> None:
        self.files = sorted(set(files_by_name.values()))
        self.meta: dict[str, TensorMeta] = {}
        self._headers: dict[Path, Header] = {}
        for file in self.files:
            with _open_safetensors(file) as handle:  # validates the whole file, not only its header
                for name in handle.keys():  # noqa: SIM118 - a safetensors handle is not iterable
                    if files_by_name.get(name, file) != file:
                        continue
                    view = handle.get_slice(name)
                    dtype = view.get_dtype()
                    self.meta[name] = TensorMeta(tuple(view.get_shape()), _DTYPE_NAMES.get(dtype, dtype.lower()), file)
        missing = sorted(set(files_by_name) - set(self.meta))
        if missing:
            raise CheckpointError(
                f"{self.files[0].parent}: the index names {len(missing)} tensors "
                f"that its shards do not hold (first: {missing[0]})"
            )

    def header(self, file: Path) -> Header:
        if file not in self._headers:
            self._headers[file] = read_header(file)
        return self._headers[file]

    def prefetch(self, name: str) -> None:
        """Ask the kernel to start reading ``name``'s bytes in the background.

        ``posix_fadvise(WILLNEED)`` on the tensor's byte range: a later :meth:`get` from a cold
        page cache then finds the bytes read in large requests while other work went on,
        instead of faulting the memory map in 4 KiB pages. Advice only: a no-op where the OS
        has no ``posix_fadvise``, and errors are ignored.
        """
        if not hasattr(os, "posix_fadvise"):
            return
        file = self.meta[name].file
        start, end = self.header(file).spans[name]
        try:
            fd = os.open(file, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, start, end - start, os.POSIX_FADV_WILLNEED)
            finally:
                os.close(fd)
        except OSError:
            pass

    def get(self, name: str) -> torch.Tensor:
        # Open per call: the mapping is released as soon as the tensor is copied out, so
        # resident memory stays at the tensors in flight, not the files touched so far.
        file = self.meta[name].file
        with _open_safetensors(file) as handle:
            try:
                return handle.get_tensor(name)
            except SafetensorError as exc:  # pragma: no cover - header was validated on open
                raise CheckpointError(f"{file}: cannot read tensor {name}: {exc}") from None


class PickleSource:
    """Tensors of ``pytorch_model.bin`` files, loaded only with ``weights_only=True``."""

    def __init__(self, files: list[Path]) -> None:
        self.files = files
        self.tensors: dict[str, torch.Tensor] = {}
        for file in files:
            self.tensors.update(load_pickle_weights(file))
        self.meta = {
            name: TensorMeta(tuple(t.shape), str(t.dtype).removeprefix("torch."), None)
            for name, t in self.tensors.items()
        }

    def get(self, name: str) -> torch.Tensor:
        return self.tensors[name]


def load_pickle_weights(file: Path) -> dict[str, torch.Tensor]:
    """A state dict from a pickle file, refusing anything but tensors (never runs code)."""
    try:
        # weights_only=True: the unpickler only rebuilds tensors and plain containers.
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"{file}: refused to load: torch.load(weights_only=True) failed "
            f"({first[:200]}); expected a plain state dict of tensors"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{file}: expected a state dict of tensors, found {type(state).__name__}")
    return state


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
        return family_for(self.model_type)

    @property
    def n_layers(self) -> int | None:
        return config_int(self.config, "num_hidden_layers")

    @property
    def hidden_size(self) -> int | None:
        return config_int(self.config, "hidden_size")

    @property
    def tied_embeddings(self) -> bool:
        """Whether lm_head is the input embedding: the config's ``tie_word_embeddings``, else the
        model class's default (as transformers decides)."""
        tied = self.config.get("tie_word_embeddings")
        return tied_by_default(self.config) if tied is None else bool(tied)

    @property
    def meta(self) -> dict[str, TensorMeta]:
        return self.source.meta

    @property
    def names(self) -> list[str]:
        return list(self.source.meta)

    def parse(self, name: str) -> TensorName:
        return parse_name(name, self.family)

    def get(self, name: str, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> torch.Tensor:
        """The tensor ``name`` as ``dtype`` on ``device``."""
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


def _open_safetensors(file: Path):
    try:
        return safe_open(str(file), framework="pt")
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(
            f"{file}: not a readable safetensors file ({exc}); expected a complete "
            "safetensors file as written by save_pretrained"
        ) from None


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
    with _open_safetensors(file) as handle:
        return {name: file for name in handle.keys()}  # noqa: SIM118 - not iterable


def enclosing_checkpoint(path: Path) -> Path | None:
    """The nearest directory at or above ``path`` that is a checkpoint (it holds config.json or
    adapter_config.json), or None."""
    for directory in (path.resolve(), *path.resolve().parents):
        if (directory / "config.json").is_file() or (directory / ADAPTER_CONFIG).is_file():
            return directory
    return None


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
