"""Run directories: training one (`train_run`: any adapter on a suite task or a data file, saved with its data and
metrics) and finding every saved one under a runs directory (`list_runs`), each with a one-line summary or the
reason it cannot be read.

A run directory holds an adapter (`adapter.json` + `adapter.safetensors`, or an older layout: aligner/adapter.py),
`metrics.jsonl`, one line per step with its loss, and the training state that `resume` continues
(aligner/checkpoint.py). The examples it was trained on are written to
RUNS/data/NAME.jsonl first, and its provenance names that file, so that what it learned can be checked against
what it was shown (`probe.dataset.training_form`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from aligner.adapter import CONFIG_FILE, LEGACY_LAYOUTS, Adapter, load_adapter
from aligner.audit import task_data
from aligner.checkpoint import METRICS_FILE
from aligner.data import Example
from aligner.files import atomic_write_bytes
from aligner.registry import FAMILIES
from aligner.tasks import Sizes, get_task
from aligner.train import TrainConfig, train_sft

DATA_DIR = "data"  # RUNS/data/NAME.jsonl: the examples each run was trained on


@dataclass(frozen=True)
class RunInfo:
    name: str  # the directory's path relative to the runs directory
    path: Path
    kind: str  # the adapter's family: "aligner", "adapter" (an unshared aligner), "lora", ...; "unreadable"
    summary: str  # config, parameter count and base model, for a caption
    base_fingerprint: str | None  # the weights fingerprint of the model it was trained on
    version: str  # changes whenever the run's files change: a cache key
    error: str | None  # why the run cannot be loaded; None when it can
    has_gates: bool = False  # an aligner, shared or not: what the gate, probe and geometry views read


def list_runs(root: str | Path) -> list[RunInfo]:
    """Every directory under `root` holding a saved adapter, sorted by name, symbolic links to folders followed
    (each folder once); one bad run never hides the others (it is listed with its error)."""
    root = Path(root)
    if not root.is_dir():
        return []
    names = {CONFIG_FILE, *(config_file for config_file, _, _ in LEGACY_LAYOUTS)}
    directories, seen = [], set()
    for folder, subfolders, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:  # a second link to one folder, or a link back up the tree
            subfolders.clear()
            continue
        seen.add(real)
        if names & set(files):
            directories.append(Path(folder))
    return [describe_run(path, str(path.relative_to(root))) for path in sorted(directories)]


def describe_run(path: Path, name: str) -> RunInfo:
    """The RunInfo of one run directory: loaded once to check it, summarised, or the reason it cannot be read."""
    version = ""
    try:
        files = sorted(p for p in path.iterdir() if p.suffix in (".json", ".safetensors") and not p.name.startswith("state"))
        version = "-".join(f"{p.name}:{p.stat().st_mtime_ns}:{p.stat().st_size}" for p in files)
        adapter = load_adapter(path)
    except (OSError, ValueError, KeyError, TypeError) as err:  # a foreign or damaged file, named in the message
        message = str(err) if str(path) in str(err) else f"{path}: {err!r}"
        return RunInfo(name, path, "unreadable", "", None, version, message)
    fingerprint = adapter.base_model.get("fingerprint")
    return RunInfo(name, path, adapter.family, summarise(adapter), fingerprint, version, None, adapter.has_gates)


def summarise(adapter: Adapter) -> str:
    """One line: what the adapter is, its settings, its trainable parameters and its base model."""
    return f"{adapter.describe()}, {adapter.num_parameters():,} parameters, base {adapter.base_model.get('name')}"


def run_losses(path: str | Path) -> list[tuple[int, float]]:
    """(step, loss) of each line of the run's metrics.jsonl; [] when it has none. A last line cut short (a run
    killed, or still writing it) is left out; any other bad line is a ValueError naming the file and line."""
    metrics = Path(path) / METRICS_FILE
    if not metrics.is_file():
        return []
    lines = metrics.read_bytes().splitlines(keepends=True)
    rows = []
    for number, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
            rows.append((int(row["step"]), float(row["loss"])))
        except (ValueError, KeyError, TypeError) as err:
            if number == len(lines) and not line.endswith(b"\n"):
                break
            raise ValueError(f"{metrics}: line {number} is not a JSON object with step and loss ({err})") from err
    return rows


def task_examples(model: nn.Module, task: str, n_train: int = 40, known_only: bool = True) -> list[Example]:
    """The training examples of the suite's task `task` ("json", "bracket", "inject", "value", ...): `n_train`
    items of its training split, cut as the suite cuts it; `known_only` restricts knowledge tasks to what the
    suite's audit of `model` finds it knows (form tasks) or does not know (injection)."""
    spec = get_task(task)
    if spec.raw_prompts:  # a run is answered in the model's own format (the app, `aligner generate`)
        raise ValueError(f"task {task!r} carries its own prompt format, which a run does not record: run it with `aligner sweep`")
    data = task_data(model, spec, Sizes(train=n_train), known_only)
    return [item.example() for item in data.train]


