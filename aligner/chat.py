"""Turning prompts (and responses) into token ids the way the model was tuned to see them: its chat template.

A base model (a tokenizer without a chat template, as Gemma-3-270M's) was trained on plain text, not turns; it
gets the plainest question-and-answer text instead, and its answer ends with its line:

    [{system}\n\n]Question: {prompt}\nAnswer: {response}\n

The answer is written after one space (the tokenizers join a space to the word that follows, so the prompt
ends at the colon). The newline token is its end of turn, which training teaches; generation stops at any
token holding a newline, since an untrained base model often ends its line with "\n\n", one token of its own.
A base model's answers are therefore one line each, as the suite's forms are.

Raw text (`chat_template=False`) is fed as given, for a prompt that carries its own format (the Alpaca template
of the suite's `instruct` task): the response ends with the tokenizer's end of sequence, as a pretraining document
does, and generation stops there alone, so that a model that does not stop is seen not to.
"""

from __future__ import annotations

import functools

from transformers import PreTrainedTokenizerBase

BASE_TEMPLATE = "Question: {prompt}\nAnswer:"  # for tokenizers without a chat template (base models)
BASE_SYSTEM = "{system}\n\n"  # a system text, where one is given, leads the prompt as a paragraph of its own
BASE_END_OF_TURN = "\n"
ENDED = "<|end of turn|>"  # what `generate(mark_end=True)` appends to an answer that ended its turn


def prompt_ids(
    tokenizer: PreTrainedTokenizerBase, prompt: str, system: str | None = None, chat_template: bool = True
) -> list[int]:
    """Token ids of `prompt` ready for the model to answer: the chat template with the generation prompt
    (the model's default system prompt unless `system` is given), `BASE_TEMPLATE` for a tokenizer without one,
    or the raw text when `chat_template=False`; a base model's or raw text's `system` leads as a paragraph."""
    if not chat_template or tokenizer.chat_template is None:
        text = prompt if not chat_template else BASE_TEMPLATE.format(prompt=prompt)
        text = ("" if system is None else BASE_SYSTEM.format(system=system)) + text
        return tokenizer(text, add_special_tokens=True)["input_ids"]
    messages = ([{"role": "system", "content": system}] if system is not None else []) + [
        {"role": "user", "content": prompt}
    ]
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])


def end_of_turn_id(tokenizer: PreTrainedTokenizerBase, chat_template: bool = True) -> int:
    """The token that ends the model's reply (`<|im_end|>` for SmolLM2; the newline for a base model; end of
    sequence for raw text: see the module docstring): generation stops on it, training teaches it."""
    if tokenizer.chat_template is not None or not chat_template:
        if tokenizer.eos_token_id is None:
            raise ValueError(f"{type(tokenizer).__name__} has no end-of-sequence token to end a reply with")
        return tokenizer.eos_token_id
    ids = tokenizer(BASE_END_OF_TURN, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ValueError(
            f"{type(tokenizer).__name__} has no chat template, and its newline is {len(ids)} tokens ({ids}), "
            "expected one: a base model's answers end at the newline token"
        )
    return ids[0]


@functools.lru_cache(maxsize=8)
def stop_ids(tokenizer: PreTrainedTokenizerBase, chat_template: bool = True) -> tuple[int, ...]:
    """The tokens at which generation stops (none of them is part of the answer): the end of turn, and for a base
    model every token whose text holds a newline (Gemma 3's 32 runs of newlines). Kept per tokenizer: finding
    them decodes the vocabulary once (about 5 s for Gemma 3's 262,144 tokens)."""
    if tokenizer.chat_template is not None or not chat_template:
        return (end_of_turn_id(tokenizer, chat_template),)
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    return tuple(i for i, text in enumerate(texts) if BASE_END_OF_TURN in text)


def example_ids(
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    response: str,
    system: str | None = None,
    chat_template: bool = True,
) -> tuple[list[int], int]:
    """(ids of prompt + response + end of turn, number of prompt tokens): the loss is taken on the rest."""
    prompt_part = prompt_ids(tokenizer, prompt, system=system, chat_template=chat_template)
    if chat_template and tokenizer.chat_template is None:  # "Answer:" is followed by one space, then the answer
        response = " " + response
    end = end_of_turn_id(tokenizer, chat_template)
    response_part = tokenizer(response, add_special_tokens=False)["input_ids"] + [end]
    return prompt_part + response_part, len(prompt_part)
