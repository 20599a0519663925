"""What a task is: items (a prompt, the response to train on, what the checkers need), how its splits are made,
and the checks that score an answer. Every task of the suite, and a user's JSONL task, is one of these."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Callable, Sequence, TypeVar

from aligner.data import Example, Pair

SPLIT_SEED = 0  # the splits are the same for every training seed: seeds vary the method, not the data
T = TypeVar("T")


@dataclass(frozen=True)
class Item:
    prompt: str  # the user's turn
    response: str  # what the model is trained to answer
    answers: tuple[str, ...] = ()  # gold answers whose presence is the content metric; () where there are none
    contrast: str | None = None  # a response showing the opposite behaviour: a steering vector's negative example
    labels: dict[str, str] = field(default_factory=dict, hash=False)  # categorical, e.g. {"region": "Africa"}
    # The text before the gold answer, where a task's responses have one place for it (forms.frame_of): in the
    # response ('{"answer": "'), and in the base model's own sentence ("The capital of Chad is "). What a
    # teacher-forced gold answer is scored after, to tell a lost fact from a lost form.
    frame: str | None = None
    own_frame: str | None = None
    knowledge: str | None = None  # the knowledge set of a question of another kind than its task's: its content check
    rejected: str | None = None  # the response the task prefers less: a preference pair's rejected side (DPO)

    def example(self) -> Example:
        return Example(self.prompt, self.response)

    def pair(self) -> Pair:
        """(prompt, response as chosen, `rejected`): what DPO trains on; refused where the item has no rejected side."""
        if self.rejected is None:
            raise ValueError(f"item {self.prompt!r}: its task has no rejected responses to make preference pairs of")
        return Pair(self.prompt, self.response, self.rejected)


Check = Callable[[Item, str], bool]  # (item, the model's answer) -> passed


@dataclass(frozen=True)
class Sizes:
    """How many items each split takes; the quick suite uses small ones."""

    train: int = 40  # training items
    valid: int = 8  # items whose loss decides early stopping: held out (injection: some taught facts)
    eval: int = 24  # items of each evaluation split


@dataclass(frozen=True)
class TaskData:
    train: list[Item]
    valid: list[Item]
    eval: dict[str, list[Item]]  # split name -> items; every metric is reported on every split


@dataclass(frozen=True)
class Task:
    name: str
    family: str  # "form", "instruct", "knowledge", "value" or "custom": the panels of the suite's figure
    description: str
    metrics: dict[str, Check]  # metric name -> check; a metric's value on a split is the share of items passed
    # (known subjects of `knowledge`, or None where the audit is not used, sizes[, {set: its known subjects} for each
    # of `other_knowledge`]) -> the splits
    build: Callable[..., TaskData]
    knowledge: str | None = None  # the knowledge set whose audit the splits depend on (aligner.tasks.knowledge)
    # Knowledge sets asked about in evaluation splits alone: question kinds never trained, audited as `knowledge` is.
    other_knowledge: tuple[str, ...] = ()
    instruction: str | None = None  # the wanted behaviour told in a system prompt: the prompting baseline
    max_new_tokens: int = 24  # enough for every checker; answers are cut there
    # The prompts carry their own format (raw text, `chat_template=False`): responses end with end of sequence, and
    # answers are marked where they ended their turn (`generate(mark_end=True)`), so that stopping can be scored.
    raw_prompts: bool = False


def shuffled(items: Sequence[T]) -> list[T]:
    """`items` in the fixed order every split is cut from."""
    items = list(items)
    random.Random(SPLIT_SEED).shuffle(items)
    return items


def take(items: Sequence[T], *counts: int, what: str) -> list[list[T]]:
    """Consecutive slices of `items` of the given sizes, refusing too few items with a message naming `what`."""
    if sum(counts) > len(items):
        raise ValueError(f"{what}: {len(items)} items, but the splits need {' + '.join(map(str, counts))}")
    starts = [sum(counts[:i]) for i in range(len(counts))]
    return [list(items[start : start + count]) for start, count in zip(starts, counts)]
