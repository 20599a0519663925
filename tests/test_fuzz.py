"""Property tests (Hypothesis) of every loader: fed arbitrary bytes or arbitrary JSON, each one either reads its
input or raises one of the project's documented errors, ValueError or OSError (FileNotFoundError among them),
with a message that names the file. Never a KeyError, a TypeError or a crash from deep inside a library."""

import hashlib
import json
import pickle
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save

from aligner import Aligner, AlignerConfig, ModelShape, TrainConfig
from aligner.checkpoint import RunState, load_state, save_state
from aligner.data import load_examples
from aligner.paper import import_paper_checkpoint

DOCUMENTED = (ValueError, OSError)
FUZZ = settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # torch's notes on pickle protocols

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=8,
)
row_keys = st.sampled_from(["prompt", "response", "instruction", "input", "output", "id"]) | st.text(max_size=6)
rows = st.lists(st.dictionaries(row_keys, json_values, max_size=5) | json_values, max_size=5)


def loads_or_refuses(load, path: Path):
    """`load(path)`, or None when it raised a documented error that names the file."""
    try:
        return load(path)
    except DOCUMENTED as err:
        assert str(path) in str(err) or path.name in str(err), f"the error does not name the file: {err}"
        return None


# ---- data rows ----


@FUZZ
@given(content=st.binary(max_size=300), suffix=st.sampled_from([".jsonl", ".json", ".csv"]))
def test_any_bytes_as_a_data_file(content, suffix):
    with tempfile.TemporaryDirectory() as root:
        path = Path(root) / f"data{suffix}"
        path.write_bytes(content)
        examples = loads_or_refuses(load_examples, path)
    assert examples is None or all(e.prompt.strip() and e.response.strip() for e in examples)


@FUZZ
@given(data=rows, layout=st.sampled_from(["jsonl", "json", "csv"]))
def test_any_rows_as_jsonl_json_or_csv(data, layout):
    with tempfile.TemporaryDirectory() as root:
        path = Path(root) / f"data.{layout}"
        if layout == "jsonl":
            path.write_text("".join(json.dumps(row) + "\n" for row in data), encoding="utf-8")
        elif layout == "json":
            path.write_text(json.dumps(data), encoding="utf-8")
        else:  # the keys of the first row as the header, every value as text
            import csv

            dicts = [row for row in data if isinstance(row, dict)]
            header = list(dicts[0]) if dicts else ["prompt", "response"]
            with open(path, "w", encoding="utf-8", newline="") as f:
                writer = csv.writer(f)
                writer.writerow(header)
                writer.writerows([str(row.get(key, "")) for key in header] for row in dicts)
        examples = loads_or_refuses(load_examples, path)
    assert examples is None or all(e.prompt.strip() and e.response.strip() for e in examples)


# ---- aligner files: adapter.json and adapter.safetensors ----


