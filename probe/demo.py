"""Small demonstration aligners for the probe report, trained by one command (`probe train-demo`).

Two output forms over the same facts (examples/json_form.jsonl: capitals, opposites, sums): JSON
`{"answer": ...}` (that file as it is) and ALL CAPS ("THE ANSWER IS BERLIN."), which the base model uses
by itself for neither. Form alone is taught; the facts are ones it mostly knows, so that the report can ask
whether the aligner moves knowledge as well.
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from aligner import TrainConfig, train_sft
from aligner.data import load_examples
from aligner.files import atomic_write_bytes

JSON_DATA = Path("examples/json_form.jsonl")
# name -> (output form, n_tokens): one token, as in the paper's main setting.
DEMO_RUNS = {"probe-demo-json-1tok": ("json", 1), "probe-demo-caps-1tok": ("caps", 1)}


def write_caps_data(path: Path) -> Path:
    """examples/json_form.jsonl with each answer in the ALL CAPS form instead of JSON."""
    rows = [
        {"prompt": example.prompt, "response": f"THE ANSWER IS {json.loads(example.response)['answer'].upper()}."}
        for example in load_examples(JSON_DATA)
    ]
    atomic_write_bytes(path, "".join(json.dumps(row) + "\n" for row in rows).encode())
    return path


def train_demo_runs(model: nn.Module, runs: Path, steps: int = 50, batch_size: int = 8, seed: int = 0) -> list[Path]:
    """Train each of `DEMO_RUNS` into `runs/NAME` (skipping those already there) and return their paths."""
    data = {"json": JSON_DATA, "caps": write_caps_data(runs / "probe-demo-data" / "caps_form.jsonl")}
    paths = []
    for name, (form, n_tokens) in DEMO_RUNS.items():
        path = runs / name
        paths.append(path)
        if (path / "aligner.json").is_file():
            continue
        config = TrainConfig(
            n_tokens=n_tokens, steps=steps, batch_size=batch_size, warmup_steps=10, seed=seed, data=str(data[form])
        )
        train_sft(model, load_examples(data[form]), config, run_dir=path)
    return paths
