"""The file names of a checkpoint directory, and the test of whether a path lies inside one.

Kept free of torch: the output guard runs these checks before any model code is imported.
"""

from __future__ import annotations

from pathlib import Path

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_FILE = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"
CONFIG_FILE = "config.json"
ADAPTER_CONFIG = "adapter_config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def enclosing_checkpoint(path: Path) -> Path | None:
    """The nearest directory at or above ``path`` that is a checkpoint (it holds config.json or
    adapter_config.json), or None."""
    for directory in (path.resolve(), *path.resolve().parents):
        if (directory / CONFIG_FILE).is_file() or (directory / ADAPTER_CONFIG).is_file():
            return directory
    return None
