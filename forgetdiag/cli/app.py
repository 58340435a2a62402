"""The Typer application; each command lives in its own module of this package."""

import sys

import typer
from typer.core import TyperGroup

from forgetdiag.cli.common import fail


class OneLineErrors(TyperGroup):
    """The root group: usage errors (a missing argument, an unknown option, a bad value) as one
    line on stderr, ``forgetdiag: error: ...``, and exit 2, like every other bad input; help
    asked for by running a group without arguments still prints the help."""

    def main(self, *args, standalone_mode: bool = True, **kwargs):
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except Exception as exc:  # click's errors, by their public shape (typer vendors click)
            name = type(exc).__name__
            if name == "NoArgsIsHelpError":
                exc.show()
                sys.exit(exc.exit_code)
            if name == "Abort":
                fail("aborted", 1)
                sys.exit(1)
            if not (hasattr(exc, "format_message") and isinstance(getattr(exc, "exit_code", None), int)):
                raise
            ctx = getattr(exc, "ctx", None)  # usage errors (a missing argument, a bad value...)
            where = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
            fail(" ".join(exc.format_message().split()) + where, exc.exit_code)
            sys.exit(exc.exit_code)
        sys.exit(code if isinstance(code, int) else 0)  # an Exit(code) comes back as its code


app = typer.Typer(
    cls=OneLineErrors,
    name="forgetdiag",
    help="Tell why a fine-tuned language model forgot: spurious forgetting (only the task "
    "alignment was undone; a few examples bring it back) or real forgetting (the knowledge is gone).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        from forgetdiag import __version__

        typer.echo(f"forgetdiag {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Show the version and exit."
    ),
) -> None:
    """Tell why a fine-tuned language model forgot: spurious or real forgetting."""
