"""The Typer application; each command lives in its own module of this package."""

import typer

app = typer.Typer(
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
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Show the version and exit."),
) -> None:
    """Tell why a fine-tuned language model forgot: spurious or real forgetting."""
