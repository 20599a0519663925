"""Baselines that need no training: steering vectors (contrastive activation addition).

CAA (Rimsky et al. 2024; Turner et al. 2023): the mean difference of the residual stream between responses
that show a behaviour and responses that do not, taken over the response tokens of the same prompts, added
(times a multiplier) at every position of one layer's `hook_resid_pre`. A one-token aligner adds a constant
to every position too (see aligner.methods), learned and spread over all adapted layers; this is the same kind
of intervention with no training at all. The vector is held by `aligner.methods.SteeringVector`. The layer and
multiplier are chosen by the loss of held-out target responses, as the trained methods are stopped.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from tqdm import tqdm

from aligner.data import Example
from aligner.methods import SteeringConfig, SteeringVector
from aligner.objective import (
    IGNORE_INDEX,
    Formatting,
    heldout_loss,
    make_batch,
    pad_token_id,
    tokenize_examples,
)
from aligner.tasks.spec import Item


def contrastive_vectors(
    model: nn.Module, items: Sequence[Item], system: str | None = None, batch_size: int = 8
) -> torch.Tensor:
    """(n_layers, d_model): for each layer, the mean over `items` of [mean residual over the tokens of
    `item.response`] - [the same over `item.contrast`], both after the same prompt. Items without a contrast
    are left out."""
    pairs = [item for item in items if item.contrast is not None]
    if not pairs:
        raise ValueError("steering vectors need items with a contrast response; this task has none")
    examples = [Example(i.prompt, r) for i in pairs for r in (i.response, i.contrast)]  # positive, negative, ...
    sequences = tokenize_examples(model.tokenizer, examples, Formatting(system))
    signs = torch.tensor([1.0, -1.0] * len(pairs))
    names = [f"blocks.{layer}.hook_resid_pre" for layer in range(model.cfg.n_layers)]
    total = torch.zeros(model.cfg.n_layers, model.cfg.d_model)
    device = next(model.parameters()).device
    for start in tqdm(range(0, len(sequences), batch_size), desc="steering vectors", unit="batch"):
        input_ids, labels = make_batch(sequences[start : start + batch_size], pad_token_id(model.tokenizer))
        response = (labels != IGNORE_INDEX).float()  # (B, T): the response's tokens (end of turn included)
        weights = signs[start : start + batch_size, None] * response / response.sum(dim=1, keepdim=True)
        with torch.no_grad():
            _, cache = model.run_with_cache(input_ids.to(device), names_filter=names)
        for layer, name in enumerate(names):
            total[layer] += torch.einsum("bt,btd->d", weights, cache[name].float().cpu())
    return total / len(pairs)


def fit_steering(
    model: nn.Module,
    train: Sequence[Item],
    valid: Sequence[Item],
    layers: Sequence[int],
    multipliers: Sequence[float],
    system: str | None = None,
    reach: int = 0,
) -> tuple[SteeringVector, dict[str, float]]:
    """The steering vector of `train`'s contrasts at the (layer, multiplier) whose held-out loss on `valid`'s
    target responses is lowest; also every candidate's loss, keyed "layer=L,multiplier=M". Where the best
    multiplier is the largest (or smallest) tried, the grid goes on past it, doubling (or halving), at most
    `reach` times: a grid that ends at its best has not found it."""
    vectors = contrastive_vectors(model, train, system)
    valid_examples = [Example(item.prompt, item.response) for item in valid]
    losses: dict[tuple[int, float], float] = {}
    steering = SteeringVector.for_model(model, SteeringConfig())

    def try_multipliers(grid: Sequence[float]) -> None:
        for layer in layers:
            steering.vector.copy_(vectors[layer])
            for multiplier in grid:
                steering.config = SteeringConfig(layer, multiplier)
                with steering.attached(model):
                    losses[layer, multiplier] = heldout_loss(model, valid_examples, system)

    grid = sorted(multipliers)
    try_multipliers(grid)
    for _ in range(reach):
        best = min(losses, key=losses.get)[1]
        if len(grid) < 2 or min(grid) < best < max(grid):
            break
        beyond = best * 2 if best == max(grid) else best / 2
        grid = sorted([*grid, beyond])
        try_multipliers([beyond])
    layer, multiplier = min(losses, key=losses.get)
    steering.config = SteeringConfig(layer, multiplier)
    steering.vector.copy_(vectors[layer])
    return steering, {f"layer={l},multiplier={m}": loss for (l, m), loss in losses.items()}
