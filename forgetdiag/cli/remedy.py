"""``forgetdiag remedy``: training data that forgets less (replay, self-output)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from forgetdiag.cli.app import app
from forgetdiag.cli.common import JsonOpt, QuietOpt, SeedOpt, command, emit, progress_bar, warn, with_runtime
from forgetdiag.errors import ProbeError
from forgetdiag.probes import ProbeFields, load_probe
from forgetdiag.render.output import guard_outputs
from forgetdiag.runtime import Runtime
from forgetdiag.settings import ReplaySettings, SelfOutputSettings

Opt = typer.Option
remedy_app = typer.Typer(
    name="remedy", no_args_is_help=True, help="Write training data that forgets less: replay, self-output."
)
app.add_typer(remedy_app, name="remedy")

OutOpt = Annotated[
    Path, Opt("--out", help="The JSONL file to write (probe format: prompt, answer, group).", show_default=False)
]
NewOpt = Annotated[
    Path, Opt("--new", help="The new task's rows (JSONL, JSON or CSV with prompt, answer).", show_default=False)
]
DEFAULT_REPLAY = ReplaySettings()


@command(remedy_app, "replay")
def replay_cmd(
    old: Annotated[
        Path,
        Opt("--old", help="The old task's training rows, to replay (JSONL, JSON or CSV).", show_default=False),
    ],
    new: NewOpt,
    out: OutOpt,
    ratio: Annotated[
        float, Opt("--ratio", help="The old rows' share of the output, in (0, 1).")
    ] = DEFAULT_REPLAY.ratio,
    exclude: Annotated[
        Path | None,
        Opt(
            "--exclude",
            help="The old task's evaluation probe: none of its rows, nor any row of its groups, is replayed.",
            show_default=False,
        ),
    ] = None,
    seed: SeedOpt = DEFAULT_REPLAY.seed,
    prompt_field: Annotated[str, Opt("--prompt-field", help="Probe field holding the prompt.")] = "prompt",
    answer_field: Annotated[str, Opt("--answer-field", help="Probe field holding the answer.")] = "answer",
    group_field: Annotated[
        str, Opt("--group-field", help="Probe field naming the entity a row is about (replay picks whole groups).")
    ] = "group",
    json_path: JsonOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Experience replay as data: the new rows with a seeded share of old-task rows mixed in.

    --ratio is the old rows' share of the OUTPUT: with N new rows, round(ratio * N / (1 - ratio))
    old rows (half up), taken as whole groups in a seeded order, the last group cut to the exact
    count. No row of --exclude, and no row about one of its groups, is ever replayed. The rows
    are shuffled together (seeded) and written atomically as JSONL: prompt, answer, group and
    source (new or old).
    """
    settings = ReplaySettings(ratio=ratio, seed=seed)
    fields = ProbeFields(prompt=prompt_field, answer=answer_field, group=group_field)
    guard_outputs({"--out": out, "--json": json_path}, [old, new, exclude])
    from forgetdiag.analyses.replay import replay_mix
    from forgetdiag.render.remedy import replay_table, write_rows

    old_rows, new_rows = load_probe(old, fields=fields), load_probe(new, fields=fields)
    try:
        evaluation = None if exclude is None else load_probe(exclude, fields=fields)
    except ProbeError as exc:  # name the option: the file is not a probe
        raise ProbeError(f"--exclude {exc.message}") from None
    with progress_bar(quiet) as progress:
        result = replay_mix(old_rows, new_rows, exclude=evaluation, settings=settings, progress=progress, warn=warn)
    write_rows(out, result.rows)
    emit(result, json=json_path, table=replay_table)


@command(remedy_app, "self-output")
@with_runtime(probe_fields=True)
def self_output_cmd(
    old: Annotated[
        Path, typer.Argument(help="The model before fine-tuning on the new data (one checkpoint).", show_default=False)
    ],
    new: NewOpt,
    out: OutOpt,
    rewrite_prompt: Annotated[
        str | None,
        Opt(
            "--rewrite-prompt",
            help="Ask the old model to restate the target with this template ({prompt}, {answer}); keep the restatement when it still contains the target answer.",
            show_default=False,
        ),
    ] = None,
    max_new_tokens: Annotated[
        int | None,
        Opt(
            "--max-new-tokens",
            min=1,
            help="Tokens generated per prompt (default: twice the longest target).",
            show_default=False,
        ),
    ] = None,
    json_path: JsonOpt = None,
    quiet: QuietOpt = False,
    runtime: Runtime = None,
    fields: ProbeFields = None,
) -> None:
    """Self-output data: every new prompt with the old model's own greedy answer.

    Where the old model already says the target (greedy exact match) the row is kept as is;
    elsewhere the target is kept, or with --rewrite-prompt the old model is shown the target and
    its restatement is trained on when it still contains the target answer. Each output row
    holds prompt, answer (what to train on), group, self_output (the old model's answer),
    target and outcome (same, restated or target). Checkpoints are never modified.
    """
    settings = SelfOutputSettings(rewrite_prompt=rewrite_prompt, max_new_tokens=max_new_tokens)
    guard_outputs({"--out": out, "--json": json_path}, [old, new, runtime.base, runtime.tokenizer])
    from forgetdiag.analyses.self_output import self_output
    from forgetdiag.render.remedy import self_output_table, write_rows

    rows = load_probe(new, fields=fields)
    with progress_bar(quiet) as progress:
        result = self_output(old, rows, settings=settings, runtime=runtime, progress=progress, warn=warn)
    write_rows(out, result.rows)
    emit(result, json=json_path, table=self_output_table)
