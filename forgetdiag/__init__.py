"""forgetdiag: tell why a fine-tuned language model forgot.

Spurious forgetting (only the old task's alignment was undone: a few examples bring it back)
or real forgetting (the knowledge is gone). The CLI and this Python API call the same functions.
"""

__version__ = "0.1.0"

from forgetdiag.errors import CheckpointError, ForgetdiagError, ProbeError  # noqa: E402
from forgetdiag.checkpoints import Checkpoint, find_checkpoints, find_sequence  # noqa: E402
from forgetdiag.streaming import check_sequence, stream_tensors, stream_updates  # noqa: E402
from forgetdiag.probes import Probe, ProbeItem, load_probe, split_probe  # noqa: E402
from forgetdiag.analyses.inspect import inspect_checkpoints  # noqa: E402

__all__ = [
    "__version__", "ForgetdiagError", "CheckpointError", "ProbeError",
    "Checkpoint", "find_checkpoints", "find_sequence", "check_sequence", "stream_tensors",
    "stream_updates", "Probe", "ProbeItem", "load_probe", "split_probe", "inspect_checkpoints",
]
