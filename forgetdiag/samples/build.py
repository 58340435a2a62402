"""Build the sample checkpoints from seeds: runs that forget spuriously and for real.

The pipeline (every step uses the package's shared core, :func:`forgetdiag.training.train` and
:func:`forgetdiag.evaluate.encode`):

1. a world of people (:mod:`forgetdiag.samples.world`) and a word-level tokenizer;
2. pretrain a tiny Llama on freshly drawn biographies of group A;
3. task 0: QA fine-tune on ``a_train`` (the model then answers about ``a_heldout`` too: the
   knowledge comes from the biographies). The result is ``checkpoint-0`` of both runs;
4. ``spurious`` run: task 1 = QA about new people (group B): the old task's answers collapse
   although the knowledge of group A is untouched;
5. ``real`` run: task 1 = contradicting biographies and QA about group A: the knowledge is
   overwritten;
6. ``control``: steps 2-3 on group C, so it knows the language and the QA format but never
   saw group A;
7. probes (JSONL) and one ``forgetdiag.toml`` per run.

Checkpoints are saved in bfloat16 (safetensors) with the tokenizer, as Trainer-style
``checkpoint-N`` directories. :func:`build_samples` writes into a temporary directory next to
the target and renames it at the end, so a failed build leaves nothing behind.
"""

from __future__ import annotations

import copy
import json
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from forgetdiag.errors import ForgetdiagError
from forgetdiag.evaluate import encode
from forgetdiag.layout import enclosing_checkpoint
from forgetdiag.models import quiet_transformers
from forgetdiag.probes import ProbeItem
from forgetdiag.runtime import torch_threads
from forgetdiag.samples import world as bio
from forgetdiag.samples.measure import Truth, measure_samples
from forgetdiag.samples.remedies import REMEDIES, task1_plan
from forgetdiag.samples.tokenizer import train_tokenizer
from forgetdiag.training import TrainConfig, train
from forgetdiag.validate import check_choice, check_number

Progress = Callable[[str, int, int], None]
PROBES = {
    "old": "task0_heldout.jsonl",
    "recovery": "task0_recovery.jsonl",
    "spurious": "task1_spurious.jsonl",
    "real": "task1_real.jsonl",
}


