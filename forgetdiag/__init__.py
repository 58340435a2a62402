"""forgetdiag: tell why a fine-tuned language model forgot.

Spurious forgetting (only the old task's alignment was undone: a few examples bring it back)
or real forgetting (the knowledge is gone). The CLI and this Python API call the same functions;
each analysis returns a result object whose ``to_dict()`` is the command's JSON.
"""

__version__ = "0.1.0"

from forgetdiag.errors import CheckpointError, ForgetdiagError, ProbeError  # noqa: E402
from forgetdiag.checkpoints import Checkpoint, find_checkpoints, find_sequence  # noqa: E402
from forgetdiag.streaming import check_sequence, stream_tensors, stream_updates  # noqa: E402
from forgetdiag.probes import Probe, ProbeItem, load_probe, split_probe  # noqa: E402
from forgetdiag.models import Runtime, load_model, load_tokenizer  # noqa: E402
from forgetdiag.runfile import load_run  # noqa: E402
from forgetdiag.analyses.inspect import inspect_checkpoints  # noqa: E402
from forgetdiag.analyses.recovery import RecoverySettings, recover  # noqa: E402
from forgetdiag.analyses.verdict import Thresholds, decide  # noqa: E402
from forgetdiag.analyses.angles import AngleSettings, compute_angles  # noqa: E402
from forgetdiag.analyses.landscape import LandscapeSettings, landscape  # noqa: E402
from forgetdiag.analyses.features import FeatureSettings, feature_shifts  # noqa: E402
from forgetdiag.analyses.magnitudes import magnitude_overlap  # noqa: E402
from forgetdiag.analyses.tokens import token_difficulty  # noqa: E402
from forgetdiag.analyses.gate import GateThresholds, gate_lm_eval, gate_recovery  # noqa: E402
from forgetdiag.analyses.report import ReportSettings, build_report  # noqa: E402
from forgetdiag.analyses.advise import AdviceSettings, advise  # noqa: E402
from forgetdiag.training import freeze_bottom  # noqa: E402

__all__ = [
    "__version__", "ForgetdiagError", "CheckpointError", "ProbeError",
    "Checkpoint", "find_checkpoints", "find_sequence", "check_sequence", "stream_tensors",
    "stream_updates", "Probe", "ProbeItem", "load_probe", "split_probe", "Runtime", "load_model",
    "load_tokenizer", "load_run", "inspect_checkpoints", "recover", "RecoverySettings",
    "Thresholds", "decide", "compute_angles", "AngleSettings", "landscape", "LandscapeSettings", "feature_shifts", "FeatureSettings",
    "magnitude_overlap", "token_difficulty", "gate_recovery", "gate_lm_eval", "GateThresholds",
    "build_report", "ReportSettings", "advise", "AdviceSettings", "freeze_bottom",
]
