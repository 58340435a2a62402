"""Command-line interface: parse arguments, call an analysis, render its result; nothing else.

Each command checks its options (the settings dataclasses of :mod:`forgetdiag.settings`, free of
torch) and its output paths (:func:`forgetdiag.render.output.guard_outputs`) first, and imports
its analysis and renderer after that: bad input is refused before torch is loaded.
"""

from forgetdiag.cli import (
    advise,  # noqa: F401
    angles,  # noqa: F401
    features,  # noqa: F401
    gate,  # noqa: F401
    inspect,  # noqa: F401  (registers its command)
    landscape,  # noqa: F401
    magnitudes,  # noqa: F401
    recover,  # noqa: F401
    remedy,  # noqa: F401  (registers its commands)
    report,  # noqa: F401
    samples,  # noqa: F401  (registers its commands)
    score,  # noqa: F401
    tokens,  # noqa: F401
)
from forgetdiag.cli.app import app


def main() -> None:
    """Entry point of the ``forgetdiag`` console script (each command silences library warnings
    itself: :func:`forgetdiag.cli.common.command_context`)."""
    app(prog_name="forgetdiag")


__all__ = ["app", "main"]
