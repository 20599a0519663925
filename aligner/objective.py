"""The training objective's parts, shared by SFT, DPO, early stopping and the baselines: each example's tokens
through the chat template, right-padded batches with the response tokens as labels, the summed next-token loss
on them, and the held-out loss under whatever adapter is attached.

An example is (prompt, response); the loss is taken on the response's tokens alone (its end-of-turn token
included), as in the authors' code.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import warnings
from dataclasses import dataclass, replace
from typing import Any, Callable, ContextManager, Protocol, Sequence, TypeVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedTokenizerBase

from aligner.chat import example_ids
from aligner.data import Example
from aligner.lens import is_bridge, transformers_model

IGNORE_INDEX = -100  # label of a position that takes no loss (prompt and padding), as in HF and PyTorch
Tokenized = tuple[list[int], int]  # (token ids, number of prompt tokens)


class PromptFormat(Protocol):
    """How examples become tokens: `TrainConfig` has these fields, and so has `Formatting`."""

    system: str | None  # system prompt of the chat template; None: the model's default
    chat_template: bool  # False: raw prompt text, no chat template (base models)
    max_length: int  # tokens per example, prompt and response; longer ones are cut


@dataclass(frozen=True)
class Formatting:
    system: str | None = None
    chat_template: bool = True
    max_length: int = 512



def accumulate_gradients(
    model: nn.Module,
    sequences: Sequence[tuple[list[int], int]],
    batch_size: int,
    pad_id: int,
    n_targets: int | None = None,
    autocast: Callable[[], ContextManager] = contextlib.nullcontext,
) -> float:
    """Forward and backward over `sequences`, `batch_size` at a time, adding to the gradients of their summed
    response-token loss divided by `n_targets`, and returning that loss. The default, their own count of response
    tokens, makes it the mean loss per token (so that the split into forward passes does not weigh examples); a
    process's share of a step passes the whole step's count, so that the shares add up to the step's mean.
    Each forward pass runs inside `autocast()` (mixed precision), each backward outside it."""
    n_targets = count_targets(sequences) if n_targets is None else n_targets
    device = next(model.parameters()).device
    total = 0.0
    for k in range(0, len(sequences), batch_size):
        input_ids, labels = make_batch(sequences[k : k + batch_size], pad_id)
        with autocast():
            loss = response_loss(model, input_ids.to(device), labels.to(device)) / n_targets
        loss.backward()
        total += loss.item()
    return total


def count_targets(sequences: Sequence[tuple[list[int], int]]) -> int:
    """The response tokens that take loss in `sequences`: every labelled position but the first of a sequence,
    which nothing predicts (the labels of `make_batch`, shifted by one)."""
    return sum(len(ids) - max(n_prompt, 1) for ids, n_prompt in sequences)


def tokenize_examples(
    tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example], config: PromptFormat
) -> list[tuple[list[int], int]]:
    """(token ids, number of prompt tokens) per example, through the chat template, cut to `max_length`.
    An example whose response is cut away entirely is left out: it would teach nothing."""
    sequences, truncated = [], []
    for position, example in enumerate(examples, start=1):
        ids, n_prompt = example_ids(
            tokenizer, example.prompt, example.response, system=config.system, chat_template=config.chat_template
        )
        if len(ids) > config.max_length:
            truncated.append(f"row {example.row}" if example.row is not None else f"example {position}")
            ids = ids[: config.max_length]
        if len(ids) > n_prompt:
            sequences.append((ids, n_prompt))
    if truncated:
        dropped = len(examples) - len(sequences)
        shown = ", ".join(truncated[:10]) + (f" and {len(truncated) - 10} more" if len(truncated) > 10 else "")
        warnings.warn(
            f"{len(truncated)} of {len(examples)} examples are longer than max_length={config.max_length} tokens and "
            f"were truncated ({shown}); {dropped} of them lost their whole response and are left out",
            stacklevel=2,
        )
    if not sequences:
        raise ValueError(f"no example keeps a response token within max_length={config.max_length}")
    return sequences


def make_batch(sequences: Sequence[tuple[list[int], int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (input_ids, labels), both (B, T). labels[b, t] is the token at t where it belongs to the
    response (its end-of-turn token included) and IGNORE_INDEX on prompt and padding; the loss shifts by one,
    as in HF. Right padding needs no attention mask: causal attention never looks ahead to the padding."""
    length = max(len(ids) for ids, _ in sequences)
    input_ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    labels = torch.full((len(sequences), length), IGNORE_INDEX, dtype=torch.long)
    for b, (ids, n_prompt) in enumerate(sequences):
        input_ids[b, : len(ids)] = torch.tensor(ids)
        labels[b, n_prompt : len(ids)] = torch.tensor(ids[n_prompt:])
    return input_ids, labels


