"""The revert test of ``advise``: the after model with its input embedding and bottom layers
put back to the before weights, scored depth by depth, and the paired statistics of it."""

from __future__ import annotations

import math

import torch

from forgetdiag.binding import bind
from forgetdiag.evaluate import score
from forgetdiag.models import load_model
from forgetdiag.runtime import ProgressFn, Runtime
from forgetdiag.storage import Checkpoint


def restore_intervals(before, after, series, *, seed: int = 0) -> tuple[float, list[tuple[float, float]]]:
    """(McNemar p of the drop, 95% interval of each depth's restore share), paired over the
    same items as the verdict's (:func:`forgetdiag.analyses.verdict.bootstrap`: the reverted
    model takes the recovered model's place, so the share is its spurious fraction)."""
    from forgetdiag.analyses.verdict import Outcomes, bootstrap, mcnemar

    p_value = mcnemar(before, after)[0]
    out = []
    for reverted in series:
        found = bootstrap(Outcomes(before, after, [reverted]), replicates=1000, confidence=0.95, seed=seed)
        out.append(found.get("spurious_fraction", (math.nan, math.nan)))
    return p_value, out


def untie_head(model) -> bool:
    """Give a tied output head its own copy of the weights, so that reverting the input
    embedding leaves the head at the after weights (True when it was tied)."""
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None or embed is None or head.weight is not embed.weight:
        return False
    head.weight = torch.nn.Parameter(head.weight.detach().clone(), requires_grad=head.weight.requires_grad)
    return True


def revert_series(
    before: Checkpoint,
    after: Checkpoint,
    encoded,
    *,
    pad_id: int,
    depths: int,
    runtime: Runtime = Runtime(),
    stops: frozenset[int] = frozenset(),
    progress: ProgressFn | None = None,
    observe=None,
):
    """Old-task scores of ``before``, ``after`` and of ``after`` with the input embedding and
    its bottom d layers set to the before weights, d = 0 .. ``depths``.

    One model in memory: the after model, into which the before tensors are streamed layer by
    layer (d grows, so each layer is copied once). With tied embeddings the output head first
    gets its own copy: only the input embedding is reverted, the head keeps the after weights.
    ``observe(depth, model)`` is called before each depth is scored (for tests).

    Returns:
        ``(before Scores, after Scores, [Scores at d = 0, 1, ...])``.
    """
    load = lambda c: load_model(c, runtime)
    run = lambda m: score(m, encoded, pad_id=pad_id, batch_size=runtime.batch_size, stops=stops, progress=progress)
    before_scores = run(load(before))
    model = load(after)
    after_scores = run(model)
    untie_head(model)
    # by name, a wrapper's prefix or as blocks of fused expert parameters (forgetdiag.binding)
    targets = bind(model, before.names, {n: m.shape for n, m in before.meta.items()}).targets
    groups: dict[int, list[str]] = {}
    for name in targets:
        tensor = before.parse(name)
        depth = tensor.layer + 1 if tensor.layer is not None else (0 if tensor.component == "embed" else None)
        if depth is not None:
            groups.setdefault(depth, []).append(name)
    series = []
    with torch.no_grad():
        for depth in range(depths + 1):
            for name in groups.get(depth, []):
                targets[name].write(before.get(name))
            if observe is not None:
                observe(depth, model)
            series.append(run(model))
    return before_scores, after_scores, series
