"""Several processes with accelerate: two CPU processes joined by gloo (`accelerate launch --multi_gpu` with
ACCELERATE_USE_CPU=true) train the aligner that one process trains on the same global batch, by SFT and by DPO,
and collect the activations one process collects, into the same cache entry. Also run here: gradient
checkpointing, bf16 mixed precision, and the launches that are refused.

Run as a script (`accelerate launch ... tests/test_distributed.py probe CACHE LOG`), this file is the probe
collection worker of `test_two_processes_collect_the_activations_of_one_into_the_same_cache`; with `fingerprint
LOG`, the worker of `test_the_fingerprint_of_a_sharded_model_is_that_of_the_whole`.
"""

import json
import os
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from accelerate import DistributedType
from accelerate.utils import FullyShardedDataParallelPlugin
from safetensors.torch import load_file
from typer.testing import CliRunner

import aligner
from aligner import Aligner, TrainConfig, train_sft
from aligner.cli import app
from aligner.data import Example
from aligner.distributed import fully_shard_options
from aligner.train import _check_accelerator

pytestmark = pytest.mark.subprocess

ACCELERATE = Path(sys.executable).with_name("accelerate")
runner = CliRunner()


def free_port() -> int:
    """A port for the processes' rendezvous, so that launches running at once never meet."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: list[str], cwd: Path, processes: int = 2, mixed_precision: str = "no") -> str:
    """`accelerate launch` of `args` on `processes` CPU processes; their output. Fails the test if they fail."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    placement = ["--multi_gpu", "--main_process_port", str(free_port())] if processes > 1 else ["--cpu"]
    command = [
        str(ACCELERATE), "launch", *placement, "--num_processes", str(processes), "--num_machines", "1",
        "--mixed_precision", mixed_precision, "--dynamo_backend", "no", *args,
    ]  # fmt: skip
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    return output


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def logged(run: Path, field: str = "loss") -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row[field] for row in rows}


def assert_same_aligner(got: Path, want: Path) -> None:
    a, b = Aligner.load(got), Aligner.load(want)
    assert b.gates.abs().max() > 0.05  # trained: a step moves every gate by about lr
    torch.testing.assert_close(a.tokens, b.tokens, rtol=0, atol=1e-5)
    torch.testing.assert_close(a.gates, b.gates, rtol=0, atol=1e-5)


# SFT: 5 examples; a step of 6 crosses epochs, shared 3 and 3, each process forwarding 2 then 1.
SFT_ARGS = ["--model", "tiny", "--batch-size", "2", "--grad-accum", "3", "--lr", "0.1", "--warmup-steps", "0",
            "--log-every", "1", "--save-every", "2"]  # fmt: skip


@pytest.mark.parametrize("shard", [False, True], ids=["whole", "sharded"])
def test_two_processes_resume_a_run_to_the_aligner_of_one_process(tmp_path, shard):
    """Also with the frozen model sharded between the two processes (FSDP2, --shard-model) and its layers
    recomputed in backward (--gradient-checkpointing): each holds half of every weight, and they train the same
    aligner."""
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"What is {i} + {i}?", "response": "Bananas."} for i in range(5)])
    train = ["train", "--data", str(data), *SFT_ARGS]
    straight = runner.invoke(app, [*train, "--out", str(tmp_path / "one"), "--steps", "5"])
    assert straight.exit_code == 0, straight.output
    first = runner.invoke(app, [*train, "--out", str(tmp_path / "two"), "--steps", "2"])  # one process...
    assert first.exit_code == 0, first.output
    sharding = ["--shard-model", "--gradient-checkpointing"] if shard else []
    output = launch(["-m", "aligner", *train, *sharding, "--out", "two", "--steps", "5", "--resume"], cwd=tmp_path)  # ...then two
    assert "5 examples from" in output and "2 processes" in output
    assert ("the frozen model sharded (FSDP2): this process held 50% of its weights" in output) == shard
    assert output.count("saved to two") == 1  # the main process alone reports

    one, two = tmp_path / "one", tmp_path / "two"
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    assert logged(two).keys() == logged(one).keys() == {1, 2, 3, 4, 5}
    for step, loss in logged(one).items():
        assert logged(two)[step] == pytest.approx(loss, rel=1e-5)
    assert logged(two, "tokens_per_s")[5] > 0
    assert_same_aligner(two, one)
    want, got = (load_file(next(run.glob("state-*.safetensors"))) for run in (one, two))
    assert want.keys() == got.keys()
    for name in want:  # AdamW's moments too
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6)
    state = json.loads((two / "state.json").read_text())
    assert (state["step"], state["position"]) == (5, 30)