def response_loss(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy of `model` over the labelled positions; input_ids and labels (B, T)."""
    return -response_logprobs(model, input_ids, labels).sum()


def response_logprobs(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(response | prompt) of each sequence, (B,): the log-probabilities of its labelled tokens, summed.
    The logits are taken from the first position that predicts a response token on (`logits_to_keep`, where the
    model's forward reads it), not over the prompt: the unembedding is most of a step when the vocabulary is large
    and the response short (Gemma 3: 262,144 tokens; a capital's sentence after a 40-token prompt)."""
    labelled = (labels != IGNORE_INDEX).any(dim=0).nonzero()
    first = max(int(labelled[0]) - 1, 0) if len(labelled) else 0  # the position that predicts the first label
    keep = {"logits_to_keep": labels.shape[1] - first} if reads_logits_to_keep(model) else {}
    logits = forward_logits(model, input_ids, **keep)  # (B, T', vocab): the last T' positions
    labels = labels[:, labels.shape[1] - logits.shape[1] :]
    token_losses = F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX, reduction="none"
    )  # (B * (T - 1),), zero where ignored
    return -token_losses.view(labels.shape[0], -1).sum(dim=1)


def forward_logits(model: nn.Module, input_ids: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    """The logits of a bridge, or of a transformers model (`aligner.adapter.attached_to_run`), which returns them in
    its output and keeps no KV cache for a forward that is not decoding."""
    if is_bridge(model):
        return model(input_ids, **kwargs)
    return model(input_ids=input_ids, use_cache=False, **kwargs).logits


def reads_logits_to_keep(model: nn.Module) -> bool:
    """Whether the Hugging Face model (under the bridge, which passes it on) computes logits for the last positions
    only when asked (`logits_to_keep`): most causal LMs of transformers do."""
    hf = transformers_model(model)
    return hf is not None and "logits_to_keep" in inspect.signature(hf.forward).parameters


def pad_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id that fills batches out to one length: the pad token, else end of sequence (never read: right padding)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def examples_sha256(examples: Sequence[Example]) -> str:
    """A digest of the training data, so that a run is never resumed on other data."""
    return hashlib.sha256(json.dumps([[e.prompt, e.response] for e in examples]).encode()).hexdigest()


def heldout_loss(
    model: nn.Module, examples: Sequence[Example], system: str | None = None, batch_size: int = 8, chat_template: bool = True
) -> float:
    """Mean cross-entropy per response token of `examples` under whatever is attached to `model`: the number early
    stopping and the steering baseline's choices read. `system` and `chat_template` as TrainConfig's."""
    sequences = tokenize_examples(model.tokenizer, examples, Formatting(system, chat_template))
    pad_id = pad_token_id(model.tokenizer)
    device = next(model.parameters()).device
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(sequences), batch_size):
            input_ids, labels = make_batch(sequences[start : start + batch_size], pad_id)
            total += response_loss(model, input_ids.to(device), labels.to(device)).item()
            count += int((labels[:, 1:] != IGNORE_INDEX).sum())
    return total / count


def prompts_for(adapter: Any, prompts: Sequence[str]) -> list[str]:
    """The user's turns as `adapter` reads them (prompt tuning's placeholders in front; others unchanged; None:
    the base model)."""
    return list(prompts) if adapter is None else [adapter.format_prompt(p) for p in prompts]


Prompted = TypeVar("Prompted")  # a dataclass with a `prompt` field: an Example, a Pair


def formatted_for(adapter: Any, records: Sequence[Prompted]) -> list[Prompted]:
    """Each record with its prompt as `adapter` reads it (`prompts_for`), the rest of it unchanged."""
    prompts = prompts_for(adapter, [record.prompt for record in records])
    return [replace(record, prompt=prompt) for record, prompt in zip(records, prompts)]
