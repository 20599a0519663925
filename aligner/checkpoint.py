"""A run directory's training state: what `resume` continues from, written so that an interruption at any moment
leaves the previous checkpoint whole.

    RUN/adapter.safetensors, adapter.json   the adapter (provenance: the training config, data, step, loss)
    RUN/metrics.jsonl                       one line per logged step
    RUN/state.json                          step, data position, time, checks; names the file below
    RUN/state-STEP.safetensors              the adapter's tensors, AdamW's moments and the torch RNG state
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from aligner.adapter import Adapter, adapter_files, read_meta
from aligner.config import check_fields, dataclass_spec
from aligner.files import atomic_write_bytes, atomic_write_json, read_json

STATE_FORMAT = "aligner-workbench/train-state/1"
STATE_FILE = "state.json"
METRICS_FILE = "metrics.jsonl"
# What may change between a run and its resumption: none of it alters the steps already taken.
RESUMABLE_CHANGES = {"steps", "log_every", "save_every", "data", "gradient_checkpointing", "shard_model"}
# TrainConfig fields added since runs were first saved: a state.json written before them resumes without them.
LATER_FIELDS = ("gradient_checkpointing", "shard_model")
# Fields a state.json of an aligner run held before the aligner's shape left TrainConfig; adapter.json holds it.
FORMER_FIELDS = ("n_tokens", "start_layer", "shared")
STATE_TENSORS_FILE = re.compile(r"state-\d{8}\.safetensors")  # the tensors of the checkpoint of one step


def check_run_dir(run_dir: str | Path | None, resume: bool) -> Path | None:
    """`run_dir` as a Path, refused before any work if it cannot be resumed or would be overwritten."""
    run_dir = None if run_dir is None else Path(run_dir)
    if resume and run_dir is None:
        raise ValueError("resume=True needs the run_dir to resume")
    if not resume and run_dir is not None and run_dir.exists() and any(run_dir.iterdir()):
        raise FileExistsError(f"{run_dir}: run directory exists; resume it (resume=True, --resume) or choose another")
    return run_dir


@dataclass
class RunState:
    """Where a run stands; what `state.json` records."""

    step: int  # optimizer steps taken
    position: int  # examples consumed from the seeded stream of epochs
    elapsed_s: float  # training time so far, over every resumption
    loss: float | None  # the last step's loss
    saved_step: int | None  # the step of the last checkpoint written


# The fields of state.json: where the run stands, and what it must be resumed with.
STATE_FIELDS = {
    "format": "str",
    "config": "dict",  # the TrainConfig (or DPOConfig) of the run
    "data_sha256": "str",
    "base_fingerprint": "str | None",
    "tensors": "str",  # the file of this checkpoint's tensors, state-STEP.safetensors
    "tensors_sha256": "str",
    **dataclass_spec(RunState),
}


def stopped(run: RunState) -> str:
    """The end of a message that stops training: what is kept on disk."""
    kept = "no checkpoint yet" if run.saved_step is None else f"checkpoint of step {run.saved_step} kept"
    return f"training stopped ({kept})"


def training_record(
    config: Any, run: RunState, n_examples: int, data_sha256: str
) -> dict[str, Any]:
    """What the adapter's provenance says about its training: the TrainConfig (or DPOConfig), where the run stands,
    and the data it read."""
    return {
        "config": asdict(config),
        "step": run.step,
        "loss": run.loss,
        "elapsed_s": run.elapsed_s,
        "examples": n_examples,
        "data_sha256": data_sha256,
    }


def save_state(
    run_dir: Path, adapter: Adapter, optimizer: torch.optim.Optimizer, config: Any, run: RunState, data_sha256: str
) -> None:
    """Write the adapter, then the training state. `state.json` is written last and names its tensor
    file, so that an interruption at any moment leaves the previous checkpoint whole."""
    adapter.save(run_dir)
    tensors = {**adapter.state_dict(), "rng.torch": torch.get_rng_state()}  # an aligner's: tokens, gates
    for index, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            tensors[f"optimizer.{index}.{key}"] = value
    data = save({name: value.detach().cpu().contiguous() for name, value in tensors.items()})
    tensors_file = f"state-{run.step:08d}.safetensors"
    atomic_write_bytes(run_dir / tensors_file, data)
    run.saved_step = run.step
    atomic_write_json(
        run_dir / STATE_FILE,
        {
            "format": STATE_FORMAT,
            **asdict(run),
            "config": asdict(config),
            "data_sha256": data_sha256,
            "base_fingerprint": adapter.base_model["fingerprint"],
            "tensors": tensors_file,
            "tensors_sha256": hashlib.sha256(data).hexdigest(),
        },
    )
    for old in run_dir.glob("state-*.safetensors"):
        if old.name != tensors_file:
            old.unlink()


def load_state(
    run_dir: Path,
    config: Any,
    adapter: Adapter,
    optimizer: torch.optim.Optimizer,
    data_sha256: str,
    base_fingerprint: str,
) -> RunState:
    """Restore the adapter's tensors, optimizer and RNG from `run_dir`, refusing a state that belongs to other
    settings, other data, another kind or shape of adapter, or a base model other than the one whose weights
    fingerprint is `base_fingerprint` (the model that training continues on)."""
    state_path = run_dir / STATE_FILE
    if not state_path.is_file():
        raise FileNotFoundError(f"{state_path}: no training state to resume")
    check_same_adapter(run_dir, adapter)
    state = check_fields(read_json(state_path), STATE_FIELDS, str(state_path), "training state")
    if state["format"] != STATE_FORMAT:
        raise ValueError(f"{state_path}: field 'format' is {state['format']!r}, expected {STATE_FORMAT!r}")
    for name in ("step", "position"):
        if state[name] < 0:
            raise ValueError(f"{state_path}: field {name!r} is {state[name]}, expected >= 0")
    saved_config = state["config"]
    if isinstance(saved_config, dict):  # the adapter's shape is checked against adapter.json
        saved_config = {k: v for k, v in saved_config.items() if k not in FORMER_FIELDS}
    saved = check_fields(
        saved_config, dataclass_spec(type(config)), f"{state_path}: field 'config'", type(config).__name__, LATER_FIELDS
    )
    changed = [
        f"{f.name}: {saved[f.name]!r} -> {getattr(config, f.name)!r}"
        for f in fields(config)
        if f.name not in RESUMABLE_CHANGES and saved[f.name] != getattr(config, f.name)
    ]
    if changed:
        raise ValueError(f"{state_path}: cannot resume with other settings ({'; '.join(changed)})")
    if state["data_sha256"] != data_sha256:
        raise ValueError(f"{state_path}: the run was trained on other data (examples differ)")
    if state["base_fingerprint"] != base_fingerprint:
        raise ValueError(f"{state_path}: the run was trained on another base model (weights fingerprint differs)")
    if not STATE_TENSORS_FILE.fullmatch(state["tensors"]):
        raise ValueError(
            f"{state_path}: field 'tensors' is {state['tensors']!r}, expected a file name like 'state-00000100.safetensors'"
        )
    tensors_path = run_dir / state["tensors"]
    data = tensors_path.read_bytes() if tensors_path.is_file() else b""
    if hashlib.sha256(data).hexdigest() != state["tensors_sha256"]:
        raise ValueError(f"{tensors_path}: missing or does not match 'tensors_sha256' in {state_path}")
    try:
        tensors = load(data)
    except SafetensorError as err:
        raise ValueError(f"{tensors_path}: not a readable safetensors file ({err})") from err
    # What save_state writes: the parameters, the torch RNG state, and AdamW's moments and step per parameter.
    own = set(adapter.state_dict())
    expected = {"rng.torch": (tuple(torch.get_rng_state().shape), torch.uint8)}
    for index, param in enumerate(adapter.parameters()):
        expected |= {f"optimizer.{index}.{key}": (tuple(param.shape), torch.float32) for key in ("exp_avg", "exp_avg_sq")}
        expected[f"optimizer.{index}.step"] = ((), torch.float32)
    found = {name: tensors[name] for name in tensors if name not in own}
    if set(found) != set(expected):
        raise ValueError(
            f"{tensors_path}: tensors missing {sorted(set(expected) - set(found))}, "
            f"unexpected {sorted(set(found) - set(expected))}"
        )
    for name, (dims, dtype) in expected.items():
        value = found[name]
        if (tuple(value.shape), value.dtype) != (dims, dtype):
            raise ValueError(
                f"{tensors_path}: tensor {name!r} is {tuple(value.shape)} {value.dtype}, expected {dims} {dtype}"
            )
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise ValueError(f"{tensors_path}: tensor {name!r} has NaN or inf values, expected all finite")
    adapter.load_tensors({name: tensors[name] for name in own if name in tensors}, str(tensors_path))
    torch.set_rng_state(found.pop("rng.torch"))
    optimizer_state: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in found.items():
        _, index, key = name.split(".")
        optimizer_state.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": optimizer_state, "param_groups": optimizer.state_dict()["param_groups"]})
    return RunState(state["step"], state["position"], state["elapsed_s"], state["loss"], state["step"])


def check_same_adapter(run_dir: Path, adapter: Adapter) -> None:
    """Refuse to resume a run of another kind of adapter, or of another config, than `adapter`."""
    files = adapter_files(run_dir)
    if files is None:
        raise FileNotFoundError(f"{run_dir}: no adapter saved with the training state")
    meta = read_meta(files[0], files[2])
    saved = {"kind": meta["kind"], "config": meta["config"]}
    given = {"kind": adapter.kind, "config": json.loads(json.dumps(asdict(adapter.config)))}  # tuples as lists
    if saved != given:
        raise ValueError(f"{run_dir}: the run holds {described(saved)}, not the {described(given)} given to resume it")


def described(record: dict[str, Any]) -> str:
    """An adapter's kind and config as adapter.json records them: 'lora {"alpha": 8.0, ...}'."""
    return f"{record['kind']} {json.dumps(record['config'], sort_keys=True)}"


def drop_metrics_after(path: Path, step: int) -> None:
    """Forget metrics logged after the checkpoint being resumed: those steps are taken again. A last line cut
    short (the run was killed while appending it) is dropped too; a bad line before it is an error."""
    if not path.is_file():
        return
    lines = path.read_bytes().splitlines(keepends=True)
    kept = []
    for number, line in enumerate(lines, start=1):
        try:
            logged_after = json.loads(line)["step"] > step
        except (ValueError, TypeError, KeyError) as err:
            if number == len(lines) and not line.endswith(b"\n"):
                continue
            raise ValueError(f"{path}, line {number}: not a metrics row with a 'step' ({type(err).__name__}: {err})") from err
        if not logged_after:
            kept.append(line)
    if len(kept) != len(lines):
        atomic_write_bytes(path, b"".join(kept))
