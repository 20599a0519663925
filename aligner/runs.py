"""Run directories: training one (`train_run`: any method on a suite task or a data file, saved with its data and
metrics) and finding every saved one under a runs directory (`list_runs`), each with a one-line summary or the
reason it cannot be read.

A run directory holds an aligner (`aligner.json` + `aligner.safetensors`: Aligner, or LLaMA-Adapter when
unshared) or another method of `aligner.methods` (`method.json` + `method.safetensors`: LoRA, prompt tuning,
z-bias), `metrics.jsonl`, one line per step with its loss, and the training state that `resume` continues
(aligner.train). The examples it was trained on are written to
RUNS/data/NAME.jsonl first, and its provenance names that file, so that what it learned can be checked against
what it was shown (`probe.dataset.training_form`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from aligner.data import Example
from aligner.files import atomic_write_bytes
from aligner.loading import model_fingerprint
from aligner.methods import CONFIG_FILE as METHOD_CONFIG_FILE
from aligner.methods import Method, load_method
from aligner.model import CONFIG_FILE as ALIGNER_CONFIG_FILE
from aligner.model import Aligner
from aligner.suite import SIZED, SuiteConfig, task_data
from aligner.tasks import Sizes, get_task
from aligner.train import METRICS_FILE, TrainConfig, train_sft

DATA_DIR = "data"  # RUNS/data/NAME.jsonl: the examples each run was trained on
ALIGNER_KINDS = ("aligner", "adapter")  # the kinds that are an Aligner object, shared or not


@dataclass(frozen=True)
class RunInfo:
    name: str  # the directory's path relative to the runs directory
    path: Path
    kind: str  # "aligner", "adapter" (an unshared aligner), or a method kind of aligner.methods ("lora", ...)
    summary: str  # config, parameter count and base model, for a caption
    base_fingerprint: str | None  # the weights fingerprint of the model it was trained on
    version: str  # changes whenever the run's files change: a cache key
    error: str | None  # why the run cannot be loaded; None when it can

    @property
    def is_aligner(self) -> bool:
        """Whether the run is an Aligner object (shared or not): what the gate, probe and geometry views read."""
        return self.kind in ALIGNER_KINDS


def list_runs(root: str | Path) -> list[RunInfo]:
    """Every directory under `root` holding an aligner or another saved method, sorted by name; one bad run never
    hides the others (it is listed with its error)."""
    root = Path(root)
    if not root.is_dir():
        return []
    directories = {p.parent for name in (ALIGNER_CONFIG_FILE, METHOD_CONFIG_FILE) for p in root.rglob(name)}
    return [describe_run(path, str(path.relative_to(root))) for path in sorted(directories)]


def describe_run(path: Path, name: str) -> RunInfo:
    """The RunInfo of one run directory: loaded once to check it, summarised, or the reason it cannot be read."""
    files = sorted(p for p in path.iterdir() if p.suffix in (".json", ".safetensors") and not p.name.startswith("state"))
    version = "-".join(f"{p.name}:{p.stat().st_mtime_ns}:{p.stat().st_size}" for p in files)
    try:
        method = load_method(path)
    except (OSError, ValueError, KeyError, TypeError) as err:  # a foreign or damaged file, named in the message
        message = str(err) if str(path) in str(err) else f"{path}: {err!r}"
        return RunInfo(name, path, "unreadable", "", None, version, message)
    return RunInfo(name, path, method_kind(method), summarise(method), method.base_model.get("fingerprint"), version, None)


def method_kind(method: Method) -> str:
    if isinstance(method, Aligner):
        return "aligner" if method.config.shared else "adapter"
    return method.kind


def describe_method(method: Method) -> str:
    """What the method is and its settings, in a few words: "Aligner, N=1, layers 2-29 x 9 heads",
    "lora (r=8, alpha=8.0, targets=q,v)"."""
    if isinstance(method, Aligner):
        kind = "Aligner" if method.config.shared else "LLaMA-Adapter"
        layers = f"layers {method.config.start_layer}-{method.shape.n_layers - 1} x {method.shape.n_heads} heads"
        return f"{kind}, N={method.config.n_tokens}, {layers}"
    settings = ", ".join(f"{k}={','.join(v) if isinstance(v, tuple) else v}" for k, v in asdict(method.config).items())
    return f"{method.kind} ({settings})"


def summarise(method: Method) -> str:
    """One line: what the method is, its settings, its trainable parameters and its base model."""
    return f"{describe_method(method)}, {method.num_parameters():,} parameters, base {method.base_model.get('name')}"


def run_losses(path: str | Path) -> list[tuple[int, float]]:
    """(step, loss) of each line of the run's metrics.jsonl; [] when it has none."""
    metrics = Path(path) / METRICS_FILE
    if not metrics.is_file():
        return []
    rows = []
    for number, line in enumerate(metrics.read_text(encoding="utf-8").splitlines(), 1):
        try:
            row = json.loads(line)
            rows.append((int(row["step"]), float(row["loss"])))
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{metrics}: line {number} is not a JSON object with step and loss ({err})") from err
    return rows


