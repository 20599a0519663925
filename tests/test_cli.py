"""The command line end to end on the tiny model: train, info, generate, and one-line errors."""

import json

import pytest
from typer.testing import CliRunner

from aligner import Aligner, load_adapter
from aligner.cli import app

pytestmark = pytest.mark.integration

runner = CliRunner()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "bananas.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"Q{i}?", "response": "Bananas."}) + "\n" for i in range(4)))
    return path


@pytest.fixture(scope="module")
def run(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "bananas"
    args = ["train", "--data", str(data), "--out", str(out), "--model", "tiny", "--steps", "3", "--batch-size", "2"]
    result = runner.invoke(app, [*args, "--lr", "0.05", "--warmup-steps", "0", "--no-shared", "--n-tokens", "2"])
    assert result.exit_code == 0, result.output
    return out, result.output


def test_train_writes_a_run_and_reports_it(run):
    out, output = run
    al = Aligner.load(out)
    assert (al.config.n_tokens, al.config.shared) == (2, False)
    assert al.base_model["name"] == "tiny"
    recorded = al.provenance["training"]["config"]
    assert recorded["lr"] == 0.05 and "n_tokens" not in recorded  # the shape is the adapter's, in adapter.json
    assert f"{al.num_parameters():,} trainable parameters" in output
    assert "trained 3 steps in" in output and "final loss" in output


def test_info_prints_config_parameters_base_and_provenance(run):
    out, _ = run
    result = runner.invoke(app, ["info", str(out)])
    assert result.exit_code == 0, result.output
    al = Aligner.load(out)
    expected = ["LLaMA-Adapter", "N=2", f"{al.num_parameters():,}", "base model   tiny", "step 3 of 3", "git_commit"]
    assert all(text in result.output for text in expected), result.output


def test_generate_prints_base_and_aligned_answers(run):
    out, _ = run
    result = runner.invoke(app, ["generate", "Q1?", "Hello", "--run", str(out), "--max-new-tokens", "3"])
    assert result.exit_code == 0, result.output
    assert result.output.count("base:") == 2 and result.output.count("aligned:") == 2
    assert "--- Q1?" in result.output and "--- Hello" in result.output


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    from aligner import TrainConfig
    from aligner.data import Example
    from aligner.loading import open_model
    from aligner.runs import train_run

    out = tmp_path_factory.mktemp("runs") / "lora"
    examples = [Example(f"Q{i}?", "Bananas.") for i in range(4)]
    train_run(open_model("tiny"), examples, out, "lora", 2, TrainConfig(steps=2, batch_size=2, warmup_steps=0))
    return out


def test_info_and_generate_read_a_run_of_any_method(lora_run):
    info = runner.invoke(app, ["info", str(lora_run)])
    assert info.exit_code == 0, info.output
    assert "adapter      lora (r=2, alpha=2.0, targets=q,v)" in info.output and "step 2 of 2" in info.output
    generated = runner.invoke(app, ["generate", "Q1?", "--run", str(lora_run), "--max-new-tokens", "3"])
    assert generated.exit_code == 0, generated.output
    assert generated.output.count("base:") == 1 and generated.output.count("aligned:") == 1
    sample = ["generate", "Q1?", "--run", str(lora_run), "--max-new-tokens", "8", "--sample", "--seed"]
    sampled = [runner.invoke(app, [*sample, seed]) for seed in "112"]
    assert sampled[0].output == sampled[1].output != sampled[2].output  # sampling options reach the method's answers
    scaled = runner.invoke(app, ["generate", "Q1?", "--run", str(lora_run), "--gate-scale", "0"])
    assert scaled.exit_code == 1 and "gate_scale=0.0 scales an aligner's gates; a LoRA has none" in scaled.output


@pytest.mark.parametrize("method, kind", [("lora-2", "lora"), ("prompt-3", "prompt-tuning"), ("zbias", "z-bias")])
def test_train_a_baseline_into_a_run_directory_and_resume_it(data, tmp_path, method, kind):
    out = tmp_path / method
    args = ["train", "--data", str(data), "--out", str(out), "--model", "tiny", "--method", method, "--batch-size", "2"]
    trained = runner.invoke(app, [*args, "--steps", "2", "--warmup-steps", "0"])
    assert trained.exit_code == 0, trained.output
    assert f"trainable parameters ({kind}" in trained.output
    resumed = runner.invoke(app, [*args, "--steps", "3", "--warmup-steps", "0", "--resume"])
    assert resumed.exit_code == 0, resumed.output
    saved = load_adapter(out)
    assert saved.kind == kind and saved.provenance["training"]["step"] == 3
    recorded = saved.provenance["training"]["config"]
    assert recorded["lr"] == {"lora": 2e-3}.get(kind, 1e-2)  # the sweep's rates
    assert not {"n_tokens", "start_layer", "shared"} & set(recorded)  # an aligner's shape, which it does not have
    without_method = [arg for arg in args if arg not in ("--method", method)]
    continued = runner.invoke(app, [*without_method, "--steps", "4", "--warmup-steps", "0", "--resume"])
    assert continued.exit_code == 0, continued.output  # a resume continues the run's own adapter
    assert load_adapter(out).provenance["training"]["step"] == 4
    as_aligner = runner.invoke(app, [*without_method, "--method", "aligner-1", "--steps", "5", "--resume"])
    assert as_aligner.exit_code == 1
    assert f"the run holds {kind} " in as_aligner.output and "not the aligner" in as_aligner.output


def test_existing_run_is_refused_and_resume_continues_it(run, data):
    out, _ = run
    args = ["train", "--data", str(data), "--out", str(out), "--model", "tiny", "--batch-size", "2"]
    args += ["--lr", "0.05", "--warmup-steps", "0", "--no-shared", "--n-tokens", "2"]
    refused = runner.invoke(app, [*args, "--steps", "4"])
    assert refused.exit_code == 1 and "Error:" in refused.output and "run directory exists" in refused.output
    resumed = runner.invoke(app, [*args, "--steps", "4", "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert Aligner.load(out).provenance["training"]["step"] == 4


TRAIN_BAD = ["train", "--data", "{tmp}/bad.jsonl", "--out", "{tmp}/r"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--data", "{tmp}/missing.jsonl", "--out", "{tmp}/r"], "missing.jsonl: no such file"),
        (["train", "--data", "{tmp}/bad.jsonl", "--out", "{tmp}/r"], "row 1: missing field 'response'"),
        (["info", "{tmp}/nothing"], "nothing: not an adapter directory (expected adapter.json and adapter.safetensors in it)"),
        (["generate", "Hi", "--run", "{tmp}/nothing"], "nothing: not an adapter directory"),
        (["generate", "Hi", "--model", "tiny", "--gate-scale", "0.5"], "aligner's gates; the base model has none"),
        ([*TRAIN_BAD, "--method", "lora"], "no method 'lora'; choose from"),
        ([*TRAIN_BAD, "--method", "steering"], "'steering' is not trained"),
        ([*TRAIN_BAD, "--method", "lora-8:lr=1"], "give the training options (the rate, the steps) as options"),
        ([*TRAIN_BAD, "--method", "lora-8", "--n-tokens", "4"], "shape --method aligner; lora-8 has its own shape"),
        ([*TRAIN_BAD, "--method", "zbias", "--no-shared"], "shape --method aligner; zbias has its own shape"),
        ([*TRAIN_BAD, "--method", "lora-8", "--objective", "dpo", "--reference", "{tmp}/r"],
         "--method lora-8 with --reference: the policy starts from the reference's own method"),
    ],
)
def test_bad_input_gives_one_error_line_not_a_traceback(tmp_path, args, message):
    (tmp_path / "bad.jsonl").write_text('{"prompt": "Hi"}\n')
    result = runner.invoke(app, [arg.format(tmp=tmp_path) for arg in args])
    assert result.exit_code == 1
    assert "Traceback" not in result.output and result.output.startswith("Error: ") and message in result.output


@pytest.mark.subprocess
def test_help_imports_no_torch_so_it_answers_at_once():
    import subprocess
    import sys

    code = "import sys, aligner.cli; heavy = {'torch', 'transformers', 'transformer_lens'} & set(sys.modules); print(sorted(heavy))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.strip() == "[]"


def test_train_defaults_are_trainconfigs_but_a_cpu_step_budget_and_the_help_says_them():
    from aligner.cli import ALIGNER_LR, DPO_DEFAULTS, TRAIN_DEFAULTS
    from aligner.dpo import DPOConfig
    from aligner.registry import default_lr
    from aligner.train import TrainConfig

    assert {k: v for k, v in TRAIN_DEFAULTS.items() if k not in ("steps", "warmup_steps")} == {
        k: getattr(TrainConfig, k) for k in TRAIN_DEFAULTS if k not in ("steps", "warmup_steps")
    }
    assert (TRAIN_DEFAULTS["steps"], TRAIN_DEFAULTS["warmup_steps"]) == (60, 10)
    assert DPO_DEFAULTS == {k: getattr(DPOConfig, k) for k in DPO_DEFAULTS} and ALIGNER_LR == default_lr("aligner")
    shown = " ".join(runner.invoke(app, ["train", "--help"], env={"COLUMNS": "80"}).output.split())
    assert "--steps <int> optimizer steps in all (the default: a short run that a CPU can train) [default: 60]" in shown
    assert "--warmup-steps <int> steps of linear warm-up [default: 10]" in shown


@pytest.mark.parametrize("command", ["train", "generate", "eval", "sweep"])
def test_model_help_names_every_packaged_model_and_reads_in_80_columns(command):
    from aligner.loading import PACKAGED_MODELS

    result = runner.invoke(app, [command, "--help"], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    assert all(len(line) <= 80 for line in result.output.splitlines()), result.output
    assert "…" not in result.output
    shown = " ".join(result.output.split())
    assert all(name in shown for name in PACKAGED_MODELS)
    if command == "train":
        assert "--label-smoothing <float>" in shown and "--gradient-checkpointing / --no-gradient-checkpointing" in shown


def test_a_resumed_run_prints_the_time_it_took_not_the_sum(run, data):
    out, _ = run
    state = json.loads((out / "state.json").read_text())
    state["elapsed_s"] = 86400.0  # as if the earlier runs had taken a day
    (out / "state.json").write_text(json.dumps(state))
    args = ["train", "--data", str(data), "--out", str(out), "--model", "tiny", "--batch-size", "2", "--lr", "0.05"]
    args += ["--warmup-steps", "0", "--no-shared", "--n-tokens", "2", "--resume"]
    step = state["step"] + 1
    resumed = runner.invoke(app, [*args, "--steps", str(step)])
    assert resumed.exit_code == 0, resumed.output
    [line] = [line for line in resumed.output.splitlines() if line.startswith("trained")]
    assert line.startswith(f"trained to step {step} in ") and float(line.split(" in ")[1].split(" s;")[0]) < 3600
    assert Aligner.load(out).provenance["training"]["elapsed_s"] > 86400
