"""The form-vs-knowledge suite's tasks, each a small declarative `Task` (`spec.py`):

    json, caps, terse, frame, bracket,  form tasks over known capitals (`forms.py`); NAME@elements, NAME@cities
    lead                                over the other knowledge sets (`knowledge.py`)
    instruct                            a base model follows the Alpaca format, answers and stops (`instruct.py`)
    inject                              knowledge injection: invented capitals, with known real ones beside them;
                                        inject@capitals (@elements, @cities): real facts the model does not know
    value                               refuse harmful requests, help with benign ones (`value.py`)
    PATH.jsonl + a regex                a user's task (`custom.py`)
"""

from __future__ import annotations

from pathlib import Path

from aligner.tasks.custom import jsonl_task
from aligner.tasks.forms import FORMS, form_task, frame_of, injection_task, knowledge_set, own_frame_of
from aligner.tasks.instruct import instruct_task
from aligner.tasks.knowledge import KNOWLEDGE_SETS, Fact, KnowledgeSet
from aligner.tasks.spec import Item, Sizes, Task, TaskData
from aligner.tasks.value import is_refusal, value_task

# The suite's default tasks, in the order of its tables.
TASK_NAMES = (*FORMS, "instruct", "inject", "value")


def get_task(name: str, checker: str | None = None) -> Task:
    """A task by name ("json", "json@elements", "inject", "value"), or a user's JSONL file checked by `checker`."""
    if name.endswith((".jsonl", ".json")) or Path(name).is_file():
        if checker is None:
            raise ValueError(f"task {name!r} is a data file: give the regular expression a good answer matches (--checker)")
        return jsonl_task(name, checker)
    if checker is not None:
        raise ValueError(f"--checker is for a user's JSONL task; {name!r} has its own checkers")
    base, _, knowledge = name.partition("@")
    if base in FORMS:
        return form_task(FORMS[base], knowledge_set(knowledge or "capitals"))
    if base == "inject":
        return injection_task(knowledge_set(knowledge or "invented"))
    if base == "instruct":
        return instruct_task(knowledge_set(knowledge or "capitals"))
    if name == "value":
        return value_task()
    raise ValueError(f"no task {name!r}; choose from {', '.join(TASK_NAMES)} (NAME@elements, NAME@cities, inject@capitals), or a .jsonl file")


__all__ = [
    "FORMS",
    "KNOWLEDGE_SETS",
    "TASK_NAMES",
    "Fact",
    "Item",
    "KnowledgeSet",
    "Sizes",
    "Task",
    "TaskData",
    "frame_of",
    "get_task",
    "is_refusal",
    "jsonl_task",
    "own_frame_of",
]
