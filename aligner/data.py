"""Instruction data for supervised fine-tuning: (prompt, response) pairs from JSONL, Alpaca JSON, or a
Hugging Face dataset that is already on this machine.

Every row is checked as it is read; a bad one is refused with the file, its 1-based row number and the field,
so that a typo on line 40,000 of a data file costs seconds, not a training run.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator


@dataclass(frozen=True)
class Example:
    prompt: str  # the user's turn, without any chat template
    response: str  # the reply the model should learn to give


# Alpaca's fields (Taori et al. 2023): the prompt is the instruction, followed by the input when there is one.
ALPACA_FIELDS = ("instruction", "input", "output")


def load_examples(
    source: str | os.PathLike,
    prompt_field: str = "prompt",
    response_field: str = "response",
    split: str = "train",
) -> list[Example]:
    """Read (prompt, response) examples from `source`:

    - a `.json`/`.jsonl` file: a JSON array of objects, or one object per line (JSONL);
    - a local dataset directory (data files, or a `save_to_disk` dataset), read through HF `datasets`;
    - a Hugging Face dataset name, only if it is already in the local `datasets` cache (nothing is downloaded).

    Rows hold `prompt_field` and `response_field`, or Alpaca's `instruction`, `input` (optional) and `output`:
    the format is taken from the first row. Row numbers in errors are 1-based: the line of a JSONL file, the
    element of a JSON array, the row of a dataset split.
    """
    path = Path(source)
    if path.is_file():
        rows = _file_rows(path)
    elif path.is_dir() or not str(source).endswith((".json", ".jsonl")):
        rows = _dataset_rows(str(source), split)
    else:
        raise FileNotFoundError(f"{path}: no such file")
    examples = _examples(rows, str(source), prompt_field, response_field)
    if not examples:
        raise ValueError(f"{source}: no examples")
    return examples


def _examples(rows: Iterable[tuple[int, Any]], source: str, prompt_field: str, response_field: str) -> list[Example]:
    examples: list[Example] = []
    alpaca = None
    for number, row in rows:
        where = f"{source}, row {number}"
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected a JSON object, found {type(row).__name__}")
        if alpaca is None:  # the first row decides the format
            alpaca = prompt_field not in row and "instruction" in row
        if alpaca:
            prompt = _text(row, "instruction", where)
            extra = _text(row, "input", where, required=False)
            examples.append(Example(f"{prompt}\n\n{extra}" if extra else prompt, _text(row, "output", where)))
        else:
            examples.append(Example(_text(row, prompt_field, where), _text(row, response_field, where)))
    return examples


def _text(row: dict[str, Any], field: str, where: str, required: bool = True) -> str:
    """The string in `row[field]`; a missing field is an empty string when not `required`."""
    if field not in row:
        if required:
            raise ValueError(f"{where}: missing field {field!r} (fields present: {sorted(row)})")
        return ""
    value = row[field]
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise ValueError(f"{where}: field {field!r} must be a string, found {type(value).__name__}")
    if required and not value.strip():
        raise ValueError(f"{where}: field {field!r} is empty")
    return value


def _file_rows(path: Path) -> Iterator[tuple[int, Any]]:
    """(row number, parsed row) from a JSON array file or a JSONL file (blank lines skipped, still counted)."""
    data = path.read_bytes()
    if data.lstrip()[:1] == b"[":
        try:
            rows = json.loads(data.decode("utf-8"))
        except UnicodeDecodeError as err:
            line = data[: err.start].count(b"\n") + 1
            raise ValueError(f"{path}: not valid UTF-8 at line {line} ({err.reason})") from err
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: invalid JSON at line {err.lineno}, column {err.colno} ({err.msg})") from err
        yield from enumerate(rows, start=1)
        return
    for number, line in enumerate(data.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line.decode("utf-8"))
        except UnicodeDecodeError as err:
            raise ValueError(f"{path}, row {number}: not valid UTF-8 ({err.reason} at byte {err.start})") from err
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}, row {number}: invalid JSON ({err.msg} at column {err.colno})") from err


def _dataset_rows(source: str, split: str) -> Iterator[tuple[int, Any]]:
    """Rows of one split of a local or already-cached Hugging Face dataset."""
    import datasets

    path = Path(source)
    try:
        with _offline():
            if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():  # written by save_to_disk
                dataset = datasets.load_from_disk(str(path))
                if isinstance(dataset, datasets.DatasetDict):
                    if split not in dataset:
                        raise ValueError(f"{source}: no split {split!r} (splits: {sorted(dataset)})")
                    dataset = dataset[split]
            else:
                dataset = datasets.load_dataset(source, split=split)
    except ConnectionError as err:
        raise FileNotFoundError(
            f"{source}: no such file, local dataset or cached Hugging Face dataset (nothing is downloaded; "
            f"fetch it first, e.g. `datasets.load_dataset({source!r}).save_to_disk(DIR)` on a machine online)"
        ) from err
    yield from enumerate(dataset, start=1)


@contextlib.contextmanager
def _offline() -> Iterator[None]:
    """HF `datasets` and `huggingface_hub` in offline mode for the duration: a name that is not cached fails at
    once instead of retrying the network. Their flags are read at import time from HF_HUB_OFFLINE, so they
    are switched here as well, and restored afterwards."""
    import datasets
    from huggingface_hub import constants

    saved = datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE = saved
