"""Bad inputs get clear errors, and nothing saved is lost: aligner files, data files, killed and poisoned training
runs, and the de-quantised model cache. docs/bad_inputs.md lists every bad input tried and what the user sees."""

import hashlib
import importlib
import json
import multiprocessing
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save
from typer.testing import CliRunner

import aligner
from aligner import Aligner, AlignerConfig, TrainConfig, train_sft
from aligner.checkpoint import drop_metrics_after
from aligner.cli import app
from aligner.data import Example, load_examples
from aligner.files import source_digest
from aligner.loading import DEFAULT_MODEL, cached_directory, packaged_model_dir
from aligner.objective import tokenize_examples


@pytest.fixture(scope="module")
def model():
    return aligner.tiny_model()


@pytest.fixture()
def saved(model, tmp_path):
    """A directory holding an aligner saved for the tiny model."""
    return Aligner.for_model(model, AlignerConfig()).save(tmp_path / "run")


def edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def write_tensors(run: Path, tensors: dict) -> None:
    """New tensors for a saved aligner, with the sha256 in adapter.json to match: the tensors alone are judged."""
    data = save(tensors)
    (run / "adapter.safetensors").write_bytes(data)
    edit_json(run / "adapter.json", lambda meta: meta.update(tensors_sha256=hashlib.sha256(data).hexdigest()))


# ---- aligner files and attaching ----


def test_the_architecture_is_recorded_and_another_family_is_refused_at_attach(model, saved):
    from transformers import GPT2Config, GPT2LMHeadModel

    loaded = Aligner.load(saved)
    assert loaded.base_model["architecture"] == "LlamaForCausalLM"
    config = GPT2Config(vocab_size=100, n_embd=64, n_layer=4, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0)
    gpt2 = aligner.from_hf(GPT2LMHeadModel(config), None, name="tiny-gpt2")  # the same shape as the tiny Llama
    with pytest.raises(ValueError, match=r"architecture: aligner 'LlamaForCausalLM', model 'GPT2LMHeadModel'"):
        loaded.attach(gpt2)
    assert not hasattr(gpt2, "aligner")
    with loaded.attached(model):  # the family it was made for
        pass


def test_files_written_before_the_architecture_was_recorded_still_load(saved):
    edit_json(saved / "adapter.json", lambda meta: meta["base_model"].pop("architecture"))
    assert Aligner.load(saved).base_model["architecture"] is None


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda meta: meta.pop("shape"), r"adapter file fields missing \['shape'\], unexpected \[\]"),
        (lambda meta: meta.update(notes=1), r"adapter file fields missing \[\], unexpected \['notes'\]"),
        (lambda meta: meta["config"].update(shared="yes"), r"field 'config': field 'shared' must be bool, found 'yes'"),
        (lambda meta: meta["config"].update(n_tokens=0), r"field 'config': AlignerConfig.n_tokens must be >= 1, got 0"),
        (lambda meta: meta["shape"].update(d_model=-64), r"field 'shape': ModelShape.d_model must be >= 1, got -64"),
        (lambda meta: meta["config"].update(start_layer=9), r"start_layer=9 leaves no layer to adapt in a 4-layer"),
        (lambda meta: meta.update(num_parameters=73), r"field 'num_parameters' is 73, expected 72 for AlignerConfig"),
        (lambda meta: meta["base_model"].update(name=[]), r"field 'base_model': field 'name' must be str \| None"),
        (lambda meta: meta["base_model"].update(rev=1), r"base model fields missing \[\], unexpected \['rev'\]"),
    ],
)
def test_each_bad_field_of_aligner_json_is_named(saved, edit, message):
    edit_json(saved / "adapter.json", edit)
    with pytest.raises(ValueError, match=re.escape(str(saved / "adapter.json")) + ": .*" + message):
        Aligner.load(saved)


