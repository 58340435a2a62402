"""How checkpoints are read and models run: one :class:`Runtime`, shared by every analysis.

Every analysis has the shape ``f(inputs, *, settings, runtime, progress, warn)``. ``runtime``
says where and how models run and how checkpoints are read; ``progress`` and ``warn`` are the
two callbacks (defined here once) through which an analysis talks to whoever called it. The
CLI's shared options are generated from :class:`Runtime`'s fields (their ``help`` metadata and
defaults), so the defaults live here only.

torch is imported where a device, dtype or thread count is used, not at import: the CLI builds
its options and refuses bad input before torch is loaded.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from forgetdiag.errors import ForgetdiagError
from forgetdiag.validate import check_choice, check_number, choices

ProgressFn = Callable[[str, int, int], None]  # (description, completed, total)
Warn = Callable[[str], None]  # receives one warning line

if TYPE_CHECKING:
    import torch

Dtype = Literal["float32", "bfloat16", "float16"]
_DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}

# Below this many parameters a forward pass is too small to gain from a second CPU thread
# (measured in bench/recover_speed.py on the samples: one thread was faster than two).
SMALL_MODEL_PARAMS = 20_000_000
RAY_MISSING = "--ray needs Ray, which is not installed here: pip install 'forgetdiag[ray]'"
# accelerate's placements of a model over the visible GPUs (then CPU RAM): one process
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


def _option(default, help: str, *, named_only: bool = False, **cli):
    """A Runtime field with the help text (and CLI extras such as ``min``) of its option.
    ``named_only``: a command gets the option only when it names the field (``--ray``)."""
    return field(default=default, metadata={"help": help, "named_only": named_only, **cli})


@dataclass(frozen=True)
class Runtime:
    """How checkpoints are read and models run; shared by every analysis.

    Each field is a CLI option of the same name (``batch_size`` is ``--batch-size``).
    """

    device: str = _option("cpu", "cpu, cuda, cuda:N, mps, or auto (CUDA when available).")
    dtype: Dtype = _option("float32", "Compute dtype of forward passes and fine-tuning: float32, bfloat16 or float16.")
    threads: int | None = _option(
        None,
        "CPU threads (default: 1 for models under 20M parameters, torch's default above; angles: every core).",
        min=1,
    )
    batch_size: int = _option(64, "Probe items per forward pass.", min=1)
    tokenizer: str | None = _option(
        None, "Tokenizer directory (default: the one saved with each checkpoint).", path=True
    )
    chat_template: bool = _option(False, "Wrap probe prompts in the tokenizer's chat template (instruct models).")
    truncate_prompts: bool = _option(
        False, "Drop the oldest tokens of prompts too long for the model's context (default: error)."
    )
    allow_pickle: bool = _option(
        False, "Read pytorch_model.bin files (with torch.load(weights_only=True)). Off: safetensors only."
    )
    base: str | None = _option(
        None, "Base model directory of LoRA adapters (default: from adapter_config.json).", path=True
    )
    trust_remote_code: bool = _option(
        False, "Allow a checkpoint's own Python code (transformers trust_remote_code). Off by default."
    )
    device_map: str | None = _option(
        None,
        "Spread the model over every visible GPU (then CPU RAM) with accelerate: auto, balanced, "
        "balanced_low_0 or sequential. One process; inputs go to the first layer's device.",
    )
    ray: str | None = _option(
        None,
        "Run the per-tensor work on Ray: auto (the running cluster, RAY_ADDRESS), local (start one "
        "here) or an address for ray.init. Needs pip install 'forgetdiag[ray]'.",
        named_only=True,
    )

    def __post_init__(self) -> None:
        dtype = str(self.dtype).removeprefix("torch.").lower()
        object.__setattr__(self, "dtype", _DTYPE_ALIASES.get(dtype, dtype))
        check_choice("--dtype", self.dtype, choices(Dtype))
        check_number("--threads", self.threads, low=1, integer=True, optional=True)
        check_number("--batch-size", self.batch_size, low=1, integer=True)
        if self.device_map is not None:
            check_choice("--device-map", self.device_map, DEVICE_MAPS)
        if self.ray is not None:
            if not isinstance(self.ray, str) or not self.ray.strip():
                raise ForgetdiagError(f"--ray {self.ray!r}: expected auto, local or a cluster address")
            if importlib.util.find_spec("ray") is None:
                raise ForgetdiagError(RAY_MISSING)
        for name in ("tokenizer", "base"):  # paths given as Path objects are kept as text
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, os.fspath(value))
        if self.device != "cpu":
            self.torch_device  # noqa: B018 - validates the device now, not at the first model load

    @property
    def torch_device(self) -> torch.device:
        """The device: ``auto`` is CUDA when available, else the CPU."""
        import torch

        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            device = torch.device(self.device)
        except (RuntimeError, TypeError):
            raise ForgetdiagError(f"--device {self.device!r}: expected cpu, cuda, cuda:N, mps or auto") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ForgetdiagError(f"--device {self.device!r}: CUDA is not available here; use --device cpu")
        return device

    @property
    def torch_dtype(self) -> torch.dtype:
        import torch

        return getattr(torch, self.dtype)

    def auto_threads(self, n_params: int) -> int | None:
        """Torch CPU threads for a model of ``n_params`` (None: leave torch's default)."""
        if self.threads is not None:
            return self.threads
        if self.torch_device.type == "cpu" and n_params < SMALL_MODEL_PARAMS:
            return 1
        return None

    @contextlib.contextmanager
    def threads_for(self, n_params: int) -> Iterator[None]:
        """Run a block with the CPU threads this runtime gives a model of ``n_params``."""
        with torch_threads(self.auto_threads(n_params)):
            yield


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run a block with ``n`` torch CPU threads (None: unchanged), restoring the count after."""
    if n is None:
        yield
        return
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
