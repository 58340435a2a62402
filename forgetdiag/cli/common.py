"""What every command shares: error handling, options generated from the settings, progress
bars and the output tail (:func:`emit`)."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import os
import sys
import typing
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from forgetdiag.errors import EXIT_INTERNAL, ForgetdiagError
from forgetdiag.probes import ProbeFields
from forgetdiag.render.output import STDOUT, write_json
from forgetdiag.runtime import ProgressFn, Runtime
from forgetdiag.validate import SEED_MAX

# markup=False: user text (paths, labels, prompts) is never read as rich markup.
stdout = Console(highlight=False, markup=False)
stderr = Console(stderr=True, highlight=False, markup=False)


def fail(message: str, code: int) -> typer.Exit:
    """Print ``forgetdiag: error: message`` as one line on stderr; return the Exit to raise."""
    print(f"forgetdiag: error: {message}", file=sys.stderr, flush=True)
    return typer.Exit(code)


def warn(message: str) -> None:
    """One warning line on stderr."""
    print(f"forgetdiag: warning: {' '.join(message.split())}", file=sys.stderr, flush=True)


def command(app: typer.Typer, name: str | None = None, **kwargs) -> Callable:
    """``app.command`` that turns errors into one stderr line and a documented exit code.

    ForgetdiagError -> its message and ``exit_code`` (2 for bad input); any other exception ->
    exit 1 with a one-line "internal error" (set FORGETDIAG_DEBUG=1 for the traceback).
    """

    def decorate(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(*args, **kw):
            try:
                with command_context():
                    return fn(*args, **kw)
            except ForgetdiagError as exc:
                raise fail(exc.message, exc.exit_code) from None
            except (typer.Exit, typer.Abort):
                raise
            except KeyboardInterrupt:
                raise fail("interrupted", 130) from None
            except Exception as exc:
                if os.environ.get("FORGETDIAG_DEBUG") or type(exc).__module__.startswith(("typer", "click")):
                    raise  # usage errors: typer reports them itself (exit 2)
                text = " ".join(str(exc).split())[:300]
                raise fail(
                    f"internal error: {type(exc).__name__}: {text} (a bug in forgetdiag; "
                    "rerun with FORGETDIAG_DEBUG=1 for the traceback and report it)",
                    EXIT_INTERNAL,
                ) from None

        if fn.__doc__ and "help" not in kwargs:  # one line per paragraph in --help
            paragraphs = fn.__doc__.strip().split("\n\n")
            kwargs["help"] = "\n\n".join(" ".join(p.split()) for p in paragraphs)
        return app.command(name, **kwargs)(wrapper)

    return decorate


@contextlib.contextmanager
def command_context() -> Iterator[None]:
    """What a command runs inside: library warnings silenced (transformers' log lines and
    Python warnings; stderr carries forgetdiag's own lines, one per problem), and SIGTERM turned
    into an interrupt so that temporary files and half-built trees are cleaned up as on Ctrl-C."""
    import logging
    import signal
    import threading
    import warnings

    # transformers may be imported only now, inside the command: its logger then takes its level
    # from TRANSFORMERS_VERBOSITY (a level set beforehand is reset); if it is loaded already, the
    # logger's own level counts.
    verbosity = os.environ.get("TRANSFORMERS_VERBOSITY")
    os.environ["TRANSFORMERS_VERBOSITY"] = "error"
    transformers_log = logging.getLogger("transformers")
    level = transformers_log.level
    transformers_log.setLevel(logging.ERROR)
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if in_main else None

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    if in_main:
        signal.signal(signal.SIGTERM, interrupt)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        transformers_log.setLevel(level)
        if verbosity is None:
            os.environ.pop("TRANSFORMERS_VERBOSITY", None)
        else:
            os.environ["TRANSFORMERS_VERBOSITY"] = verbosity
        if in_main:
            signal.signal(signal.SIGTERM, previous)


# Options shared by commands (Annotated aliases keep signatures short).
JsonOpt = Annotated[
    Path | None, typer.Option("--json", help="Write results as JSON to this path ('-' for stdout).", show_default=False)
]
HtmlOpt = Annotated[
    Path | None,
    typer.Option("--html", help="Write a self-contained HTML page (plots work offline).", show_default=False),
]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")]
SeedOpt = Annotated[
    int, typer.Option("--seed", min=0, max=SEED_MAX, help="Seed of every random choice (same seed, same numbers).")
]


def show_progress(quiet: bool) -> bool:
    """Progress bars only on an interactive stderr and without --quiet."""
    return not quiet and sys.stderr.isatty()


@contextlib.contextmanager
def progress_bar(quiet: bool) -> Iterator[ProgressFn | None]:
    """A ``progress(description, done, total)`` callback drawing a rich bar on stderr.

    Yields None (no callback) when quiet or when stderr is not a terminal.
    """
    if not show_progress(quiet):
        yield None
        return
    columns = (
        TextColumn("{task.description}", style="bold", markup=False),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=stderr, transient=True) as bar:
        tasks: dict[str, int] = {}

        def update(description: str, done: int, total: int) -> None:
            if description not in tasks:
                tasks[description] = bar.add_task(description, total=total)
            bar.update(tasks[description], completed=done, total=total)

        yield update


def print_renderable(renderable, *, json_to_stdout: bool) -> None:
    """Print a rich renderable to stdout, unless stdout carries JSON (then to stderr)."""
    (stderr if json_to_stdout else stdout).print(renderable)


def emit(
    result,
    *,
    json: Path | None = None,
    html: Path | None = None,
    table: Callable[[Any], Any] | None = None,
    page: Callable[[Path, Any], Any] | None = None,
) -> None:
    """The tail of every command: the HTML page, the JSON, then the table (on stderr when the
    JSON goes to stdout)."""
    if html is not None:
        page(html, result)
    if json is not None:
        write_json(json, result.to_dict())
    if table is not None:
        print_renderable(table(result), json_to_stdout=str(json) == STDOUT)


def command_line(ctx: typer.Context) -> str:
    """The running command as a shell line, rebuilt from its parsed parameters (non-defaults)."""
    import shlex

    words = ctx.command_path.split()
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if value is None or value == param.default or value == () or value == []:
            continue
        values = value if isinstance(value, (list, tuple)) else [value]
        if param.param_type_name == "argument":
            words += [str(v) for v in values]
        elif isinstance(value, bool):
            words.append(param.opts[0] if value else (param.secondary_opts or param.opts)[0])
        else:
            for v in values:
                words += [param.opts[0], str(v)]
    return shlex.join(words)


# --- options generated from the settings dataclasses -------------------------------------------


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _option_parameter(name: str, hint: Any, default: Any, help: str, **extra) -> inspect.Parameter:
    """A keyword-only parameter that typer turns into the option ``--name``."""
    option = typer.Option(_flag(name), help=help, show_default=default is not None, **extra)
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=Annotated[hint, option])


def _runtime_parameters(names: tuple[str, ...]) -> list[inspect.Parameter]:
    hints = typing.get_type_hints(Runtime)
    out = []
    for f in dataclasses.fields(Runtime):
        meta = dict(f.metadata)
        named_only = meta.pop("named_only", False)  # --ray: only where a command names it
        if (names or named_only) and f.name not in names:
            continue
        help_text = meta.pop("help")
        hint = Path | None if meta.pop("path", False) else hints[f.name]
        out.append(_option_parameter(f.name, hint, f.default, help_text, **meta))
    return out


_FIELD_HELP = {
    "prompt": "Probe field holding the prompt.",
    "answer": "Probe field holding the answer.",
    "group": "Probe field naming the entity a row is about (rows of one group never straddle a split).",
    "choices": "Probe field holding a multiple-choice row's choices (then the answer is the right choice's text or 0-based index).",
}


def with_runtime(*names: str, probe_fields: bool = False) -> Callable:
    """Give a command :class:`Runtime`'s options (every field, or only ``names``), generated from
    its fields; the command receives ``runtime: Runtime``. With ``probe_fields`` it also gets
    --prompt-field/--answer-field/--group-field and receives ``fields: ProbeFields``.
    """

    def decorate(fn: Callable) -> Callable:
        signature = inspect.signature(fn)
        hints = typing.get_type_hints(fn, include_extras=True)  # resolve string annotations here
        own = [
            p.replace(annotation=hints.get(p.name, p.annotation), kind=inspect.Parameter.KEYWORD_ONLY)
            for p in signature.parameters.values()
            if p.name not in ("runtime", "fields")
        ]
        runtime_params = _runtime_parameters(names)
        field_params = (
            [
                _option_parameter(f"{f.name}_field", str, f.default, _FIELD_HELP[f.name])
                for f in dataclasses.fields(ProbeFields)
            ]
            if probe_fields
            else []
        )

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            kwargs["runtime"] = Runtime(**{p.name: kwargs.pop(p.name) for p in runtime_params})
            if probe_fields:
                kwargs["fields"] = ProbeFields(
                    **{p.name.removesuffix("_field"): kwargs.pop(p.name) for p in field_params}
                )
            return fn(*args, **kwargs)

        parameters = [*own, *runtime_params, *field_params]
        wrapper.__signature__ = signature.replace(parameters=parameters)
        wrapper.__annotations__ = {p.name: p.annotation for p in parameters}
        return wrapper

    return decorate
