"""A run directory's training state: what `resume` continues from, written so that an interruption at any moment
leaves the previous checkpoint whole.

    RUN/adapter.safetensors, adapter.json   the adapter (provenance: the training config, data, step, loss)
    RUN/metrics.jsonl                       one line per logged step
    RUN/state.json                          step, data position, time, checks; names the file below
    RUN/state-STEP.safetensors              the adapter's tensors, AdamW's moments and the torch RNG state
    RUN/.lock                               while a process trains the run: held by it (flock), its PID in it
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from aligner.adapter import MAX_CONFIG_BYTES, MAX_TENSOR_BYTES, Adapter, adapter_files, read_meta
from aligner.config import check_fields, dataclass_spec
from aligner.files import atomic_write_bytes, atomic_write_json, read_json

if TYPE_CHECKING:
    from accelerate import Accelerator

STATE_FORMAT = "aligner-workbench/train-state/1"
STATE_FILE = "state.json"
METRICS_FILE = "metrics.jsonl"
# What may change between a run and its resumption: none of it alters the steps already taken.
RESUMABLE_CHANGES = {"steps", "log_every", "save_every", "data", "task", "gradient_checkpointing", "shard_model"}
# TrainConfig fields added since runs were first saved: a state.json written before them resumes without them.
LATER_FIELDS = ("gradient_checkpointing", "shard_model", "task")
# Fields a state.json of an aligner run held before the aligner's shape left TrainConfig; adapter.json holds it.
FORMER_FIELDS = ("n_tokens", "start_layer", "shared")
STATE_TENSORS_FILE = re.compile(r"state-\d{8}\.safetensors")  # the tensors of the checkpoint of one step
LOCK_FILE = ".lock"
# What a run holds before its first checkpoint is complete: metrics, the lock, the temporary files of a write
# (`aligner.files.atomic_write_files`: .NAME.RANDOM.tmp) and a checkpoint's tensors written before its state.json.
BEFORE_FIRST_CHECKPOINT = re.compile(rf"{re.escape(METRICS_FILE)}|{re.escape(LOCK_FILE)}|\..+\.tmp|state-\d{{8}}\.safetensors")


@contextlib.contextmanager
def run_directory(
    run_dir: str | Path | None, resume: bool, accelerator: Accelerator
) -> Iterator[tuple[Path | None, bool]]:
    """Inside, `run_dir` is this training's (`run_lock`, taken by the main process of `accelerator`'s launch) and
    checked (`check_run_dir`); yields it as a Path and whether there is a training state to resume."""
    if run_dir is None:
        if resume:
            raise ValueError("resume=True needs the run_dir to resume")
        yield None, False
        return
    run_dir = Path(run_dir)
    if resume and not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: no training state to resume (no such directory)")
    main = accelerator.is_main_process
    with run_lock(run_dir) if main else contextlib.nullcontext():
        yield run_dir, check_run_dir(run_dir, resume, main)


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold `run_dir` for this process until the block ends: an exclusive `flock` of RUN/.lock, with this process's
    PID written in it. A second training of the run, resumed or not, is refused at once, naming the process that
    holds it; the lock goes with the process however it ends (a file left by a killed one is locked again)."""
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise BlockingIOError(
                f"{run_dir}: being trained by another process (PID {holder}, holding {path}); wait for it to end, "
                "or stop it"
            ) from None
        with contextlib.suppress(FileNotFoundError):
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        os.close(fd)  # its holder removed the file as it ended, after this process opened it: lock the new one
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        path.unlink(missing_ok=True)  # before the lock goes, so that no process locks a file being removed
        os.close(fd)
        if created:  # nothing was written into it (a failed start): no empty directory is left
            with contextlib.suppress(OSError):
                run_dir.rmdir()


def check_run_dir(run_dir: Path, resume: bool, main: bool = True) -> bool:
    """Refuse, before any work, a run directory that would be overwritten or cannot be resumed; whether it holds
    a training state to resume. A run stopped before its first checkpoint holds none: resumed, it starts afresh,
    with a warning, and the main process removes the metrics and temporary files it left. Stale temporary files
    of a resumed run are removed too."""
    if not resume:
        if run_dir.exists() and any(p.name != LOCK_FILE for p in run_dir.iterdir()):
            raise FileExistsError(f"{run_dir}: run directory exists; resume it (resume=True, --resume) or choose another")
        return False
    stale = sorted(p for p in run_dir.glob(".*.tmp") if p.is_file())
    if (run_dir / STATE_FILE).is_file():
        if main:
            for path in stale:
                path.unlink(missing_ok=True)
        return True
    if (files := adapter_files(run_dir)) is not None:
        raise FileExistsError(
            f"{run_dir}: holds an adapter ({files[0].name}) but no training state ({STATE_FILE}) to resume it from: "
            f"saved by Adapter.save, or a run stopped while writing its first checkpoint; train into another "
            f"directory, or delete {files[0].name} and {files[1].name} to train this one afresh"
        )
    others = sorted(p.name for p in run_dir.iterdir() if not BEFORE_FIRST_CHECKPOINT.fullmatch(p.name))
    if others:
        raise FileNotFoundError(
            f"{run_dir}: no training state ({STATE_FILE}) to resume, and it holds what a run does not write "
            f"({', '.join(others[:5])}); choose the run's own directory"
        )
    if main:
        warnings.warn(f"{run_dir}: no checkpoint to resume (the run stopped before its first); starting afresh", stacklevel=4)
        for path in run_dir.iterdir():
            if path.name != LOCK_FILE:
                path.unlink(missing_ok=True)
    return False


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
    state = check_fields(read_json(state_path, MAX_CONFIG_BYTES), STATE_FIELDS, str(state_path), "training state")
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
    # The adapter's tensors and two moments each: a larger file is not one save_state wrote.
    if tensors_path.is_file() and tensors_path.stat().st_size > 3 * MAX_TENSOR_BYTES:
        raise ValueError(f"{tensors_path}: {tensors_path.stat().st_size:,} bytes, more than a training state holds")
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