@pytest.mark.parametrize("shard", [False, True], ids=["whole", "sharded"])
def test_two_processes_train_by_dpo_the_policy_of_one_process(tmp_path, shard):
    pairs = [{"prompt": f"What is {i} + {i}?", "chosen": "Bananas.", "rejected": "Apples are red" + "!" * i} for i in range(5)]
    data = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    # Steps of 3 pairs, shared 2 and 1; the reference pass shares the 5 pairs 3 and 2. A sharded model needs steps
    # that split evenly: 2 pairs, 1 and 1; its reference pass pads the second share to 3 pairs, 2 forward passes.
    batch = "2" if shard else "3"
    train = ["train", "--objective", "dpo", "--data", str(data), "--model", "tiny", "--steps", "3", "--batch-size", batch,
             "--lr", "0.1", "--warmup-steps", "0", "--log-every", "1"]  # fmt: skip
    one = runner.invoke(app, [*train, "--out", str(tmp_path / "one")])
    assert one.exit_code == 0, one.output
    output = launch(["-m", "aligner", *train, *(["--shard-model"] if shard else []), "--out", "two"], cwd=tmp_path)
    assert "5 pairs from" in output and "2 processes" in output
    assert ("this process held 50% of its weights" in output) == shard
    assert logged(tmp_path / "two", "loss")[1] == pytest.approx(np.log(2), rel=1e-6)  # the policy starts at the base
    for field in ("loss", "reward_margin", "logp_chosen", "logp_rejected"):
        for step, value in logged(tmp_path / "one", field).items():
            assert logged(tmp_path / "two", field)[step] == pytest.approx(value, rel=1e-5, abs=1e-6)
    assert_same_aligner(tmp_path / "two", tmp_path / "one")


# ---- probe collection: the worker, run by accelerate launch ----

PROMPTS = ["What is the capital of Peru?", "Name a river.", "Which city is the capital of the United Kingdom?",
           "What is 2 + 2?", "Say something."]  # fmt: skip


def probe_inputs():
    """The model, dataset and aligner that the worker and the test both collect with."""
    from aligner.tasks import KNOWLEDGE_SETS
    from probe.dataset import ProbeDataset

    model = aligner.tiny_model()
    dataset = ProbeDataset(
        name="five", knowledge=KNOWLEDGE_SETS["capitals"], prompts=PROMPTS, answers=[("x",)] * len(PROMPTS),
        labels={"kind": np.arange(len(PROMPTS)) % 2}, entities=np.arange(len(PROMPTS)),
    )  # fmt: skip
    torch.manual_seed(1)
    al = Aligner.for_model(model, aligner.AlignerConfig(n_tokens=2))
    with torch.no_grad():
        al.gates.normal_()
    return model, dataset, al


def collect_module():
    """probe.collect, the module (`probe` exports a function of the same name)."""
    import probe.collect  # noqa: F401

    return sys.modules["probe.collect"]


def probe_worker(cache: Path, log: Path) -> None:
    """Collect into `cache` as one of the launched processes; write to `log` the rows this process computed."""
    from aligner.distributed import launched_accelerator

    rank = launched_accelerator().process_index
    computed = []
    module = collect_module()
    write_activations = module._write_activations

    def recording(*args):
        computed.append([args[-1].start, args[-1].stop])  # its last argument: the rows
        return write_activations(*args)

    module._write_activations = recording
    model, dataset, al = probe_inputs()
    module.collect(model, dataset, [None, al], batch_size=2, cache=cache)
    (log / f"rows-{rank}.json").write_text(json.dumps(computed))


def fingerprint_worker(log: Path) -> None:
    """Shard the tiny model between the launched processes; write to `log` its fingerprint before and after."""
    from aligner.distributed import held_share, launched_accelerator, shard_frozen_model
    from aligner.loading import model_fingerprint

    accelerator = launched_accelerator()
    model = aligner.tiny_model()
    whole = model_fingerprint(model)
    shard_frozen_model(model, accelerator)
    record = {"whole": whole, "sharded": model_fingerprint(model), "held": held_share(model)}
    (log / f"fingerprint-{accelerator.process_index}.json").write_text(json.dumps(record))


