"""Command-line interface: parse arguments, call an analysis, render its result; nothing else."""

from forgetdiag.cli.app import app
from forgetdiag.cli import inspect  # noqa: F401  (registers its command)
from forgetdiag.cli import angles  # noqa: F401
from forgetdiag.cli import landscape  # noqa: F401
from forgetdiag.cli import recover  # noqa: F401
from forgetdiag.cli import gate  # noqa: F401
from forgetdiag.cli import report  # noqa: F401
from forgetdiag.cli import advise  # noqa: F401
from forgetdiag.cli import features  # noqa: F401
from forgetdiag.cli import magnitudes  # noqa: F401
from forgetdiag.cli import tokens  # noqa: F401
from forgetdiag.cli import samples  # noqa: F401  (registers its commands)


def main() -> None:
    """Entry point of the ``forgetdiag`` console script."""
    app(prog_name="forgetdiag")


__all__ = ["app", "main"]
