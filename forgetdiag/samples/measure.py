"""The truths the samples carry, measured with forgetdiag itself.

For every checkpoint of a run, :func:`forgetdiag.recover` in sequence mode gives the greedy
exact match on the old task's held-out people and the same after recovery (a copy fine-tuned for
one epoch on the old task's other half: AdamW, lr 1e-4, batch 32, answer tokens only;
docs/science.md, section 3.2), with the control recovered the same way; :func:`forgetdiag.evaluate.score`
adds each checkpoint's accuracy on its own new task.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from forgetdiag.analyses.recovery import RecoverySettings, recover
from forgetdiag.checkpoints import find_checkpoints
from forgetdiag.evaluate import encode, score
from forgetdiag.models import load_model, load_tokenizer
from forgetdiag.probes import load_probe

RECOVERY = RecoverySettings(epochs=1, lr=1e-4, batch_size=32, seed=0)
PROBE_FILES = {"old": "task0_heldout", "recovery": "task0_recovery", "spurious": "task1_spurious", "real": "task1_real"}


@dataclass(frozen=True)
class Truth:
    """One checkpoint's numbers (greedy exact match unless named otherwise)."""

    run: str
    step: int | None  # None: the control
    accuracy: float  # old task, held-out people
    first_token: float
    answer_loss: float
    recovered: float  # old task, held-out people, after recovery
    verdict: str | None  # forgetdiag's verdict against checkpoint-0 (None for the control)
    new_task: float | None  # the run's own task 1
    spurious_fraction: float | None = None
    fraction_interval: tuple[float, float] | None = None  # 95%, paired bootstrap over people
    p_value: float | None = None  # exact McNemar test of the drop from checkpoint-0
    possible_verdicts: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return asdict(self)


def measure_samples(
    root: str | Path,
    *,
    runs: Sequence[str] = ("spurious", "real"),
    settings: RecoverySettings = RECOVERY,
    progress: Callable[[str, int, int], None] | None = None,
) -> list[Truth]:
    """Truths of the control and of every checkpoint of ``runs`` under a samples directory."""
    root = Path(root)
    probes = {key: load_probe(root / "probes" / f"{stem}.jsonl") for key, stem in PROBE_FILES.items()}
    truths: list[Truth] = []
    for run in runs:
        result = recover(
            root / run / "checkpoint-0",
            root / run,
            probes["old"],
            control=root / "control",
            recovery_probe=probes["recovery"],
            settings=settings,
            progress=progress,
        )
        if not truths:
            control, rec = result.scores["control"], result.scores["control_recovered"]
            truths.append(
                Truth(
                    "control",
                    None,
                    control.exact_match,
                    control.first_token,
                    control.answer_loss,
                    rec.exact_match,
                    None,
                    None,
                )
            )
        for point in result.sequence:
            d = point.decision
            truths.append(
                Truth(
                    run,
                    point.step,
                    point.after.exact_match,
                    point.after.first_token,
                    point.after.answer_loss,
                    point.recovered.exact_match,
                    d.verdict,
                    _new_task(root / run, point.label, probes[run]),
                    d.spurious_fraction,
                    d.intervals.get("spurious_fraction"),
                    d.p_value,
                    d.possible_verdicts,
                )
            )
    return truths


def _new_task(run_dir: Path, label: str, probe) -> float:
    (checkpoint,) = find_checkpoints(run_dir / label)
    tokenizer = load_tokenizer(checkpoint)
    return score(
        load_model(checkpoint), encode(tokenizer, probe), pad_id=tokenizer.pad_token_id, batch_size=128
    ).exact_match
