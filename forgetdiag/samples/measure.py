"""The truths the samples carry, measured: accuracy and recovered accuracy per checkpoint.

For every checkpoint of a run: greedy exact match on the old task's held-out people, and the
same after *recovery* (a copy fine-tuned for one epoch on the old task's other half, AdamW,
lr 1e-4, batch 32, loss on answer tokens only; SCIENCE.md section 1); the control gets the
same recovery. Scoring and training are the package's shared core
(:func:`forgetdiag.evaluate.score`, :func:`forgetdiag.training.train`).
"""

from __future__ import annotations

import copy
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from forgetdiag.evaluate import Scores, encode, score
from forgetdiag.probes import ProbeItem, load_probe
from forgetdiag.training import TrainConfig, train

RECOVERY = TrainConfig(epochs=1, lr=1e-4, batch_size=32, seed=0)
_STEP = re.compile(r"^checkpoint-(\d+)$")


def load_sample(path: str | Path):
    """``(model, tokenizer)`` of a sample directory, the model in float32 and eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32,
                                                 local_files_only=True)
    return model.eval(), AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def accuracy(model, tokenizer, items: Sequence[ProbeItem]) -> Scores:
    """Exact match, first-token accuracy and answer loss of ``model`` on ``items``."""
    return score(model, encode(tokenizer, items), pad_id=tokenizer.pad_token_id, batch_size=128)


def recovered(model, tokenizer, recovery: Sequence[ProbeItem], evaluation: Sequence[ProbeItem],
              config: TrainConfig = RECOVERY) -> Scores:
    """Scores on ``evaluation`` of a copy of ``model`` fine-tuned on ``recovery``."""
    copied = copy.deepcopy(model)
    train(copied, encode(tokenizer, recovery), config, pad_id=tokenizer.pad_token_id)
    return accuracy(copied, tokenizer, evaluation)


@dataclass(frozen=True)
class Truth:
    """One checkpoint's numbers (exact match unless named otherwise)."""

    run: str
    step: int | None  # None: the control
    accuracy: float  # old task, held-out people
    first_token: float
    answer_loss: float
    recovered: float  # old task, held-out people, after recovery
    new_task: float | None  # the run's own task 1

    def to_dict(self) -> dict:
        return asdict(self)


def measure_checkpoint(path: Path, run: str, probes: dict[str, Sequence[ProbeItem]], *,
                       new: str | None = None, config: TrainConfig = RECOVERY) -> Truth:
    """The :class:`Truth` of one checkpoint directory."""
    model, tokenizer = load_sample(path)
    before = accuracy(model, tokenizer, probes["old"])
    after = recovered(model, tokenizer, probes["recovery"], probes["old"], config)
    step = _STEP.match(path.name)
    new_task = accuracy(model, tokenizer, probes[new]).exact_match if new else None
    return Truth(run, int(step.group(1)) if step else None, before.exact_match,
                 before.first_token_accuracy, before.answer_loss, after.exact_match, new_task)


def run_checkpoints(run_dir: Path) -> list[Path]:
    """``checkpoint-N`` subdirectories in step order."""
    found = [p for p in run_dir.iterdir() if p.is_dir() and _STEP.match(p.name)]
    return sorted(found, key=lambda p: int(_STEP.match(p.name).group(1)))


def measure_samples(root: str | Path, *, runs: Sequence[str] = ("spurious", "real"),
                    config: TrainConfig = RECOVERY,
                    progress: Callable[[str, int, int], None] | None = None) -> list[Truth]:
    """Truths of the control and of every checkpoint of ``runs`` under a samples directory."""
    root = Path(root)
    names = {"old": "task0_heldout", "recovery": "task0_recovery",
             "spurious": "task1_spurious", "real": "task1_real"}
    probes = {key: load_probe(root / "probes" / f"{stem}.jsonl").items
              for key, stem in names.items()}
    jobs = [("control", root / "control")]
    jobs += [(run, path) for run in runs for path in run_checkpoints(root / run)]
    truths = []
    for done, (run, path) in enumerate(jobs):
        new = run if run in probes else None
        truths.append(measure_checkpoint(path, run, probes, new=new, config=config))
        if progress is not None:
            progress("measuring", done + 1, len(jobs))
    return truths
