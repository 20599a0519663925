"""Write docs/bad_inputs.md: each bad input tried on the workbench, and what the user sees.

Every row comes from running its case here, on the tiny random Llama (tiny random Gemma 2, HunYuan and Cohere
for the attention the aligner refuses) and files made in a temporary directory, so the table says what the code
does today:

    python docs/make_bad_inputs.py            # rewrite docs/bad_inputs.md
    python docs/make_bad_inputs.py --check    # exit 1 if the file differs from what the code now prints

A case either raises (the row shows the exception type and message, with the temporary directory written
`<tmp>`), warns (the warning), or is accepted (what it gives back).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pickle
import re
import shutil
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator
from unittest import mock

OUTPUT = Path(__file__).resolve().parent / "bad_inputs.md"
PACKAGE_DIR = str(Path(__file__).resolve().parents[1] / "aligner")


@dataclass(frozen=True)
class Case:
    area: str  # which loader or command
    bad_input: str  # what is wrong with the input, in a few words
    run: Callable[["Workspace"], str]  # raises or warns as the user would see it; else says what it gave


CASES: list[Case] = []


def case(area: str, bad_input: str) -> Callable[[Callable[["Workspace"], str]], Callable]:
    def register(run: Callable[["Workspace"], str]) -> Callable:
        CASES.append(Case(area, bad_input, run))
        return run

    return register


class Workspace:
    """A temporary directory, tiny models built once, and a saved aligner to copy and spoil."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._models: dict[tuple, Any] = {}
        self._counter = 0

    def model(self, **shape: int) -> Any:
        import aligner

        key = tuple(sorted(shape.items()))
        if key not in self._models:
            self._models[key] = aligner.tiny_model(**shape)
        return self._models[key]

    def fresh(self, name: str) -> Path:
        """A new, empty path under the workspace."""
        self._counter += 1
        return self.root / f"{self._counter:02d}-{name}"

    def saved_aligner(self) -> Path:
        """A copy of one aligner saved for the default tiny model (N=1, layers 2-3, 4 heads)."""
        from aligner import Aligner, AlignerConfig

        template = self.root / "template-aligner"
        if not template.exists():
            import torch

            torch.manual_seed(0)
            Aligner.for_model(self.model(), AlignerConfig()).save(template)
        copy = self.fresh("run")
        shutil.copytree(template, copy)
        return copy

    def text_file(self, name: str, content: bytes) -> Path:
        path = self.fresh("data") / name
        path.parent.mkdir(parents=True)
        path.write_bytes(content)
        return path


def edit_json(path: Path, edit: Callable[[dict], None]) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def write_tensors(run: Path, tensors: dict[str, Any]) -> None:
    """Replace the aligner's tensors and update the sha256 in adapter.json, so that the tensors themselves are judged."""
    import hashlib

    from safetensors.torch import save

    data = save(tensors)
    (run / "adapter.safetensors").write_bytes(data)
    edit_json(run / "adapter.json", lambda meta: meta.update(tensors_sha256=hashlib.sha256(data).hexdigest()))


def load_aligner(run: Path) -> str:
    from aligner import Aligner

    al = Aligner.load(run)
    return f"loads: {al.config}"


# ---- aligner files: Aligner.load ----

AREA = "aligner files (`Aligner.load`, `aligner info`)"


@case(AREA, "the run directory does not exist")
def _(ws: Workspace) -> str:
    return load_aligner(ws.fresh("missing"))


@case(AREA, "adapter.json missing")
def _(ws: Workspace) -> str:
    run = ws.saved_aligner()
    (run / "adapter.json").unlink()
    return load_aligner(run)


@case(AREA, "adapter.json is not JSON (cut off mid-write by another tool)")
def _(ws: Workspace) -> str:
    run = ws.saved_aligner()
    (run / "adapter.json").write_bytes((run / "adapter.json").read_bytes()[:50])
    return load_aligner(run)


@case(AREA, "adapter.json has non-UTF-8 bytes")
def _(ws: Workspace) -> str:
    run = ws.saved_aligner()
    (run / "adapter.json").write_bytes(b'{"format": "\xff"}')
    return load_aligner(run)


@case(AREA, "adapter.json holds a list, not an object")
def _(ws: Workspace) -> str:
    run = ws.saved_aligner()
    (run / "adapter.json").write_text("[]")
    return load_aligner(run)


@case(AREA, "adapter.json: a field missing (`shape`)")
def _(ws: Workspace) -> str:
    run = ws.saved_aligner()
    edit_json(run / "adapter.json", lambda meta: meta.pop("shape"))
    return load_aligner(run)


@case(AREA, "adapter.json: an extra field")
def _(ws: Workspace) -> str:
    run = ws.saved_aligner()
    edit_json(run / "adapter.json", lambda meta: meta.update(notes="mine"))
    return load_aligner(run)


@case(AREA, "adapter.json: another format version")
def _(ws: Workspace) -> str:
    run = ws.saved_aligner()
    edit_json(run / "adapter.json", lambda meta: meta.update(format="aligner-workbench/aligner/0"))
    return load_aligner(run)


@case(AREA, "config.n_tokens is a string")
def _(ws: Workspace) -> str:
    run = ws.saved_aligner()
    edit_json(run / "adapter.json", lambda meta: meta["config"].update(n_tokens="one"))
    return load_aligner(run)


@case(AREA, "config.n_tokens is 0")
def _(ws: Workspace) -> str:
    run = ws.saved_aligner()
    edit_json(run / "adapter.json", lambda meta: meta["config"].update(n_tokens=0))
    return load_aligner(run)


@case(AREA, "config has an extra field")
def _(ws: Workspace) -> str:
    run = ws.saved_aligner()
    edit_json(run / "adapter.json", lambda meta: meta["config"].update(gate_init=0.0))
    return load_aligner(run)


@case(AREA, "shape lacks n_heads")
def _(ws: Workspace) -> str:
    run = ws.saved_aligner()
    edit_json(run / "adapter.json", lambda meta: meta["shape"].pop("n_heads"))
    return load_aligner(run)


@case(AREA, "start_layer leaves no layer to adapt")
def _(ws: Workspace) -> str:
    run = ws.saved_aligner()
    edit_json(run / "adapter.json", lambda meta: meta["config"].update(start_layer=4))
    return load_aligner(run)


@case(AREA, "num_parameters disagrees with config and shape")
def _(ws: Workspace) -> str:
    run = ws.saved_aligner()
    edit_json(run / "adapter.json", lambda meta: meta.update(num_parameters=5056))
    return load_aligner(run)


@case(AREA, "base_model has an extra field")
def _(ws: Workspace) -> str:
    run = ws.saved_aligner()
    edit_json(run / "adapter.json", lambda meta: meta["base_model"].update(revision="main"))
    return load_aligner(run)


@case(AREA, "base_model.name is a number")
def _(ws: Workspace) -> str:
    run = ws.saved_aligner()
    edit_json(run / "adapter.json", lambda meta: meta["base_model"].update(name=7))
    return load_aligner(run)


