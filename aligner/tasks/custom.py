"""A user's task: (prompt, response) rows from a JSONL file (the format `aligner train --data` reads) and a regular
expression that a well-formed answer matches in full. Rows may carry `answers` (a list of strings) or `answer`,
whose presence in the answer is the content metric."""

from __future__ import annotations

import re
from pathlib import Path

from aligner.data import _file_rows, _text
from aligner.tasks.knowledge import contains_answer
from aligner.tasks.spec import Item, Sizes, Task, TaskData, shuffled, take


def load_items(path: str | Path, prompt_field: str = "prompt", response_field: str = "response") -> list[Item]:
    items = []
    for number, row in _file_rows(Path(path)):
        where = f"{path}, row {number}"
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected a JSON object, found {type(row).__name__}")
        answers = row.get("answers", [row["answer"]] if "answer" in row else [])
        if not (isinstance(answers, list) and all(isinstance(a, str) and a for a in answers)):
            raise ValueError(f"{where}: field 'answers' must be a list of non-empty strings")
        items.append(Item(_text(row, prompt_field, where), _text(row, response_field, where), tuple(answers)))
    if not items:
        raise ValueError(f"{path}: no rows")
    return items


def jsonl_task(path: str | Path, pattern: str, name: str | None = None, max_new_tokens: int = 32) -> Task:
    """The task of a user's JSONL file: metric `form` (the answer, stripped, matches `pattern` in full) and, when
    the rows give answers, `content` (one is present, case and accents ignored) and `both`."""
    try:
        regex = re.compile(pattern, re.DOTALL)
    except re.error as err:
        raise ValueError(f"checker {pattern!r} is not a valid regular expression ({err})") from err
    items = load_items(path)

    def build(known: frozenset[str] | None, sizes: Sizes) -> TaskData:
        n_eval = min(sizes.eval, len(items) - sizes.train - sizes.valid)  # a small file gives what it has
        train, valid, test = take(shuffled(items), sizes.train, sizes.valid, max(n_eval, 1), what=str(path))
        return TaskData(train, valid, {"test": test})

    def form(item: Item, text: str) -> bool:
        return regex.fullmatch(text.strip()) is not None

    metrics = {"form": form}
    if any(item.answers for item in items):
        metrics["content"] = lambda item, text: contains_answer(text, item.answers)
        metrics["both"] = lambda item, text: form(item, text) and contains_answer(text, item.answers)
    return Task(name or Path(path).stem, "custom", f"{path}, checked by /{pattern}/", metrics, build, max_new_tokens=max_new_tokens)
