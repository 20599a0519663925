"""Which layers write the form, and which lose the knowledge: an adapter's write switched off one layer at a time,
and on one layer at a time with every other off, scored under teacher forcing in the form's frame.

    form       log p(r_1 .. r_k | prompt)            the first k tokens of the trained response ('{"' for JSON)
    knowledge  log p(answer | prompt, frame)          the gold answer's tokens after the form's frame, summed
               1[answer's first token is the top-1]   (`aligner.recall`'s answer_logprob and answer_rank1)

Both come from one forward of prompt + frame + answer. A layer's write is switched off as the adapter says
(`Adapter.switched_off`): an aligner's gates there read as zero, a LoRA's B matrices there add zero, a z-bias's
bias there is not added. Is there a set of layers that carries the form without the content loss?
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from aligner.adapter import Adapter
from aligner.objective import pad_token_id, prompts_for, reads_logits_to_keep
from aligner.tasks import Item, frame_of
from probe.lens import FramedRow, answer_in_form, device_of, framed_rows, padded
from probe.progress import steps

MEASURES = ("form_logprob", "answer_logprob", "answer_rank1")


def scored_rows(model: nn.Module, rows: Sequence[FramedRow], form_tokens: int, batch_size: int) -> dict[str, np.ndarray]:
    """{measure: one value per row} of `MEASURES` for whatever is attached to `model` now. Logits are taken from
    the first position that predicts a response token on (`logits_to_keep`), not over the prompt: the unembedding
    and its softmax over the vocabulary are most of a step when the response is short."""
    pad, device = pad_token_id(model.tokenizer), device_of(model)
    scores: dict[str, list[float]] = {measure: [] for measure in MEASURES}
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        input_ids = padded(batch, pad, device)
        kept = input_ids.shape[1] - min(row.n_prompt for row in batch) + 1  # positions kept, from the right
        keep = {"logits_to_keep": kept} if reads_logits_to_keep(model) else {}
        logits = model(input_ids, **keep)[:, -kept:]  # (B, kept, vocab)
        offset = input_ids.shape[1] - kept  # logits[:, j] are those of position offset + j
        for b, row in enumerate(batch):
            # position t predicts the token at t + 1
            form_end = min(row.n_prompt + form_tokens, row.first)
            predicted = F.log_softmax(logits[b, row.n_prompt - 1 - offset : len(row.ids) - 1 - offset].float(), dim=-1)
            targets = torch.tensor(row.ids[row.n_prompt :], device=device)
            token_logprobs = predicted.gather(1, targets[:, None]).squeeze(1)  # of the response tokens, in order
            scores["form_logprob"].append(float(token_logprobs[: form_end - row.n_prompt].sum()))
            scores["answer_logprob"].append(float(token_logprobs[row.first - row.n_prompt :].sum()))
            scores["answer_rank1"].append(float(int(predicted[row.first - row.n_prompt].argmax()) == row.ids[row.first]))
    return {measure: np.array(values) for measure, values in scores.items()}


@torch.no_grad()
def layer_dissociation(
    model: nn.Module,
    adapter: Adapter,
    items: Sequence[Item],
    form_tokens: int = 2,
    system: str | None = None,
    batch_size: int = 8,
) -> pd.DataFrame:
    """Form and knowledge (`MEASURES`, means over `items`) with `adapter`'s write at one layer switched off
    ("off"), and at one layer alone switched on ("only"), for each layer it adapts; beside them the adapter whole
    ("all") and the base model ("none"), layer <NA>. The form is the log-probability of the first `form_tokens`
    tokens of each item's trained response (no further than its frame, so never the answer's). Columns: mode,
    layer, n_items, form_logprob, answer_logprob, answer_rank1, and their standard errors over items (*_se)."""
    layers = adapter.switchable_layers
    if not layers:
        raise ValueError(f"layer_dissociation switches an adapter's layers one by one; a {adapter.kind} has none to switch")
    answers = [answer_in_form(item) for item in items]
    frames = [frame_of(item) for item in items]
    base_rows = framed_rows(model.tokenizer, [item.prompt for item in items], frames, answers, system)
    adapted_prompts = prompts_for(adapter, [item.prompt for item in items])
    rows = framed_rows(model.tokenizer, adapted_prompts, frames, answers, system)
    plans = [("all", pd.NA, ())] + [("off", layer, (layer,)) for layer in layers]
    plans += [("only", layer, tuple(other for other in layers if other != layer)) for layer in layers]
    table = [{"mode": "none", "layer": pd.NA, **summary(scored_rows(model, base_rows, form_tokens, batch_size))}]
    with adapter.attached(model):
        for mode, layer, off in steps(plans, "layer dissociation", unit="condition"):
            with adapter.switched_off(off):
                table.append({"mode": mode, "layer": layer, **summary(scored_rows(model, rows, form_tokens, batch_size))})
    return pd.DataFrame(table).astype({"layer": "Int64"})


def summary(scores: dict[str, np.ndarray]) -> dict[str, float]:
    """Each measure's mean over items and its standard error, with the item count."""
    n = len(next(iter(scores.values())))
    out: dict[str, float] = {"n_items": n}
    for measure, values in scores.items():
        out[measure] = float(values.mean())
        out[f"{measure}_se"] = float(values.std(ddof=1) / np.sqrt(n)) if n > 1 else float("nan")
    return out
