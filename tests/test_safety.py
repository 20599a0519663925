"""Nothing lost, nothing executed (issue #32): the cache prunes only what it made, one training per run directory,
a run stopped early resumes, a damaged run of any kind is named and hides no other, huge files are refused
before they are read, and the smaller cases: each a test that the code before these fixes fails."""

import hashlib
import json
import os
import stat
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save
from typer.testing import CliRunner

from aligner import Aligner, AlignerConfig, TrainConfig, load_adapter, train_sft
from aligner.checkpoint import LOCK_FILE, run_lock
from aligner.cli import app
from aligner.data import Example, load_examples
from aligner.files import atomic_write_bytes, command_line
from aligner.loading import (
    CACHE_TAG,
    DEFAULT_CACHE,
    cache_dir,
    cache_entries,
    cache_location,
    cached_directory,
)
from aligner.methods import LoRA, LoRAConfig, PromptTuning, PromptTuningConfig, ZBias, ZBiasConfig
from aligner.paper import import_paper_checkpoint
from aligner.runs import list_runs, run_losses

pytestmark = pytest.mark.usefixtures("one_thread")

runner = CliRunner()
EXAMPLES = [Example(f"What is {i} + {i}?", "Bananas are yellow.", row=i + 1) for i in range(4)]
QUICK = TrainConfig(steps=2, save_every=1, log_every=1, batch_size=2, lr=0.05, warmup_steps=0)


def fake_build(directory: Path) -> None:
    (directory / "model.safetensors").write_bytes(b"weights")


def age(path: Path, days: float) -> None:
    then = time.time() - days * 86400
    os.utime(path, (then, then))


# ---- 1. the cache prunes only a root it made, and only its own kinds of entry ----