def test_the_fingerprint_of_a_sharded_model_is_that_of_the_whole(tmp_path):
    launch([__file__, "fingerprint", str(tmp_path)], cwd=tmp_path)
    records = [json.loads((tmp_path / f"fingerprint-{rank}.json").read_text()) for rank in (0, 1)]
    for record in records:
        assert record["sharded"] == record["whole"] == aligner.model_fingerprint(aligner.tiny_model())
        assert record["held"] == pytest.approx(0.5, abs=0.01)


def test_two_processes_collect_the_activations_of_one_into_the_same_cache(tmp_path, monkeypatch):
    module = collect_module()
    (tmp_path / "log").mkdir()
    launch([__file__, "probe", str(tmp_path / "shared"), str(tmp_path / "log")], cwd=tmp_path)
    shares = [json.loads((tmp_path / "log" / f"rows-{rank}.json").read_text()) for rank in (0, 1)]
    assert shares == [[[0, 3], [0, 3]], [[3, 5], [3, 5]]]  # rows 0-2 and 3-4, for each of the two conditions

    model, dataset, al = probe_inputs()
    alone = module.collect(model, dataset, [None, al], batch_size=2, cache=tmp_path / "alone")

    def must_not_run(*args, **kwargs):
        raise AssertionError("the activations were computed again")

    monkeypatch.setattr(module, "_write_activations", must_not_run)
    together = module.collect(model, dataset, [None, al], batch_size=2, cache=tmp_path / "shared")
    assert [path.name for path in together.paths.values()] == [path.name for path in alone.paths.values()]
    for condition in alone.conditions:
        assert together.arrays[condition].keys() == alone.arrays[condition].keys()
        for name, array in alone.arrays[condition].items():
            np.testing.assert_allclose(together.arrays[condition][name], array, rtol=1e-5, atol=1e-6)
            assert np.abs(array).sum(axis=tuple(range(1, array.ndim))).all()  # every row written


# ---- one process ----

EXAMPLES = [Example(f"What is {i} + {i}?", "Bananas are yellow.") for i in range(4)]
FAST = dict(steps=2, batch_size=4, lr=0.1, warmup_steps=0)


def test_gradient_checkpointing_recomputes_the_layers_and_trains_the_same_aligner():
    model = aligner.tiny_model()
    calls = []
    model.add_hook("blocks.3.attn.hook_z", lambda z, hook: calls.append(None))
    plain = train_sft(model, EXAMPLES, TrainConfig(**FAST))
    forwards = len(calls)
    checkpointed = train_sft(model, EXAMPLES, TrainConfig(**FAST, gradient_checkpointing=True))
    assert (forwards, len(calls) - forwards) == (2, 4)  # a forward per step, then a recomputation in each backward
    torch.testing.assert_close(checkpointed.tokens, plain.tokens, rtol=0, atol=1e-6)
    torch.testing.assert_close(checkpointed.gates, plain.gates, rtol=0, atol=1e-6)
    layers = [block.original_component for block in model.blocks]
    assert not any(layer.training or layer.gradient_checkpointing for layer in layers)  # left as it was


def test_a_run_resumes_with_or_without_gradient_checkpointing_and_from_before_it_was_recorded(tmp_path):
    model = aligner.tiny_model()
    config = TrainConfig(**FAST, save_every=1)
    straight = train_sft(model, EXAMPLES, replace(config, steps=3), run_dir=tmp_path / "straight")
    train_sft(model, EXAMPLES, config, run_dir=tmp_path / "split")
    state = json.loads((tmp_path / "split" / "state.json").read_text())
    del state["config"]["gradient_checkpointing"]  # as written before the setting existed
    (tmp_path / "split" / "state.json").write_text(json.dumps(state))
    resumed_config = replace(config, steps=3, gradient_checkpointing=True)
    resumed = train_sft(model, EXAMPLES, resumed_config, run_dir=tmp_path / "split", resume=True)
    torch.testing.assert_close(resumed.tokens, straight.tokens, rtol=0, atol=1e-6)


