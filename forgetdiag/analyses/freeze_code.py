"""The freeze ``advise`` recommends, as code to paste: a ``requires_grad_(False)`` loop over the
model's own parameter names, and the PEFT and Trainer equivalents (each one tested by running it).

Layers are matched by their parsed index (``layers.1.`` never matches layer 10). A frozen
mixture-of-experts layer is frozen whole: its router, shared experts and every routed expert
(per-expert modules in transformers 4, fused 3-D parameters in transformers 5). A multimodal
wrapper's vision tower has layers of its own: the loop leaves it alone.
"""

from __future__ import annotations

import json
import math

from forgetdiag.architectures import LAYER_PATTERN, TOWERS, Component
from forgetdiag.storage import Checkpoint


def frozen_parameters(checkpoint: Checkpoint, n: int, embed: bool) -> tuple[list[str], int]:
    """The checkpoint's own tensor names the advice freezes, and their parameter count."""
    names, count = [], 0
    for name, meta in checkpoint.meta.items():
        tensor = checkpoint.parse(name)
        if (tensor.layer is not None and tensor.layer < n) or (embed and tensor.component == "embed"):
            names.append(name)
            count += math.prod(meta.shape)
    return names, count


def code_snippets(checkpoint: Checkpoint, n: int, embed: bool) -> dict[str, str]:
    """Ready-to-paste code: a requires_grad_(False) loop, the PEFT and Trainer equivalents.

    Layers are matched by their parsed index; the comment lists the checkpoint's own names.
    Each snippet runs on its own given ``model`` (the Trainer one also ``training_args`` and
    ``train_dataset``, the user's as before).
    """
    layer_names = [k for k in checkpoint.meta if checkpoint.parse(k).layer == 0]
    container = layer_names[0].split(".0.")[0].rpartition(".")[2] if layer_names else "layers"
    loop = _freeze_loop(checkpoint, layer_names, n, embed)
    n_layers = checkpoint.n_layers or 0
    routed = [k for k in layer_names if (checkpoint.parse(k).spec or _PLAIN).routed]
    modules = list(
        dict.fromkeys(
            k.rpartition(".")[0].rpartition(".")[2]
            for k in layer_names
            if checkpoint.parse(k).is_matrix_weight and k not in routed and checkpoint.parse(k).component != "router"
        )
    )
    experts = (
        "# the routed experts and routers are left to their own settings: transformers 5\n"
        "# holds the experts as fused 3-D parameters, which PEFT adapts via target_parameters\n"
        if routed
        else ""
    )
    peft = (
        "from peft import LoraConfig, get_peft_model\n\n"
        "# adapters on the upper layers only; the base model (the embedding and\n"
        f"# the bottom {n} layers with it) stays frozen under LoRA\n" + experts + ""
        f"config = LoraConfig(\n    r=16, lora_alpha=32,\n    target_modules={json.dumps(modules)},\n"
        f"    layers_to_transform=list(range({n}, {n_layers})),\n"
        f'    layers_pattern="{container}",\n)\nmodel = get_peft_model(model, config)\n'
    )
    # Trainer has no freeze option; its create_optimizer() takes only the parameters with
    # requires_grad, so freezing before it is built is the Trainer setting
    trainer = (
        "import re\n\nfrom transformers import Trainer\n\n"
        + loop
        + "\n# Trainer.create_optimizer() hands the optimizer only the parameters that still\n"
        "# require gradients: the frozen ones get no updates and no optimizer state\n"
        "# (training_args, train_dataset: your TrainingArguments and dataset, as before)\n"
        "trainer = Trainer(model=model, args=training_args, train_dataset=train_dataset)\n"
        "trainer.train()\n"
    )
    return {"torch": "import re\n\n" + loop, "peft": peft, "trainer": trainer}


def _freeze_loop(checkpoint: Checkpoint, layer_names: list[str], n: int, embed: bool) -> str:
    """The requires_grad_(False) loop over parsed layer indices (needs ``import re``)."""
    pattern = LAYER_PATTERN.pattern.split("(.+)")[0].replace("(?:^|\\.)", "\\.")
    embed_names = [k for k in checkpoint.meta if checkpoint.parse(k).component == "embed"]
    shown = (
        (embed_names[:1] if embed else []) + [f"{layer_names[0].split('.0.')[0]}.{k}.*" for k in range(n)]
        if layer_names
        else embed_names[:1]
    )
    what = " and the input embedding" if embed else ""
    experts = checkpoint.experts
    moe = (
        f"# each frozen layer whole: attention, router and its {max(experts.values())} routed experts\n"
        if experts
        else ""
    )
    towers = sorted(checkpoint.towers)
    skip = (
        f'TOWER = re.compile(r"(?:^|\\.)(?:{"|".join(t for t in TOWERS if t in towers)})\\.")  # left as they are\n'
        if towers
        else ""
    )
    return (
        f"FREEZE_LAYERS = {n}  # bottom layers{what} (forgetdiag advise)\n"
        f"# freezes {', '.join(shown)}\n" + moe + '# the layer index is parsed: "layers.1." never matches layer 10\n'
        f'LAYER = re.compile(r"{pattern}")\n'
        + skip
        + "\n"
        + ("model.get_input_embeddings().requires_grad_(False)\n" if embed else "")
        + "for name, param in model.named_parameters():\n"
        "    match = LAYER.search(name)\n"
        + (
            "    if match and int(match.group(1)) < FREEZE_LAYERS and not TOWER.search(name):\n"
            if towers
            else "    if match and int(match.group(1)) < FREEZE_LAYERS:\n"
        )
        + "        param.requires_grad_(False)\n"
    )


_PLAIN = Component("")
