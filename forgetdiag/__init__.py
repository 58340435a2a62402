"""forgetdiag: tell why a fine-tuned language model forgot.

Spurious forgetting (only the old task's alignment was undone: a few examples bring it back)
or real forgetting (the knowledge is gone). The CLI and this Python API call the same functions;
each analysis has the shape ``f(inputs, *, settings, runtime, progress, warn)`` and returns a
result whose ``to_dict()`` is the command's JSON.
"""

from forgetdiag._version import __version__
from forgetdiag.analyses.advise import AdviceSettings, advise
from forgetdiag.analyses.angles import AngleSettings, compute_angles
from forgetdiag.analyses.features import FeatureSettings, feature_shifts
from forgetdiag.analyses.gate import GateThresholds, gate_by_recovery, gate_lm_eval, gate_recovery
from forgetdiag.analyses.inspect import InspectSettings, inspect_checkpoints
from forgetdiag.analyses.landscape import LandscapeSettings, landscape
from forgetdiag.analyses.magnitudes import MagnitudeSettings, magnitude_overlap
from forgetdiag.analyses.recovery import RecoverySettings, recover
from forgetdiag.analyses.replay import ReplaySettings, replay_mix
from forgetdiag.analyses.report import ReportSettings, build_report
from forgetdiag.analyses.score import ScoreSettings, score_checkpoints
from forgetdiag.analyses.self_output import SelfOutputSettings, self_output
from forgetdiag.analyses.tokens import TokenSettings, token_difficulty
from forgetdiag.analyses.verdict import Thresholds, decide
from forgetdiag.checkpoints import find_checkpoints, find_sequence, resolve_checkpoints
from forgetdiag.errors import CheckpointError, ForgetdiagError, ProbeError
from forgetdiag.models import load_model, load_tokenizer
from forgetdiag.probes import Probe, ProbeFields, ProbeItem, load_probe, split_probe
from forgetdiag.runfile import load_run
from forgetdiag.runtime import Runtime
from forgetdiag.storage import Checkpoint
from forgetdiag.streaming import check_sequence, stream_tensors, stream_updates
from forgetdiag.training import freeze_bottom

__all__ = [
    "__version__",
    "ForgetdiagError",
    "CheckpointError",
    "ProbeError",
    "Checkpoint",
    "find_checkpoints",
    "find_sequence",
    "resolve_checkpoints",
    "check_sequence",
    "stream_tensors",
    "stream_updates",
    "Probe",
    "ProbeFields",
    "ProbeItem",
    "load_probe",
    "split_probe",
    "Runtime",
    "load_model",
    "load_tokenizer",
    "load_run",
    "score_checkpoints",
    "ScoreSettings",
    "inspect_checkpoints",
    "InspectSettings",
    "recover",
    "RecoverySettings",
    "Thresholds",
    "decide",
    "compute_angles",
    "AngleSettings",
    "landscape",
    "LandscapeSettings",
    "feature_shifts",
    "FeatureSettings",
    "magnitude_overlap",
    "MagnitudeSettings",
    "token_difficulty",
    "TokenSettings",
    "gate_recovery",
    "gate_by_recovery",
    "gate_lm_eval",
    "GateThresholds",
    "build_report",
    "ReportSettings",
    "advise",
    "AdviceSettings",
    "freeze_bottom",
    "replay_mix",
    "ReplaySettings",
    "self_output",
    "SelfOutputSettings",
    "ForgettingCallback",
]


def __getattr__(name: str):
    # The Trainer callback subclasses transformers.TrainerCallback: imported on first use, so
    # that ``import forgetdiag`` stays as light as the rest of the package keeps it.
    if name == "ForgettingCallback":
        from forgetdiag.callback import ForgettingCallback

        return ForgettingCallback
    raise AttributeError(f"module 'forgetdiag' has no attribute {name!r}")