@dataclass(frozen=True)
class SampleConfig:
    """Every number of the build; the defaults are the shipped samples.

    Stage seeds are derived from ``seed`` (``seed * 100 + k``), so one seed fixes the build.
    """

    seed: int = 0
    n_a: int = 500  # group A, halved into task 0 (recovery) and held-out people
    n_b: int = 250  # new people of the spurious run's task 1
    n_c: int = 250  # the control's people
    hidden_size: int = 128
    intermediate_size: int = 512
    n_layers: int = 4
    n_heads: int = 4
    context: int = 128
    pretrain_epochs: int = 150  # fresh biographies of every person per epoch
    pretrain_lr: float = 2e-3
    pretrain_batch: int = 64
    pretrain_warmup: int = 50
    pretrain_weight_decay: float = 0.1
    control_pretrain_epochs: int = 50  # enough for the language; its facts do not matter
    task0_epochs: int = 5  # more overfits the task-0 people: held-out accuracy falls
    task0_lr: float = 3e-4
    qa_batch: int = 32  # task 0, task 1
    spurious_lr: float = 3e-4
    real_lr: float = 1e-3
    real_bio_copies: int = 3  # contradicting biographies per person in the real run's data
    task1_steps: int = 300
    # six checkpoints per run keep the samples under 30 MB (2.2 MB each in bf16)
    checkpoint_steps: tuple[int, ...] = (0, 10, 50, 100, 200)  # and the last step
    spurious_after: int = 100  # the named after-checkpoints (steps)
    real_after: int = 300  # the last step: the cleanest real loss (recovery near the control)
    landscape_x: int = 100  # task-1 step where task 0 has collapsed (landscape x end)
    # the spurious run's task 1 with a remedy (forgetdiag.samples.remedies; docs/remedy.md)
    remedy: str = "none"
    freeze_layers: int | None = None  # freeze: the embedding and the bottom N layers (default 1)
    replay_ratio: float = 0.1  # replay: task-0 rows' share of the training rows
    rewrite_prompt: str = "{prompt}{answer}\n{prompt}"  # self-output: the old model restates
    mask_threshold: float = 0.01  # mask: tokens the old model gives less probability are dropped
    lora_rank: int = 16  # lora: rank (alpha = 2 x rank, every linear layer of the blocks)
    lora_lr: float | None = None  # lora: learning rate (default: the run's own)
    threads: int = 1  # torch threads while building (1 is fastest for models this small)
    dtype: str = "bfloat16"  # saved weights

    def __post_init__(self) -> None:
        check_choice("--remedy", self.remedy, REMEDIES)
        if self.freeze_layers is not None:
            if self.remedy not in ("none", "freeze"):
                raise ForgetdiagError(f"--freeze {self.freeze_layers}: goes with --remedy freeze, not {self.remedy}")
            if not 0 <= self.freeze_layers <= self.n_layers:
                raise ForgetdiagError(
                    f"--freeze {self.freeze_layers}: expected 0 to {self.n_layers} (the model has {self.n_layers} layers)"
                )
            object.__setattr__(self, "remedy", "freeze")  # --freeze N alone is --remedy freeze
        elif self.remedy == "freeze":
            object.__setattr__(self, "freeze_layers", 1)  # what advise recommends on the shipped run
        check_number("--replay-ratio", self.replay_ratio, low=0, high=1, low_open=True, high_open=True)
        check_number("--mask-threshold", self.mask_threshold, low=0, high=1, low_open=True, high_open=True)
        check_number("--lora-rank", self.lora_rank, low=1, integer=True)
        check_number("--lora-lr", self.lora_lr, low=0, low_open=True, optional=True)

    def stage_seed(self, k: int) -> int:
        return self.seed * 100 + k

    def saved_steps(self) -> tuple[int, ...]:
        """Checkpoint steps of each run, the last step included."""
        return tuple(sorted({s for s in self.checkpoint_steps if s < self.task1_steps} | {self.task1_steps}))

    @classmethod
    def miniature(cls, seed: int = 0, **overrides) -> SampleConfig:
        """A build of a few seconds with the same layout (for tests; the truths do not hold)."""
        return cls(
            **{
                **dict(
                    seed=seed,
                    n_a=20,
                    n_b=10,
                    n_c=10,
                    hidden_size=32,
                    intermediate_size=64,
                    n_layers=2,
                    n_heads=2,
                    pretrain_epochs=2,
                    control_pretrain_epochs=1,
                    pretrain_warmup=2,
                    task0_epochs=1,
                    task1_steps=6,
                    checkpoint_steps=(0, 2, 4),
                    spurious_after=2,
                    real_after=4,
                    landscape_x=2,
                    real_bio_copies=1,
                ),
                **overrides,
            }
        )