@case(AREA, "base_model without `architecture` (written before it was recorded)")
def _(ws: Workspace) -> str:
    from aligner import Aligner

    run = ws.saved_aligner()
    edit_json(run / "adapter.json", lambda meta: meta["base_model"].pop("architecture"))
    return f"loads; base_model['architecture'] is {Aligner.load(run).base_model['architecture']} (not checked at attach)"


@case(AREA, "adapter.safetensors missing")
def _(ws: Workspace) -> str:
    run = ws.saved_aligner()
    (run / "adapter.safetensors").unlink()
    return load_aligner(run)


@case(AREA, "adapter.safetensors truncated")
def _(ws: Workspace) -> str:
    run = ws.saved_aligner()
    (run / "adapter.safetensors").write_bytes((run / "adapter.safetensors").read_bytes()[:-10])
    return load_aligner(run)


@case(AREA, "adapter.safetensors is not safetensors (its sha256 updated to match)")
def _(ws: Workspace) -> str:
    import hashlib

    run = ws.saved_aligner()
    data = b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}  "
    (run / "adapter.safetensors").write_bytes(data)
    edit_json(run / "adapter.json", lambda meta: meta.update(tensors_sha256=hashlib.sha256(data).hexdigest()))
    return load_aligner(run)


@case(AREA, "a tensor is missing, another is extra")
def _(ws: Workspace) -> str:
    import torch

    run = ws.saved_aligner()
    write_tensors(run, {"tokens": torch.zeros(1, 64), "prefix": torch.zeros(2, 4)})
    return load_aligner(run)


@case(AREA, "tokens of another d_model (32, where adapter.json says 64)")
def _(ws: Workspace) -> str:
    import torch

    run = ws.saved_aligner()
    write_tensors(run, {"tokens": torch.zeros(1, 32), "gates": torch.zeros(2, 4)})
    return load_aligner(run)


@case(AREA, "tensors of dtype int64")
def _(ws: Workspace) -> str:
    import torch

    run = ws.saved_aligner()
    write_tensors(run, {"tokens": torch.zeros(1, 64, dtype=torch.int64), "gates": torch.zeros(2, 4)})
    return load_aligner(run)


@case(AREA, "tensors of dtype float64")
def _(ws: Workspace) -> str:
    import torch

    run = ws.saved_aligner()
    write_tensors(run, {"tokens": torch.zeros(1, 64, dtype=torch.float64), "gates": torch.zeros(2, 4)})
    return load_aligner(run)


@case(AREA, "tensors in bfloat16")
def _(ws: Workspace) -> str:
    import torch

    run = ws.saved_aligner()
    write_tensors(run, {"tokens": torch.ones(1, 64, dtype=torch.bfloat16), "gates": torch.zeros(2, 4)})
    return load_aligner(run) + ", tokens converted to float32 exactly"


@case(AREA, "a NaN in the gates")
def _(ws: Workspace) -> str:
    import torch

    run = ws.saved_aligner()
    write_tensors(run, {"tokens": torch.zeros(1, 64), "gates": torch.tensor([[0.0, float("nan"), 0, 0], [0, 0, 0, 0]])})
    return load_aligner(run)


@case(AREA, "an inf in the tokens")
def _(ws: Workspace) -> str:
    import torch

    run = ws.saved_aligner()
    tokens = torch.zeros(1, 64)
    tokens[0, 3] = float("inf")
    write_tensors(run, {"tokens": tokens, "gates": torch.zeros(2, 4)})
    return load_aligner(run)


@case(AREA, "adapter.json asks for 10^12 parameters (n_layers = 10^12), num_parameters to match")
def _(ws: Workspace) -> str:
    run = ws.saved_aligner()

    def huge(meta: dict) -> None:
        meta["shape"]["n_layers"] = 10**12
        meta["num_parameters"] = 64 + (10**12 - 2) * 4

    edit_json(run / "adapter.json", huge)
    return load_aligner(run)


# ---- attaching to a model ----

AREA = "every method's files (`load_adapter`, `list_runs`, the app)"


def saved_method(ws: Workspace, kind: str) -> Path:
    """A LoRA (r=2), prompt tuning (3 tokens) or z-bias saved for the default tiny model."""
    import torch

    from aligner.methods import LoRA, LoRAConfig, PromptTuning, PromptTuningConfig, ZBias, ZBiasConfig

    torch.manual_seed(0)
    make = {
        "lora": lambda model: LoRA.for_model(model, LoRAConfig(r=2, alpha=2.0)),
        "prompt": lambda model: PromptTuning.for_model(model, PromptTuningConfig(3)),
        "zbias": lambda model: ZBias.for_model(model, ZBiasConfig()),
    }[kind]
    return make(ws.model()).save(ws.fresh(kind))


def load_any(run: Path) -> str:
    from aligner import load_adapter

    return f"loads: {load_adapter(run).describe()}"


@case(AREA, "LoRA: `r` is a string (`\"eight\"`)")
def _(ws: Workspace) -> str:
    run = saved_method(ws, "lora")
    edit_json(run / "adapter.json", lambda meta: meta["config"].update(r="eight"))
    return load_any(run)


@case(AREA, "LoRA: a config field missing (`alpha`)")
def _(ws: Workspace) -> str:
    run = saved_method(ws, "lora")
    edit_json(run / "adapter.json", lambda meta: meta["config"].pop("alpha"))
    return load_any(run)


@case(AREA, "LoRA: an unknown target (`mlp`)")
def _(ws: Workspace) -> str:
    run = saved_method(ws, "lora")
    edit_json(run / "adapter.json", lambda meta: meta["config"].update(targets=["q", "mlp"]))
    return load_any(run)


@case(AREA, "LoRA: matrices one column too wide (sha256 updated to match)")
def _(ws: Workspace) -> str:
    import torch
    from safetensors.torch import load

    run = saved_method(ws, "lora")
    tensors = load((run / "adapter.safetensors").read_bytes())
    write_tensors(run, {name: torch.cat([t, t[..., :1]], dim=-1) for name, t in tensors.items()})
    return load_any(run)


@case(AREA, "LoRA: its tensors changed after saving (no longer the sha256 in adapter.json)")
def _(ws: Workspace) -> str:
    run = saved_method(ws, "lora")
    data = bytearray((run / "adapter.safetensors").read_bytes())
    data[-1] ^= 1
    (run / "adapter.safetensors").write_bytes(bytes(data))
    return load_any(run)


@case(AREA, "prompt tuning: adapter.safetensors truncated")
def _(ws: Workspace) -> str:
    run = saved_method(ws, "prompt")
    (run / "adapter.safetensors").write_bytes((run / "adapter.safetensors").read_bytes()[:-5])
    return load_any(run)


@case(AREA, "z-bias: a field of adapter.json of the wrong type (`num_parameters` a string)")
def _(ws: Workspace) -> str:
    run = saved_method(ws, "zbias")
    edit_json(run / "adapter.json", lambda meta: meta.update(num_parameters="many"))
    return load_any(run)


@case(AREA, "adapter.json of 30 GB (sparse)")
def _(ws: Workspace) -> str:
    run = ws.saved_aligner()
    with open(run / "adapter.json", "r+b") as f:
        f.truncate(30 * 10**9)
    return load_any(run)