def test_pruning_a_folder_the_cache_did_not_make_is_refused_and_removes_nothing(tmp_path, monkeypatch):
    home = tmp_path / "home"
    for path in (home / ".ssh" / "id_rsa", home / "models" / "thesis" / "draft.tex", home / "answers" / "a.json"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("mine")
        age(path, 100)
    monkeypatch.setenv("ALIGNER_CACHE", str(home))
    for args in (["cache", "--unused-days", "0"], ["cache", "--unused-days", "0", "--dry-run"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 1, result.output
        assert f"Error: {home}: not a cache that aligner-workbench made (no {CACHE_TAG}" in result.output
    assert sorted(str(p.relative_to(home)) for p in home.rglob("*") if p.is_file()) == [
        ".ssh/id_rsa", "answers/a.json", "models/thesis/draft.tex"
    ]
    cache_dir()  # a folder that exists and holds files is used, never marked
    assert not (home / CACHE_TAG).exists()


def test_an_empty_aligner_cache_variable_is_unset(tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGNER_CACHE", "")
    monkeypatch.chdir(tmp_path)
    assert cache_location() == DEFAULT_CACHE != Path.cwd()


def test_the_cache_marks_the_root_it_makes_and_prunes_only_its_own_entries(tmp_path, monkeypatch):
    root, outside = tmp_path / "cache", tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.txt").write_text("mine")
    monkeypatch.setenv("ALIGNER_CACHE", str(root))
    assert cache_dir() == root and (root / CACHE_TAG).read_text().startswith("Signature: 8a477f597d28d172789f06886806bc55")
    model = cached_directory(root / "models" / "m-1", fake_build, {"file": "m"})
    answers = root / "answers" / "base.json"
    answers.parent.mkdir()
    answers.write_text("{}")
    foreign = [root / "answers" / "notes.txt", root / "other" / "x.bin", root / "readme.txt"]
    for path in foreign:
        path.parent.mkdir(exist_ok=True)
        path.write_text("not the cache's")
    (root / "models" / "link").symlink_to(outside, target_is_directory=True)
    for path in (model / "complete.json", answers, *foreign):
        age(path, 10)
    assert sorted(e.path.name for e in cache_entries()) == ["base.json", "m-1"]
    result = runner.invoke(app, ["cache", "--unused-days", "1"])
    assert result.exit_code == 0 and "removed the 2 entries" in result.output, result.output
    assert not model.exists() and not answers.exists()
    assert all(path.is_file() for path in foreign) and (outside / "precious.txt").is_file()


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_files_and_cache_entries_follow_the_umask(tmp_path, umask):
    previous = os.umask(umask)
    try:
        atomic_write_bytes(tmp_path / "run" / "adapter.json", b"{}")
        entry = cached_directory(tmp_path / "cache" / "models" / "m", fake_build, {"file": "m"})
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "run" / "adapter.json").stat().st_mode) == 0o666 & ~umask
    assert stat.S_IMODE(entry.stat().st_mode) == 0o777 & ~umask
    assert stat.S_IMODE((entry / "complete.json").stat().st_mode) == 0o666 & ~umask


def aligner_model():
    import aligner

    return aligner.tiny_model()


# ---- 3 and 4. one training per run directory; a run stopped before its first checkpoint ----


def test_a_second_training_of_a_run_is_refused_at_once_naming_the_run_and_process(tiny, tmp_path):
    run = tmp_path / "run"
    with run_lock(run):
        for resume in (False, True):
            with pytest.raises(BlockingIOError, match=rf"{run}: being trained by another process \(PID {os.getpid()},"):
                train_sft(tiny, EXAMPLES, QUICK, run_dir=run, resume=resume)
        data = tmp_path / "d.jsonl"
        data.write_text('{"prompt": "Hi", "response": "Hello"}\n')
        result = runner.invoke(app, ["train", "--data", str(data), "--out", str(run), "--model", "tiny", "--steps", "1"])
        assert result.exit_code == 1 and f"being trained by another process (PID {os.getpid()}" in result.output
    assert not (run / "metrics.jsonl").exists()
    train_sft(tiny, EXAMPLES, QUICK, run_dir=run)  # the lock went with its holder
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert not (run / LOCK_FILE).exists()


def test_a_run_stopped_before_its_first_checkpoint_resumes_afresh(tiny, tmp_path):
    straight = train_sft(tiny, EXAMPLES, QUICK, run_dir=tmp_path / "straight")
    run = tmp_path / "killed"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n{"step": 2, "lo')
    (run / ".adapter.json.1a2b3c4d.tmp").write_text("{")
    (run / LOCK_FILE).write_text("12345\n")  # left by the killed process; no process holds it
    with pytest.raises(FileExistsError, match=rf"{run}: run directory exists; resume it"):
        train_sft(tiny, EXAMPLES, QUICK, run_dir=run)
    with pytest.warns(UserWarning, match=rf"{run}: no checkpoint to resume \(the run stopped before its first\); starting afresh"):
        resumed = train_sft(tiny, EXAMPLES, QUICK, run_dir=run, resume=True)
    torch.testing.assert_close(resumed.tokens, straight.tokens, rtol=0, atol=0)
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert sorted(p.name for p in run.iterdir()) == ["adapter.json", "adapter.safetensors", "metrics.jsonl", "state-00000002.safetensors", "state.json"]


def test_resuming_removes_stale_temporary_files(tiny, tmp_path):
    run = tmp_path / "run"
    train_sft(tiny, EXAMPLES, QUICK, run_dir=run)
    (run / ".state.json.deadbeef.tmp").write_text("half")
    train_sft(tiny, EXAMPLES, TrainConfig(**{**QUICK.__dict__, "steps": 3}), run_dir=run, resume=True)
    assert not list(run.glob(".*.tmp"))


@pytest.mark.parametrize(
    "prepare, message",
    [
        (lambda run: None, r"no training state to resume \(no such directory\)"),
        (
            lambda run: Aligner.for_model(aligner_model()).save(run),
            r"holds an adapter \(adapter.json\) but no training state \(state.json\) to resume it from: .*; train into "
            r"another directory, or delete adapter.json and adapter.safetensors to train this one afresh",
        ),
        (
            lambda run: (run.mkdir(), (run / "thesis.tex").write_text("mine")),
            r"no training state \(state.json\) to resume, and it holds what a run does not write \(thesis.tex\)",
        ),
    ],
)
def test_resuming_what_is_not_a_stopped_run_says_what_to_do_and_changes_nothing(tiny, tmp_path, prepare, message):
    run = tmp_path / "run"
    prepare(run)
    before = {p.name: p.read_bytes() for p in run.iterdir()} if run.exists() else None
    with pytest.raises(OSError, match=message):
        train_sft(tiny, EXAMPLES, QUICK, run_dir=run, resume=True)
    assert ({p.name: p.read_bytes() for p in run.iterdir()} if run.exists() else None) == before


# ---- 5, 6 and 7. every kind of adapter file gets every check; a damaged run hides no other ----

KINDS = {
    "aligner": lambda model: Aligner.for_model(model, AlignerConfig()),
    "lora": lambda model: LoRA.for_model(model, LoRAConfig(r=2, alpha=2.0)),
    "prompt-tuning": lambda model: PromptTuning.for_model(model, PromptTuningConfig(3)),
    "z-bias": lambda model: ZBias.for_model(model, ZBiasConfig()),
}


@pytest.fixture(scope="module")
def saved_kinds(tmp_path_factory):
    import aligner

    model, root = aligner.tiny_model(), tmp_path_factory.mktemp("kinds")
    torch.manual_seed(0)
    return {kind: make(model).save(root / kind) for kind, make in KINDS.items()}


def spoiled(saved: Path, tmp_path: Path) -> Path:
    run = tmp_path / saved.name
    run.mkdir()
    for name in ("adapter.json", "adapter.safetensors"):
        (run / name).write_bytes((saved / name).read_bytes())
    return run


def edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def write_tensors(run: Path, tensors: dict) -> None:
    data = save(tensors)
    (run / "adapter.safetensors").write_bytes(data)
    edit_json(run / "adapter.json", lambda meta: meta.update(tensors_sha256=hashlib.sha256(data).hexdigest()))


def widened(run: Path) -> None:
    """Every tensor one column wider, the sha256 updated: a matrix of the wrong width, linked to its JSON."""
    tensors = load_adapter_tensors(run)
    write_tensors(run, {name: torch.cat([t, t[..., :1]], dim=-1) for name, t in tensors.items()})


def load_adapter_tensors(run: Path) -> dict:
    from safetensors.torch import load

    return load((run / "adapter.safetensors").read_bytes())


SPOILS = {
    "a config field missing": (lambda run: edit_json(run / "adapter.json", lambda m: m["config"].popitem()), "adapter.json"),
    "a config field of the wrong type": (
        lambda run: edit_json(run / "adapter.json", lambda m: m["config"].update({next(iter(m["config"])): "eight"})),
        "adapter.json",
    ),
    "a field of the file missing": (lambda run: edit_json(run / "adapter.json", lambda m: m.pop("shape")), "adapter.json"),
    "a tensor of the wrong width": (widened, "adapter.safetensors"),
    "tensors changed after saving": (
        lambda run: (run / "adapter.safetensors").write_bytes((run / "adapter.safetensors").read_bytes()[:-4] + b"\0\0\0\1"),
        "adapter.safetensors",
    ),
    "tensors cut short": (
        lambda run: (run / "adapter.safetensors").write_bytes((run / "adapter.safetensors").read_bytes()[:-5]),
        "adapter.safetensors",
    ),
}


@pytest.mark.parametrize("spoil", SPOILS)
@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_of_adapter_file_gets_every_check_naming_the_file(saved_kinds, tmp_path, kind, spoil):
    run = spoiled(saved_kinds[kind], tmp_path)
    damage, file = SPOILS[spoil]
    damage(run)
    with pytest.raises(ValueError, match=rf"^{run / file}: "):
        load_adapter(run)


def test_unknown_lora_targets_are_refused_naming_the_field(saved_kinds, tmp_path):
    run = spoiled(saved_kinds["lora"], tmp_path)
    edit_json(run / "adapter.json", lambda meta: meta["config"].update(targets=["q", "mlp"]))
    with pytest.raises(ValueError, match=rf"{run / 'adapter.json'}: .*'mlp'"):
        load_adapter(run)


def test_a_damaged_run_of_any_kind_is_listed_with_its_file_and_hides_no_other(saved_kinds, tmp_path):
    (tmp_path / "good").mkdir()
    (tmp_path / "bad").mkdir()
    for saved in saved_kinds.values():
        spoiled(saved, tmp_path / "good")
        bad = spoiled(saved, tmp_path / "bad")
        (bad / "adapter.safetensors").write_bytes((bad / "adapter.safetensors").read_bytes()[:100])
    runs = {info.name: info for info in list_runs(tmp_path)}
    assert sorted(runs) == sorted(f"{where}/{kind}" for where in ("bad", "good") for kind in KINDS)
    for kind in KINDS:
        assert runs[f"good/{kind}"].error is None
        assert runs[f"bad/{kind}"].error.startswith(f"{tmp_path / 'bad' / kind / 'adapter.safetensors'}: ")


def test_a_torn_last_line_of_metrics_is_left_out_and_a_bad_earlier_line_named(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')
    assert run_losses(tmp_path) == [(1, 2.0)]
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "lo\n{"step": 2, "loss": 1.0}\n')
    with pytest.raises(ValueError, match=rf"{tmp_path / 'metrics.jsonl'}: line 1 is not a JSON object"):
        run_losses(tmp_path)


@pytest.mark.parametrize("name", ["adapter.json", "aligner.json", "adapter.safetensors", "state.json"])
def test_a_huge_file_is_refused_by_its_size_before_it_is_read(saved_kinds, tmp_path, name):
    run = spoiled(saved_kinds["aligner"], tmp_path)
    if name == "aligner.json":  # the older layout
        (run / "adapter.json").rename(run / "aligner.json")
        (run / "adapter.safetensors").rename(run / "aligner.safetensors")
    if name == "state.json":
        run = tmp_path / "trained"
        train_sft(aligner_model(), EXAMPLES, QUICK, run_dir=run)
    with open(run / name, "r+b") as f:  # sparse: 30 GB that take no disk
        f.truncate(30 * 10**9)
    with pytest.raises(ValueError, match=rf"{run / name}: 30,000,000,000 bytes, more than"):
        if name == "state.json":
            train_sft(aligner_model(), EXAMPLES, TrainConfig(**{**QUICK.__dict__, "steps": 3}), run_dir=run, resume=True)
        else:
            load_adapter(run)


# ---- the smaller items ----


@pytest.mark.parametrize("value", ["nan", "inf", "-1"])
def test_a_gate_scale_that_is_not_finite_and_positive_is_refused(value):
    result = runner.invoke(app, ["generate", "Hi", "--model", "tiny", "--gate-scale", value])
    assert result.exit_code == 1 and "gate_scale must be finite and >= 0" in result.output


@pytest.mark.parametrize("settings", [{"lr": float("inf")}, {"lr": float("nan")}, {"steps": 2.5}, {"warmup_steps": 1.5}])
def test_an_infinite_rate_or_a_fractional_step_count_is_refused(settings):
    with pytest.raises(ValueError, match=f"TrainConfig.{next(iter(settings))} must be"):
        TrainConfig(**settings)


def test_max_new_tokens_is_capped_at_the_models_context_with_a_warning(tiny, monkeypatch):
    import aligner

    monkeypatch.setattr(tiny.cfg, "n_ctx", 40)
    with pytest.warns(UserWarning, match=r"max_new_tokens=100000 is more than the model's context of 40 tokens .* at most \d+ are"):
        aligner.generate(tiny, ["Hi"], max_new_tokens=100000)


def test_a_lone_surrogate_in_training_json_is_named_by_row_and_field(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "Hi", "response": "Yo"}\n{"prompt": "Hi \\ud800", "response": "Yo"}\n')
    with pytest.raises(ValueError, match=rf"{path}, row 2: field 'prompt' is not Unicode text \(a lone UTF-16 surrogate"):
        load_examples(path)


def test_a_folder_that_holds_no_dataset_is_named():
    with pytest.raises(ValueError, match=r"^/: not a data file or a dataset"):
        load_examples("/")


def test_info_escapes_control_characters_from_the_file(saved_kinds, tmp_path):
    run = spoiled(saved_kinds["aligner"], tmp_path)
    edit_json(run / "adapter.json", lambda meta: meta["base_model"].update(name="\x1b]0;owned\x07\x1b[2J"))
    result = runner.invoke(app, ["info", str(run)])
    assert result.exit_code == 0, result.output
    assert "\x1b" not in result.output and "\x07" not in result.output
    assert "base model   \\x1b]0;owned\\x07\\x1b[2J" in result.output


def test_a_code_bearing_pth_is_refused_as_such_without_torchs_advice(tmp_path):
    import pickle

    class Opens:
        def __reduce__(self):
            return (open, (str(tmp_path / "created"), "w"))

    path = tmp_path / "evil.pth"
    path.write_bytes(pickle.dumps({"x": Opens()}))
    with pytest.raises(ValueError) as caught:
        import_paper_checkpoint(path)
    message = str(caught.value)
    assert "could run code when loaded" in message and "none of it was run" in message
    assert "weights_only" not in message and not (tmp_path / "created").exists()


def test_two_keys_for_one_layer_in_a_paper_checkpoint_are_refused(tmp_path):
    gate = torch.zeros(1, 4, 1, 1)
    state = {
        "global_value_embedding.weight": torch.zeros(1, 8),
        "transformer.h.3.attn.gating_factor": gate,
        "transformer.h.03.attn.gating_factor": gate + 1,
    }
    torch.save(state, tmp_path / "dup.pth")
    with pytest.raises(ValueError, match=r"keys 'transformer.h.3.attn.gating_factor' and 'transformer.h.03.attn.gating_factor' both give layer 3's"):
        import_paper_checkpoint(tmp_path / "dup.pth")


def test_runs_behind_symbolic_links_are_listed_once(saved_kinds, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    spoiled(saved_kinds["lora"], elsewhere)
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "linked").symlink_to(elsewhere, target_is_directory=True)
    (runs / "again").symlink_to(elsewhere, target_is_directory=True)
    (elsewhere / "loop").symlink_to(runs, target_is_directory=True)
    listed = [info.name for info in list_runs(runs)]
    assert len(listed) == 1 and listed[0] in ("again/lora", "linked/lora")


# ---- provenance: the command that made a run ----


@pytest.mark.parametrize(
    "argv, command",
    [
        (["/x/.venv/bin/aligner", "train", "--data", "my data.jsonl"], "aligner train --data 'my data.jsonl'"),
        (["/x/aligner/__main__.py", "info", "runs/a"], "python -m aligner info runs/a"),
        (["-c"], "python -c (library call: aligner.train.train_sft)"),
        ([""], "python (interactive) (library call: aligner.train.train_sft)"),
    ],
)
def test_a_runs_provenance_records_the_command_or_the_library_call(tiny, tmp_path, monkeypatch, argv, command):
    monkeypatch.setattr(sys, "argv", argv)
    run = tmp_path / "run"
    train_sft(tiny, EXAMPLES, TrainConfig(**{**QUICK.__dict__, "steps": 1}), run_dir=run)
    assert load_adapter(run).provenance["command"] == command
    assert command_line() == command.replace("aligner.train.train_sft", "aligner.files.command_line")


def test_a_recorded_data_path_outside_the_working_directory_is_not_followed(tmp_path, monkeypatch):
    """A run's provenance is anyone's writing: /etc/passwd, /proc/self/environ or a folder is never read as its data."""
    from aligner import tiny_model
    from aligner.runs import recorded_data

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "data").mkdir(parents=True)
    own = tmp_path / "runs" / "data" / "mine.jsonl"
    own.write_text('{"prompt": "Q?", "response": "A."}\n')
    outside = tmp_path.parent / f"{tmp_path.name}-outside.jsonl"
    outside.write_text('{"prompt": "Q?", "response": "A."}\n')
    (tmp_path / "link.jsonl").symlink_to(outside)
    al = Aligner.for_model(tiny_model())
    for recorded, expected in [
        ("runs/data/mine.jsonl", own),
        (str(own), own),
        ("/etc/passwd", None),
        ("/proc/self/environ", None),
        (str(outside), None),
        ("link.jsonl", None),  # a link inside that leads outside
        ("runs/data", None),
        ("runs/data/missing.jsonl", None),
        (7, None),
    ]:
        al.provenance = {"training": {"config": {"data": recorded}}}
        assert recorded_data(al) == expected, recorded
