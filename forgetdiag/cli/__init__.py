"""Command-line interface: parse arguments, call an analysis, render its result; nothing else."""

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
    """Entry point of the ``forgetdiag`` console script.

    Library warnings (transformers' and torch's log lines and Python warnings) are silenced
    here, for the command line only: stderr carries forgetdiag's own lines, one per problem.
    """
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    app(prog_name="forgetdiag")


__all__ = ["app", "main"]