@case(AREA, "adapter.safetensors of 30 GB (sparse)")
def _(ws: Workspace) -> str:
    run = ws.saved_aligner()
    with open(run / "adapter.safetensors", "r+b") as f:
        f.truncate(30 * 10**9)
    return load_any(run)


@case(AREA, "aligner.json (the older layout) of 30 GB (sparse)")
def _(ws: Workspace) -> str:
    run = ws.saved_aligner()
    (run / "adapter.json").rename(run / "aligner.json")
    (run / "adapter.safetensors").rename(run / "aligner.safetensors")
    with open(run / "aligner.json", "r+b") as f:
        f.truncate(30 * 10**9)
    return load_any(run)


@case(AREA, "a runs folder with a truncated LoRA run beside a good z-bias run (`list_runs`)")
def _(ws: Workspace) -> str:
    from aligner.runs import list_runs

    root = ws.fresh("runs")
    root.mkdir()
    lora, zbias = saved_method(ws, "lora"), saved_method(ws, "zbias")
    (lora / "adapter.safetensors").write_bytes((lora / "adapter.safetensors").read_bytes()[:100])
    lora.rename(root / "lora")
    zbias.rename(root / "zbias")
    return "; ".join(f"{run.name}: {run.error or run.summary}" for run in list_runs(root))


@case(AREA, "a run folder that is a symbolic link (`list_runs`)")
def _(ws: Workspace) -> str:
    from aligner.runs import list_runs

    root = ws.fresh("runs")
    root.mkdir()
    (root / "linked").symlink_to(saved_method(ws, "zbias"), target_is_directory=True)
    return "lists: " + ", ".join(run.name for run in list_runs(root))


@case(AREA, "metrics.jsonl: the last line cut short, read by `run_losses` (the app's Train tab)")
def _(ws: Workspace) -> str:
    from aligner.runs import run_losses

    run = ws.fresh("run")
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')
    return f"reads {run_losses(run)}"


@case(AREA, "metrics.jsonl: a bad line before the last, read by `run_losses`")
def _(ws: Workspace) -> str:
    from aligner.runs import run_losses

    run = ws.fresh("run")
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "lo\n{"step": 2, "loss": 1.0}\n')
    return f"reads {run_losses(run)}"


# ---- attaching ----

AREA = "attaching (`attach`, `attached`, `generate --run`)"


def attach(al: Any, model: Any) -> str:
    with al.attached(model):
        pass
    return "attached"


@case(AREA, "aligner made for d_model 64, model has 32")
def _(ws: Workspace) -> str:
    from aligner import Aligner

    return attach(Aligner.for_model(ws.model()), ws.model(d_model=32))


@case(AREA, "aligner made for 4 layers, model has 6")
def _(ws: Workspace) -> str:
    from aligner import Aligner

    return attach(Aligner.for_model(ws.model()), ws.model(n_layers=6))


@case(AREA, "aligner made for 4 heads, model has 8")
def _(ws: Workspace) -> str:
    from aligner import Aligner

    return attach(Aligner.for_model(ws.model()), ws.model(n_heads=8, n_kv_heads=4))


@case(AREA, "another model family of the same shape (a Llama aligner on GPT-2, 64-d, 4 layers, 4 heads)")
def _(ws: Workspace) -> str:
    from transformers import GPT2Config, GPT2LMHeadModel

    import aligner

    config = GPT2Config(vocab_size=100, n_embd=64, n_layer=4, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0)
    gpt2 = aligner.from_hf(GPT2LMHeadModel(config), None, name="tiny-gpt2")
    return attach(aligner.Aligner.for_model(ws.model()), gpt2)


@case(AREA, "same shape and family, another model name (seed 1 instead of 0)")
def _(ws: Workspace) -> str:
    from aligner import Aligner

    return attach(Aligner.for_model(ws.model()), ws.model(seed=1))


@case(AREA, "attaching twice")
def _(ws: Workspace) -> str:
    from aligner import Aligner

    al = Aligner.for_model(ws.model())
    with al.attached(ws.model()):
        return attach(al, ws.model())


def other_family(family: str, **extra: Any) -> Any:
    """A random 2-layer model of a transformers `family` (64-d, 4 query heads of 16, 2 key heads) through the
    bridge, as tests/test_gemma.py builds its tiny references."""
    import torch
    import transformers

    import aligner

    torch.manual_seed(0)
    config = getattr(transformers, f"{family}Config")(
        vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=64, **extra
    )  # fmt: skip
    return aligner.from_hf(getattr(transformers, f"{family}ForCausalLM")(config), None, name=f"tiny-{family.lower()}")


def attach_every_layer(model: Any) -> str:
    from aligner import Aligner, AlignerConfig

    return attach(Aligner.for_model(model, AlignerConfig(n_tokens=1, start_layer=0)), model)


@case(AREA, "a Gemma 2 model: attention scores soft-capped")
def _(ws: Workspace) -> str:
    return attach_every_layer(other_family("Gemma2"))


@case(AREA, "a HunYuan model: queries and keys normed after rotary")
def _(ws: Workspace) -> str:
    return attach_every_layer(other_family("HunYuanDenseV1"))


@case(AREA, "a Cohere model with `use_qk_norm`: a key norm with a weight row per head")
def _(ws: Workspace) -> str:
    return attach_every_layer(other_family("Cohere", use_qk_norm=True, bos_token_id=1, eos_token_id=2, pad_token_id=0))


# ---- the authors' .pth files ----

AREA = "paper checkpoints (`import_paper_checkpoint`)"


def lit_llama_state(**change: Any) -> dict:
    import torch

    prefix = torch.randn(1, 8)
    state = {"global_value_embedding.weight": prefix}
    for layer in (2, 3):
        state[f"transformer.h.{layer}.attn.gating_factor"] = torch.zeros(1, 2, 1, 1)
        state[f"transformer.h.{layer}.attn.adapter_wte.weight"] = prefix
    state.update(change)
    return {key: value for key, value in state.items() if value is not None}


def import_pth(path: Path) -> str:
    import aligner

    al = aligner.import_paper_checkpoint(path)
    return f"imports: {al.config}"


