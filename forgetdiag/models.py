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

from forgetdiag.checkpoints import Checkpoint
from forgetdiag.errors import CheckpointError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
          "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def resolve_dtype(name: str | torch.dtype | None) -> torch.dtype:
    """A torch dtype from ``float32``/``bf16``/...; None means float32."""
    if name is None:
        return torch.float32
    if isinstance(name, torch.dtype):
        return name
    try:
        return DTYPES[name.lower()]
    except KeyError:
        raise CheckpointError(f"unknown dtype {name!r}; expected one of float32, float16, bfloat16") from None


def resolve_device(name: str | torch.device | None) -> torch.device:
    """``cpu``, ``cuda``, ``cuda:1``, ``mps`` or ``auto`` (CUDA when available)."""
    if name is None or str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise CheckpointError(f"unknown device {name!r}; expected cpu, cuda, cuda:N, mps or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CheckpointError(f"device {name!r} requested but CUDA is not available here; use --device cpu")
    return device


@contextlib.contextmanager
def quiet_transformers():
    """No transformers progress bars or info logs inside the block."""
    import transformers

    logging = transformers.utils.logging
    level, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
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


def load_model(checkpoint: Checkpoint, *, device: str | torch.device = "cpu",
               dtype: str | torch.dtype | None = None, trust_remote_code: bool = False):
    """The checkpoint as an ``AutoModelForCausalLM`` in eval mode on ``device``.

    Args:
        checkpoint: from :func:`forgetdiag.find_checkpoints`.
        device: ``cpu``, ``cuda``... .
        dtype: compute dtype (default float32; ``bfloat16`` on a GPU halves memory).
        trust_remote_code: allow the checkpoint's own Python code (never by default).
    """
    from transformers import AutoModelForCausalLM

    torch_dtype = resolve_dtype(dtype)
    source = checkpoint.base or checkpoint
    with _LOAD_LOCK, quiet_transformers():
        try:
            model = AutoModelForCausalLM.from_pretrained(
                str(source.path), dtype=torch_dtype, local_files_only=True,
                use_safetensors=source.format == "safetensors", trust_remote_code=trust_remote_code)
        except (OSError, ValueError, KeyError) as exc:
            msg = " ".join(str(exc).split())[:300]
            hint = " (pass --trust-remote-code if you trust its code)" if "trust_remote_code" in msg else ""
            raise CheckpointError(f"{source.path}: transformers cannot load this model{hint}: {msg}") from None
    if checkpoint.base is not None:
        _merge_adapter(model, checkpoint)
    return model.to(resolve_device(device)).eval()


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
            raise CheckpointError(f"{checkpoint.path}: adapter updates {name}, which the loaded "
                                  "model has no parameter for")
        # merge in float32, then round once to the compute dtype
        param.copy_((param.to(torch.float32) + delta).to(param.dtype))


def load_tokenizer(checkpoint: Checkpoint, *, path: str | Path | None = None,
                   trust_remote_code: bool = False):
    """The tokenizer saved with the checkpoint (or at ``path``), with a pad token set."""
    from transformers import AutoTokenizer

    where = Path(path) if path is not None else checkpoint.tokenizer_dir
    if where is None:
        raise CheckpointError(f"{checkpoint.path}: no tokenizer files (expected tokenizer.json or "
                              "tokenizer_config.json next to the weights); pass --tokenizer DIR")
    with quiet_transformers():
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(where), local_files_only=True,
                                                      trust_remote_code=trust_remote_code)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{where}: cannot load the tokenizer: {' '.join(str(exc).split())[:300]}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
    return tokenizer


def same_tokenizer(a, b) -> bool:
    """True when two tokenizers map every token to the same id (vocab and special tokens)."""
    return a.get_vocab() == b.get_vocab() and a.all_special_ids == b.all_special_ids


@dataclass(frozen=True)
class Runtime:
    """How checkpoints are read and models run; shared by every analysis that runs a model.

    Attributes:
        device: ``cpu``, ``cuda``, ``cuda:N``, ``mps`` or ``auto``.
        dtype: compute dtype of forward passes and fine-tuning (float32, bfloat16, float16).
        allow_pickle: read ``pytorch_model.bin`` (with ``weights_only=True``).
        base: base model directory of LoRA adapters.
        trust_remote_code: allow a checkpoint's own Python code.
        tokenizer: tokenizer directory (default: the one saved with each checkpoint).
        chat_template: wrap probe prompts in the tokenizer's chat template.
        truncate_prompts: drop the oldest prompt tokens of items longer than the context.
        batch_size: items per forward pass when scoring.
        threads: torch CPU threads (None: chosen by model size, see :func:`auto_threads`).
    """

    device: str = "cpu"
    dtype: str = "float32"
    allow_pickle: bool = False
    base: str | None = None
    trust_remote_code: bool = False
    tokenizer: str | None = None
    chat_template: bool = False
    truncate_prompts: bool = False
    batch_size: int = 64
    threads: int | None = None


# Below this many parameters a forward pass is too small to gain from a second CPU thread
# (measured in bench/recover_speed.py on the samples: one thread was faster than two).
SMALL_MODEL_PARAMS = 20_000_000


def auto_threads(n_params: int, device: torch.device) -> int | None:
    """Torch CPU threads for a model of ``n_params`` (None: leave torch's default)."""
    if device.type == "cpu" and n_params < SMALL_MODEL_PARAMS:
        return 1
    return None


@contextlib.contextmanager
def torch_threads(n: int | None):
    """Run a block with ``n`` torch CPU threads (None: unchanged), restoring the count after."""
    if n is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def shared_tokenizer(checkpoints, runtime: Runtime):
    """The tokenizer of ``checkpoints[0]``, after checking that every other one uses the same.

    With ``runtime.tokenizer`` set, that one tokenizer serves all and nothing is compared.

    Raises:
        CheckpointError: two checkpoints ship different tokenizers.
    """
    load = lambda c: load_tokenizer(c, path=runtime.tokenizer,  # noqa: E731
                                    trust_remote_code=runtime.trust_remote_code)
    tokenizer = load(checkpoints[0])
    if runtime.tokenizer is None:
        for other in checkpoints[1:]:
            if other.tokenizer_dir is not None and not same_tokenizer(tokenizer, load(other)):
                raise CheckpointError(f"{checkpoints[0].label} and {other.label} use different "
                                      "tokenizers; expected one tokenizer for every checkpoint compared")
    return tokenizer
