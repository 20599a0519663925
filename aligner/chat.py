"""Turning prompts (and responses) into token ids the way the model was tuned to see them: its chat template."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

# For tokenizers without a chat template (base models): a plain turn format.
PLAIN_TEMPLATE = "User: {prompt}\nAssistant:"


def prompt_ids(
    tokenizer: PreTrainedTokenizerBase, prompt: str, system: str | None = None, chat_template: bool = True
) -> list[int]:
    """Token ids of `prompt` ready for the model to answer: the chat template with the generation prompt
    (the model's default system prompt unless `system` is given), or the raw text when `chat_template=False`."""
    if not chat_template:
        return tokenizer(prompt, add_special_tokens=True)["input_ids"]
    if tokenizer.chat_template is None:
        return tokenizer(PLAIN_TEMPLATE.format(prompt=prompt), add_special_tokens=True)["input_ids"]
    messages = ([{"role": "system", "content": system}] if system is not None else []) + [
        {"role": "user", "content": prompt}
    ]
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])


def end_of_turn_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The token that ends the model's reply (`<|im_end|>` for SmolLM2): generation stops on it, training teaches it."""
    return tokenizer.eos_token_id


def example_ids(
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    response: str,
    system: str | None = None,
    chat_template: bool = True,
) -> tuple[list[int], int]:
    """(ids of prompt + response + end of turn, number of prompt tokens): the loss is taken on the rest."""
    prompt_part = prompt_ids(tokenizer, prompt, system=system, chat_template=chat_template)
    response_part = tokenizer(response, add_special_tokens=False)["input_ids"] + [end_of_turn_id(tokenizer)]
    return prompt_part + response_part, len(prompt_part)
