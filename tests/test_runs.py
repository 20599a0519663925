"""Run directories: `train_run` trains every method kind into a directory with its data and per-step losses,
and `list_runs` finds each of them, with a summary, while a damaged or foreign run is listed with its error."""

import json
from pathlib import Path

import pytest

from aligner import TrainConfig, load_adapter
from aligner.data import load_examples
from aligner.loading import open_model
from aligner.registry import default_lr
from aligner.runs import DATA_DIR, list_runs, run_losses, train_run
from probe.dataset import training_form

JSON_DATA = Path(__file__).resolve().parents[1] / "examples" / "json_form.jsonl"
CONFIG = TrainConfig(steps=3, batch_size=2, warmup_steps=1)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    model = open_model("tiny")
    examples = load_examples(JSON_DATA)[:6]
    for name, kind, size in (("a", "aligner", 2), ("b", "adapter", 1), ("c", "lora", 4), ("d", "prompt", 3)):
        train_run(model, examples, root / name, kind, size, CONFIG, task="json")
    return root


def test_train_run_writes_each_kind_with_its_data_and_every_steps_loss(runs):
    for name in ("a", "b", "c", "d"):
        assert [step for step, _ in run_losses(runs / name)] == [1, 2, 3]
        assert len((runs / DATA_DIR / f"{name}.jsonl").read_text().splitlines()) == 6
    infos = {run.name: run for run in list_runs(runs)}
    kinds = {"a": "aligner", "b": "adapter", "c": "lora", "d": "prompt"}
    assert {name: run.kind for name, run in infos.items()} == kinds
    assert all(run.error is None and run.base_fingerprint for run in infos.values())
    assert "N=2" in infos["a"].summary and "LLaMA-Adapter" in infos["b"].summary and "r=4" in infos["c"].summary
    assert "n_tokens=3" in infos["d"].summary


def test_a_run_trains_at_its_familys_rate_the_authors_for_an_aligner(runs):
    assert default_lr("aligner") == default_lr("adapter") == 9e-3
    for name, family in (("a", "aligner"), ("c", "lora"), ("d", "prompt")):
        assert load_adapter(runs / name).provenance["training"]["config"]["lr"] == default_lr(family)
    assert {run.name: run.has_gates for run in list_runs(runs)} == {"a": True, "b": True, "c": False, "d": False}


def test_a_trained_run_records_its_task_so_its_form_is_read_back(runs):
    adapter = load_adapter(runs / "a")
    assert adapter.provenance["training"]["config"]["task"] == "json" and training_form(adapter) == "json"


def test_train_run_refuses_an_existing_directory_and_an_unknown_kind(runs):
    model = open_model("tiny")
    with pytest.raises(FileExistsError, match="exists"):
        train_run(model, load_examples(JSON_DATA)[:2], runs / "a", "aligner", 1, CONFIG)
    with pytest.raises(ValueError, match="no adapter family 'prefix'"):
        train_run(model, load_examples(JSON_DATA)[:2], runs / "new", "prefix", 1, CONFIG)


def test_a_damaged_or_foreign_run_is_listed_with_its_error_and_hides_no_other(runs, tmp_path):
    import shutil

    root = tmp_path / "runs"
    shutil.copytree(runs, root)
    (root / "a" / "adapter.safetensors").write_bytes(b"garbage")
    (root / "foreign").mkdir()
    (root / "foreign" / "adapter.json").write_text(json.dumps({"format": "other/1", "kind": "magic"}))
    infos = {run.name: run for run in list_runs(root)}
    assert "adapter.safetensors" in infos["a"].error
    assert "foreign/adapter.json" in infos["foreign"].error
    assert infos["b"].error is None and infos["c"].error is None


def test_a_run_version_changes_when_its_files_change(runs, tmp_path):
    import shutil

    root = tmp_path / "runs"
    shutil.copytree(runs, root)
    before = {run.name: run.version for run in list_runs(root)}
    config = root / "c" / "adapter.json"
    config.write_text(config.read_text() + " ")
    after = {run.name: run.version for run in list_runs(root)}
    assert before["c"] != after["c"] and before["a"] == after["a"]