def write_examples(examples: Sequence[Example], path: str | Path) -> Path:
    """`examples` as a JSONL file of {"prompt", "response"}, the format `aligner train --data` reads."""
    path = Path(path)
    atomic_write_bytes(path, "".join(json.dumps({"prompt": e.prompt, "response": e.response}) + "\n" for e in examples).encode())
    return path


DATA_SUFFIXES = (".jsonl", ".json", ".csv")  # what `aligner.data.load_examples` reads as a file


def recorded_data(adapter: Adapter, root: str | Path = ".") -> Path | None:
    """The training data file a run's provenance names, where it is safe to read: a data file (by its suffix)
    inside `root` (default: the working directory, which holds the runs and the project's examples), links
    resolved. A run's files are data that anyone may have written: a recorded path such as /etc/passwd or
    /proc/self/environ is not followed (None), as is one that no longer exists."""
    data = adapter.provenance.get("training", {}).get("config", {}).get("data")
    if not isinstance(data, str):
        return None
    path, root = Path(data).resolve(), Path(root).resolve()
    if path.suffix.lower() not in DATA_SUFFIXES or not path.is_relative_to(root) or not path.is_file():
        return None
    return path


def train_run(
    model: nn.Module,
    examples: Sequence[Example],
    run_dir: str | Path,
    kind: str = "aligner",
    size: int = 1,
    config: TrainConfig | None = None,
    on_step: Callable[[int, float], bool | None] | None = None,
    task: str | None = None,
) -> Adapter:
    """Train a fresh adapter of family `kind` (`aligner.registry.FAMILIES`: aligner, adapter, lora, prompt) and
    `size` on `examples` with `model` frozen, into `run_dir`, which must not exist yet: its examples to
    RUNS/data/NAME.jsonl (named in its provenance), its files, and metrics.jsonl with every step's loss. `config`
    gives the steps, batch size, rate (None: the family's) and seed; `on_step(step, loss)` follows the training
    (a progress bar); `task` names the suite task whose form the examples show (`TrainConfig.task`)."""
    if kind not in FAMILIES:
        raise ValueError(f"no adapter family {kind!r}; choose from {', '.join(FAMILIES)}")
    run_dir = Path(run_dir)
    if run_dir.exists():
        raise FileExistsError(f"{run_dir}: a run of that name exists; choose another name")
    data = write_examples(examples, run_dir.parent / DATA_DIR / f"{run_dir.name}.jsonl")
    # Every step logged: the loss curve of a short run needs each point.
    config = config or TrainConfig()
    config = replace(config, data=str(data), log_every=1, task=task or config.task)
    torch.manual_seed(config.seed)  # the fresh adapter's initial values, as train_sft seeds its own
    adapter = FAMILIES[kind].make(model, size)
    return train_sft(model, examples, config, run_dir=run_dir, adapter=adapter, on_step=on_step)