@pytest.mark.parametrize(
    "tokens, gates, message",
    [
        (torch.zeros(1, 64, dtype=torch.int64), torch.zeros(2, 4), r"'tokens' has dtype I64, expected one of F32 \(float32\), BF16"),
        (torch.zeros(1, 64, dtype=torch.float64), torch.zeros(2, 4), r"'tokens' has dtype F64, expected one of"),
        (torch.zeros(1, 32), torch.zeros(2, 4), r"'tokens' has shape \(1, 32\), expected \(1, 64\)"),
        (torch.zeros(1, 64), torch.zeros(2, 8), r"'gates' has shape \(2, 8\), expected \(2, 4\)"),
        (torch.zeros(1, 64), torch.full((2, 4), float("nan")), r"'gates' has 8 NaN or inf values of 8, expected all"),
        (torch.full((1, 64), float("-inf")), torch.zeros(2, 4), r"'tokens' has 64 NaN or inf values of 64"),
    ],
)
def test_tensors_of_the_wrong_dtype_shape_or_value_are_refused(saved, tokens, gates, message):
    write_tensors(saved, {"tokens": tokens, "gates": gates})
    with pytest.raises(ValueError, match=re.escape(str(saved / "adapter.safetensors")) + ": tensor " + message):
        Aligner.load(saved)


def test_bfloat16_tensors_load_exactly(saved):
    tokens = torch.randn(1, 64).bfloat16()
    write_tensors(saved, {"tokens": tokens, "gates": torch.zeros(2, 4, dtype=torch.bfloat16)})
    assert torch.equal(Aligner.load(saved).tokens, tokens.float())


def test_a_config_asking_for_a_trillion_parameters_is_refused_before_allocating(saved):
    def huge(meta):
        meta["shape"]["n_layers"] = 10**12
        meta["num_parameters"] = 64 + (10**12 - 2) * 4

    edit_json(saved / "adapter.json", huge)
    with pytest.raises(ValueError, match=r"'gates' has shape \(2, 4\), expected \(999999999998, 4\)"):
        Aligner.load(saved)


def test_saving_writes_both_files_through_temporary_ones_and_leaves_none(model, tmp_path):
    al = Aligner.for_model(model, AlignerConfig())
    for _ in range(2):  # the second save replaces the first
        al.save(tmp_path / "run")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["adapter.json", "adapter.safetensors"]
    Aligner.load(tmp_path / "run")


def test_a_pickle_that_would_open_a_file_is_refused_naming_what_it_asked_for(tmp_path):
    import pickle

    class WritesAFile:
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned.txt"), "w"))

    # Protocol 2, which torch's weights-only reader parses up to the call it refuses (4 stops at its framing).
    (tmp_path / "evil.pth").write_bytes(pickle.dumps({"global_value_embedding.weight": WritesAFile()}, protocol=2))
    with pytest.raises(ValueError, match=r"evil\.pth: refused: .* stopped at: Unsupported global: GLOBAL io\.open was not"):
        aligner.import_paper_checkpoint(tmp_path / "evil.pth")
    assert not (tmp_path / "pwned.txt").exists()


# ---- data files ----


