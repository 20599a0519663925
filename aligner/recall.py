"""Whether a fact is still there, whatever the generation does: the gold answer under teacher forcing.

A greedy answer that misses its gold string may have lost the fact, or only its form; this tells them apart. For
each item, the response is given up to the answer (its *frame*: '{"answer": "' in the JSON form, "The capital of
Chad is " in the base model's own sentence, nothing for a bare answer), and the model, with or without an
adapter, is read at the answer's tokens as they are tokenised in the whole response:

    answer_logprob  log p(answer tokens | prompt, frame), summed over the answer's tokens
    answer_rank1    1 where the answer's first token is the most likely next token after the frame, else 0

The same frame read by the base model says what the frame alone costs; the base model in its own sentence is
where the fact is readable at all. `knowledge_scores` reads both frames of a task's items (`Item.frame`,
`Item.own_frame`: cut where the form places the answer, not where its letters first occur, as "Th" in "The").
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from aligner.adapter import Adapter
from aligner.chat import example_ids
from aligner.generation import check_gate_scale, scaled
from aligner.objective import pad_token_id, prompts_for
from aligner.tasks.spec import Item

METRICS = ("answer_logprob", "answer_rank1")


@dataclass(frozen=True)
class Framed:
    prompt: str  # the user's turn
    frame: str  # the response before the answer
    answer: str  # the gold answer as it stands in the response (upper-cased in an all-caps form)


def answer_span(tokenizer, response_ids: Sequence[int], lead: str, answer: str) -> tuple[int, int]:
    """[first, last] indices of the tokens of `response_ids` that hold the answer: from the token in which the
    text passes `lead` to the one in which it covers `lead + answer`. A token that joins the frame's last
    characters to the answer's first ('"P') counts as the answer's: that is how the model must produce it."""
    first = last = None
    for k in range(len(response_ids)):
        covered = len(tokenizer.decode(response_ids[: k + 1], clean_up_tokenization_spaces=False))
        if first is None and covered > len(lead):
            first = k
        if covered >= len(lead) + len(answer):
            last = k
            break
    if first is None or last is None:
        raise ValueError(f"the answer {answer!r} is not in the tokens of its response {lead + answer!r}")
    return first, last


def answer_scores(
    model: nn.Module,
    adapter: Adapter | None,
    items: Sequence[Framed],
    system: str | None = None,
    raw_prompts: bool = False,
    batch_size: int = 4,
    gate_scale: float = 1.0,
) -> dict[str, list[float]]:
    """{metric: one value per item} (`METRICS`) with `adapter` attached (None: the base model), an aligner's
    gates times `gate_scale` as `generate` scales them."""
    tokenizer = model.tokenizer
    chat_template = not raw_prompts
    prompts = prompts_for(adapter, [item.prompt for item in items])
    rows = []  # (ids, position of the answer's first token, position of its last)
    for prompt, item in zip(prompts, items):
        response = item.frame + item.answer
        ids, n_prompt = example_ids(tokenizer, prompt, response, system=system, chat_template=chat_template)
        # example_ids puts one space after a base model's "Answer:"; the span is found in the text it tokenised
        lead = item.frame if not (chat_template and tokenizer.chat_template is None) else " " + item.frame
        first, last = answer_span(tokenizer, ids[n_prompt:-1], lead, item.answer)
        rows.append((ids[: n_prompt + last + 1], n_prompt + first, n_prompt + last))
    pad = pad_token_id(tokenizer)
    device = next(model.parameters()).device
    scores: dict[str, list[float]] = {metric: [] for metric in METRICS}
    starts = range(0, len(rows), batch_size)
    with contextlib.ExitStack() as stack:
        if adapter is not None and adapter.attached_to is not model:
            stack.enter_context(adapter.attached(model))
        if gate_scale != 1.0:
            check_gate_scale(adapter, gate_scale)
            stack.enter_context(model.hooks(fwd_hooks=[(lambda name: name.endswith("aligner.hook_gate"), scaled(gate_scale))]))
        stack.enter_context(torch.no_grad())
        for start in tqdm(starts, desc="answer log-probabilities", unit="batch", disable=len(starts) <= 1):
            batch = rows[start : start + batch_size]
            length = max(len(ids) for ids, _, _ in batch)
            input_ids = torch.tensor([ids + [pad] * (length - len(ids)) for ids, _, _ in batch], device=device)
            logprobs = F.log_softmax(model(input_ids).float(), dim=-1)  # (B, T, vocab); right padding is never read
            for b, (ids, first, last) in enumerate(batch):
                targets = torch.tensor(ids[first : last + 1], device=device)
                predicted = logprobs[b, first - 1 : last]  # position t predicts the token at t + 1
                scores["answer_logprob"].append(float(predicted.gather(1, targets[:, None]).sum()))
                scores["answer_rank1"].append(float(int(predicted[0].argmax()) == ids[first]))
    return scores


def knowledge_scores(
    model: nn.Module,
    adapter: Adapter | None,
    items: Sequence[Item],
    system: str | None = None,
    raw_prompts: bool = False,
    gate_scale: float = 1.0,
) -> dict[str, list[float]]:
    """`answer_scores` for every item in the trained response's frame (`answer_*`) and in the base model's own
    sentence (`own_*`); a frame that some item lacks is left out for all (a task with no place for the answer)."""
    scores: dict[str, list[float]] = {}
    read: dict[tuple[Framed, ...], dict[str, list[float]]] = {}  # a task that answers in the own sentence: once
    for prefix, frame_of in (("answer", lambda i: i.frame), ("own", lambda i: i.own_frame)):
        frames = [frame_of(item) for item in items]
        if not items or any(frame is None for frame in frames):
            continue
        framed = tuple(Framed(item.prompt, frame, gold_as_written(item, frame, prefix)) for item, frame in zip(items, frames))
        if framed not in read:
            read[framed] = answer_scores(model, adapter, framed, system, raw_prompts, gate_scale=gate_scale)
        scores.update({metric.replace("answer", prefix, 1): values for metric, values in read[framed].items()})
    return scores


def gold_as_written(item: Item, frame: str, frame_kind: str) -> str:
    """The gold answer as the response writes it after `frame`: the trained response's own letters (an all-caps
    form upper-cases it), or the first gold answer in the base model's sentence."""
    gold = item.answers[0]
    if frame_kind == "answer" and item.response.startswith(frame):
        return item.response[len(frame) : len(frame) + len(gold)]
    return gold
