"""Per-item scores of a probe: which items a model gets right under each metric, and the answer
loss, with the summary numbers every analysis reads (:func:`forgetdiag.evaluate.score` makes
:class:`Scores`; :func:`forgetdiag.choices.score_choices` makes the multiple-choice kind)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np


class ItemScores:
    """What per-item scores share: ``columns`` maps each metric to the (n,) array of right (True)
    or wrong items; ``nll`` and ``n_tokens`` give the token-weighted answer loss."""

    columns: ClassVar[dict[str, str]] = {}  # metric -> attribute holding its (n,) array
    nll: np.ndarray
    n_tokens: np.ndarray

    @property
    def metrics(self) -> tuple[str, ...]:
        return tuple(self.columns)

    @property
    def n(self) -> int:
        return int(self.nll.shape[0])

    def per_item(self, metric: str) -> np.ndarray:
        """(n,) right (True) or wrong per item under ``metric`` (one of :attr:`metrics`)."""
        return getattr(self, self.columns[metric])

    def value(self, metric: str) -> float:
        return float(self.per_item(metric).mean()) if self.n else float("nan")

    @property
    def answer_loss(self) -> float:
        """Mean answer-token cross-entropy over all tokens of all items (nats, token-weighted)."""
        return float(self.nll.sum() / self.n_tokens.sum()) if self.n else float("nan")


@dataclass(frozen=True)
class Scores(ItemScores):
    """Per-item results of :func:`score`, with the summary numbers as properties.

    Attributes:
        exact: (n,) greedy exact match (answer then EOS).
        first_token: (n,) argmax of the first answer token is right.
        nll: (n,) summed negative log-likelihood of the completion tokens.
        n_tokens: (n,) completion tokens per item.
    """

    exact: np.ndarray
    first_token: np.ndarray
    nll: np.ndarray
    n_tokens: np.ndarray
    columns: ClassVar[dict[str, str]] = {"exact_match": "exact", "first_token": "first_token"}

    @property
    def exact_match(self) -> float:
        return float(self.exact.mean()) if self.n else float("nan")

    @property
    def first_token_accuracy(self) -> float:
        return float(self.first_token.mean()) if self.n else float("nan")

    def to_dict(self) -> dict[str, float | int]:
        return {
            "n": self.n,
            "exact_match": self.exact_match,
            "first_token_accuracy": self.first_token_accuracy,
            "answer_loss": self.answer_loss,
        }
