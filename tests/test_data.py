"""Reading (prompt, response) examples: the formats, and a clear error naming file, row and field for each bad row."""

import json
import re

import pytest

from aligner.data import Example, load_examples


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def test_jsonl_prompt_response(tmp_path):
    rows = [{"prompt": "Hi", "response": "Hello"}, {"prompt": "2+2?", "response": "4"}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    assert load_examples(path) == [Example("Hi", "Hello"), Example("2+2?", "4")]


def test_jsonl_skips_blank_lines_and_reads_custom_fields(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"q": "Hi", "a": "Hello", "id": 1}\n\n{"q": "Bye", "a": "Ciao"}\n', encoding="utf-8")
    assert load_examples(path, prompt_field="q", response_field="a") == [Example("Hi", "Hello"), Example("Bye", "Ciao")]


def test_alpaca_json_array_joins_instruction_and_input(tmp_path):
    rows = [
        {"instruction": "Translate to French.", "input": "cat", "output": "chat"},
        {"instruction": "Name a colour.", "input": "", "output": "Blue"},
        {"instruction": "Name a fruit.", "output": "Apple"},  # no input field at all
    ]
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps(rows, indent=1), encoding="utf-8")
    assert load_examples(path) == [
        Example("Translate to French.\n\ncat", "chat"),
        Example("Name a colour.", "Blue"),
        Example("Name a fruit.", "Apple"),
    ]


def test_alpaca_jsonl(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Say hi.", "input": "politely", "output": "Good day."}])
    assert load_examples(path) == [Example("Say hi.\n\npolitely", "Good day.")]


def test_local_dataset_directories(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))  # not the user's cache
    rows = [{"prompt": "Hi", "response": "Hello"}, {"prompt": "Bye", "response": "Ciao"}]
    files = tmp_path / "files"
    files.mkdir()
    write_jsonl(files / "train.jsonl", rows)
    assert load_examples(files) == [Example("Hi", "Hello"), Example("Bye", "Ciao")]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    assert load_examples(tmp_path / "saved") == [Example("Hi", "Hello"), Example("Bye", "Ciao")]


def test_uncached_hub_name_fails_at_once_without_download():
    pytest.importorskip("datasets")
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        load_examples("no-such-user/no-such-dataset-4c6a78e6")


def test_missing_file():
    with pytest.raises(FileNotFoundError, match="missing.jsonl: no such file"):
        load_examples("missing.jsonl")


@pytest.mark.parametrize(
    "line, message",
    [
        (b'{"prompt": "Hi"}', "missing field 'response'"),
        (b'{"prompt": "Hi", "response": "   "}', "field 'response' is empty"),
        (b'{"prompt": "", "response": "Hello"}', "field 'prompt' is empty"),
        (b'{"prompt": 3, "response": "Hello"}', "field 'prompt' must be a string, found int"),
        (b'{"prompt": "Hi", "response": null}', "field 'response' must be a string, found NoneType"),
        (b'{"prompt": "Hi", "response": "Hello"', "invalid JSON"),
        (b'{"prompt": "Hi \xff", "response": "Hello"}', "not valid UTF-8"),
        (b'["Hi", "Hello"]', "expected a JSON object, found list"),
    ],
)
def test_bad_jsonl_row_names_file_row_and_field(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"prompt": "Hi", "response": "Hello"}\n\n' + line + b"\n")
    with pytest.raises(ValueError, match=re.escape(f"{path}, row 3: {message}")):
        load_examples(path)


@pytest.mark.parametrize(
    "row, message",
    [
        ({"input": "x", "output": "y"}, "row 2: missing field 'prompt'"),  # the first row made it prompt/response
        ({"instruction": "Do it.", "input": "x"}, "row 2: missing field 'output'"),
        ({"instruction": "Do it.", "input": 5, "output": "y"}, "row 2: field 'input' must be a string, found int"),
        ({"instruction": " ", "output": "y"}, "row 2: field 'instruction' is empty"),
    ],
)
def test_bad_alpaca_row_names_file_row_and_field(tmp_path, row, message):
    alpaca = "instruction" in row
    first = {"instruction": "Do it.", "input": "", "output": "Done."} if alpaca else {"prompt": "a", "response": "b"}
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([first, row]), encoding="utf-8")
    with pytest.raises(ValueError, match=re.escape(f"{path}, {message}")):
        load_examples(path)


def test_bad_json_array_names_the_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_bytes(b'[\n {"instruction": "a", "output": "b"},\n {"instruction": "c" "output": "d"}\n]')
    with pytest.raises(ValueError, match=re.escape(f"{path}: invalid JSON at line 3")):
        load_examples(path)
    path.write_bytes(b'[\n {"instruction": "a", "output": "b"},\n {"instruction": "\xfe", "output": "d"}\n]')
    with pytest.raises(ValueError, match=re.escape(f"{path}: not valid UTF-8 at line 3")):
        load_examples(path)


def test_empty_file_is_refused(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no examples"):
        load_examples(path)
