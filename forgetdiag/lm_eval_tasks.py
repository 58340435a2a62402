"""lm-evaluation-harness task files as probes (the optional ``lm-eval`` extra; docs/probes.md).

``--probe path/task.yaml`` loads the task with lm-eval's own machinery (its ``TaskManager``:
``include:``, ``!function``, ``process_docs``, the dataset the file names) and turns each
document of the split lm-eval evaluates (test, else validation) into a probe row:

* the prompt is the context lm-eval builds for the document (description, few-shot examples
  drawn with lm-eval's default seed, ``doc_to_text``), followed by ``target_delimiter``;
* ``generate_until`` tasks give prompt/answer rows, the answer being ``doc_to_target``; the
  task's ``until`` strings become stop strings (a token starting with one ends an answer,
  like the EOS);
* ``multiple_choice`` tasks give multiple-choice rows: ``doc_to_choice``'s choices, the right
  one from ``doc_to_target`` (an index or a choice's text). A whitespace delimiter at the end
  of the prompt moves into each choice when it is tokenized, so the tokens scored are lm-eval's
  ``target_delimiter + choice``, and ``acc_norm`` divides by the choice's own length, as lm-eval.

Other output types, tasks with one context per choice, several right answers and groups of
tasks are refused with one line.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from pathlib import Path

from forgetdiag.errors import ProbeError
from forgetdiag.probe_rows import ProbeFields, Row, row_item

SUPPORTED = ("generate_until", "multiple_choice")
FEWSHOT_SEED = 1234  # lm-eval's simple_evaluate default (fewshot_random_seed)
INSTALL = "pip install 'forgetdiag[lm-eval]'"


@contextlib.contextmanager
def _quiet():
    """lm-eval and datasets log on stderr while they load: keep forgetdiag's stderr its own."""
    import warnings

    import datasets

    loggers = [logging.getLogger(n) for n in ("lm_eval", "lm-eval", "datasets", "evaluate")]
    levels = [lg.level for lg in loggers]
    bars = datasets.utils.logging.is_progress_bar_enabled()
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    datasets.utils.logging.disable_progress_bar()  # "Generating test split" bars
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
        if bars:
            datasets.utils.logging.enable_progress_bar()


def _task(path: Path):
    """The one task the file defines, loaded by lm-eval."""
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise ProbeError(f"{path}: an lm-eval task file needs lm-evaluation-harness: {INSTALL}") from None
    if not hasattr(TaskManager, "load"):
        from importlib.metadata import version

        raise ProbeError(
            f"{path}: reading lm-eval task files needs lm-eval 0.4.13 or later (found {version('lm_eval')}): {INSTALL}"
        )
    try:
        with _quiet():
            manager = TaskManager(include_path=str(path.parent), include_defaults=False)
            loaded = manager.load([str(path)])
    except Exception as exc:  # lm-eval raises many kinds (yaml, datasets, KeyError...): one line each
        raise ProbeError(f"{path}: lm-eval cannot load this task: {type(exc).__name__}: {_text(exc)}") from None
    tasks, groups = loaded.get("tasks", {}), loaded.get("groups", {})
    if groups or len(tasks) != 1:
        raise ProbeError(
            f"{path}: defines a group of {len(tasks)} tasks; expected one task's file (pass each task's .yaml as its own --probe)"
        )
    return next(iter(tasks.values()))


def _text(exc: Exception) -> str:
    return " ".join(str(exc).split())[:300]


def _context(task, doc) -> str:
    """The prompt lm-eval builds for ``doc`` (plain text, no chat template), as its requests do."""
    num_fewshot = task.config.num_fewshot or 0
    kwargs = {}
    parameters = inspect.signature(task.fewshot_context).parameters
    if "gen_prefix" in parameters and hasattr(task, "doc_to_prefix"):
        kwargs["gen_prefix"] = task.doc_to_prefix(doc)
    return task.fewshot_context(doc, num_fewshot, **kwargs)


def task_rows(path: str | Path) -> tuple[list[Row], tuple[str, ...]]:
    """An lm-eval task file's documents as probe rows, and its stop strings (see the module's
    docstring); :func:`forgetdiag.probes.load_probe` makes the probe.

    Raises:
        ProbeError: lm-eval is not installed, the file cannot be loaded, the task's output type
            is not ``generate_until`` or ``multiple_choice``, or a document cannot be a row
            (several right answers, a target that is not among the choices...), naming the file
            and the document.
    """
    path = Path(path)
    if not path.is_file():
        raise ProbeError(f"{path}: no such task file; expected an lm-evaluation-harness task .yaml")
    task = _task(path)
    output_type = task.config.output_type
    task_name = task.config.task
    if output_type not in SUPPORTED:
        raise ProbeError(
            f"{path}: task {task_name} has output_type {output_type}; forgetdiag reads {' and '.join(SUPPORTED)} tasks"
        )
    if getattr(task, "multiple_input", False):
        raise ProbeError(
            f"{path}: task {task_name} builds one context per choice (doc_to_text gives a choice index); "
            "expected choices as continuations of one prompt"
        )
    if hasattr(task, "set_fewshot_seed"):
        task.set_fewshot_seed(seed=FEWSHOT_SEED)
    delimiter = task.config.target_delimiter
    fields = ProbeFields()
    items = []
    try:
        with _quiet():
            docs = list(task.eval_docs)
            for k, doc in enumerate(docs):
                where = f"{path}: document {k} of task {task_name}"
                row = {"prompt": _context(task, doc) + delimiter, "answer": task.doc_to_target(doc)}
                if output_type == "multiple_choice":
                    row["choices"] = list(task.doc_to_choice(doc))
                elif isinstance(row["answer"], (int, float)) and not isinstance(row["answer"], bool):
                    row["answer"] = str(row["answer"])
                if isinstance(row["answer"], list):
                    raise ProbeError(f"{where} has {len(row['answer'])} right answers; expected one")
                items.append(row_item(where, row, fields))
    except ProbeError:
        raise
    except Exception as exc:
        raise ProbeError(
            f"{path}: lm-eval cannot build the task's documents: {type(exc).__name__}: {_text(exc)}"
        ) from None
    if not items:
        raise ProbeError(f"{path}: task {task_name} has no documents to evaluate")
    until = (task.config.generation_kwargs or {}).get("until", ()) if output_type == "generate_until" else ()
    return items, (until,) if isinstance(until, str) else tuple(until)
