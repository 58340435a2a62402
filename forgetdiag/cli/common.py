"""What every command shares: error handling, common options, progress bars, output."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Callable, Iterator, Optional

import click
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from forgetdiag.errors import EXIT_INTERNAL, ForgetdiagError

if TYPE_CHECKING:
    from forgetdiag.models import Runtime

stdout = Console(highlight=False)
stderr = Console(stderr=True, highlight=False)


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
                return fn(*args, **kw)
            except ForgetdiagError as exc:
                raise fail(exc.message, exc.exit_code) from None
            except (typer.Exit, typer.Abort, click.exceptions.Exit, click.ClickException, click.Abort):
                raise
            except KeyboardInterrupt:
                raise fail("interrupted", 130) from None
            except Exception as exc:  # noqa: BLE001 - the last line of defence
                if os.environ.get("FORGETDIAG_DEBUG") or type(exc).__module__.startswith(("typer", "click")):
                    raise  # usage errors: typer reports them itself (exit 2)
                text = " ".join(str(exc).split())[:300]
                raise fail(f"internal error: {type(exc).__name__}: {text} (a bug in forgetdiag; "
                           "rerun with FORGETDIAG_DEBUG=1 for the traceback and report it)",
                           EXIT_INTERNAL) from None

        if fn.__doc__ and "help" not in kwargs:  # one line per paragraph in --help
            paragraphs = fn.__doc__.strip().split("\n\n")
            kwargs["help"] = "\n\n".join(" ".join(p.split()) for p in paragraphs)
        return app.command(name, **kwargs)(wrapper)

    return decorate


# Options shared by commands (Annotated aliases keep signatures short).
JsonOpt = Annotated[Optional[Path], typer.Option("--json", help="Write results as JSON to this path ('-' for stdout).", show_default=False)]
HtmlOpt = Annotated[Optional[Path], typer.Option("--html", help="Write a self-contained HTML page (plots work offline).", show_default=False)]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")]
DeviceOpt = Annotated[str, typer.Option("--device", help="cpu, cuda, cuda:N, mps, or auto (CUDA when available).")]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="Compute dtype for forward passes: float32, bfloat16 or float16.")]
AllowPickleOpt = Annotated[bool, typer.Option("--allow-pickle", help="Read pytorch_model.bin files (with torch.load(weights_only=True)). Off: safetensors only.")]
TrustCodeOpt = Annotated[bool, typer.Option("--trust-remote-code", help="Allow a checkpoint's own Python code (transformers trust_remote_code). Off by default.")]
BaseOpt = Annotated[Optional[Path], typer.Option("--base", help="Base model directory of LoRA adapters (default: from adapter_config.json).", show_default=False)]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed of every random choice (same seed, same numbers).")]


def show_progress(quiet: bool) -> bool:
    """Progress bars only on an interactive stderr and without --quiet."""
    return not quiet and sys.stderr.isatty()


@contextlib.contextmanager
def progress_bar(quiet: bool) -> Iterator[Callable[[str, int, int], None] | None]:
    """A ``progress(description, done, total)`` callback drawing a rich bar on stderr.

    Yields None (no callback) when quiet or when stderr is not a terminal.
    """
    if not show_progress(quiet):
        yield None
        return
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())
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

# Probe and model-running options (recover, landscape, features, report...).
PromptFieldOpt = Annotated[str, typer.Option("--prompt-field", help="Probe field holding the prompt.")]
AnswerFieldOpt = Annotated[str, typer.Option("--answer-field", help="Probe field holding the answer.")]
GroupFieldOpt = Annotated[str, typer.Option("--group-field", help="Probe field naming the entity a row is about (rows of one group never straddle a split).")]
ChatTemplateOpt = Annotated[bool, typer.Option("--chat-template", help="Wrap probe prompts in the tokenizer's chat template (instruct models).")]
TruncateOpt = Annotated[bool, typer.Option("--truncate-prompts", help="Drop the oldest tokens of prompts too long for the model's context (default: error).")]
TokenizerOpt = Annotated[Optional[Path], typer.Option("--tokenizer", help="Tokenizer directory (default: the one saved with each checkpoint).", show_default=False)]
ThreadsOpt = Annotated[Optional[int], typer.Option("--threads", min=1, help="Torch CPU threads (default: 1 for models under 20M parameters, else torch's default).", show_default=False)]
BatchOpt = Annotated[int, typer.Option("--batch-size", min=1, help="Probe items per forward pass.")]


def runtime_from(**options):
    """A :class:`forgetdiag.models.Runtime` from CLI options (paths become strings)."""
    from forgetdiag.models import Runtime

    return Runtime(**{k: (str(v) if isinstance(v, Path) else v) for k, v in options.items()})


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


@dataclasses.dataclass(frozen=True)
class ModelOptions:
    """The options every model-running command shares, parsed once (see :func:`model_options`)."""

    runtime: "Runtime"
    fields: dict

    def probe(self, path: Path):
        """Load a probe file with the chosen field names."""
        from forgetdiag.probes import load_probe

        return load_probe(path, **self.fields)


_RUNTIME_OPTIONS = (("device", DeviceOpt, "cpu"), ("dtype", DtypeOpt, "float32"),
                    ("threads", ThreadsOpt, None), ("batch_size", BatchOpt, 64),
                    ("tokenizer", TokenizerOpt, None), ("chat_template", ChatTemplateOpt, False),
                    ("truncate_prompts", TruncateOpt, False), ("allow_pickle", AllowPickleOpt, False),
                    ("base", BaseOpt, None), ("trust_remote_code", TrustCodeOpt, False))
_FIELD_OPTIONS = (("prompt_field", PromptFieldOpt, "prompt"), ("answer_field", AnswerFieldOpt, "answer"),
                  ("group_field", GroupFieldOpt, "group"))


def model_options(fn: Callable) -> Callable:
    """Give a command the shared model and probe options; it receives them as ``options``.

    The decorated function declares ``options: ModelOptions``; its command line gets --device,
    --dtype, --threads, --batch-size, --tokenizer, --chat-template, --truncate-prompts,
    --allow-pickle, --base, --trust-remote-code and the probe field names instead.
    """
    shared = (*_RUNTIME_OPTIONS, *_FIELD_OPTIONS)
    import typing

    signature = inspect.signature(fn)
    hints = typing.get_type_hints(fn, include_extras=True)  # resolve string annotations here
    own = [p.replace(annotation=hints.get(p.name, p.annotation))
           for p in signature.parameters.values() if p.name != "options"]
    added = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=kind)
             for name, kind, default in shared]

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        runtime = runtime_from(**{name: kwargs.pop(name) for name, _, _ in _RUNTIME_OPTIONS})
        fields = {name: kwargs.pop(name) for name, _, _ in _FIELD_OPTIONS}
        return fn(*args, options=ModelOptions(runtime, fields), **kwargs)

    keyword = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own]
    wrapper.__signature__ = signature.replace(parameters=[*keyword[:-1], *added, *keyword[-1:]])
    wrapper.__annotations__ = {**{p.name: p.annotation for p in own},
                               **{name: kind for name, kind, _ in shared}}
    return wrapper