def test_bf16_mixed_precision_trains_close_to_float32(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": e.prompt, "response": e.response} for e in EXAMPLES])
    train = ["train", "--data", str(data), "--model", "tiny", "--steps", "2", "--batch-size", "2", "--lr", "0.1",
             "--warmup-steps", "0", "--log-every", "1"]  # fmt: skip
    assert runner.invoke(app, [*train, "--out", str(tmp_path / "fp32")]).exit_code == 0
    launch(["-m", "aligner", *train, "--out", "bf16"], cwd=tmp_path, processes=1, mixed_precision="bf16")
    fp32, bf16 = logged(tmp_path / "fp32"), logged(tmp_path / "bf16")
    assert bf16[1] != fp32[1]  # the forward passes ran in bfloat16...
    assert bf16 == pytest.approx(fp32, rel=1e-2)  # ...close to float32
    trained = Aligner.load(tmp_path / "bf16")
    assert trained.gates.dtype == torch.float32 and trained.gates.abs().max() > 0.05  # float32 parameters, trained


def test_processes_launched_together_that_accelerate_did_not_join_are_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # as accelerate launch --multi_gpu leaves it on a machine with no GPU
    with pytest.raises(ValueError, match=r"one of 2 processes launched together .* ACCELERATE_USE_CPU=true"):
        train_sft(aligner.tiny_model(), EXAMPLES, TrainConfig(**FAST))


def stand_in(kind: DistributedType, processes: int = 1) -> SimpleNamespace:
    """What the loop reads of accelerate's accelerator, for launches that need GPUs or other processes."""
    return SimpleNamespace(num_processes=processes, distributed_type=kind, mixed_precision="no", device=torch.device("cpu"))


def test_deepspeed_launches_are_refused_rather_than_run_unsharded():
    # This launch needs GPUs; what the loop reads of the accelerator is faked here.
    launched = stand_in(DistributedType.DEEPSPEED)
    with pytest.raises(ValueError, match="launch with DEEPSPEED is not supported: .* --use_fsdp, or .* --shard-model"):
        _check_accelerator(launched)


def test_an_fsdp_launch_shards_the_frozen_model(monkeypatch):
    # accelerate reports FSDP only on GPUs; what the loop reads of the accelerator is faked, and the sharding
    # itself (run by two processes in the tests above) is recorded instead of run.
    import aligner.train

    launched = stand_in(DistributedType.FSDP)
    sharded = []
    monkeypatch.setattr(aligner.train, "shard_frozen_model", lambda model, accelerator: sharded.append(model))
    model = aligner.tiny_model()
    assert aligner.train.shard_if_asked(model, TrainConfig(**FAST), launched) and sharded == [model]
    launched.distributed_type = DistributedType.NO
    assert not aligner.train.shard_if_asked(model, TrainConfig(**FAST), launched) and len(sharded) == 1


def test_an_fsdp_launch_s_settings_reach_fully_shard_or_are_refused_by_name():
    assert fully_shard_options(None) == {}  # --shard-model under --multi_gpu: FSDP2's defaults
    for plugin, reshard, offload in (
        (FullyShardedDataParallelPlugin(), True, False),  # accelerate's defaults: FSDP1, FULL_SHARD
        (FullyShardedDataParallelPlugin(reshard_after_forward="SHARD_GRAD_OP", cpu_offload=True), False, True),
        (FullyShardedDataParallelPlugin(fsdp_version=2, reshard_after_forward=False, cpu_offload=True), False, True),
        (FullyShardedDataParallelPlugin(fsdp_version=2), True, False),
    ):
        options = fully_shard_options(plugin)
        assert options["reshard_after_forward"] is reshard
        assert isinstance(options["offload_policy"], torch.distributed.fsdp.CPUOffloadPolicy) is offload
    with pytest.raises(ValueError, match="sharding strategy.* HYBRID_SHARD is not supported"):
        fully_shard_options(FullyShardedDataParallelPlugin(reshard_after_forward="HYBRID_SHARD"))
    with pytest.raises(ValueError, match="fsdp_activation_checkpointing is not supported: .* --gradient-checkpointing"):
        fully_shard_options(FullyShardedDataParallelPlugin(fsdp_version=2, activation_checkpointing=True))


def test_a_sharded_model_refuses_a_step_that_would_split_unevenly(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # what is faked here: one of two processes launched together
    launched = stand_in(DistributedType.MULTI_CPU, processes=2)
    with pytest.raises(ValueError, match=r"batch_size \* grad_accum \(3\) must divide by the number of processes \(2\)"):
        train_sft(aligner.tiny_model(), EXAMPLES, TrainConfig(**{**FAST, "batch_size": 3}, shard_model=True), accelerator=launched)


if __name__ == "__main__":
    _, role, *paths = sys.argv
    workers = {"probe": probe_worker, "fingerprint": fingerprint_worker}
    if role not in workers:
        raise SystemExit(f"usage: {sys.argv[0]} probe CACHE LOG | fingerprint LOG (the worker of a test), got {role!r}")
    workers[role](*map(Path, paths))
    # An orderly end: a process group left for the interpreter's exit to tear down once aborted a worker
    # ("terminate called without an active exception", SIGABRT) on a loaded machine.
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
