"""Every analysis' settings: frozen dataclasses validated in ``__post_init__`` (a bad value is a
:class:`~forgetdiag.errors.ForgetdiagError` naming the CLI option). Kept free of torch so that the
CLI can build its options and refuse bad input before any model code is imported."""

from forgetdiag.settings.scoring import (
    ANALYSES,
    REMEDIES,
    GateThresholds,
    Metric,
    RecoverySettings,
    Remedy,
    ReplaySettings,
    ReportSettings,
    ScoreSettings,
    SelfOutputSettings,
    Thresholds,
)
from forgetdiag.settings.weights import (
    DEFAULT_RANK,
    AdviceSettings,
    AngleSettings,
    Directions,
    FeatureSettings,
    InspectSettings,
    LandscapeSettings,
    MagnitudeSettings,
    Method,
    TokenSettings,
    axis,
)

__all__ = [
    "ANALYSES",
    "AdviceSettings",
    "AngleSettings",
    "DEFAULT_RANK",
    "Directions",
    "FeatureSettings",
    "GateThresholds",
    "InspectSettings",
    "LandscapeSettings",
    "MagnitudeSettings",
    "Method",
    "Metric",
    "RecoverySettings",
    "REMEDIES",
    "Remedy",
    "ReplaySettings",
    "ReportSettings",
    "ScoreSettings",
    "SelfOutputSettings",
    "Thresholds",
    "TokenSettings",
    "axis",
]