def test_csv_reads_a_header_quoted_newlines_a_byte_order_mark_and_alpaca_columns(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes(b'\xef\xbb\xbfprompt,response\n"Two\nlines",Fine\n\nHi,"Hello, you"\n')
    assert load_examples(path) == [Example("Two\nlines", "Fine"), Example("Hi", "Hello, you")]
    assert [example.row for example in load_examples(path)] == [2, 4]  # the header is row 1; the blank row counts
    path.write_text("instruction,input,output\nTranslate.,cat,chat\nName a colour.,,Blue\n", encoding="utf-8")
    assert load_examples(path) == [Example("Translate.\n\ncat", "chat"), Example("Name a colour.", "Blue")]


@pytest.mark.parametrize(
    "content, message",
    [
        (b"prompt,response\nHi,Hello\nBye,Ciao,x\n", "row 3: 3 cells, expected 2 (the header's columns: prompt, response)"),
        (b"prompt,response\nHi,Hello\nBye\n", "row 3: 1 cells, expected 2"),
        (b"prompt,answer\nHi,Hello\n", "row 2: missing field 'response' (fields present: ['answer', 'prompt'])"),
        (b"prompt,response\nHi,Hello\nBye,  \n", "row 3: field 'response' is empty"),
        (b"prompt,response,prompt\nHi,Hello,Hey\n", "row 1: header names column 'prompt' twice (columns 1 and 3)"),
        (b"prompt,,response\nHi,x,Hello\n", "row 1: header column 2 has no name"),
        (b"prompt,response\nHi,Hello\nCaf\xe9?,Oui\n", "not valid UTF-8 at line 3"),
        (b'prompt,response\nHi,Hello\n"Bye,Ciao\n', "row 3: not valid CSV"),
    ],
)
def test_bad_csv_names_file_and_row(tmp_path, content, message):
    path = tmp_path / "bad.csv"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=re.escape(f"{path}") + r"(, |: )" + re.escape(message)):
        load_examples(path)


def test_a_repeated_id_names_both_rows_and_ids_of_two_types_differ(tmp_path):
    path = tmp_path / "d.jsonl"
    rows = [{"id": 7, "prompt": "a", "response": "b"}, {"id": "7", "prompt": "c", "response": "d"}]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    assert len(load_examples(path)) == 2  # 7 and "7" are different ids
    path.write_text(path.read_text() + "\n" + json.dumps({"id": 7, "prompt": "e", "response": "f"}) + "\n")
    with pytest.raises(ValueError, match=re.escape(f"{path}, row 4: duplicate id 7 (first at row 1)")):
        load_examples(path)
    csv_path = tmp_path / "d.csv"
    csv_path.write_text("id,prompt,response\nx,a,b\ny,c,d\nx,e,f\n", encoding="utf-8")
    with pytest.raises(ValueError, match=re.escape(f"{csv_path}, row 4: duplicate id 'x' (first at row 2)")):
        load_examples(csv_path)


def test_a_byte_order_mark_and_a_huge_number_in_jsonl(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"prompt": "Hi", "response": "Hello"}\n')
    assert load_examples(path) == [Example("Hi", "Hello")]
    path.write_bytes(b'{"prompt": "Hi", "response": "Hello", "n": ' + b"9" * 5000 + b"}\n")
    with pytest.raises(ValueError, match=re.escape(f"{path}, row 1: JSON that cannot be read")):
        load_examples(path)


def test_the_truncation_warning_names_the_rows_cut(tmp_path):
    path = tmp_path / "d.jsonl"
    rows = [{"prompt": f"Q{i}?", "response": "Bananas. " * (40 if i in (2, 5) else 1)} for i in range(6)]
    path.write_text("".join(json.dumps(row) + "\n\n" for row in rows), encoding="utf-8")  # rows 1, 3, 5, ...
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(packaged_model_dir(DEFAULT_MODEL), local_files_only=True)
    with pytest.warns(UserWarning, match=r"2 of 6 examples are longer than max_length=60 tokens and were truncated "
                      r"\(row 5, row 11\); 0 of them lost their whole response"):
        tokenize_examples(tokenizer, load_examples(path), TrainConfig(max_length=60))


# ---- training durability ----

KILL_STEPS, KILL_SAVE_EVERY = 6, 2


def train_args(data: Path, out: Path) -> list[str]:
    return ["train", "--data", str(data), "--out", str(out), "--model", "tiny", "--steps", str(KILL_STEPS),
            "--save-every", str(KILL_SAVE_EVERY), "--log-every", "1", "--batch-size", "2", "--lr", "0.05",
            "--warmup-steps", "2"]  # fmt: skip


