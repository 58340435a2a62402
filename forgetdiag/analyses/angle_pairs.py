"""Which weight updates ``forgetdiag angles`` compares: the ``--compare`` syntax.

Checkpoints are numbered C0, C1, ... in the order given (a Trainer run expands in place). An
update is written ``i-j`` for C[j] - C[i], or ``k`` alone for update k = C[k+1] - C[k]. A pair
is ``A:B``, the earlier update first (the paper's per-direction angle goes from B's directions
to A's subspace); pairs are separated by commas. Examples with four checkpoints:

* ``0:1`` = ``0-1:1-2``: what the first update and the next one share;
* ``0-1:1-3``: the first steps of a task against the rest of it;
* ``0:1,1:2`` (the default for four checkpoints): every consecutive pair.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from forgetdiag.errors import ForgetdiagError

_UPDATE = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d+)\s*)?$")
SYNTAX = (
    "pairs are written A:B, comma-separated, where an update is i-j (C[j] - C[i]) or k "
    "(C[k+1] - C[k]); e.g. 0-1:1-2 or 0:1,1:2"
)


@dataclass(frozen=True, order=True)
class Update:
    """The update C[j] - C[i] between checkpoints i < j (indices in the order given)."""

    i: int
    j: int

    @property
    def label(self) -> str:
        return f"{self.i}-{self.j}"


@dataclass(frozen=True)
class PairSpec:
    """Two updates to compare: ``a`` (earlier, the reference subspace) and ``b``."""

    a: Update
    b: Update

    @property
    def label(self) -> str:
        return f"{self.a.label}:{self.b.label}"


def consecutive_pairs(n_checkpoints: int) -> list[PairSpec]:
    """(C1 - C0 vs C2 - C1), (C2 - C1 vs C3 - C2), ... for ``n_checkpoints`` >= 3."""
    return [PairSpec(Update(k, k + 1), Update(k + 1, k + 2)) for k in range(n_checkpoints - 2)]


def parse_pairs(
    spec: str | Sequence[PairSpec] | None, n_checkpoints: int, *, labels: Sequence[str] = ()
) -> list[PairSpec]:
    """The pairs of updates to compare, checked against the number of checkpoints.

    Args:
        spec: a ``--compare`` string (see the module docstring), PairSpec objects, or None for
            consecutive pairs.
        n_checkpoints: how many checkpoints were given (after Trainer runs expand).
        labels: checkpoint labels, to say in errors what was found.

    Returns:
        The pairs, in the order given, without repeats.

    Raises:
        ForgetdiagError: fewer than 3 checkpoints, bad syntax, an index out of range, or a
            pair that compares an update with itself.
    """
    found = ", ".join(labels) if labels else f"{n_checkpoints}"
    if n_checkpoints < 3:
        raise ForgetdiagError(
            f"angles compares two updates, so it needs at least 3 checkpoints (C0 C1 C2 give the "
            f"consecutive updates C1 - C0 and C2 - C1); found {n_checkpoints}: {found}"
        )
    if spec is None:
        return consecutive_pairs(n_checkpoints)
    pairs = [_parse_pair(text) for text in spec.split(",")] if isinstance(spec, str) else list(spec)
    if not pairs:
        raise ForgetdiagError(f"--compare is empty; {SYNTAX}")
    for pair in pairs:
        for update in (pair.a, pair.b):
            if not 0 <= update.i < update.j < n_checkpoints:
                raise ForgetdiagError(
                    f"--compare {pair.label}: update {update.label} needs 0 <= i < j <= "
                    f"{n_checkpoints - 1} (checkpoints are numbered 0..{n_checkpoints - 1}: {found})"
                )
        if pair.a == pair.b:
            raise ForgetdiagError(
                f"--compare {pair.label} compares update {pair.a.label} with itself; expected two different updates"
            )
    return list(dict.fromkeys(pairs))


def _parse_pair(text: str) -> PairSpec:
    sides = text.split(":")
    if len(sides) != 2:
        raise ForgetdiagError(f"--compare: cannot read {text.strip()!r}; {SYNTAX}")
    return PairSpec(_parse_update(sides[0], text), _parse_update(sides[1], text))


def _parse_update(text: str, pair: str) -> Update:
    match = _UPDATE.match(text)
    if match is None:
        raise ForgetdiagError(f"--compare: cannot read update {text.strip()!r} in {pair.strip()!r}; {SYNTAX}")
    i = int(match.group(1))
    return Update(i, int(match.group(2)) if match.group(2) is not None else i + 1)
