"""Watch the old tasks while a transformers Trainer trains: :class:`ForgettingCallback` (docs/callback.md).

At the first step and every ``every_steps`` updates, each probe's fixed, seeded subset of items
is scored on the model being trained with the same teacher-forced pass as ``forgetdiag score``
(:func:`forgetdiag.choices.score_items`), and the numbers go into the Trainer's own logs
(``forgetdiag/<probe>/<metric>``), so every reporting integration (TensorBoard, Weights & Biases,
MLflow...) receives them. A probe whose headline metric fell by more than ``alarm_drop`` since the
first scoring, with the exact paired test of the recover verdict (McNemar) significant at
``alpha``, raises one alarm that names the checkpoint to diagnose and the command to run.

The callback never touches the optimizer or a random generator (scoring is a no-grad pass in eval
mode; dropout in eval mode draws nothing), so a run with it ends with the same weights as one
without. It writes one file, ``forgetdiag.toml`` at the top of ``output_dir`` (never inside a
``checkpoint-N``), describing the run for ``forgetdiag report`` and ``forgetdiag score``.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from transformers import TrainerCallback
from transformers.utils import logging

from forgetdiag.analyses.verdict import Thresholds, mcnemar
from forgetdiag.choices import score_items
from forgetdiag.errors import ForgetdiagError, ProbeError
from forgetdiag.models import Stops, load_tokenizer, tokenize_probe
from forgetdiag.probes import Probe, ProbeFields, load_probe
from forgetdiag.runtime import Runtime
from forgetdiag.storage import Checkpoint
from forgetdiag.validate import check_number, check_seed
from forgetdiag.watch import live_checkpoint, recover_command, run_description, saved_step

logger = logging.get_logger("transformers.trainer")
PREFIX = "forgetdiag"


@dataclass(frozen=True)
class Alarm:
    """A probe that fell: its headline metric at the first scoring and now, and what to run."""

    probe: str
    step: int
    metric: str
    start: float
    now: float
    p_value: float
    checkpoint: str
    command: str

    def message(self) -> str:
        return (
            f"forgetdiag: {self.probe} {self.metric} fell from {self.start:.3f} to {self.now:.3f} "
            f"by step {self.step} (paired test p = {self.p_value:.2g}); diagnose it: {self.command}"
        )


@dataclass
class _Watched:
    """One probe as watched: its subset, its tokens, and the per-item outcomes at the first scoring."""

    probe: Probe
    source: str | None  # the whole probe's file (what recover and the run file name)
    metric: str
    encoded: list | None = None
    stops: Stops | None = None
    start: np.ndarray | None = None  # (n,) right or wrong at the first scoring
    alarm: Alarm | None = None


class ForgettingCallback(TrainerCallback):
    """Score old-task probes during training and log them with the Trainer's own logs.

    Args:
        probes: name -> probe (a file of any kind forgetdiag reads, or a :class:`Probe`).
        every_steps: score every this many optimizer updates (default: the Trainer's logging
            steps), and at the first step.
        max_items: items per probe (a fixed subset drawn with ``seed``; all when fewer).
        metric: the headline metric the alarm watches (default: each probe's own, exact match or
            acc); one of exact_match, first_token, acc, acc_norm.
        alarm_drop: the alarm fires when the headline metric fell by more than this since the
            first scoring and the paired test is significant at ``alpha``.
        tokenizer: a tokenizer, or a directory holding one (default: the Trainer's
            ``processing_class``).
        before: the checkpoint that knew the old tasks, named in the run file and the alarm's
            command (default: the model's own ``name_or_path`` when it is a directory).
        freeze_layers: freeze the input embedding and this many bottom layers at train begin
            (:func:`forgetdiag.training.freeze_bottom`, what ``advise`` recommends).
        runtime: tokenization and batch settings (``batch_size``, ``chat_template``,
            ``truncate_prompts``); the device is the model's own.

    Raises:
        ForgetdiagError: a probe that cannot be read, a tokenizer that cannot be loaded, or a bad
            setting, at construction (before training starts).
    """

    def __init__(
        self,
        probes: dict[str, str | Path | Probe],
        *,
        every_steps: int | None = None,
        max_items: int = 240,
        metric: str | None = None,
        alarm_drop: float = 0.1,
        alpha: float = Thresholds.alpha,
        tokenizer=None,
        before: str | Path | None = None,
        freeze_layers: int | None = None,
        seed: int = 0,
        runtime: Runtime | None = None,
        fields: ProbeFields = ProbeFields(),
    ) -> None:
        check_number("every_steps", every_steps, low=1, integer=True, optional=True)
        check_number("max_items", max_items, low=1, integer=True)
        check_number("alarm_drop", alarm_drop, low=0, high=1)
        check_number("alpha", alpha, low=0, high=1, low_open=True, high_open=True)
        check_number("freeze_layers", freeze_layers, low=0, integer=True, optional=True)
        check_seed("seed", seed)
        if not isinstance(probes, dict) or not probes:
            raise ProbeError(f"probes {probes!r}: expected a dict of name -> probe file, at least one")
        self.every_steps, self.alarm_drop, self.alpha = every_steps, alarm_drop, alpha
        self.freeze_layers, self.runtime = freeze_layers, runtime or Runtime()
        self.before = Path(before).resolve() if before is not None else None
        if self.before is not None and not self.before.exists():
            raise ForgetdiagError(f"before {before}: no such checkpoint; expected the directory that knew the old task")
        self.watched: dict[str, _Watched] = {}
        for name, given in probes.items():
            probe = given if isinstance(given, Probe) else load_probe(given, fields=fields, name=name)
            if not probe.items:
                raise ProbeError(f"probe {name}: no items; expected at least one")
            source = str(Path(probe.path).resolve()) if probe.path else None
            chosen = probe.metric(metric, option="metric")
            self.watched[name] = _Watched(
                replace(probe, name=name, items=subset(probe, max_items, seed)), source, chosen
            )
        self.tokenizer = tokenizer
        if isinstance(tokenizer, (str, Path)):
            self.tokenizer = load_tokenizer(None, replace(self.runtime, tokenizer=str(tokenizer)))
        self.alarms: list[Alarm] = []
        self.history: list[dict] = []  # every scoring: {"step": N, "forgetdiag/<probe>/<metric>": value...}
        self.seconds: list[float] = []  # wall time of each scoring (every probe)
        self._pending: dict | None = None
        self._started = False
        self._handler = None
        self._live: Checkpoint | None = None
        self.frozen: list[str] = []  # the parameters freeze_layers froze

    # --- Trainer events -------------------------------------------------------------------

    def on_train_begin(self, args, state, control, model=None, processing_class=None, **kwargs):
        self._handler = _move_to_front(self)
        self._started, self._pending = False, None  # a callback reused for the next task starts afresh
        for w in self.watched.values():
            w.start, w.alarm = None, None
        if self.tokenizer is None:
            processing_class = getattr(processing_class, "tokenizer", processing_class)  # a processor's tokenizer
            if processing_class is None or not hasattr(processing_class, "convert_tokens_to_ids"):
                raise ForgetdiagError(
                    "ForgettingCallback: the Trainer has no tokenizer (processing_class); "
                    "expected tokenizer=<a tokenizer or its directory>"
                )
            self.tokenizer = processing_class
        if self.every_steps is None:
            self.every_steps = max(1, int(state.logging_steps or 50))
        if self.before is None:
            own = Path(str(getattr(_config(model), "_name_or_path", "") or "."))
            self.before = own.resolve() if own.name and (own / "config.json").is_file() else None
        if self.freeze_layers:
            from forgetdiag.training import freeze_bottom

            frozen = self.frozen = freeze_bottom(model, self.freeze_layers)
            logger.info(
                f"forgetdiag: froze the embedding and {self.freeze_layers} bottom layers ({len(frozen)} tensors)"
            )
        self._live = live_checkpoint(model, Path(args.output_dir))
        for w in self.watched.values():
            w.encoded, w.stops = tokenize_probe(self.tokenizer, w.probe, self._live, self.runtime, warn=logger.warning)
            w.stops = Stops(w.stops.primary, w.stops.accepted | _generation_stops(model))

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if self._started:
            return
        self._started = True
        logs = self._score(model, state.global_step, args, state)
        state.log_history.append(dict(logs))  # as Trainer.log records an entry: the values, then the step
        if self._handler is not None:
            del logs["step"]  # integrations receive the values; the step comes from the state
            self._handler.on_log(args, state, control, logs)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every_steps == 0:
            self._pending = self._score(model, state.global_step, args, state)
            control.should_log = True

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self._pending is not None and logs is not None and self._pending["step"] == state.global_step:
            entries = {k: v for k, v in self._pending.items() if k != "step"}
            logs.update(entries)
            if state.log_history:
                state.log_history[-1].update(entries)
            self._pending = None

    def on_save(self, args, state, control, **kwargs):
        self._describe(args, state)

    def on_train_end(self, args, state, control, **kwargs):
        self._describe(args, state)

    # --- work -----------------------------------------------------------------------------

    def _score(self, model, step: int, args, state) -> dict:
        """Score every probe on ``model`` as it is now; eval mode for the pass, then as it was."""
        was_training, start = model.training, time.perf_counter()
        model.eval()
        logs: dict = {}
        try:
            for name, w in self.watched.items():
                scores = score_items(
                    model, w.encoded, pad_id=_pad_id(self.tokenizer), batch_size=self.runtime.batch_size,
                    stops=w.stops.accepted,
                )  # fmt: skip
                for metric in (*w.probe.metrics, "answer_loss"):
                    logs[f"{PREFIX}/{name}/{metric}"] = float(
                        scores.answer_loss if metric == "answer_loss" else scores.value(metric)
                    )
                outcome = np.asarray(scores.per_item(w.metric), dtype=bool)  # (n,)
                if w.start is None:
                    w.start = outcome
                elif w.alarm is None:
                    alarm = self._check(name, w, outcome, step, args, state)
                    if alarm is not None:
                        logs[f"{PREFIX}/{name}/alarm"] = alarm.command
        finally:
            model.train(was_training)
            self.seconds.append(time.perf_counter() - start)
        self.history.append({"step": step, **logs})
        return {"step": step, **logs}

    def _check(self, name: str, w: _Watched, outcome: np.ndarray, step: int, args, state) -> Alarm | None:
        start, now = float(w.start.mean()), float(outcome.mean())
        p_value, _, _ = mcnemar(w.start, outcome)
        if not (start - now > self.alarm_drop and p_value < self.alpha):
            return None
        checkpoint = Path(args.output_dir).resolve() / f"checkpoint-{saved_step(step, args, state)}"
        command = recover_command(self.before, checkpoint, w.source)
        w.alarm = Alarm(name, step, w.metric, start, now, p_value, str(checkpoint), command)
        self.alarms.append(w.alarm)
        logger.warning(w.alarm.message())
        return w.alarm

    def _describe(self, args, state) -> None:
        if not state.is_world_process_zero:
            return
        out = Path(args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        probes = {name: w.source for name, w in self.watched.items()}
        text = run_description(out, probes, before=self.before, every_steps=self.every_steps)
        target = out / "forgetdiag.toml"
        temporary = out / ".forgetdiag.toml.tmp"
        temporary.write_text(text, encoding="utf-8")
        temporary.replace(target)


def subset(probe: Probe, max_items: int, seed: int) -> tuple:
    """A fixed subset of ``max_items`` of the probe's items (drawn with ``seed``), in file order."""
    if len(probe.items) <= max_items:
        return probe.items
    keep = np.sort(np.random.default_rng(seed).choice(len(probe.items), size=max_items, replace=False))
    return tuple(probe.items[int(k)] for k in keep)


def _config(model):
    return getattr(model, "config", None)


def _pad_id(tokenizer) -> int:
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if value is not None:
            return int(value)
    return 0


def _generation_stops(model) -> frozenset[int]:
    """The ids the model's generation config stops on (what a saved checkpoint's file holds)."""
    value = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    values = value if isinstance(value, list) else [value]
    return frozenset(v for v in values if isinstance(v, int) and not isinstance(v, bool))


def _move_to_front(callback):
    """The Trainer's CallbackHandler (found on the call stack: callbacks are not handed it), with
    ``callback`` moved first, so the entries it adds to a log reach the reporting integrations
    that come before it in the list. Moving the current element to the front while the handler
    iterates keeps every other callback at its index, so none is skipped or called twice."""
    from transformers.trainer_callback import CallbackHandler

    frame = inspect.currentframe()
    while frame is not None:
        handler = frame.f_locals.get("self")
        if isinstance(handler, CallbackHandler):
            if handler.callbacks and handler.callbacks[0] is not callback and callback in handler.callbacks:
                handler.callbacks.remove(callback)
                handler.callbacks.insert(0, callback)
            return handler
        frame = frame.f_back
    logger.warning("forgetdiag: Trainer's callback handler not found; step-0 scores reach only log_history")
    return None
