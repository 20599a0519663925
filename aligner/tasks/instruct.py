"""Instruction following, the paper's first task, as a labeled one: a base model answers a question in a turn
format it was not trained on, with the answer, and stops.

The format is the Alpaca template that LLaMA-Adapter (and the lit-llama code the Aligner builds on) train with;
the prompt carries it as raw text (`raw_prompts`), so a model answers it the same way with or without a chat
template of its own. The response is the fact's sentence ("The capital of Chad is N'Djamena."), ended by the
tokenizer's end of sequence; an untrained base model goes on instead, with a next "### Instruction:" or more
text, until it is cut at `max_new_tokens`. Three metrics, and all of them at once:

    stops    the answer ended its turn (end of sequence) within `max_new_tokens`
    format   the reply is one non-empty line that starts no new turn ("###"), as the trained replies are
    content  the reply holds a gold answer

The facts are known ones: known to the base model when asked with a few-shot prompt (`SuiteConfig.audit_shots`),
which reads what a base model knows better than a bare question does, so that `content` measures whether the
format kept the knowledge rather than whether there was any.
"""

from __future__ import annotations

from aligner.chat import ENDED
from aligner.tasks.forms import known_splits
from aligner.tasks.knowledge import Fact, KnowledgeSet
from aligner.tasks.spec import Item, Sizes, Task, TaskData

ALPACA = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
INSTRUCTION = "Answer the question in one sentence, then stop."  # the prompting baseline's system text


def reply(text: str) -> str:
    """The answer without the mark of its end of turn."""
    return text.removesuffix(ENDED)


def stops(item: Item, text: str) -> bool:
    return text.endswith(ENDED)


def one_line(item: Item, text: str) -> bool:
    body = reply(text).strip()
    return bool(body) and "\n" not in body and "###" not in body


def instruct_task(knowledge: KnowledgeSet) -> Task:
    """Known facts of `knowledge` asked in the Alpaca format: trained on some, evaluated on held-out facts asked
    with the trained question template (`test`) and the held-out one (`test_template`)."""

    def item(fact: Fact, template: int) -> Item:
        prompt = ALPACA.format(instruction=knowledge.question(fact, template))
        frame = knowledge.statement_frame(fact)
        return Item(prompt, knowledge.sentence(fact), fact.answers, None, fact.labels, frame=frame, own_frame=frame)

    def build(known: frozenset[str] | None, sizes: Sizes) -> TaskData:
        return known_splits(knowledge, known, sizes, item)

    def content(item: Item, text: str) -> bool:
        return knowledge.contains_answer(reply(text), item.answers)

    name = "instruct" if knowledge.name == "capitals" else f"instruct@{knowledge.name}"
    return Task(
        name,
        "instruct",
        f"known {knowledge.name} asked in the Alpaca format, answered in one sentence that ends the turn",
        {
            "stops": stops,
            "format": one_line,
            "content": content,
            "all": lambda i, t: stops(i, t) and one_line(i, t) and content(i, t),
        },
        build,
        knowledge=knowledge.name,
        instruction=INSTRUCTION,
        max_new_tokens=48,
        raw_prompts=True,
    )
