"""Training data: (prompt, response) examples for supervised fine-tuning and (prompt, chosen, rejected) pairs
for preference optimisation, from JSONL, JSON, CSV, or a Hugging Face dataset that is already on this machine.

Every row is checked as it is read; a bad one is refused with the file, its 1-based row number and the field,
so that a typo on line 40,000 of a data file costs seconds, not a training run. Rows that carry an `id` must
not repeat one: a repeated id means a file was concatenated or merged twice, and the error names both rows.
Each example keeps its row number, so that later messages (an example cut to `max_length`) can name it.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator


@dataclass(frozen=True)
class Example:
    prompt: str  # the user's turn, without any chat template
    response: str  # the reply the model should learn to give
    row: int | None = field(default=None, compare=False)  # the 1-based row it was read from, for messages


@dataclass(frozen=True)
class Pair:
    prompt: str  # the user's turn, without any chat template
    chosen: str  # the preferred reply
    rejected: str  # the reply it is preferred to
    row: int | None = field(default=None, compare=False)  # the 1-based row it was read from, for messages


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
    - a `.csv` file: a header row naming the fields, then one example per row (empty cells are empty strings);
    - a local dataset directory (data files, or a `save_to_disk` dataset), read through HF `datasets`;
    - a Hugging Face dataset name, only if it is already in the local `datasets` cache (nothing is downloaded).

    Rows hold `prompt_field` and `response_field`, or Alpaca's `instruction`, `input` (optional) and `output`:
    the format is taken from the first row. Row numbers in errors are 1-based: the line of a JSONL file, the
    element of a JSON array, the row of a CSV file as a spreadsheet shows it (the header is row 1), the row of a
    dataset split.
    """
    examples = _examples(_rows(source, split), str(source), prompt_field, response_field)
    if not examples:
        raise ValueError(f"{source}: no examples")
    return examples


# PKU-SafeRLHF (Ji et al. 2023; the paper's "Beaver" value-alignment data): two responses to each prompt and, for
# each of the two judgements, the id (0 or 1) of the response preferred.
PKU_FIELDS = ("prompt", "response_0", "response_1")
PKU_PREFERENCES = {"safer": "safer_response_id", "better": "better_response_id"}


def load_pairs(source: str | os.PathLike, prefer: str = "safer", split: str = "train") -> list[Pair]:
    """Read preference pairs from `source` (a file, local dataset or cached dataset, as `load_examples`).

    Rows hold `prompt`, `chosen` and `rejected`, or PKU-SafeRLHF's `prompt`, `response_0`, `response_1`,
    `safer_response_id` and `better_response_id`: there `prefer="safer"` takes the safer response as chosen (the
    paper's value alignment) and `prefer="better"` the more helpful one; plain rows carry their own choice. The
    layout is taken from the first row; errors name the file, the 1-based row and the field.
    """
    if prefer not in PKU_PREFERENCES:
        raise ValueError(f"prefer must be one of {sorted(PKU_PREFERENCES)}, got {prefer!r}")
    pairs: list[Pair] = []
    pku = None
    for number, row in _rows(source, split):
        where = f"{source}, row {number}"
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected a JSON object, found {type(row).__name__}")
        if pku is None:  # the first row decides the layout
            pku = "chosen" not in row and "response_0" in row
        if pku:
            prompt, *responses = (_text(row, name, where) for name in PKU_FIELDS)
            chosen = _response_id(row, PKU_PREFERENCES[prefer], where)
            pairs.append(Pair(prompt, responses[chosen], responses[1 - chosen], number))
        else:
            pairs.append(Pair(*(_text(row, name, where) for name in ("prompt", "chosen", "rejected")), number))
    if not pairs:
        raise ValueError(f"{source}: no pairs")
    return pairs


def _response_id(row: dict[str, Any], field: str, where: str) -> int:
    """The 0 or 1 in `row[field]`: which of `response_0` and `response_1` a PKU-SafeRLHF judgement prefers."""
    if field not in row:
        raise ValueError(f"{where}: missing field {field!r} (fields present: {sorted(row)})")
    value = row[field]
    if type(value) is not int or value not in (0, 1):
        raise ValueError(f"{where}: field {field!r} must be 0 or 1, found {value!r}")
    return value


def _rows(source: str | os.PathLike, split: str) -> Iterator[tuple[int, Any]]:
    """(row number, row) from a file, a local dataset directory or an already-cached Hugging Face dataset."""
    path = Path(source)
    if path.is_file():
        rows = _file_rows(path)
    elif path.is_dir() or not str(source).endswith(FILE_SUFFIXES):
        rows = _dataset_rows(str(source), split)
    else:
        raise FileNotFoundError(f"{path}: no such file")
    return _unique_ids(rows, str(source))


FILE_SUFFIXES = (".json", ".jsonl", ".csv")  # a missing file with one of these is a missing file, not a dataset name


