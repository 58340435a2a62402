"""What :class:`forgetdiag.callback.ForgettingCallback` needs besides the Trainer: the model being
trained seen as a checkpoint (for tokenization), the checkpoint an alarm points at, the command
that diagnoses it, and the run description it writes (``forgetdiag.toml``, read by
:func:`forgetdiag.runfile.load_run`). No transformers import here."""

from __future__ import annotations

import json
import math
import os
import shlex
from pathlib import Path

from forgetdiag.checkpoints import trainer_checkpoints
from forgetdiag.sources import TensorMeta
from forgetdiag.storage import Checkpoint

RESERVED = ("old", "recovery", "new")  # the probe roles a run file knows


class _LiveSource:
    """Tensor names and shapes of a model in memory (what tokenization asks a checkpoint:
    its vocabulary, from the input embedding's rows)."""

    files: tuple = ()

    def __init__(self, model) -> None:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT: the wrapped model
        self.meta = {
            name: TensorMeta(tuple(t.shape), str(t.dtype).removeprefix("torch."), None)
            for name, t in base.state_dict().items()
        }


def live_checkpoint(model, output_dir: Path) -> Checkpoint:
    """The model being trained as a :class:`Checkpoint` (config and tensor shapes, no reads)."""
    config = model.config.to_dict()
    return Checkpoint(output_dir, config=config, source=_LiveSource(model), fmt="live", label="model being trained")


def saved_step(step: int, args, state) -> int:
    """The step of the first checkpoint the Trainer saves at or after ``step``."""
    strategy = str(getattr(args.save_strategy, "value", args.save_strategy))
    if strategy == "steps" and state.save_steps and state.save_steps > 0:
        return min(math.ceil(step / state.save_steps) * int(state.save_steps), state.max_steps)
    return state.max_steps


def recover_command(before: Path | None, checkpoint: Path, probe: str | None) -> str:
    """``forgetdiag recover BEFORE CHECKPOINT --probe PROBE`` (placeholders where unknown)."""
    parts = ["forgetdiag", "recover", str(before) if before else "BEFORE", str(checkpoint), "--probe", probe or "PROBE"]
    return " ".join(p if p in ("BEFORE", "PROBE") else shlex.quote(p) for p in parts)


def _relative(path: Path | str, root: Path) -> str:
    """``path`` relative to the run file's folder (the tree can move whole), else absolute."""
    path = Path(path).resolve()
    try:
        return os.path.relpath(path, root.resolve())
    except ValueError:  # another drive (Windows)
        return str(path)


def probe_roles(probes: dict[str, str | None]) -> tuple[dict[str, str], list[str]]:
    """The run file's [probes]: names old/recovery/new keep their role; without an ``old``, the
    first other probe is the old task. Returns (role -> file, notes on probes left out)."""
    roles, notes = {}, []
    for name, source in probes.items():
        if source is None:
            notes.append(f"probe {name} was given in memory (no file): not in the run file")
        elif name in RESERVED:
            roles[name] = source
    for name, source in probes.items():
        if source is None or name in RESERVED:
            continue
        if "old" not in roles:
            roles["old"] = source
            notes.append(f"probe {name} is the old task")
        else:
            notes.append(f"probe {name} also watched: {source}")
    return roles, notes


def run_description(out: Path, probes: dict[str, str | None], *, before: Path | None, every_steps: int) -> str:
    """The text of ``out/forgetdiag.toml``: the run, its checkpoints and its probes."""
    saved = trainer_checkpoints(out) if out.is_dir() else []
    roles, notes = probe_roles(probes)
    lines = [
        "# Written by forgetdiag.ForgettingCallback: `forgetdiag report` and `forgetdiag score` read it.",
        f"name = {json.dumps(out.resolve().name)}",
        f"description = {json.dumps(f'Trainer run watched every {every_steps} steps')}",
        "",
        "[checkpoints]",
    ]
    if before is not None:
        lines.append(f"before = {json.dumps(_relative(before, out))}")
    if saved:
        lines.append('run = "."')
        lines.append(f"after = {json.dumps(saved[-1][1].name)}")
    lines += ["", "[probes]"]
    lines += [f"{role} = {json.dumps(_relative(path, out))}" for role, path in roles.items()]
    lines += [f"# {note}" for note in notes]
    return "\n".join(lines) + "\n"
