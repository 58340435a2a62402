"""Where a checkpoint's tensors come from: safetensors files (read by byte span) and pickles
(read as tensors only). :class:`forgetdiag.storage.Checkpoint` reads through these sources."""

from __future__ import annotations

import contextlib
import json
import os
import struct
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from forgetdiag.errors import CheckpointError

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
    """Tensors of one or several safetensors files; headers are read once, data per call.

    A tensor is read by its byte span with ``pread`` into a fresh buffer, through one file
    descriptor kept per file: no memory map outlives the call (resident memory stays at the
    tensors in flight), and a checkpoint of thousands of small tensors (a 64-expert model) does
    not pay for opening the file and parsing its header again for every one (2.5 ms each,
    measured: 25x the time of the arithmetic on such tensors).
    """

    def __init__(self, files_by_name: dict[str, Path]) -> None:
        self.files = sorted(set(files_by_name.values()))
        self.meta: dict[str, TensorMeta] = {}
        self._headers: dict[Path, Header] = {}
        self._fds: dict[Path, int] = {}
        self._lock = threading.Lock()
        for file in self.files:
            with open_safetensors(file) as handle:  # validates the whole file, not only its header
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

    def _fd(self, file: Path) -> int:
        with self._lock:
            if file not in self._fds:
                self._fds[file] = os.open(file, os.O_RDONLY)
            return self._fds[file]

    def close(self) -> None:
        """Close the file descriptors kept for reading (reads reopen them)."""
        with self._lock:
            fds, self._fds = self._fds, {}
        for fd in fds.values():
            os.close(fd)

    def __del__(self) -> None:
        for fd in getattr(self, "_fds", {}).values():
            with contextlib.suppress(OSError):
                os.close(fd)

    def prefetch(self, name: str) -> None:
        """Ask the kernel to start reading ``name``'s bytes in the background.

        ``posix_fadvise(WILLNEED)`` on the tensor's byte range: a later :meth:`get` from a cold
        page cache then finds the bytes read in large requests while other work went on.
        Advice only: a no-op where the OS has no ``posix_fadvise``, and errors are ignored.
        """
        if not hasattr(os, "posix_fadvise"):
            return
        file = self.meta[name].file
        start, end = self.header(file).spans[name]
        with contextlib.suppress(OSError):
            os.posix_fadvise(self._fd(file), start, end - start, os.POSIX_FADV_WILLNEED)

    def get(self, name: str) -> torch.Tensor:
        meta = self.meta[name]
        dtype = getattr(torch, meta.dtype, None)
        start, end = self.header(meta.file).spans[name]
        if not isinstance(dtype, torch.dtype) or not _READ_SPANS or end - start != _nbytes(meta.shape, dtype):
            return self._get_mapped(name)
        data = torch.empty(end - start, dtype=torch.uint8)  # (bytes,) filled by pread below
        buffer, done = data.numpy(), 0
        while done < buffer.size:
            n = os.preadv(self._fd(meta.file), [buffer[done:]], start + done)
            if n <= 0:
                raise CheckpointError(f"{meta.file}: truncated while reading tensor {name}")
            done += n
        return data.view(dtype).reshape(meta.shape)

    def _get_mapped(self, name: str) -> torch.Tensor:
        # Through safetensors' own reader (dtypes torch lacks, empty tensors): the mapping is
        # released as soon as the tensor is copied out.
        file = self.meta[name].file
        with open_safetensors(file) as handle:
            try:
                return handle.get_tensor(name)
            except SafetensorError as exc:  # pragma: no cover - header was validated on open
                raise CheckpointError(f"{file}: cannot read tensor {name}: {exc}") from None


# safetensors stores little-endian data: read raw bytes only where that is the native order
_READ_SPANS = sys.byteorder == "little" and hasattr(os, "preadv")


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    n = dtype.itemsize
    for s in shape:
        n *= s
    return n


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


def open_safetensors(file: Path):
    try:
        return safe_open(str(file), framework="pt")
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(
            f"{file}: not a readable safetensors file ({exc}); expected a complete "
            "safetensors file as written by save_pretrained"
        ) from None