def _unique_ids(rows: Iterable[tuple[int, Any]], source: str) -> Iterator[tuple[int, Any]]:
    """The rows, refusing an `id` (a string or an integer; null: none) that an earlier row already has."""
    first_row: dict[tuple[type, Any], int] = {}
    for number, row in rows:
        if isinstance(row, dict) and row.get("id") is not None:
            value = row["id"]
            if type(value) not in (str, int):
                raise ValueError(
                    f"{source}, row {number}: field 'id' must be a string or an integer, found {type(value).__name__}"
                )
            if (type(value), value) in first_row:
                raise ValueError(
                    f"{source}, row {number}: duplicate id {value!r} (first at row {first_row[type(value), value]})"
                )
            first_row[type(value), value] = number
        yield number, row


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
            examples.append(Example(f"{prompt}\n\n{extra}" if extra else prompt, _text(row, "output", where), number))
        else:
            examples.append(Example(_text(row, prompt_field, where), _text(row, response_field, where), number))
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
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:  # JSON's "\ud800" escape without its pair: no tokenizer reads it
        raise ValueError(
            f"{where}: field {field!r} is not Unicode text (a lone UTF-16 surrogate, {value[err.start]!r}, at "
            f"character {err.start + 1})"
        ) from err
    if required and not value.strip():
        raise ValueError(f"{where}: field {field!r} is empty")
    return value


def _file_rows(path: Path) -> Iterator[tuple[int, Any]]:
    """(row number, parsed row) from a CSV file, a JSON array file or a JSONL file (blank lines skipped, still
    counted). A UTF-8 byte-order mark, as Excel and Notepad write, is allowed."""
    data = path.read_bytes().removeprefix(codecs.BOM_UTF8)
    if path.suffix.lower() == ".csv":
        yield from _csv_rows(path, _decode(path, data))
        return
    if data.lstrip()[:1] == b"[":
        text = _decode(path, data)
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: invalid JSON at line {err.lineno}, column {err.colno} ({err.msg})") from err
        except (ValueError, RecursionError) as err:  # an integer of over 4300 digits; nesting too deep to parse
            raise ValueError(f"{path}: JSON that cannot be read ({type(err).__name__}: {err})") from err
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
        except (ValueError, RecursionError) as err:
            raise ValueError(f"{path}, row {number}: JSON that cannot be read ({type(err).__name__}: {err})") from err


def _decode(path: Path, data: bytes) -> str:
    """`data` as UTF-8 text; an error names the line of the first bad byte."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise ValueError(f"{path}: not valid UTF-8 at line {line} ({err.reason})") from err


def _csv_rows(path: Path, text: str) -> Iterator[tuple[int, dict[str, str]]]:
    """(row number, {column: cell}) for each row after the header; the header is row 1, as in a spreadsheet.
    Blank rows are skipped (still counted); a row with more or fewer cells than the header is refused."""
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)  # a stray quote is an error, not a cell
    number = 0  # the last row read
    try:
        header = next(reader, None)
        if header is None:
            return
        number = 1
        columns = {}
        for index, name in enumerate(header, start=1):
            if not name.strip():
                raise ValueError(f"{path}, row 1: header column {index} has no name")
            if name in columns:
                raise ValueError(f"{path}, row 1: header names column {name!r} twice (columns {columns[name]} and {index})")
            columns[name] = index
        for number, cells in enumerate(reader, start=2):
            if not any(cell.strip() for cell in cells):
                continue
            if len(cells) != len(header):
                raise ValueError(
                    f"{path}, row {number}: {len(cells)} cells, expected {len(header)} (the header's columns: "
                    f"{', '.join(header)})"
                )
            yield number, dict(zip(header, cells))
    except csv.Error as err:  # e.g. a cell over csv.field_size_limit() characters
        raise ValueError(f"{path}, row {number + 1}: not valid CSV ({err})") from err


def _dataset_rows(source: str, split: str) -> Iterator[tuple[int, Any]]:
    """Rows of one split of a local or already-cached Hugging Face dataset."""
    import datasets

    path = Path(source)
    try:
        with _offline():
            if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():  # written by save_to_disk
                dataset = datasets.load_from_disk(str(path))
            else:
                dataset = datasets.load_dataset(source, split=split)
    except ConnectionError as err:
        raise FileNotFoundError(
            f"{source}: no such file, local dataset or cached Hugging Face dataset (nothing is downloaded; "
            f"fetch it first, e.g. `datasets.load_dataset({source!r}).save_to_disk(DIR)` on a machine online)"
        ) from err
    except (datasets.exceptions.DatasetsError, ValueError) as err:  # data files it cannot parse, an unknown split
        cause = f": {err.__cause__}" if err.__cause__ is not None else ""
        raise ValueError(f"{source}: Hugging Face datasets cannot read it ({err}{cause})") from err
    except (IndexError, KeyError, TypeError, AttributeError) as err:  # a folder of no dataset's layout, e.g. "/"
        raise ValueError(
            f"{source}: not a data file or a dataset that Hugging Face datasets can read ({type(err).__name__}: {err})"
        ) from err
    if isinstance(dataset, datasets.DatasetDict):
        if split not in dataset:
            raise ValueError(f"{source}: no split {split!r} (splits: {sorted(dataset)})")
        dataset = dataset[split]
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
