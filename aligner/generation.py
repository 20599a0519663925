"""Answering prompts with a base model, with or without an adapter: batched, greedy or sampled, chat-formatted.

Decoding is Hugging Face's `generate` on the plain transformers model under the bridge, with an aligner
attached through its attention interface (`aligner.adapter.attached_to_run`), at the model's own speed. Where the
bridge's hooks are in play (an adapter that needs them, a user's hooks, a gate scale) it runs on
`model.original_model` with the bridge's components in place, so every bridge hook fires at every step, with the
KV cache. Checked numerically: greedy answers equal an argmax loop over the bridge's full-sequence logits, and a
left-padded batch equals each prompt alone (tests/test_generation.py; on SmolLM2 too, with an aligner).
On the bridge the cache needs transformers < 5.24: from 5.24 attention receives it as `cache=`, which
transformer-lens 4.3's attention bridge does not read (each cached step then attends to itself alone);
pyproject.toml pins it.
The decoding options are given in full (`GenerationConfig`), so no checkpoint default (top-k 50, a repetition
penalty) slips in. An aligner's prefix keys and values are computed once per batch of prompts and kept beside
the KV cache (`fixed_prefix`); `aligners=` answers each prompt with its own aligner, all in one batch (bank.py).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Sequence
from typing import Any, Callable

import torch
from torch import nn
from tqdm import tqdm
from transformer_lens.hook_points import HookPoint
from transformers import GenerationConfig

from aligner.adapter import Adapter, attached_to_run
from aligner.bank import AlignerBank
from aligner.chat import ENDED, end_of_turn_id, prompt_ids, stop_ids
from aligner.lens import transformers_model
from aligner.model import Aligner, AlignerHooks
from aligner.objective import prompts_for

BATCH_SIZE = 16  # prompts per forward pass, unless told


def generate(
    model: nn.Module,
    prompts: list[str],
    aligner: Adapter | None = None,
    max_new_tokens: int = 32,
    gate_scale: float = 1.0,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int | None = None,
    system: str | None = None,
    chat_template: bool = True,
    batch_size: int = BATCH_SIZE,
    aligners: Sequence[Aligner] | None = None,
    mark_end: bool = False,
) -> list[str]:
    """The new text only, one per prompt, in order, without special tokens: each prompt answered by `model`
    (a TransformerBridge) with `aligner`, any adapter, attached for the call (`None`: the base model), each
    prompt as the adapter reads it (prompt tuning's placeholders in front).

    Prompts go through the model's chat template (`system` replaces its default system prompt;
    `chat_template=False` feeds the raw text). Decoding is greedy unless `do_sample`, then it samples from
    softmax(logits / temperature) cut to the top-p nucleus; with `seed`, the same call gives the same text,
    and the global RNG is left alone. Each answer stops at the end-of-turn token (a base model's, without a chat
    template, at the end of its line: chat.py) or after `max_new_tokens`.
    `gate_scale` multiplies every gate of an adapter with gates (the aligners) through its `hook_gate` hook
    points (0: the base model, 1: as trained), to see how the answers move with the aligner's strength.
    `aligners` (instead of `aligner`) gives each prompt its own aligner, all of one configuration: prompts[i]
    is answered with aligners[i], in the same batches as with one aligner (an `AlignerBank`).
    `mark_end` appends `ENDED` to every answer that ended its turn, so that it can be told from one cut at
    `max_new_tokens` (whether a model stops is a metric of the suite's `instruct` task).
    """
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of strings, not one string")
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise TypeError(f"prompts[{i}] is a {type(prompt).__name__}, expected a str")
    if aligners is not None:
        if aligner is not None:
            raise ValueError("pass one aligner for every prompt (aligner=) or one per prompt (aligners=), not both")
        if len(aligners) != len(prompts):
            raise ValueError(f"aligners= needs one aligner per prompt: {len(aligners)} aligners, {len(prompts)} prompts")
        for i, each in enumerate(aligners):
            if not isinstance(each, Aligner):
                raise TypeError(f"aligners[{i}] is a {type(each).__name__}, expected an Aligner")
    check_gate_scale(aligner if aligners is None else aligners[0], gate_scale)
    if aligner is None and isinstance(getattr(model, "aligner", None), AlignerHooks):
        raise ValueError(
            "aligner=None asks for the base model, but the model has an aligner attached: pass it as aligner= or detach it"
        )
    if batch_size < 1 or max_new_tokens < 0:
        raise ValueError(f"need batch_size >= 1 and max_new_tokens >= 0, got {batch_size} and {max_new_tokens}")
    if do_sample and not (temperature > 0 and 0 < top_p <= 1):
        raise ValueError(f"sampling needs temperature > 0 and 0 < top_p <= 1, got {temperature} and {top_p}")
    if not prompts:
        return []

    tokenizer = model.tokenizer
    prompts = prompts_for(aligner, prompts)
    ids = [prompt_ids(tokenizer, prompt, system=system, chat_template=chat_template) for prompt in prompts]
    for i, prompt_tokens in enumerate(ids):
        if not prompt_tokens:
            raise ValueError(f"prompts[{i}] is empty once tokenized; there is nothing to answer")
    longest = max(map(len, ids))
    room = model.cfg.n_ctx - longest  # the model reads no position past its context
    if room < 1:
        raise ValueError(f"a prompt of {longest} tokens fills the model's context of {model.cfg.n_ctx}; shorten it")
    if max_new_tokens > room:
        warnings.warn(
            f"max_new_tokens={max_new_tokens} is more than the model's context of {model.cfg.n_ctx} tokens leaves "
            f"after a prompt of {longest}: at most {room} are generated",
            stacklevel=2,
        )
        max_new_tokens = room
    decoding = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        temperature=temperature if do_sample else None,
        top_p=top_p if do_sample else None,
        top_k=0 if do_sample else None,  # no top-k cut: only what the arguments say
        eos_token_id=list(stop_ids(tokenizer, chat_template)),  # the end of turn; a base model's: its line's end
        pad_token_id=end_of_turn_id(tokenizer, chat_template),
    )

    bank, rows = None, []
    if aligners is not None:  # each distinct aligner once in the bank; rows[i]: the one prompts[i] reads
        position: dict[int, int] = {}
        rows = [position.setdefault(id(a), len(position)) for a in aligners]
        bank = AlignerBank(list({id(a): a for a in aligners}.values()))
    adapter = aligner if bank is None else bank
    starts = range(0, len(ids), batch_size)
    with contextlib.ExitStack() as stack:
        # The plain transformers model where the adapter runs on it (`attached_to_run`); the bridge where the adapter
        # is attached to it already, or its gates are scaled through its hook points.
        runner = stack.enter_context(attached_to_run(model, adapter, plain=gate_scale == 1.0))
        if gate_scale != 1.0:
            gate_hooks = [(lambda name: name.endswith("aligner.hook_gate"), scaled(gate_scale))]  # every adapted layer
            stack.enter_context(model.hooks(fwd_hooks=gate_hooks))
        stack.enter_context(torch.no_grad())
        if seed is not None:  # seeded sampling that leaves the caller's random state alone
            stack.enter_context(torch.random.fork_rng(devices=[]))
            torch.manual_seed(seed)
        answers = []
        for start in tqdm(starts, desc="generate", unit="batch", disable=len(starts) <= 1):
            with contextlib.ExitStack() as batch_stack:
                if bank is not None:
                    batch_stack.enter_context(bank.selected(rows[start : start + batch_size]))
                if adapter is not None:  # the prefix depends on no token: computed at the prompt, kept for the answer
                    batch_stack.enter_context(adapter.fixed_prefix())
                answers += generate_batch(runner, ids[start : start + batch_size], decoding)
    stops = set(decoding.eos_token_id)
    ended = [bool(row) and row[-1] in stops for row in answers]
    texts = tokenizer.batch_decode([row[:-1] if end else row for row, end in zip(answers, ended)], skip_special_tokens=True)
    return [text + ENDED if mark_end and end else text for text, end in zip(texts, ended)]


def scaled(gate_scale: float) -> Callable[[torch.Tensor, HookPoint], torch.Tensor]:
    """A hook on `hook_gate` that multiplies every gate by `gate_scale`: an aligner's strength, turned."""

    def scale_gate(gate: torch.Tensor, hook: HookPoint) -> torch.Tensor:
        return gate * gate_scale

    return scale_gate


def check_gate_scale(adapter: Adapter | None, gate_scale: float) -> None:
    """Refuse a gate scale that is not finite and >= 0, or other than 1 for what has no gates: the base model
    (None), or an adapter other than an aligner (LoRA, prompt tuning, ...)."""
    if not (math.isfinite(gate_scale) and gate_scale >= 0):
        raise ValueError(f"gate_scale must be finite and >= 0, got {gate_scale}")
    if gate_scale != 1.0 and not (adapter is not None and adapter.has_gates):
        has = "the base model" if adapter is None else f"a {type(adapter).__name__}"
        raise ValueError(f"gate_scale={gate_scale} scales an aligner's gates; {has} has none")


def answer(
    model: nn.Module,
    adapter: Adapter | None,
    prompts: Sequence[str],
    system: str | None,
    max_new_tokens: int,
    batch_size: int = BATCH_SIZE,
    gate_scale: float = 1.0,
    raw_prompts: bool = False,
    **sampling: Any,
) -> list[str]:
    """`generate` as the suite and the app ask: with `adapter` attached (None: the base model), batched and
    left-padded, greedy unless `sampling` says otherwise (`generate`'s do_sample, temperature, top_p, seed).
    `raw_prompts`: the prompts carry their own format (`Task.raw_prompts`), and the answers that ended their
    turn are marked (`ENDED`)."""
    return generate(
        model,
        list(prompts),
        aligner=adapter,
        max_new_tokens=max_new_tokens,
        gate_scale=gate_scale,
        system=system,
        batch_size=batch_size,
        chat_template=not raw_prompts,
        mark_end=raw_prompts,
        **sampling,
    )


def generate_batch(model: nn.Module, batch: list[list[int]], decoding: GenerationConfig) -> list[list[int]]:
    """The new token ids of each prompt in `batch`, up to the first stop token, which is kept where there is one;
    prompts are left-padded so that every row's next token is read at the last position."""
    device = next(model.parameters()).device
    length = max(map(len, batch))
    pad = decoding.pad_token_id  # never attended to (mask 0)
    ids = torch.tensor([[pad] * (length - len(p)) + p for p in batch], device=device)  # (B, T)
    mask = torch.tensor([[0] * (length - len(p)) + [1] * len(p) for p in batch], device=device)
    if decoding.max_new_tokens == 0:
        return [[] for _ in batch]
    rows = transformers_model(model).generate(input_ids=ids, attention_mask=mask, generation_config=decoding)
    stops = set(decoding.eos_token_id)
    return [next((row[: j + 1] for j, token in enumerate(row) if token in stops), row) for row in rows[:, length:].tolist()]