def task_examples(model: nn.Module, task: str, n_train: int = 40, known_only: bool = True) -> list[Example]:
    """The training examples of the suite's task `task` ("json", "bracket", "inject", "value", ...): `n_train`
    items of its training split, cut as the suite cuts it; `known_only` restricts knowledge tasks to what the
    suite's audit of `model` finds it knows (form tasks) or does not know (injection)."""
    spec = get_task(task)
    if spec.raw_prompts:  # a run is answered in the model's own format (the app, `aligner generate`)
        raise ValueError(f"task {task!r} carries its own prompt format, which a run does not record: run it with `aligner sweep`")
    config = SuiteConfig(sizes=Sizes(train=n_train), known_only=known_only)
    data = task_data(model, model_fingerprint(model), spec, config, {})
    return [item.example() for item in data.train]


def write_examples(examples: Sequence[Example], path: str | Path) -> Path:
    """`examples` as a JSONL file of {"prompt", "response"}, the format `aligner train --data` reads."""
    path = Path(path)
    atomic_write_bytes(path, "".join(json.dumps({"prompt": e.prompt, "response": e.response}) + "\n" for e in examples).encode())
    return path


def run_lr(kind: str) -> float:
    """The rate a run of `kind` trains at unless told: the authors' (TrainConfig.lr) for an aligner, shared or not,
    and the sweep's (`aligner.suite.SIZED`) for another method, whose rate the paper does not give."""
    return TrainConfig.lr if kind in ALIGNER_KINDS else SIZED[kind].lr


def train_run(
    model: nn.Module,
    examples: Sequence[Example],
    run_dir: str | Path,
    kind: str = "aligner",
    size: int = 1,
    config: TrainConfig | None = None,
    on_step: Callable[[int, float], bool | None] | None = None,
) -> Method:
    """Train a fresh method of `kind` (a family of `aligner.suite.SIZED`: aligner, adapter, lora, prompt) and
    `size` on `examples` with `model` frozen, into `run_dir`, which must not exist yet: its examples to
    RUNS/data/NAME.jsonl (named in its provenance), its files, and metrics.jsonl with every step's loss. `config`
    gives the steps, batch size, rate (`run_lr`) and seed (its aligner fields are set from kind and size);
    `on_step(step, loss)` follows the training (a progress bar)."""
    if kind not in SIZED:
        raise ValueError(f"no method kind {kind!r}; choose from {', '.join(SIZED)}")
    run_dir = Path(run_dir)
    if run_dir.exists():
        raise FileExistsError(f"{run_dir}: a run of that name exists; choose another name")
    data = write_examples(examples, run_dir.parent / DATA_DIR / f"{run_dir.name}.jsonl")
    # Every step logged: the loss curve of a short run needs each point.
    config = replace(
        config or TrainConfig(lr=run_lr(kind)),
        n_tokens=size if kind in ALIGNER_KINDS else 1,
        shared=kind != "adapter",
        data=str(data),
        log_every=1,
    )
    torch.manual_seed(config.seed)  # the fresh method's initial values, as train_sft seeds its own
    method = SIZED[kind].make(model, size)
    return train_sft(model, examples, config, run_dir=run_dir, aligner=method, on_step=on_step)

