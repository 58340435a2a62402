"""The one error type forgetdiag raises for problems a user can fix.

Library code raises :class:`ForgetdiagError` (or a subclass) with a message that says what was
expected and what was found. The CLI prints that message as one line on stderr and exits with
``exit_code``; anything else that escapes is an internal error (exit 1).

Exit codes (documented in the README):

* 0: success (for ``gate``: every threshold holds);
* 1: an unexpected internal error (a bug), or, for ``gate`` only, a broken threshold;
* 2: bad input or usage (a missing file, an unreadable checkpoint, an invalid probe, ...).
"""

from __future__ import annotations

EXIT_INTERNAL = 1
EXIT_THRESHOLD = 1
EXIT_BAD_INPUT = 2


class ForgetdiagError(Exception):
    """A problem with the user's input, reported in one line.

    Args:
        message: what was expected and what was found. Newlines are folded into spaces so
            that the CLI can print it as a single line.
        exit_code: the process exit code the CLI uses (default 2, bad input).
    """

    def __init__(self, message: str, *, exit_code: int = EXIT_BAD_INPUT) -> None:
        message = " ".join(str(message).split())
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code


class CheckpointError(ForgetdiagError):
    """A checkpoint is missing, unreadable, unsafe to read, or incompatible with the others."""


class ProbeError(ForgetdiagError):
    """A probe file is missing, malformed, or unusable with the model."""