def logged_losses(run: Path) -> dict[int, float]:
    lines = (run / "metrics.jsonl").read_bytes().splitlines(keepends=True)
    whole = [line for line in lines if line.endswith(b"\n")]  # a line cut by the kill is not a logged step
    return {row["step"]: row["loss"] for row in map(json.loads, whole)}


@pytest.mark.subprocess
def test_a_run_killed_mid_training_resumes_to_the_aligner_of_an_unkilled_run(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Q{i}?", "response": "Bananas."}) + "\n" for i in range(5)))
    killed, straight = tmp_path / "killed", tmp_path / "straight"
    with open(tmp_path / "stderr.txt", "wb") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "aligner", *train_args(data, killed)], cwd=tmp_path, stdout=stderr, stderr=stderr
        )
        deadline = time.monotonic() + 120
        while not (killed / "state.json").is_file():  # the first checkpoint is complete once state.json exists
            assert process.poll() is None and time.monotonic() < deadline, (tmp_path / "stderr.txt").read_text()
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
        assert process.wait() == -signal.SIGKILL  # killed mid-run, not finished
    saved_step = json.loads((killed / "state.json").read_text())["step"]
    assert Aligner.load(killed).provenance["training"]["step"] == saved_step  # the directory reads as one checkpoint
    assert max(logged_losses(killed)) - saved_step <= KILL_SAVE_EVERY  # at most one checkpoint interval lost
    assert saved_step < KILL_STEPS

    runner = CliRunner()
    resumed = runner.invoke(app, [*train_args(data, killed), "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert runner.invoke(app, train_args(data, straight)).exit_code == 0
    assert logged_losses(killed) == logged_losses(straight)  # each step saw the same batch, from the same state
    want, got = (load_file(next(run.glob("state-*.safetensors"))) for run in (straight, killed))
    assert want.keys() == got.keys() and all(torch.equal(want[name], got[name]) for name in want)  # AdamW moments too
    assert torch.equal(Aligner.load(killed).tokens, Aligner.load(straight).tokens)


EXAMPLES = [Example(f"What is {i} + {i}?", "Bananas are yellow.") for i in range(4)]


def test_an_update_that_turns_the_tokens_nan_stops_before_any_save(model, tmp_path):
    al = Aligner.for_model(model, AlignerConfig())
    backwards = []

    def overflow_second_step(grad):
        backwards.append(None)
        return grad * float("inf") if len(backwards) == 2 else grad

    al.gates.register_hook(overflow_second_step)
    config = TrainConfig(steps=3, save_every=1, batch_size=4, lr=0.1, warmup_steps=0)
    with pytest.raises(FloatingPointError, match=r"became NaN or inf in the update of step 2 .* \(checkpoint of step 1 kept\)"):
        train_sft(model, EXAMPLES, config, run_dir=tmp_path / "run", adapter=al)
    kept = Aligner.load(tmp_path / "run")
    assert kept.provenance["training"]["step"] == 1 and torch.isfinite(kept.gates).all()


def test_a_torn_last_metrics_line_is_dropped_and_a_bad_earlier_line_is_named(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b'{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.0}\n{"step": 3, "lo')
    drop_metrics_after(path, 1)
    assert path.read_bytes() == b'{"step": 1, "loss": 2.0}\n'
    path.write_bytes(b'{"step": 1, "loss": 2.0}\n{"step": \n{"step": 2, "loss": 1.0}\n')
    with pytest.raises(ValueError, match=re.escape(f"{path}, line 2: not a metrics row with a 'step'")):
        drop_metrics_after(path, 1)


@pytest.fixture(scope="module")
def trained_run(model, tmp_path_factory):
    run = tmp_path_factory.mktemp("trained") / "run"
    train_sft(model, EXAMPLES, TrainConfig(steps=2, save_every=1, batch_size=2, warmup_steps=0), run_dir=run)
    return run


@pytest.mark.parametrize(
    "spoil, message",
    [
        (lambda state, _: state.pop("position"), r"training state fields missing \['position'\]"),
        (lambda state, _: state.update(step="2"), r"field 'step' must be int, found '2' \(str\)"),
        (lambda state, _: state.update(tensors="../run/state.json"), r"field 'tensors' is '../run/state.json', expected"),
        (lambda state, _: state["config"].update(dropout=0.1), r"field 'config': TrainConfig fields missing \[\], unexpected \['dropout'\]"),
        (lambda state, _: state.update(format="other"), r"field 'format' is 'other', expected"),
    ],
)
def test_each_bad_field_of_state_json_is_named_and_the_run_is_left_as_it_was(model, trained_run, tmp_path, spoil, message):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    edit_json(run / "state.json", lambda state: spoil(state, run))
    before = {path.name: path.read_bytes() for path in run.iterdir()}
    config = TrainConfig(steps=3, save_every=1, batch_size=2, warmup_steps=0)
    with pytest.raises(ValueError, match=re.escape(str(run / "state.json")) + ": .*" + message):
        train_sft(model, EXAMPLES, config, run_dir=run, resume=True)
    assert {path.name: path.read_bytes() for path in run.iterdir()} == before


def test_optimizer_tensors_of_the_wrong_shape_are_refused(model, trained_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    [tensors_path] = run.glob("state-*.safetensors")
    tensors = load_file(tensors_path)
    tensors["optimizer.1.exp_avg"] = torch.zeros(3, 3)
    data = save(tensors)
    tensors_path.write_bytes(data)
    edit_json(run / "state.json", lambda state: state.update(tensors_sha256=hashlib.sha256(data).hexdigest()))
    config = TrainConfig(steps=3, save_every=1, batch_size=2, warmup_steps=0)
    with pytest.raises(ValueError, match=r"tensor 'optimizer.1.exp_avg' is \(3, 3\) torch.float32, expected \(2, 4\)"):
        train_sft(model, EXAMPLES, config, run_dir=run, resume=True)


def test_info_prints_a_hand_edited_training_record_instead_of_a_traceback(saved):
    edit_json(saved / "adapter.json", lambda meta: meta["provenance"].update(training={"step": "three"}))
    result = CliRunner().invoke(app, ["info", str(saved)])
    assert result.exit_code == 0, result.output
    assert 'training     {"step": "three"}' in result.output


# ---- the de-quantised model cache ----

SOURCE = {"file": "model.gguf", "size": 1234, "mtime": 0}


def fake_build(directory: Path) -> None:
    """A stand-in for de-quantising SmolLM2: 2 MiB of "weights" and a config, at once."""
    (directory / "model.safetensors").write_bytes(bytes(range(256)) * 8192)
    (directory / "config.json").write_text('{"model_type": "llama"}')


def counting_build(log: Path):
    def build(directory: Path) -> None:
        with open(log, "a") as f:
            f.write("built\n")
        fake_build(directory)

    return build


def builds(log: Path) -> int:
    return len(log.read_text().splitlines()) if log.exists() else 0


def flip_byte(path: Path, index: int) -> None:
    data = bytearray(path.read_bytes())
    data[index] ^= 1
    path.write_bytes(bytes(data))


def test_the_cache_builds_once_and_then_reuses_its_entry(tmp_path):
    entry, log = tmp_path / "cache" / "entry", tmp_path / "log"
    assert cached_directory(entry, counting_build(log), SOURCE) == entry
    assert cached_directory(entry, counting_build(log), SOURCE) == entry
    assert builds(log) == 1
    record = json.loads((entry / "complete.json").read_text())
    assert record["source"] == SOURCE and record["files"]["model.safetensors"]["size"] == 2 * 2**20


@pytest.mark.parametrize(
    "spoil, message",
    [
        (lambda entry: (entry / "model.safetensors").write_bytes(b"cut"), r"model.safetensors: size is 3, expected 2097152"),
        (lambda entry: flip_byte(entry / "model.safetensors", 100), r"model.safetensors: head_sha256 is [0-9a-f]{64}, expected"),
        (lambda entry: (entry / "config.json").unlink(), r"config.json: missing"),
        (lambda entry: (entry / "complete.json").write_text("{"), r"complete.json: not valid UTF-8 JSON"),
        (lambda entry: (entry / "complete.json").unlink(), r"complete.json: missing \(the entry was never finished"),
        (lambda entry: edit_json(entry / "complete.json", lambda r: r["source"].update(size=1)), r"built from .*\"size\": 1"),
        (lambda entry: edit_json(entry / "complete.json", lambda r: r.update(format="old")), r"field 'format' is 'old'"),
    ],
)
def test_a_damaged_or_mismatched_cache_entry_is_rebuilt_with_a_warning(tmp_path, spoil, message):
    entry, log = tmp_path / "cache" / "entry", tmp_path / "log"
    cached_directory(entry, counting_build(log), SOURCE)
    spoil(entry)
    with pytest.warns(UserWarning, match=message + r".*; rebuilding the cache entry"):
        cached_directory(entry, counting_build(log), SOURCE)
    assert builds(log) == 2
    assert (entry / "model.safetensors").read_bytes() == bytes(range(256)) * 8192
    assert sorted(p.name for p in entry.parent.iterdir()) == [".entry.lock", "entry"]  # the damaged copy is gone


def test_damage_past_the_first_mib_is_found_by_the_full_check(tmp_path):
    entry, log = tmp_path / "cache" / "entry", tmp_path / "log"
    cached_directory(entry, counting_build(log), SOURCE)
    flip_byte(entry / "model.safetensors", -1)
    cached_directory(entry, counting_build(log), SOURCE)  # the quick check reads sizes and first MiBs only
    assert builds(log) == 1
    with pytest.warns(UserWarning, match=r"model.safetensors: sha256 is [0-9a-f]{64}, expected"):
        cached_directory(entry, counting_build(log), SOURCE, full_check=True)
    assert builds(log) == 2


def test_a_failed_or_killed_build_leaves_no_entry_behind(tmp_path):
    entry, log = tmp_path / "cache" / "entry", tmp_path / "log"

    def disk_full(directory: Path) -> None:
        (directory / "model.safetensors").write_bytes(b"half")
        raise OSError("No space left on device")

    with pytest.raises(OSError, match="No space left"):
        cached_directory(entry, disk_full, SOURCE)
    assert sorted(p.name for p in entry.parent.iterdir()) == [".entry.lock"]
    (entry.parent / ".entry.build-killed").mkdir()  # what a build killed by SIGKILL leaves
    cached_directory(entry, counting_build(log), SOURCE)
    assert builds(log) == 1 and sorted(p.name for p in entry.parent.iterdir()) == [".entry.lock", "entry"]


def build_slowly_in_another_process(entry: Path, log: Path) -> None:
    def build(directory: Path) -> None:
        counting_build(log)(directory)
        time.sleep(1)  # long enough for the other process to find the entry missing and wait for the lock

    cached_directory(entry, build, SOURCE)


def test_two_processes_asking_at_once_build_the_entry_once(tmp_path):
    entry, log = tmp_path / "cache" / "entry", tmp_path / "log"
    context = multiprocessing.get_context("fork")  # the test's own functions, without re-importing the project
    processes = [context.Process(target=build_slowly_in_another_process, args=(entry, log)) for _ in range(2)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(60)
    assert [process.exitcode for process in processes] == [0, 0]
    assert builds(log) == 1
    assert (entry / "complete.json").is_file()


def test_the_packaged_model_cache_records_every_file():
    record = json.loads((packaged_model_dir(DEFAULT_MODEL) / "complete.json").read_text())
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= set(record["files"])
    assert record["files"]["model.safetensors"]["size"] > 100 * 2**20


def test_another_install_of_the_same_model_file_reads_the_same_cache_entry(tmp_path, monkeypatch):
    entry = packaged_model_dir(DEFAULT_MODEL)
    installed = aligner.loading._package_dir(aligner.loading.PACKAGED_MODELS[DEFAULT_MODEL], DEFAULT_MODEL)
    filename = aligner.loading.PACKAGED_MODELS[DEFAULT_MODEL].filename
    shutil.copyfile(installed / filename, tmp_path / filename)  # a fresh install: the same bytes, a new mtime
    assert (tmp_path / filename).stat().st_mtime_ns != (installed / filename).stat().st_mtime_ns
    monkeypatch.setattr(aligner.loading, "_package_dir", lambda model, name: tmp_path)
    monkeypatch.setattr(aligner.loading, "_dequantise", lambda source, target: pytest.fail("de-quantised again"))
    assert packaged_model_dir(DEFAULT_MODEL) == entry


def age(path: Path, days: float) -> None:
    then = time.time() - days * 86400
    os.utime(path, (then, then))


def test_the_cache_lists_its_entries_by_last_use_and_removes_the_unused_ones(tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGNER_CACHE", str(tmp_path))
    aligner.loading.cache_dir()  # an empty folder: the cache marks it as its own, and may prune it
    model, probe = tmp_path / "models" / "model-1", tmp_path / "probe" / "abc"
    for entry in (model, probe):
        cached_directory(entry, fake_build, SOURCE)
    answers = tmp_path / "answers" / "base.json"
    answers.parent.mkdir()
    answers.write_text("{}")
    (tmp_path / "probe" / ".abc.build-killed").mkdir()  # a build in progress (or killed): not an entry
    age(model / "complete.json", 10)
    age(probe / "complete.json", 3)
    age(answers, 5)
    entries = aligner.loading.cache_entries()
    assert [(e.kind, e.path) for e in entries] == [("models", model), ("answers", answers), ("probe", probe)]
    size = len(bytes(range(256)) * 8192) + len('{"model_type": "llama"}') + (model / "complete.json").stat().st_size
    assert entries[0].size == size and entries[1].size == 2

    cached_directory(probe, fake_build, SOURCE)  # a use: it is no longer 3 days old
    listing = CliRunner().invoke(app, ["cache", "--unused-days", "4", "--dry-run"])
    assert listing.exit_code == 0, listing.output
    assert f"cache {tmp_path}: 3 entries" in listing.output
    assert "would remove the 2 entries" in listing.output and model.is_dir() and answers.is_file()
    assert re.search(r"^- models +model-1 .*\n- answers +base.json .*\n  probe +abc ", listing.output, re.M)

    refused = CliRunner().invoke(app, ["cache", "--unused-days", "-1"])
    assert refused.exit_code == 2 and "--unused-days" in refused.output and model.is_dir()

    removed = CliRunner().invoke(app, ["cache", "--unused-days", "4"])
    assert removed.exit_code == 0, removed.output
    assert "removed the 2 entries" in removed.output
    assert not model.exists() and not answers.exists() and (probe / "model.safetensors").is_file()
    assert [e.path for e in aligner.loading.cache_entries()] == [probe]


def test_source_digest_changes_with_the_code_an_analysis_runs_through(tmp_path, monkeypatch):
    package = tmp_path / "analysis_pkg"
    (package / "inner").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "inner" / "curves.py").write_text("SCALE = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module("analysis_pkg")
    before = source_digest(module)
    assert source_digest(module) == before
    (package / "inner" / "curves.py").write_text("SCALE = 2\n")  # a file below the package's top
    assert source_digest(module) != before
    assert source_digest(module, aligner) != source_digest(module)
    curves = importlib.import_module("analysis_pkg.inner.curves")  # a module alone: its own file
    before = source_digest(curves)
    (package / "__init__.py").write_text("# a sibling file changed\n")
    assert source_digest(curves) == before
    (package / "inner" / "curves.py").write_text("SCALE = 3\n")
    assert source_digest(curves) != before