class _WritesAFile:
    """Unpickled, this would create a file: the pickle runs `open(target, "w")`."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self) -> tuple:
        return (open, (str(self.target), "w"))


@case(AREA, "a pickle that would run code (create a file) when loaded")
def _(ws: Workspace) -> str:
    path = ws.fresh("evil.pth")
    target = ws.root / "pwned.txt"
    path.write_bytes(pickle.dumps({"global_value_embedding.weight": _WritesAFile(target)}, protocol=2))
    try:
        return import_pth(path)
    finally:
        assert not target.exists(), "the pickle ran"


@case(AREA, "the file is missing")
def _(ws: Workspace) -> str:
    return import_pth(ws.fresh("missing.pth"))


@case(AREA, "truncated .pth")
def _(ws: Workspace) -> str:
    import torch

    path = ws.fresh("cut.pth")
    torch.save(lit_llama_state(), path)
    path.write_bytes(path.read_bytes()[:300])
    return import_pth(path)


@case(AREA, "a tensor, not a dict of tensors")
def _(ws: Workspace) -> str:
    import torch

    path = ws.fresh("tensor.pth")
    torch.save(torch.zeros(3), path)
    return import_pth(path)


@case(AREA, "a key outside lit-llama's naming")
def _(ws: Workspace) -> str:
    import torch

    path = ws.fresh("other.pth")
    torch.save(lit_llama_state(**{"model.layers.0.mlp.weight": torch.zeros(2)}), path)
    return import_pth(path)


@case(AREA, "gates stored as integers")
def _(ws: Workspace) -> str:
    import torch

    path = ws.fresh("int.pth")
    torch.save(lit_llama_state(**{"transformer.h.3.attn.gating_factor": torch.zeros(1, 2, 1, 1, dtype=torch.int32)}), path)
    return import_pth(path)


@case(AREA, "a layer missing between the gated ones (2 and 4, no 3)")
def _(ws: Workspace) -> str:
    import torch

    path = ws.fresh("gap.pth")
    state = lit_llama_state(**{"transformer.h.3.attn.gating_factor": None, "transformer.h.3.attn.adapter_wte.weight": None})
    state["transformer.h.4.attn.gating_factor"] = torch.zeros(1, 2, 1, 1)
    state["transformer.h.4.attn.adapter_wte.weight"] = state["global_value_embedding.weight"]
    torch.save(state, path)
    return import_pth(path)


@case(AREA, "two keys for one layer (`transformer.h.3...` and `transformer.h.03...`)")
def _(ws: Workspace) -> str:
    import torch

    path = ws.fresh("dup.pth")
    state = lit_llama_state()
    state["transformer.h.03.attn.gating_factor"] = state["transformer.h.3.attn.gating_factor"] + 1
    torch.save(state, path)
    return import_pth(path)


@case(AREA, "a gate of the wrong shape in one layer")
def _(ws: Workspace) -> str:
    import torch

    path = ws.fresh("gate.pth")
    torch.save(lit_llama_state(**{"transformer.h.3.attn.gating_factor": torch.zeros(1, 3, 1, 1)}), path)
    return import_pth(path)


# ---- training data ----

AREA = "training data (`load_examples`, `aligner train --data`)"
GOOD_JSONL = b'{"prompt": "Hi", "response": "Hello"}\n'


def load_data(path: Path | str, **options: Any) -> str:
    from aligner.data import load_examples

    examples = load_examples(path, **options)
    return f"loads {len(examples)} examples: {examples}"


@case(AREA, "JSONL: a row without `response`")
def _(ws: Workspace) -> str:
    return load_data(ws.text_file("d.jsonl", GOOD_JSONL + b'{"prompt": "Bye"}\n'))


@case(AREA, "JSONL: an empty response")
def _(ws: Workspace) -> str:
    return load_data(ws.text_file("d.jsonl", GOOD_JSONL + b'{"prompt": "Bye", "response": ""}\n'))


@case(AREA, "JSONL: a prompt of spaces only")
def _(ws: Workspace) -> str:
    return load_data(ws.text_file("d.jsonl", GOOD_JSONL + b'{"prompt": "   ", "response": "Ciao"}\n'))


@case(AREA, "JSONL: a response that is a number")
def _(ws: Workspace) -> str:
    return load_data(ws.text_file("d.jsonl", GOOD_JSONL + b'{"prompt": "2+2?", "response": 4}\n'))


@case(AREA, "JSONL: a line that is not JSON")
def _(ws: Workspace) -> str:
    return load_data(ws.text_file("d.jsonl", GOOD_JSONL + b'{"prompt": "Bye", "response": "Ciao"\n'))


@case(AREA, "JSONL: non-UTF-8 bytes (Latin-1 text)")
def _(ws: Workspace) -> str:
    return load_data(ws.text_file("d.jsonl", GOOD_JSONL + '{"prompt": "Café?", "response": "Oui"}\n'.encode("latin-1")))


@case(AREA, "JSONL: a row that is a list")
def _(ws: Workspace) -> str:
    return load_data(ws.text_file("d.jsonl", GOOD_JSONL + b'["Bye", "Ciao"]\n'))


@case(AREA, "JSONL: a number of 5000 digits")
def _(ws: Workspace) -> str:
    return load_data(ws.text_file("d.jsonl", GOOD_JSONL + b'{"prompt": "n?", "response": "ok", "n": ' + b"9" * 5000 + b"}\n"))


@case(AREA, "JSONL: a UTF-8 byte-order mark at the start (Notepad, Excel)")
def _(ws: Workspace) -> str:
    return load_data(ws.text_file("d.jsonl", b"\xef\xbb\xbf" + GOOD_JSONL))


@case(AREA, "JSON array: a missing comma on line 3")
def _(ws: Workspace) -> str:
    return load_data(ws.text_file("d.json", b'[\n {"prompt": "a", "response": "b"},\n {"prompt": "c" "response": "d"}\n]'))


@case(AREA, "JSON array: non-UTF-8 bytes on line 3")
def _(ws: Workspace) -> str:
    return load_data(ws.text_file("d.json", b'[\n {"prompt": "a", "response": "b"},\n {"prompt": "\xfe", "response": "d"}\n]'))


@case(AREA, "Alpaca JSON: a row without `output`")
def _(ws: Workspace) -> str:
    rows = [{"instruction": "Name a colour.", "input": "", "output": "Blue"}, {"instruction": "Name a fruit."}]
    return load_data(ws.text_file("alpaca.json", json.dumps(rows).encode()))


@case(AREA, "CSV: a row with one cell too many")
def _(ws: Workspace) -> str:
    return load_data(ws.text_file("d.csv", b"prompt,response\nHi,Hello\nBye,Ciao,extra\n"))


@case(AREA, "CSV: no `response` column")
def _(ws: Workspace) -> str:
    return load_data(ws.text_file("d.csv", b"prompt,answer\nHi,Hello\n"))


@case(AREA, "CSV: an empty cell")
def _(ws: Workspace) -> str:
    return load_data(ws.text_file("d.csv", b"prompt,response\nHi,Hello\nBye,\n"))


@case(AREA, "CSV: the header names a column twice")
def _(ws: Workspace) -> str:
    return load_data(ws.text_file("d.csv", b"prompt,response,prompt\nHi,Hello,Hey\n"))


@case(AREA, "CSV: a header column without a name")
def _(ws: Workspace) -> str:
    return load_data(ws.text_file("d.csv", b"prompt,,response\nHi,x,Hello\n"))


@case(AREA, "CSV: non-UTF-8 bytes (Windows-1252 from Excel)")
def _(ws: Workspace) -> str:
    return load_data(ws.text_file("d.csv", "prompt,response\nHi,Hello\nCafé?,Oui\n".encode("cp1252")))


@case(AREA, "CSV: a quoted cell spanning two lines, a byte-order mark")
def _(ws: Workspace) -> str:
    return load_data(ws.text_file("d.csv", b'\xef\xbb\xbfprompt,response\n"Two\nlines",Fine\n'))


@case(AREA, "a repeated `id` (rows 1 and 3)")
def _(ws: Workspace) -> str:
    rows = [{"id": "a1", "prompt": "Hi", "response": "Hello"}, {"id": "a2", "prompt": "Yo", "response": "Hey"}]
    rows.append({"id": "a1", "prompt": "Bye", "response": "Ciao"})
    return load_data(ws.text_file("d.jsonl", "".join(json.dumps(row) + "\n" for row in rows).encode()))


@case(AREA, "an `id` that is a list")
def _(ws: Workspace) -> str:
    return load_data(ws.text_file("d.jsonl", b'{"id": [1], "prompt": "Hi", "response": "Hello"}\n'))


@case(AREA, "an empty file")
def _(ws: Workspace) -> str:
    return load_data(ws.text_file("d.jsonl", b"\n\n"))


@case(AREA, "JSONL: a lone UTF-16 surrogate (`\\ud800`) in a prompt")
def _(ws: Workspace) -> str:
    return load_data(ws.text_file("d.jsonl", b'{"prompt": "Hi", "response": "Yo"}\n{"prompt": "Hi \\ud800", "response": "Yo"}\n'))


@case(AREA, "`--data /`: a folder that holds no dataset")
def _(ws: Workspace) -> str:
    return load_data("/")


@case(AREA, "a .csv path that does not exist")
def _(ws: Workspace) -> str:
    return load_data(ws.fresh("missing.csv"))


@case(AREA, "a Hugging Face dataset name that is not cached (nothing is downloaded)")
def _(ws: Workspace) -> str:
    return load_data("no-such-user/no-such-dataset")


@case(AREA, "a dataset directory whose JSONL file is broken")
def _(ws: Workspace) -> str:
    path = ws.text_file("train.jsonl", GOOD_JSONL + b"{broken\n")
    return load_data(path.parent)


@case(AREA, "a saved dataset without the split asked for")
def _(ws: Workspace) -> str:
    import datasets

    path = ws.fresh("dataset")
    rows = [{"prompt": "Hi", "response": "Hello"}]
    datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)}).save_to_disk(str(path))
    return load_data(path)


# ---- training ----

AREA = "training (`train_sft`, `aligner train`)"


def examples() -> list:
    from aligner.data import Example

    return [Example(f"What is {i} + {i}?", "Bananas are yellow.", row=i + 1) for i in range(4)]


def train(ws: Workspace, run_dir: Path | None, resume: bool = False, model: Any = None, **settings: Any) -> str:
    from aligner import TrainConfig, train_sft

    config = TrainConfig(**{"steps": 2, "save_every": 1, "batch_size": 2, "lr": 0.1, "warmup_steps": 0, **settings})
    al = train_sft(model or ws.model(), examples(), config, run_dir=run_dir, resume=resume)
    return f"trains to step {al.provenance['training']['step']}"


def trained_run(ws: Workspace) -> Path:
    run = ws.fresh("trained")
    train(ws, run)
    return run


@case(AREA, "an example longer than max_length (row 3: 90 tokens, max_length 48)")
def _(ws: Workspace) -> str:
    from aligner import TrainConfig, train_sft
    from aligner.data import Example

    data = examples()
    data[2] = Example(data[2].prompt, "Bananas are yellow. " * 10, row=3)
    config = TrainConfig(steps=1, batch_size=4, max_length=48)
    al = train_sft(ws.model(), data, config)
    return f"trains to step {al.provenance['training']['step']}"


@case(AREA, "every example too long to keep a response token")
def _(ws: Workspace) -> str:
    return train(ws, None, max_length=8)


@case(AREA, "a setting out of range (steps = 0)")
def _(ws: Workspace) -> str:
    return train(ws, None, steps=0)


@case(AREA, "the run directory exists and is not resumed")
def _(ws: Workspace) -> str:
    return train(ws, trained_run(ws))


@case(AREA, "resuming a directory that does not exist")
def _(ws: Workspace) -> str:
    return train(ws, ws.fresh("empty"), resume=True)


@case(AREA, "resuming a run killed before its first checkpoint (metrics, a stale `.tmp`, its `.lock` left)")
def _(ws: Workspace) -> str:
    run = ws.fresh("killed")
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n')
    (run / ".adapter.json.1a2b3c4d.tmp").write_text("{")
    (run / ".lock").write_text("12345\n")
    return train(ws, run, resume=True) + f"; left in the run: {', '.join(sorted(p.name for p in run.iterdir()))}"


@case(AREA, "resuming a directory holding an adapter but no training state (`Adapter.save`)")
def _(ws: Workspace) -> str:
    return train(ws, ws.saved_aligner(), resume=True)


@case(AREA, "resuming a directory of other files (`--out runs --resume`)")
def _(ws: Workspace) -> str:
    run = ws.fresh("runs")
    (run / "json-1tok").mkdir(parents=True)
    return train(ws, run, resume=True)


@case(AREA, "a second training of a run being trained (resumed or not)")
def _(ws: Workspace) -> str:
    from aligner.checkpoint import run_lock

    run = ws.fresh("busy")
    with run_lock(run):
        try:
            train(ws, run, resume=True)
        except BlockingIOError as err:
            return f"BlockingIOError: {str(err).replace(str(os.getpid()), '<pid>')}"
    return "trained"


@case(AREA, "a stale `.tmp` file in a run that is resumed")
def _(ws: Workspace) -> str:
    run = trained_run(ws)
    (run / ".state.json.deadbeef.tmp").write_text("half")
    return train(ws, run, resume=True, steps=3) + f"; `.tmp` files left: {len(list(run.glob('.*.tmp')))}"


@case(AREA, "state.json of 30 GB (sparse)")
def _(ws: Workspace) -> str:
    run = trained_run(ws)
    with open(run / "state.json", "r+b") as f:
        f.truncate(30 * 10**9)
    return train(ws, run, resume=True, steps=3)


@case(AREA, "a fractional step count (`steps = 2.5`)")
def _(ws: Workspace) -> str:
    return train(ws, None, steps=2.5)


@case(AREA, "an infinite learning rate")
def _(ws: Workspace) -> str:
    return train(ws, None, lr=float("inf"))


@case(AREA, "resuming with another learning rate")
def _(ws: Workspace) -> str:
    return train(ws, trained_run(ws), resume=True, lr=0.2)


@case(AREA, "resuming on another base model (other weights)")
def _(ws: Workspace) -> str:
    return train(ws, trained_run(ws), resume=True, model=ws.model(seed=1))


@case(AREA, "state.json: a field missing")
def _(ws: Workspace) -> str:
    run = trained_run(ws)
    edit_json(run / "state.json", lambda state: state.pop("position"))
    return train(ws, run, resume=True, steps=3)


@case(AREA, "state.json: the tensors file named outside the run (`../x.safetensors`)")
def _(ws: Workspace) -> str:
    run = trained_run(ws)
    edit_json(run / "state.json", lambda state: state.update(tensors="../x.safetensors"))
    return train(ws, run, resume=True, steps=3)


@case(AREA, "state.json: the step is negative")
def _(ws: Workspace) -> str:
    run = trained_run(ws)
    edit_json(run / "state.json", lambda state: state.update(step=-1))
    return train(ws, run, resume=True, steps=3)


@case(AREA, "the state's tensors file truncated")
def _(ws: Workspace) -> str:
    run = trained_run(ws)
    [tensors] = run.glob("state-*.safetensors")
    tensors.write_bytes(tensors.read_bytes()[:-4])
    return train(ws, run, resume=True, steps=3)


@case(AREA, "metrics.jsonl: the last line cut short (killed mid-append)")
def _(ws: Workspace) -> str:
    run = trained_run(ws)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "lo')
    return train(ws, run, resume=True, steps=3) + "; the torn line is dropped"


@case(AREA, "the loss becomes NaN at step 2")
def _(ws: Workspace) -> str:
    model = ws.model()
    forwards = []

    def poison_second_step(x: Any, hook: Any) -> Any:
        forwards.append(None)
        return x * float("nan") if len(forwards) == 2 else x

    model.add_hook("blocks.3.hook_resid_post", poison_second_step)
    try:
        return train(ws, ws.fresh("nan"), steps=3, batch_size=4)
    finally:
        model.reset_hooks()


@case(AREA, "the gradients overflow (the loss stays finite, the update is NaN)")
def _(ws: Workspace) -> str:
    from aligner import Aligner, TrainConfig, train_sft

    al = Aligner.for_model(ws.model())
    al.gates.register_hook(lambda grad: grad * float("inf"))
    config = TrainConfig(steps=2, save_every=1, batch_size=4, lr=0.1, warmup_steps=0)
    train_sft(ws.model(), examples(), config, run_dir=ws.fresh("overflow"), adapter=al)
    return "trained"


@contextlib.contextmanager
def launched(**env: str) -> Iterator[None]:
    """As if under `accelerate launch`: its environment variables set, and accelerate's process state (one per
    process, made by the first `Accelerator()`) made afresh from them; both put back after."""
    from accelerate.state import AcceleratorState

    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        AcceleratorState._reset_state(reset_partial_state=True)


@case(AREA, "processes launched together that accelerate did not join (WORLD_SIZE=2, on no GPU)")
def _(ws: Workspace) -> str:
    with launched(WORLD_SIZE="2"):
        return train(ws, None)


@case(AREA, "`accelerate launch --mixed_precision fp16` (ACCELERATE_MIXED_PRECISION=fp16)")
def _(ws: Workspace) -> str:
    with launched(ACCELERATE_MIXED_PRECISION="fp16"):
        return train(ws, None)


@case(AREA, "DPO (`train_dpo`) under `accelerate launch --mixed_precision fp16`")
def _(ws: Workspace) -> str:
    from aligner.data import Pair
    from aligner.dpo import DPOConfig, train_dpo

    pairs = [Pair("Hi?", "Hello.", "Go away.", row=1), Pair("Yo?", "Hey.", "No.", row=2)]
    with launched(ACCELERATE_MIXED_PRECISION="fp16"):
        train_dpo(ws.model(), pairs, DPOConfig(steps=2, batch_size=2, lr=0.1, warmup_steps=0))
    return "trained"


def stand_in_launch(ws: Workspace, processes: int, kind: str, **settings: int | bool) -> str:
    """`train_sft` given what accelerate reports under a launch of `processes` of `kind`: DeepSpeed needs GPUs,
    and a refusal needs no processes, so the accelerator is a stand-in with accelerate's own values, as
    tests/test_distributed.py does."""
    from types import SimpleNamespace

    import torch
    from accelerate import DistributedType

    from aligner import TrainConfig, train_sft

    stand_in = SimpleNamespace(
        num_processes=processes, distributed_type=DistributedType[kind], mixed_precision="no", device=torch.device("cpu")
    )
    with mock.patch.dict(os.environ, {"WORLD_SIZE": str(processes)}):  # as accelerate launch sets it
        train_sft(ws.model(), examples(), TrainConfig(**{"steps": 2, "batch_size": 2, **settings}), accelerator=stand_in)
    return "trained"


@case(AREA, "`accelerate launch --use_deepspeed` (a stand-in accelerator: DeepSpeed needs GPUs)")
def _(ws: Workspace) -> str:
    return stand_in_launch(ws, 1, "DEEPSPEED")


@case(AREA, "`aligner train --shard-model --batch-size 3` on 2 processes (a stand-in accelerator)")
def _(ws: Workspace) -> str:
    return stand_in_launch(ws, 2, "MULTI_CPU", batch_size=3, shard_model=True)


@case(AREA, "a prompt-tuning forward on a prompt without its placeholder tokens (not formatted by `prompts_for`)")
def _(ws: Workspace) -> str:
    import torch

    from aligner.chat import prompt_ids
    from aligner.methods import PromptTuning, PromptTuningConfig

    model = ws.model()
    with PromptTuning.for_model(model, PromptTuningConfig(4)).attached(model):
        model(torch.tensor([prompt_ids(model.tokenizer, "Hi")]))
    return "ran"


@case(AREA, "prompt tuning given a placeholder that padding writes (SmolLM2's pad token, its end of turn)")
def _(ws: Workspace) -> str:
    from aligner.methods import PromptTuning, PromptTuningConfig

    model = ws.model()
    with PromptTuning.for_model(model, PromptTuningConfig(4, placeholder="<|im_end|>")).attached(model):
        return "attached"


# ---- the suite's method names ----

AREA = "suite methods (`method_spec`, `aligner sweep --methods`)"


def spec(name: str) -> str:
    from aligner.registry import method_spec

    got = method_spec(name)
    return f"accepted: lr={got.lr}, steps={got.steps}, train={got.train}, gate_scale={got.gate_scale}"


@case(AREA, "a method that does not exist (`ia3`)")
def _(ws: Workspace) -> str:
    return spec("ia3")


@case(AREA, "a size of no sense (`lora-0`)")
def _(ws: Workspace) -> str:
    return spec("lora-0")


@case(AREA, "an option on a method that trains nothing (`base:lr=0.1`)")
def _(ws: Workspace) -> str:
    return spec("base:lr=0.1")


@case(AREA, "an option that is not one (`aligner-1:rank=4`)")
def _(ws: Workspace) -> str:
    return spec("aligner-1:rank=4")


@case(AREA, "an option given twice (`aligner-1:lr=0.1:lr=0.2`)")
def _(ws: Workspace) -> str:
    return spec("aligner-1:lr=0.1:lr=0.2")


@case(AREA, "an option without its value (`aligner-1:lr`)")
def _(ws: Workspace) -> str:
    return spec("aligner-1:lr")


@case(AREA, "a step budget that is not a number (`aligner-1:steps=ten`)")
def _(ws: Workspace) -> str:
    return spec("aligner-1:steps=ten")


@case(AREA, "a step budget of 0 (`aligner-1:steps=0`)")
def _(ws: Workspace) -> str:
    return spec("aligner-1:steps=0")


@case(AREA, "a negative rate (`aligner-1:lr=-0.1`)")
def _(ws: Workspace) -> str:
    return spec("aligner-1:lr=-0.1")


@case(AREA, "a rate that is not a number (`aligner-1:lr=nan`)")
def _(ws: Workspace) -> str:
    return spec("aligner-1:lr=nan")


@case(AREA, "a gate scale on a method without gates (`lora-8:gate_scale=0.5`)")
def _(ws: Workspace) -> str:
    return spec("lora-8:gate_scale=0.5")


@case(AREA, "a gate scale of 0 (`aligner-1:gate_scale=0`: the base model's answers)")
def _(ws: Workspace) -> str:
    return spec("aligner-1:gate_scale=0")


@case(AREA, "more training items than the task's training split (`aligner-1:train=100`, quick `json` task)")
def _(ws: Workspace) -> str:
    from aligner.registry import method_spec
    from aligner.suite import QUICK, train_method
    from aligner.tasks import get_task

    data = get_task("json").build(None, QUICK.sizes)
    _, record = train_method(ws.model(), method_spec("aligner-1:train=100"), data, QUICK, seed=0)
    return f"trains on {record['train_items']} items"


# ---- the command line ----

AREA = "command line (`aligner ...`)"


def cli(*args: str) -> str:
    from typer.testing import CliRunner

    from aligner.cli import app

    result = CliRunner().invoke(app, list(args))
    lines = [line for line in result.output.splitlines() if line.startswith("Error")] or result.output.splitlines()[-1:]
    return f"exit status {result.exit_code}: " + " ".join(lines)


@case(AREA, "`train --data` a file that does not exist")
def _(ws: Workspace) -> str:
    return cli("train", "--data", str(ws.fresh("missing.jsonl")), "--out", str(ws.fresh("run")), "--model", "tiny")


@case(AREA, "`train --method lora-8` with an option that shapes an aligner (`--n-tokens 4`)")
def _(ws: Workspace) -> str:
    data = ws.fresh("data.jsonl")
    data.write_text('{"prompt": "Hi", "response": "Hello"}\n')
    return cli("train", "--data", str(data), "--out", str(ws.fresh("run")), "--method", "lora-8", "--n-tokens", "4")


@case(AREA, "`generate --run` an aligner for another model (`--model tiny`, aligner of 32-d)")
def _(ws: Workspace) -> str:
    from aligner import Aligner

    run = Aligner.for_model(ws.model(d_model=32)).save(ws.fresh("run32"))
    return cli("generate", "Hi", "--run", str(run), "--model", "tiny", "--max-new-tokens", "2")


@case(AREA, "`info` on a directory that holds no run (no aligner, no other method)")
def _(ws: Workspace) -> str:
    path = ws.fresh("empty")
    path.mkdir()
    return cli("info", str(path))


@case(AREA, "`info` on an aligner whose provenance was hand-edited")
def _(ws: Workspace) -> str:
    from typer.testing import CliRunner

    from aligner.cli import app

    run = ws.saved_aligner()
    edit_json(run / "adapter.json", lambda meta: meta["provenance"].update(training={"step": "three"}))
    result = CliRunner().invoke(app, ["info", str(run)])
    [training] = [line for line in result.output.splitlines() if line.startswith("training")]
    return f"exit status {result.exit_code}, prints: {training}"


@case(AREA, "`generate --gate-scale nan` (or inf)")
def _(ws: Workspace) -> str:
    return cli("generate", "Hi", "--model", "tiny", "--gate-scale", "nan")


@case(AREA, "`generate --max-new-tokens 100000`, more than the context leaves (a model of 40 positions)")
def _(ws: Workspace) -> str:
    import aligner

    model = ws.model()
    n_ctx = model.cfg.n_ctx
    model.cfg.n_ctx = 40
    try:
        return f"answers {aligner.generate(model, ['Hi'], max_new_tokens=100000)!r}"
    finally:
        model.cfg.n_ctx = n_ctx


@case(AREA, "`info` on a run whose adapter.json holds terminal escape sequences (base model name)")
def _(ws: Workspace) -> str:
    from typer.testing import CliRunner

    from aligner.cli import app

    run = ws.saved_aligner()
    edit_json(run / "adapter.json", lambda meta: meta["base_model"].update(name="\x1b]0;owned\x07\x1b[2J"))
    result = CliRunner().invoke(app, ["info", str(run)])
    [line] = [line for line in result.output.splitlines() if line.startswith("base model")]
    return f"exit status {result.exit_code}, prints: {line}"


@case(AREA, "`sweep --methods` a method option that is not one (`aligner-1:rank=4`)")
def _(ws: Workspace) -> str:
    return cli("sweep", "--quick", "--methods", "base,aligner-1:rank=4", "--out", str(ws.fresh("sweep")))


@case(AREA, "`sweep --tables-only` on a results folder of cells in the layout before cells were kept per model")
def _(ws: Workspace) -> str:
    out = ws.fresh("sweep")
    (out / "cells" / "json" / "base").mkdir(parents=True)
    (out / "cells" / "json" / "base" / "seed0.json").write_text("{}")
    return cli("sweep", "--tables-only", "--out", str(out))


@case(AREA, "a few-shot audit (`sweep --audit-shots`) of as many shots as the knowledge set has facts")
def _(ws: Workspace) -> str:
    from aligner.audit import demonstrations
    from aligner.tasks import KNOWLEDGE_SETS

    return demonstrations(KNOWLEDGE_SETS["capitals"], 250)


@case(AREA, "`task_examples` (the app's Train tab, notebooks) of a task in a prompt format of its own (`instruct`)")
def _(ws: Workspace) -> str:
    from aligner.runs import task_examples

    return task_examples(ws.model(), "instruct", n_train=4, known_only=False)


@case(AREA, "a run whose provenance names `/etc/passwd` as its data (what `probe report` and the app read)")
def _(ws: Workspace) -> str:
    from aligner import load_adapter
    from aligner.runs import recorded_data

    al = load_adapter(ws.saved_aligner())
    al.provenance = {"training": {"config": {"data": "/etc/passwd"}}}
    return f"recorded data read: {recorded_data(al)} (not followed)"


# ---- the de-quantised model cache ----

AREA = "model cache (`packaged_model_dir`, `cached_directory`)"
CACHE_SOURCE = {"file": "model.gguf", "size": 1234, "mtime": 0}


def fake_build(directory: Path) -> None:
    """A stand-in for de-quantising: a 2 MiB model.safetensors and a config, in no time."""
    (directory / "model.safetensors").write_bytes(bytes(range(256)) * 8192)
    (directory / "config.json").write_text('{"model_type": "llama"}')


def built_entry(ws: Workspace) -> Path:
    from aligner.loading import cached_directory

    return cached_directory(ws.fresh("cache") / "entry", fake_build, CACHE_SOURCE)


def use_entry(entry: Path, full_check: bool = False) -> str:
    from aligner.loading import cached_directory

    builds = []
    cached_directory(entry, lambda directory: (builds.append(1), fake_build(directory)), CACHE_SOURCE, full_check)
    return "rebuilt" if builds else "used as is"


@case(AREA, "model.safetensors truncated")
def _(ws: Workspace) -> str:
    entry = built_entry(ws)
    (entry / "model.safetensors").write_bytes((entry / "model.safetensors").read_bytes()[:1000])
    return use_entry(entry)


@case(AREA, "model.safetensors: a byte changed in its header (first MiB)")
def _(ws: Workspace) -> str:
    entry = built_entry(ws)
    data = bytearray((entry / "model.safetensors").read_bytes())
    data[100] ^= 1
    (entry / "model.safetensors").write_bytes(bytes(data))
    return use_entry(entry)


@case(AREA, "model.safetensors: a byte changed after the first MiB, quick check")
def _(ws: Workspace) -> str:
    entry = built_entry(ws)
    data = bytearray((entry / "model.safetensors").read_bytes())
    data[-1] ^= 1
    (entry / "model.safetensors").write_bytes(bytes(data))
    return use_entry(entry) + " (the quick check reads sizes and first MiBs only)"


@case(AREA, "model.safetensors: a byte changed after the first MiB, `full_check=True`")
def _(ws: Workspace) -> str:
    entry = built_entry(ws)
    data = bytearray((entry / "model.safetensors").read_bytes())
    data[-1] ^= 1
    (entry / "model.safetensors").write_bytes(bytes(data))
    return use_entry(entry, full_check=True)


@case(AREA, "a file of the entry deleted")
def _(ws: Workspace) -> str:
    entry = built_entry(ws)
    (entry / "config.json").unlink()
    return use_entry(entry)


@case(AREA, "complete.json is not JSON")
def _(ws: Workspace) -> str:
    entry = built_entry(ws)
    (entry / "complete.json").write_text("{")
    return use_entry(entry)


@case(AREA, "an entry built from another source file")
def _(ws: Workspace) -> str:
    entry = built_entry(ws)
    edit_json(entry / "complete.json", lambda record: record["source"].update(size=999))
    return use_entry(entry)


@case(AREA, "a build that was killed (no complete.json)")
def _(ws: Workspace) -> str:
    entry = built_entry(ws)
    (entry / "complete.json").unlink()
    return use_entry(entry)


@contextlib.contextmanager
def aligner_cache(root: str) -> Iterator[None]:
    saved = os.environ.get("ALIGNER_CACHE")
    os.environ["ALIGNER_CACHE"] = root
    try:
        yield
    finally:
        if saved is None:
            del os.environ["ALIGNER_CACHE"]
        else:
            os.environ["ALIGNER_CACHE"] = saved


@case(AREA, "`aligner cache --unused-days 0` with ALIGNER_CACHE a home folder (`.ssh/`, `models/thesis/`)")
def _(ws: Workspace) -> str:
    home = ws.fresh("home")
    for path in (home / ".ssh" / "id_rsa", home / "models" / "thesis" / "draft.tex"):
        path.parent.mkdir(parents=True)
        path.write_text("mine")
    with aligner_cache(str(home)):
        result = cli("cache", "--unused-days", "0")
    kept = sorted(str(p.relative_to(home)) for p in home.rglob("*") if p.is_file())
    return f"{result}; files kept: {', '.join(kept)}"


@case(AREA, "ALIGNER_CACHE set but empty")
def _(ws: Workspace) -> str:
    from aligner.loading import cache_location

    with aligner_cache(""):
        return f"the cache is {str(cache_location()).replace(str(Path.home()), '~')}, not the current folder"


@case(AREA, "`aligner cache --unused-days 0` on the cache's own root holding files of other programs and a link out")
def _(ws: Workspace) -> str:
    from aligner.loading import cache_dir, cached_directory

    root, outside = ws.fresh("cache"), ws.fresh("outside")
    outside.mkdir()
    (outside / "precious.txt").write_text("mine")
    with aligner_cache(str(root)):
        cache_dir()
        cached_directory(root / "models" / "m-1", fake_build, CACHE_SOURCE)
        (root / "answers").mkdir()
        (root / "answers" / "notes.txt").write_text("not the cache's")
        (root / "models" / "link").symlink_to(outside, target_is_directory=True)
        result = cli("cache", "--unused-days", "0")
    kept = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.name != ".m-1.lock")
    return f"{result}; kept: {', '.join(kept)}, and {outside.name}/precious.txt"


@case(AREA, "a build that fails (the disk is full): its error, and no entry or staging directory left")
def _(ws: Workspace) -> str:
    from aligner.loading import cached_directory

    def failing_build(directory: Path) -> None:
        (directory / "model.safetensors").write_bytes(b"half")
        raise OSError("No space left on device")

    entry = ws.fresh("cache") / "entry"
    try:
        cached_directory(entry, failing_build, CACHE_SOURCE)
    finally:
        assert not entry.exists() and list(entry.parent.iterdir()) == [entry.parent / ".entry.lock"]
    return "built"


# ---- running the cases ----


# What a bad input may end in: the errors the project documents. Anything else is a bug, and stops the script.
DOCUMENTED_ERRORS = (ValueError, OSError, FloatingPointError, RuntimeError)


def outcome(run: Callable[[Workspace], str], ws: Workspace) -> str:
    """What the user sees: the exception, the warnings raised by this package, or what the call gave back."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result = run(ws)
        except DOCUMENTED_ERRORS as err:
            result = f"{type(err).__name__}: {err}"
    ours = [w for w in caught if w.filename.startswith(PACKAGE_DIR) or w.filename == __file__]
    shown = [f"{w.category.__name__}: {w.message}" for w in ours] + [result]
    return " — then ".join(dict.fromkeys(shown))


