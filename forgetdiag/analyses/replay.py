"""Experience replay as data: the new task's rows with a seeded share of old-task rows mixed in.

docs/remedy.md. Replay (rehearsal) keeps a little of the old task in the new task's training
data, so that every few steps the gradient also asks for the old answers. Here it is a file,
not a training loop: any trainer that reads the probe format (prompt, answer, group) can use it.

The rules, exact and seeded:

* ``ratio`` is the old rows' share of the OUTPUT: with N new rows, ``K = floor(ratio * N /
  (1 - ratio) + 1/2)`` old rows (round half up, computed in exact decimal arithmetic from the
  ratio as written, at least 1), so that ``K / (N + K)`` is the ratio to within one row;
* old rows are chosen by group (the entity a row is about, :class:`forgetdiag.probes.Probe`):
  whole groups in a seeded shuffle, the last one cut to its first rows (file order) so that
  exactly K rows are taken;
* never a row of the evaluation probe (``exclude``): an old row is left out when its group is
  one of the evaluation's groups, or when its prompt and answer (whitespace normalised) are an
  evaluation row's. Replaying the rows the old task is scored on would make the score a test
  of memory, not of what the new training kept;
* the output is the N new rows (file order) and the K old rows, shuffled together with the
  same seed; each row says where it came from (``source``: ``new`` or ``old``).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from fractions import Fraction

from forgetdiag.errors import ForgetdiagError
from forgetdiag.probes import Probe, ProbeItem
from forgetdiag.results import Result
from forgetdiag.runtime import ProgressFn, Warn
from forgetdiag.settings import ReplaySettings


@dataclass(frozen=True)
class MixRow:
    """One output row: a probe row and where it came from (``new`` or ``old``)."""

    prompt: str
    answer: str
    group: str | None
    source: str

    def to_dict(self) -> dict:
        return {"prompt": self.prompt, "answer": self.answer, "group": self.group, "source": self.source}


@dataclass(frozen=True)
class ReplayResult(Result):
    """The mixed rows (for the output file) and the numbers behind them."""

    analysis = "replay"
    old: str
    new: str
    exclude: str | None
    settings: ReplaySettings
    n_new: int
    n_old: int  # rows of the old file
    n_excluded: int  # old rows left out because the evaluation probe holds them (or their group)
    n_replayed: int
    replayed_groups: int
    rows: tuple[MixRow, ...]
    warnings: tuple[str, ...] = ()
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def share(self) -> float:
        """The old rows' share of the output, as written."""
        return self.n_replayed / len(self.rows)

    def summary(self) -> str:
        excluded = (
            ""
            if self.exclude is None
            else f"; {self.n_excluded} old rows left out because {self.exclude} holds them or their group"
        )
        return (
            f"{self.n_new} rows of {self.new} + {self.n_replayed} replayed rows of {self.old} "
            f"({self.replayed_groups} groups) = {len(self.rows)} rows, {100 * self.share:.2f}% old "
            f"(--ratio {self.settings.ratio:g}, seed {self.settings.seed}){excluded}"
        )

    def body(self) -> dict:
        return {
            "old": self.old,
            "new": self.new,
            "exclude": self.exclude,
            "ratio": self.settings.ratio,
            "seed": self.settings.seed,
            "n_new": self.n_new,
            "n_old": self.n_old,
            "n_excluded": self.n_excluded,
            "n_replayed": self.n_replayed,
            "replayed_groups": self.replayed_groups,
            "n_rows": len(self.rows),
            "share_old": self.share,
        }


def replay_count(n_new: int, ratio: float) -> int:
    """Old rows to add to ``n_new`` new rows so that they are ``ratio`` of the output:
    ``floor(ratio * n / (1 - ratio) + 1/2)``, in exact arithmetic on the ratio as written
    (0.1 is 1/10, not its binary neighbour), at least 1."""
    r = Fraction(repr(float(ratio)))
    return max(1, math.floor(r * n_new / (1 - r) + Fraction(1, 2)))


def _text(item: ProbeItem) -> tuple[str, str]:
    return " ".join(item.prompt.split()), " ".join(item.answer.split())


def _key(item: ProbeItem, index: int) -> str:
    """The row's group; a row without one is a group of its own."""
    return item.group if item.group is not None else f"\0row{index}"


def replay_mix(
    old: Probe,
    new: Probe,
    *,
    exclude: Probe | None = None,
    settings: ReplaySettings = ReplaySettings(),
    progress: ProgressFn | None = None,
    warn: Warn | None = None,
) -> ReplayResult:
    """The new rows with ``settings.ratio`` of the output drawn from the old task's rows.

    Args:
        old: the old task's training rows (what may be replayed).
        new: the new task's rows (all kept, in file order before the shuffle).
        exclude: the old task's evaluation probe: none of its rows or groups is replayed.
        settings: the share and the seed (:class:`ReplaySettings`).

    Raises:
        ForgetdiagError: the old rows left after the exclusion are fewer than the ratio needs.

    Example:
        >>> mix = replay_mix(load_probe("task0_train.jsonl"), load_probe("task1.jsonl"),
        ...                  exclude=load_probe("task0_eval.jsonl"))  # doctest: +SKIP
        >>> mix.n_replayed, mix.share  # doctest: +SKIP
    """
    banned_groups = {i.group for i in exclude.items if i.group is not None} if exclude is not None else set()
    banned_rows = {_text(i) for i in exclude.items} if exclude is not None else set()
    by_group: dict[str, list[ProbeItem]] = {}
    excluded = 0
    for k, item in enumerate(old.items):
        if (item.group is not None and item.group in banned_groups) or _text(item) in banned_rows:
            excluded += 1
            continue
        by_group.setdefault(_key(item, k), []).append(item)
    available = sum(len(rows) for rows in by_group.values())
    want = replay_count(len(new), settings.ratio)
    if want > available:
        left = f" ({excluded} left out by the exclusion)" if excluded else ""
        raise ForgetdiagError(
            f"--ratio {settings.ratio:g} with {len(new)} new rows needs {want} old rows; "
            f"{old.name} has {available}{left}; expected a smaller --ratio or more old rows"
        )
    rng = random.Random(settings.seed)
    groups = list(by_group)  # first-seen order, then a seeded shuffle
    rng.shuffle(groups)
    chosen: list[ProbeItem] = []
    n_groups = 0
    for g in groups:
        if len(chosen) >= want:
            break
        chosen += by_group[g][: want - len(chosen)]  # the last group is cut to the exact count
        n_groups += 1
    rows = [MixRow(i.prompt, i.answer, i.group, "new") for i in new.items]
    rows += [MixRow(i.prompt, i.answer, i.group, "old") for i in chosen]
    rng.shuffle(rows)
    if progress is not None:
        progress("mixing", 1, 1)
    notes = []
    if exclude is not None and all(i.group is None for i in exclude.items):
        notes.append(
            f"{exclude.name} has no groups: only rows with the same prompt and answer were left out; "
            "facts about its entities may still be replayed (give each row a 'group')"
        )
    return ReplayResult(
        old=old.name,
        new=new.name,
        exclude=None if exclude is None else exclude.name,
        settings=settings,
        n_new=len(new),
        n_old=len(old),
        n_excluded=excluded,
        n_replayed=len(chosen),
        replayed_groups=n_groups,
        rows=tuple(rows),
        warnings=tuple(notes),
    )
