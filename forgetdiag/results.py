"""What every analysis result shares: the envelope of its JSON, and phase timings.

Each result is a frozen dataclass holding numbers only (renderers turn it into tables and pages
afterwards). Its ``to_dict()`` (the command's ``--json``) starts with the same five keys::

    {"analysis": "angles", "schema_version": 2, "summary": "<one sentence>",
     "warnings": ["..."], "timings_s": {"phase": seconds}, ...the analysis' own records}

``summary`` is the result in words, ``warnings`` what the reader must know to trust it (notes
included), ``timings_s`` the seconds of each phase.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any, ClassVar

SCHEMA_VERSION = 2


class Result:
    """Base of analysis results: subclasses (frozen dataclasses) define ``analysis``, the
    fields ``warnings`` and ``timings``, ``summary()`` and ``body()``."""

    analysis: ClassVar[str] = ""
    warnings: tuple[str, ...]
    timings: dict[str, float]

    def summary(self) -> str:
        """The result in one or two sentences, with the numbers behind it."""
        raise NotImplementedError

    def body(self) -> dict[str, Any]:
        """The analysis' own JSON records (after the envelope)."""
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        return {
            "analysis": self.analysis,
            "schema_version": SCHEMA_VERSION,
            "summary": self.summary(),
            "warnings": list(self.warnings),
            "timings_s": dict(self.timings),
            **self.body(),
        }


class Timings(dict):
    """Seconds per phase, accumulated: ``with timings.phase("recovery"): ...``."""

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self[name] = self.get(name, 0.0) + time.perf_counter() - start
