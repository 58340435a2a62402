"""forgetdiag: tell why a fine-tuned language model forgot.

Spurious forgetting (only the old task's alignment was undone: a few examples bring it back)
or real forgetting (the knowledge is gone). The CLI and this Python API call the same functions;
each analysis has the shape ``f(inputs, *, settings, runtime, progress, warn)`` and returns a
result whose ``to_dict()`` is the command's JSON.

Names are imported on first use (PEP 562): ``import forgetdiag`` and the CLI's start stay light,
and torch is loaded only when an analysis runs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from forgetdiag._version import __version__

# public name -> the module that defines it
_EXPORTS = {
    "ForgettingCallback": "forgetdiag.callback",  # subclasses transformers.TrainerCallback
    "AdviceSettings": "forgetdiag.settings",
    "advise": "forgetdiag.analyses.advise",
    "AngleSettings": "forgetdiag.settings",
    "compute_angles": "forgetdiag.analyses.angles",
    "FeatureSettings": "forgetdiag.settings",
    "feature_shifts": "forgetdiag.analyses.features",
    "GateThresholds": "forgetdiag.settings",
    "gate_by_recovery": "forgetdiag.analyses.gate",
    "gate_lm_eval": "forgetdiag.analyses.gate",
    "gate_recovery": "forgetdiag.analyses.gate",
    "InspectSettings": "forgetdiag.settings",
    "inspect_checkpoints": "forgetdiag.analyses.inspect",
    "LandscapeSettings": "forgetdiag.settings",
    "landscape": "forgetdiag.analyses.landscape",
    "MagnitudeSettings": "forgetdiag.settings",
    "magnitude_overlap": "forgetdiag.analyses.magnitudes",
    "RecoverySettings": "forgetdiag.settings",
    "recover": "forgetdiag.analyses.recovery",
    "ReplaySettings": "forgetdiag.settings",
    "replay_mix": "forgetdiag.analyses.replay",
    "ReportSettings": "forgetdiag.settings",
    "build_report": "forgetdiag.analyses.report",
    "ScoreSettings": "forgetdiag.settings",
    "score_checkpoints": "forgetdiag.analyses.score",
    "SelfOutputSettings": "forgetdiag.settings",
    "self_output": "forgetdiag.analyses.self_output",
    "TokenSettings": "forgetdiag.settings",
    "token_difficulty": "forgetdiag.analyses.tokens",
    "Thresholds": "forgetdiag.settings",
    "decide": "forgetdiag.analyses.verdict",
    "find_checkpoints": "forgetdiag.checkpoints",
    "find_sequence": "forgetdiag.checkpoints",
    "resolve_checkpoints": "forgetdiag.checkpoints",
    "CheckpointError": "forgetdiag.errors",
    "ForgetdiagError": "forgetdiag.errors",
    "ProbeError": "forgetdiag.errors",
    "load_model": "forgetdiag.models",
    "load_tokenizer": "forgetdiag.models",
    "Probe": "forgetdiag.probes",
    "ProbeFields": "forgetdiag.probes",
    "ProbeItem": "forgetdiag.probes",
    "load_probe": "forgetdiag.probes",
    "split_probe": "forgetdiag.probes",
    "load_run": "forgetdiag.runfile",
    "Runtime": "forgetdiag.runtime",
    "Checkpoint": "forgetdiag.storage",
    "check_sequence": "forgetdiag.streaming",
    "stream_tensors": "forgetdiag.streaming",
    "stream_updates": "forgetdiag.streaming",
    "freeze_bottom": "forgetdiag.training",
}

if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from forgetdiag.analyses.advise import advise
    from forgetdiag.analyses.angles import compute_angles
    from forgetdiag.analyses.features import feature_shifts
    from forgetdiag.analyses.gate import gate_by_recovery, gate_lm_eval, gate_recovery
    from forgetdiag.analyses.inspect import inspect_checkpoints
    from forgetdiag.analyses.landscape import landscape
    from forgetdiag.analyses.magnitudes import magnitude_overlap
    from forgetdiag.analyses.recovery import recover
    from forgetdiag.analyses.replay import replay_mix
    from forgetdiag.analyses.report import build_report
    from forgetdiag.analyses.score import score_checkpoints
    from forgetdiag.analyses.self_output import self_output
    from forgetdiag.analyses.tokens import token_difficulty
    from forgetdiag.analyses.verdict import decide
    from forgetdiag.callback import ForgettingCallback
    from forgetdiag.checkpoints import find_checkpoints, find_sequence, resolve_checkpoints
    from forgetdiag.errors import CheckpointError, ForgetdiagError, ProbeError
    from forgetdiag.models import load_model, load_tokenizer
    from forgetdiag.probes import Probe, ProbeFields, ProbeItem, load_probe, split_probe
    from forgetdiag.runfile import load_run
    from forgetdiag.runtime import Runtime
    from forgetdiag.settings import (
        AdviceSettings,
        AngleSettings,
        FeatureSettings,
        GateThresholds,
        InspectSettings,
        LandscapeSettings,
        MagnitudeSettings,
        RecoverySettings,
        ReplaySettings,
        ReportSettings,
        ScoreSettings,
        SelfOutputSettings,
        Thresholds,
        TokenSettings,
    )
    from forgetdiag.storage import Checkpoint
    from forgetdiag.streaming import check_sequence, stream_tensors, stream_updates
    from forgetdiag.training import freeze_bottom


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'forgetdiag' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # the next lookup is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


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