@pytest.fixture(scope="module")
def saved_aligner(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    al = Aligner(AlignerConfig(n_tokens=2, start_layer=1), ModelShape(d_model=8, n_layers=3, n_heads=2))
    return al.save(tmp_path_factory.mktemp("aligner") / "run")


def copy_of(run: Path, root: str) -> Path:
    copy = Path(root) / "run"
    shutil.copytree(run, copy)
    return copy


def set_field(path: Path, section: str | None, key: str, value: object, delete: bool) -> None:
    """Set (or delete) `key` of a JSON file's top object, or of its object `section`, and write it back."""
    meta = json.loads(path.read_text())
    target = meta if section is None else meta[section]
    if delete:
        target.pop(key, None)
    else:
        target[key] = value
    path.write_text(json.dumps(meta))


def set_tensors_file(run: Path, data: bytes) -> None:
    """Write adapter.safetensors with the sha256 in adapter.json to match, so that the bytes themselves are judged."""
    (run / "adapter.safetensors").write_bytes(data)
    meta = json.loads((run / "adapter.json").read_text())
    meta["tensors_sha256"] = hashlib.sha256(data).hexdigest()
    (run / "adapter.json").write_text(json.dumps(meta))


@FUZZ
@given(section=st.sampled_from([None, "config", "shape", "base_model"]), key=st.text(max_size=12) | st.sampled_from(
    ["format", "num_parameters", "tensors_sha256", "n_tokens", "start_layer", "shared", "d_model", "n_layers",
     "n_heads", "name", "architecture"]), value=json_values | st.integers(min_value=-10, max_value=10**15), delete=st.booleans())  # fmt: skip
def test_any_field_of_aligner_json_set_to_anything(saved_aligner, section, key, value, delete):
    with tempfile.TemporaryDirectory() as root:
        run = copy_of(saved_aligner, root)
        set_field(run / "adapter.json", section, key, value, delete)
        loads_or_refuses(Aligner.load, run)


@FUZZ
@given(meta=json_values)
def test_any_json_as_aligner_json(saved_aligner, meta):
    with tempfile.TemporaryDirectory() as root:
        run = copy_of(saved_aligner, root)
        (run / "adapter.json").write_text(json.dumps(meta))
        loads_or_refuses(Aligner.load, run)


@FUZZ
@given(cut=st.integers(min_value=0, max_value=400), flips=st.lists(st.integers(min_value=0, max_value=400), max_size=3))
def test_truncated_or_flipped_safetensors_bytes(saved_aligner, cut, flips):
    data = bytearray((saved_aligner / "adapter.safetensors").read_bytes())
    for index in flips:
        if index < len(data):
            data[index] ^= 0xFF
    with tempfile.TemporaryDirectory() as root:
        run = copy_of(saved_aligner, root)
        set_tensors_file(run, bytes(data[: len(data) - cut]))
        loads_or_refuses(Aligner.load, run)


dtypes = st.sampled_from(["F32", "F16", "BF16", "F64", "I64", "U8", "BOOL", "F8_E4M3", "XX"])
shapes = st.lists(st.integers(min_value=-1, max_value=40), max_size=4)


@FUZZ
@given(
    header=st.dictionaries(
        st.sampled_from(["tokens", "gates", "other", "__metadata__"]),
        st.fixed_dictionaries(
            {"dtype": dtypes, "shape": shapes, "data_offsets": st.lists(st.integers(min_value=-1, max_value=300), max_size=3)}
        )
        | json_values,
        max_size=3,
    ),
    payload=st.binary(max_size=300),
)
def test_any_safetensors_header(saved_aligner, header, payload):
    encoded = json.dumps(header).encode()
    with tempfile.TemporaryDirectory() as root:
        run = copy_of(saved_aligner, root)
        set_tensors_file(run, len(encoded).to_bytes(8, "little") + encoded + payload)
        loads_or_refuses(Aligner.load, run)


# ---- the authors' .pth files ----


@pytest.fixture(scope="module")
def paper_files(tmp_path_factory) -> dict[str, bytes]:
    """A small lit-llama aligner file in torch's zip format and in its older plain-pickle format."""
    prefix = torch.randn(1, 8)
    state = {"global_value_embedding.weight": prefix}
    for layer in (2, 3):
        state[f"transformer.h.{layer}.attn.gating_factor"] = torch.randn(1, 2, 1, 1)
        state[f"transformer.h.{layer}.attn.adapter_wte.weight"] = prefix
    files = {}
    for layout, zipped in (("zip", True), ("legacy", False)):
        path = tmp_path_factory.mktemp("paper") / f"{layout}.pth"
        torch.save(state, path, _use_new_zipfile_serialization=zipped)
        files[layout] = path.read_bytes()
    return files


@FUZZ
@given(
    layout=st.sampled_from(["zip", "legacy"]),
    cut=st.integers(min_value=0, max_value=2000),
    flips=st.lists(st.tuples(st.integers(min_value=0, max_value=2000), st.integers(min_value=1, max_value=255)), max_size=3),
)
def test_truncated_or_flipped_pth_bytes(paper_files, layout, cut, flips):
    data = bytearray(paper_files[layout])
    for index, bits in flips:
        if index < len(data):
            data[index] ^= bits
    with tempfile.TemporaryDirectory() as root:
        path = Path(root) / "file.pth"
        path.write_bytes(bytes(data[: max(0, len(data) - cut)]))
        loads_or_refuses(import_paper_checkpoint, path)


@FUZZ
@given(content=st.binary(max_size=300) | json_values.map(pickle.dumps) | st.binary(max_size=30).map(lambda b: b"\x80\x02" + b))
def test_any_bytes_or_plain_pickle_as_a_pth_file(content):
    with tempfile.TemporaryDirectory() as root:
        path = Path(root) / "file.pth"
        path.write_bytes(content)
        loads_or_refuses(import_paper_checkpoint, path)


@FUZZ
@given(
    state=st.dictionaries(
        st.sampled_from(["global_value_embedding.weight", "transformer.h.2.attn.gating_factor",
                         "transformer.h.3.attn.gating_factor", "transformer.h.3.attn.adapter_wte.weight",
                         "transformer.h.99999999999.attn.gating_factor"]),  # fmt: skip
        st.tuples(shapes.map(lambda dims: [abs(d) % 4 for d in dims]), st.sampled_from([torch.float32, torch.bfloat16, torch.int8])),
        max_size=5,
    )
)
def test_any_dict_of_lit_llama_keys(state):
    tensors = {key: torch.zeros(dims, dtype=dtype) for key, (dims, dtype) in state.items()}
    with tempfile.TemporaryDirectory() as root:
        path = Path(root) / "file.pth"
        torch.save(tensors, path)
        loads_or_refuses(import_paper_checkpoint, path)


# ---- training state: state.json and state-STEP.safetensors ----

STATE_CONFIG = TrainConfig(steps=5, save_every=1, batch_size=2, warmup_steps=0)


def fresh_training(base_fingerprint: str = "base"):
    torch.manual_seed(0)
    al = Aligner(AlignerConfig(), ModelShape(d_model=8, n_layers=3, n_heads=2), base_model={"name": None, "fingerprint": base_fingerprint})
    return al, torch.optim.AdamW(al.parameters())


@pytest.fixture(scope="module")
def saved_state(tmp_path_factory) -> Path:
    """A run directory whose state is one AdamW step on an aligner of a made-up 3-layer model."""
    al, optimizer = fresh_training()
    for param in al.parameters():
        param.grad = torch.ones_like(param)
    optimizer.step()
    run_dir = tmp_path_factory.mktemp("state") / "run"
    run_dir.mkdir()
    save_state(run_dir, al, optimizer, STATE_CONFIG, RunState(1, 2, 0.5, 1.0, None), "data")
    return run_dir


def resume(run_dir: Path) -> None:
    al, optimizer = fresh_training()
    load_state(run_dir, STATE_CONFIG, al, optimizer, "data", "base")


def test_the_saved_state_resumes(saved_state):
    resume(saved_state)


@FUZZ
@given(section=st.sampled_from([None, "config"]), key=st.text(max_size=10) | st.sampled_from(
    ["format", "step", "position", "elapsed_s", "loss", "saved_step", "tensors", "tensors_sha256", "base_fingerprint",
     "data_sha256", "lr", "n_tokens", "seed"]), value=json_values, delete=st.booleans())  # fmt: skip
def test_any_field_of_state_json_set_to_anything(saved_state, section, key, value, delete):
    with tempfile.TemporaryDirectory() as root:
        run = copy_of(saved_state, root)
        set_field(run / "state.json", section, key, value, delete)
        loads_or_refuses(resume, run)


@FUZZ
@given(names=st.lists(st.sampled_from(["tokens", "gates", "rng.torch", "optimizer.0.exp_avg", "optimizer.0.step",
                                       "optimizer.1.exp_avg_sq", "optimizer.x.y", "optimizer.9.exp_avg", "a.b"]),
                      max_size=6), dims=shapes.map(lambda d: [abs(x) % 5 for x in d]))  # fmt: skip
def test_any_tensors_in_the_state_file(saved_state, names, dims):
    data = save({name: torch.zeros(dims) for name in names})
    with tempfile.TemporaryDirectory() as root:
        run = copy_of(saved_state, root)
        state = json.loads((run / "state.json").read_text())
        (run / state["tensors"]).write_bytes(data)
        state["tensors_sha256"] = hashlib.sha256(data).hexdigest()
        (run / "state.json").write_text(json.dumps(state))
        loads_or_refuses(resume, run)