def build_samples(
    out: str | Path, config: SampleConfig = SampleConfig(), *, progress: Progress | None = None
) -> list[Truth]:
    """Build every sample into ``out`` (which must not exist or be empty), measure the truths
    it carries (:func:`forgetdiag.samples.measure.measure_samples`) and return them; they are
    also written to ``out/measurements.json`` with the config.

    Raises:
        ForgetdiagError: ``out`` is a file or a non-empty directory.
    """
    out = Path(out)
    inside = enclosing_checkpoint(out)
    if inside is not None:
        raise ForgetdiagError(
            f"{out}: refusing to build inside the checkpoint directory {inside}; forgetdiag never "
            "writes into checkpoints, choose another directory"
        )
    if out.is_file() or (out.is_dir() and any(out.iterdir())):
        raise ForgetdiagError(
            f"{out}: refusing to build into an existing "
            f"{'file' if out.is_file() else 'non-empty directory'}; expected a "
            "new or empty directory"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.building-", dir=out.parent))
    try:
        with torch_threads(config.threads):
            remedy = build_tree(work, config, progress=progress)
            truths = measure_samples(work, progress=progress)
        record = {"config": asdict(config), "remedy": remedy, "truths": [t.to_dict() for t in truths]}
        (work / "measurements.json").write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
        if out.is_dir():
            out.rmdir()  # empty, checked above
        work.rename(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)  # gone after the rename unless the build failed
    return truths


def build_tree(root: Path, config: SampleConfig, *, progress: Progress | None = None) -> dict:
    """Everything of :func:`build_samples`, written into the existing directory ``root``;
    returns what the spurious run's remedy did (:func:`run_task1`)."""
    world, tokenizer, data = prepare(config)
    for key, items in data.items():
        if key in PROBES:
            write_probe(root / "probes" / PROBES[key], items)

    base = trained_base(
        tokenizer,
        world.group_a,
        data["recovery"],
        config,
        seed=1,
        epochs=config.pretrain_epochs,
        label="group A",
        progress=progress,
    )
    remedy = {}
    for name, lr in (("spurious", config.spurious_lr), ("real", config.real_lr)):
        items = data[f"{name}_train"]
        remedy[name] = run_task1(
            base,
            tokenizer,
            items,
            root / name,
            lr=lr,
            config=config,
            seed=config.stage_seed(3 if name == "spurious" else 4),
            remedy=config.remedy if name == "spurious" else "none",
            data=data,
            progress=_labelled(progress, f"task 1 ({name})"),
        )
        after = config.spurious_after if name == "spurious" else config.real_after
        write_run_file(root / name, name, after=after, landscape_x=config.landscape_x, last=config.task1_steps)

    control_task0 = bio.qa_items(world.c[: len(world.c) // 2])
    control = trained_base(
        tokenizer,
        world.c,
        control_task0,
        config,
        seed=5,
        epochs=config.control_pretrain_epochs,
        label="control (group C)",
        progress=progress,
    )
    save_model(control, tokenizer, root / "control", dtype=config.dtype)
    return {"name": config.remedy, **remedy["spurious"]}


def prepare(config: SampleConfig):
    """The world of people, its word-level tokenizer and :func:`task_data`; all from seeds."""
    world = bio.make_world(config.stage_seed(0), n_a=config.n_a, n_b=config.n_b, n_c=config.n_c)
    tokenizer = train_tokenizer(bio.vocabulary_texts(world), model_max_length=config.context)
    return world, tokenizer, task_data(world, config)


def task_data(world: bio.World, config: SampleConfig) -> dict[str, list[ProbeItem]]:
    """Probe rows and task-1 training items.

    Keys: ``old`` (held-out half of A), ``recovery`` (task 0: the other half), ``spurious``
    (QA about group B), ``real`` (contradicting QA about group A), and the task-1 training
    sets ``spurious_train`` (= ``spurious``) and ``real_train`` (contradicting QA plus
    contradicting biographies, as plain text items with an empty prompt).
    """
    liars = bio.contradicted(world, world.group_a, seed=config.stage_seed(2))
    real_qa = bio.qa_items(liars)
    real_bios = [
        ProbeItem("", text, group=None)
        for text in bio.biographies(liars, config.real_bio_copies, seed=config.stage_seed(2))
    ]
    spurious_qa = bio.qa_items(world.b)
    return {
        "old": bio.qa_items(world.a_heldout),
        "recovery": bio.qa_items(world.a_train),
        "spurious": spurious_qa,
        "real": real_qa,
        "spurious_train": spurious_qa,
        "real_train": real_qa + real_bios,
    }


def trained_base(
    tokenizer,
    people: Sequence[bio.Person],
    task0: Sequence[ProbeItem],
    config: SampleConfig,
    *,
    seed: int,
    epochs: int,
    label: str,
    progress: Progress | None = None,
):
    """A fresh model pretrained on the biographies of ``people``, then QA-tuned on ``task0``."""
    model = make_model(tokenizer, config, seed=config.stage_seed(seed))
    texts = bio.biographies(people, epochs, seed=config.stage_seed(seed))
    bios = encode(tokenizer, [ProbeItem("", text) for text in texts])  # prompt = [BOS]
    pretrain = TrainConfig(
        epochs=1,
        lr=config.pretrain_lr,
        batch_size=config.pretrain_batch,
        schedule="cosine",
        warmup_steps=config.pretrain_warmup,
        weight_decay=config.pretrain_weight_decay,
        seed=config.stage_seed(seed),
    )
    train(model, bios, pretrain, pad_id=tokenizer.pad_token_id, progress=_labelled(progress, f"pretraining on {label}"))
    qa = TrainConfig(
        epochs=config.task0_epochs, lr=config.task0_lr, batch_size=config.qa_batch, seed=config.stage_seed(seed)
    )
    train(
        model,
        encode(tokenizer, task0),
        qa,
        pad_id=tokenizer.pad_token_id,
        progress=_labelled(progress, f"task 0 on {label}"),
    )
    return model


def make_model(tokenizer, config: SampleConfig, *, seed: int):
    """A randomly initialised tiny Llama (tied embeddings) for ``tokenizer``; seeded."""
    from transformers import LlamaConfig, LlamaForCausalLM

    llama = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.n_layers,
        num_attention_heads=config.n_heads,
        num_key_value_heads=config.n_heads,
        max_position_embeddings=config.context,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng():  # leave the caller's global RNG as it was
        torch.manual_seed(seed)
        model = LlamaForCausalLM(llama)
    return model.eval()


def run_task1(
    base,
    tokenizer,
    items: Sequence[ProbeItem],
    run_dir: Path,
    *,
    lr: float,
    config: SampleConfig,
    seed: int,
    remedy: str = "none",
    data: dict[str, list[ProbeItem]] | None = None,
    progress: Progress | None = None,
) -> dict:
    """Fine-tune a copy of ``base`` on ``items`` (constant lr) and save ``checkpoint-N`` at
    every step of :meth:`SampleConfig.saved_steps` (``checkpoint-0`` is ``base`` itself).

    ``remedy`` changes one thing of the recipe (:mod:`forgetdiag.samples.remedies`; ``data`` is
    :func:`task_data`, which replay draws from). Returns what the remedy did, in numbers.
    """
    save_model(base, tokenizer, run_dir / "checkpoint-0", dtype=config.dtype)
    plan = task1_plan(
        base, tokenizer, items, remedy=remedy, config=config, data=data or {}, old_checkpoint=run_dir / "checkpoint-0"
    )
    steps = set(config.saved_steps())

    def on_step(step: int, loss: float) -> None:
        if step in steps:
            save_model(plan.merged(), tokenizer, run_dir / f"checkpoint-{step}", dtype=config.dtype)

    if remedy == "lora" and config.lora_lr is not None:
        lr = config.lora_lr
    task1 = TrainConfig(lr=lr, batch_size=config.qa_batch, max_steps=config.task1_steps, seed=seed)
    pad = tokenizer.pad_token_id
    train(plan.model, plan.encoded, task1, pad_id=pad, on_step=on_step, progress=progress, keep=plan.keep)
    return plan.notes


def save_model(model, tokenizer, path: Path, *, dtype: str = "bfloat16") -> None:
    """``save_pretrained`` of a ``dtype`` copy (safetensors) and of the tokenizer.

    The tokenizer config names ``PreTrainedTokenizerFast``, a class every transformers
    version since 4 knows, so that ``AutoTokenizer`` loads it offline with older versions too.
    """
    with quiet_transformers():
        copy.deepcopy(model).to(getattr(torch, dtype)).save_pretrained(path)  # safetensors
        tokenizer.save_pretrained(path)
    config_file = path / "tokenizer_config.json"
    settings = json.loads(config_file.read_text(encoding="utf-8"))
    settings["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_file.write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")


def write_probe(path: Path, items: Sequence[ProbeItem]) -> None:
    """Probe rows as JSONL: ``{"prompt": ..., "answer": ..., "group": <person>}``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for item in items:
            handle.write(json.dumps({"prompt": item.prompt, "answer": item.answer, "group": item.group}) + "\n")


RUN_DESCRIPTIONS = {
    "spurious": (
        "Task 1 = QA about new people (group B). Task-0 answers about group A collapse "
        "within the first steps, but the knowledge stays: one epoch on the task-0 QA "
        "of half of group A brings the held-out half back."
    ),
    "real": (
        "Task 1 = contradicting biographies and QA about group A. The old facts are "
        "overwritten: recovery on half of group A does not bring the held-out half back."
    ),
}


def write_run_file(run_dir: Path, name: str, *, after: int, landscape_x: int, last: int) -> None:
    """``run_dir/forgetdiag.toml`` (format: :mod:`forgetdiag.runfile`)."""
    lines = [
        f'name = "{name}"',
        f'description = "{RUN_DESCRIPTIONS[name]}"',
        f'expected_verdict = "{name}"',
        "",
        "[checkpoints]",
        'before = "checkpoint-0"',
        f'after = "checkpoint-{after}"',
        'control = "../control"',
        'run = "."',
        f'landscape = ["checkpoint-0", "checkpoint-{landscape_x}", "checkpoint-{last}"]',
        "",
        "[probes]",
        f'old = "../probes/{PROBES["old"]}"',
        f'recovery = "../probes/{PROBES["recovery"]}"',
        f'new = "../probes/{PROBES[name]}"',
    ]
    (run_dir / "forgetdiag.toml").write_text("\n".join(lines) + "\n", encoding="utf-8")


def _labelled(progress: Progress | None, label: str) -> Progress | None:
    """``progress`` with its description replaced by ``label``."""
    if progress is None:
        return None
    return lambda _description, done, total: progress(label, done, total)