def table(ws: Workspace) -> str:
    rows = []
    for number, item in enumerate(CASES, start=1):
        seen = outcome(item.run, ws).replace(str(ws.root), "<tmp>")
        seen = re.sub(r"\s+", " ", seen).replace("|", "\\|")
        rows.append(f"| {number} | {item.area} | {item.bad_input} | {seen} |")
    areas = len(dict.fromkeys(item.area for item in CASES))
    return "\n".join(
        [
            "# Bad inputs, and what the user sees",
            "",
            f"{len(CASES)} bad inputs in {areas} areas, each tried by `python docs/make_bad_inputs.py`, which wrote",
            "this file: do not edit it by hand (`python docs/make_bad_inputs.py --check` says whether it is still",
            "what the code prints). `<tmp>` is the temporary directory the cases ran in. Every case ends in one of",
            "the documented errors (`ValueError`; `OSError`, `FileNotFoundError` and `FileExistsError` among them;",
            "`FloatingPointError`; `RuntimeError` for misuse, `NotImplementedError` for a model the aligner's math",
            "does not follow), a warning, or the input accepted; anything else stops the script. The command line",
            "prints an error as one `Error: ...` line with exit status 1.",
            "",
            "| # | where | bad input | what the user sees |",
            "| --- | --- | --- | --- |",
            *rows,
            "",
        ]
    )


@contextlib.contextmanager
def workspace() -> Iterator[Workspace]:
    with tempfile.TemporaryDirectory(prefix="bad-inputs-") as root:
        yield Workspace(Path(root).resolve())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/bad_inputs.md is not what the code prints")
    args = parser.parse_args()
    with workspace() as ws:
        os.environ["HF_DATASETS_CACHE"] = str(ws.root / "hf-datasets-cache")  # read at import: before `datasets`
        text = table(ws)
    if args.check:
        if not OUTPUT.is_file() or OUTPUT.read_text() != text:
            print(f"{OUTPUT} is out of date: run `python docs/make_bad_inputs.py`", file=sys.stderr)
            return 1
        return 0
    OUTPUT.write_text(text)
    print(f"wrote {OUTPUT}: {len(CASES)} cases")
    return 0


if __name__ == "__main__":
    sys.exit(main())
