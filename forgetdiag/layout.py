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
ADAPTER_SAFETENSORS = "adapter_model.safetensors"
ADAPTER_PICKLE = "adapter_model.bin"
WEIGHT_FILES = (SAFETENSORS_FILE, SAFETENSORS_INDEX, PICKLE_FILE, PICKLE_INDEX, ADAPTER_SAFETENSORS, ADAPTER_PICKLE)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def enclosing_checkpoint(path: Path) -> Path | None:
    """The nearest directory at or above ``path`` that is a checkpoint, or None.

    A checkpoint holds config.json or adapter_config.json next to its weights (one of
    :data:`WEIGHT_FILES`); a config.json alone (many projects have one at their root) is not one.
    """
    for directory in (path.resolve(), *path.resolve().parents):
        has_config = (directory / CONFIG_FILE).is_file() or (directory / ADAPTER_CONFIG).is_file()
        if has_config and any((directory / name).is_file() for name in WEIGHT_FILES):
            return directory
    return None
