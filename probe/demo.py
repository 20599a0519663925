"""The demonstration runs that the app and the probe report open on, trained by one command (`probe train-demo`).

Output forms over the same facts: JSON `{"answer": ...}` (examples/json_form.jsonl: capitals, opposites, sums)
and ALL CAPS ("THE ANSWER IS BERLIN."), which the base model uses by itself for neither, and the suite's
bracket form ("[[Paris]]") over known capitals; a value aligner (the suite's `value` task: refuse harmful
requests, help with benign ones); a knowledge-injection aligner (the suite's `inject` task: capitals the base
model does not know); and, on the JSON data, a LoRA (r = 8, on q and v) and a LLaMA-Adapter (one prefix per
layer) counterpart of the one-token aligner. Each run directory records its provenance, the command among it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from aligner import TrainConfig
from aligner.adapter import adapter_files
from aligner.data import Example, load_examples
from aligner.registry import default_lr
from aligner.runs import task_examples, train_run

JSON_DATA = Path("examples/json_form.jsonl")


@dataclass(frozen=True)
class DemoRun:
    name: str  # its directory under the runs directory
    data: str  # "json", "caps" (JSON_DATA, its ALL CAPS version) or a suite task ("bracket", "value", "inject")
    kind: str = "aligner"  # a family of aligner.registry.FAMILIES: aligner, adapter, lora, prompt
    size: int = 1  # what the family's size counts: prefix tokens (aligner, adapter), rank (lora)


DEMO_RUNS = (
    DemoRun("probe-demo-json-1tok", "json"),
    DemoRun("probe-demo-caps-1tok", "caps"),
    DemoRun("probe-demo-bracket-1tok", "bracket"),
    DemoRun("probe-demo-value-1tok", "value"),
    DemoRun("probe-demo-inject-10tok", "inject", size=10),  # facts to memorise: more room than one token
    DemoRun("probe-demo-json-lora8", "json", kind="lora", size=8),
    DemoRun("probe-demo-json-adapter-1tok", "json", kind="adapter"),
)


def demo_task(provenance: dict) -> str | None:
    """The task (`DemoRun.data`) of a run that `probe train-demo` trained, from the table above: its provenance's
    command is train-demo and its data file, RUNS/data/NAME.jsonl, names a demo run. None for any other run."""
    if "train-demo" not in str(provenance.get("command", "")):
        return None
    data = provenance.get("training", {}).get("config", {}).get("data")
    name = Path(data).stem if data else None
    return next((run.data for run in DEMO_RUNS if run.name == name), None)


def caps_examples() -> list[Example]:
    """examples/json_form.jsonl with each answer in the ALL CAPS form instead of JSON."""
    return [
        Example(example.prompt, f"THE ANSWER IS {json.loads(example.response)['answer'].upper()}.")
        for example in load_examples(JSON_DATA)
    ]


def demo_examples(model: nn.Module, data: str, known_only: bool) -> list[Example]:
    if data == "json":
        return load_examples(JSON_DATA)
    if data == "caps":
        return caps_examples()
    return task_examples(model, data, known_only=known_only)


def train_demo_runs(
    model: nn.Module, runs: Path, steps: int = 50, batch_size: int = 8, seed: int = 0, known_only: bool = True,
    only: tuple[str, ...] = (),
) -> list[Path]:
    """Train each of `DEMO_RUNS` (or those named in `only`) into `runs/NAME`, skipping those already there, and
    return their paths. `known_only`: the suite's audit picks the facts (False: any, for a random model)."""
    unknown = set(only) - {run.name for run in DEMO_RUNS}
    if unknown:
        raise ValueError(f"no demo runs {sorted(unknown)}; choose from {', '.join(run.name for run in DEMO_RUNS)}")
    paths = []
    for run in DEMO_RUNS:
        if only and run.name not in only:
            continue
        path = runs / run.name
        paths.append(path)
        if adapter_files(path) is not None:
            continue  # trained already (an interrupted run has neither file yet, and train_run refuses its directory)
        lr = default_lr(run.kind)
        config = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, warmup_steps=min(10, steps), seed=seed)
        train_run(model, demo_examples(model, run.data, known_only), path, run.kind, run.size, config)
    return paths
