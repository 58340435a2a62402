"""Rich rendering of :class:`forgetdiag.analyses.inspect.InspectResult`."""

from __future__ import annotations

from rich import box
from rich.console import Group
from rich.table import Table
from rich.text import Text

from forgetdiag.analyses.inspect import InspectResult
from forgetdiag.render.fmt import human_bytes, human_count

_SHORT = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}


def inspect_table(result: InspectResult) -> Group:
    """The architecture (one per sequence), then one row per checkpoint in sequence order."""
    first = result.checkpoints[0]
    head = Text.assemble(
        (first.architecture, "bold"),
        f" ({first.family} family): ",
        f"{first.n_layers} layers, hidden {first.hidden_size}, "
        f"{human_count(first.n_params)} parameters" + (", tied embeddings" if first.tied_embeddings else ""),
    )
    table = Table(box=box.SIMPLE_HEAD, title_justify="left", pad_edge=False)
    for column, justify in (
        ("#", "right"),
        ("checkpoint", "left"),
        ("step", "right"),
        ("format", "left"),
        ("dtype", "left"),
        ("size", "right"),
        ("tokenizer", "left"),
    ):
        table.add_column(column, justify=justify, no_wrap=column != "checkpoint")
    for k, c in enumerate(result.checkpoints):
        fmt = c.format if c.lora is None else f"lora r={c.lora['rank']}"
        table.add_row(
            str(k),
            c.label,
            "" if c.step is None else str(c.step),
            fmt,
            ",".join(_SHORT.get(d, d) for d in c.dtypes),
            human_bytes(c.size_bytes),
            "yes" if c.tokenizer else "no",
        )
    lines = [head, table]
    if first.experts:
        lines.append(
            Text(
                f"Mixture of experts: {first.experts} routed experts in {first.moe_layers} of {first.n_layers} "
                "layers (angles summarises them per layer and component; the JSON keeps each)."
            )
        )
    for tower, count in first.towers.items():
        lines.append(Text(f"Not text: {tower} ({count} tensors), left out of the text analyses."))
    for c in result.checkpoints:
        if c.duplicate_of is not None:
            lines.append(Text(f"{c.label} is a duplicate of {c.duplicate_of}: the same bytes.", style="yellow"))
    for c in {c.components: c for c in result.checkpoints}.values():
        text = f"Weight matrices understood: {' '.join(c.components) or 'none'}"
        if c.unrecognised:
            text += f"; {c.unrecognised} 2-D weights not recognised (left out of angles)"
        lines.append(Text(text))
    for c in result.checkpoints:
        if c.lora is not None:
            lines.append(
                Text(
                    f"{c.label}: LoRA r={c.lora['rank']} alpha={c.lora['alpha']} on "
                    f"{c.lora['targets']} weights over {c.lora['base']}"
                )
            )
    if len(result.checkpoints) > 1:
        lines.append(Text(f"Compatible: one architecture, {result.shared_tensors} shared tensors.", style="green"))
    checked = all(c.values_checked for c in result.checkpoints)
    lines.append(
        Text(
            "All weights finite (every tensor read once)." if checked else "Weight values not read (--no-check-values)."
        )
    )
    lines.extend(Text(f"Note: {n}", style="yellow") for n in result.warnings)
    return Group(*lines)
