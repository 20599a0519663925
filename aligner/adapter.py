"""One family of adapters: every way of changing a frozen bridge that the project trains, compares and saves.

An `Adapter` has peft's shape: a config dataclass (what the user sets), `for_model(model, config)` (a fresh one
shaped for a model), `attached(model)` (a context in which the bridge computes with it), `num_parameters()`
(the trainable ones), and one file format for every kind:

    DIR/adapter.json          format, kind, config, model shape, base model, parameter count,
                              the tensors' sha256, provenance
    DIR/adapter.safetensors   the adapter's tensors (its state dict)

`load_adapter(DIR)` reads any kind, with the same checks for each: every field and its type, the kind and its
config, the tensors' names, shapes, dtypes and finite values against what the config and shape call for (read
from the file's header, before any tensor is), the sizes of both files, and the link between them. It also reads
the two layouts written before the format was shared (`aligner.json`, `method.json`). What an adapter can do
beyond that is an attribute: `has_gates` (the aligners), `can_merge` (a one-token aligner folds into biases),
`runs_on_plain_model` (the aligner attaches to a transformers model itself, without the bridge's hook points, and
so trains and generates at the model's own speed: `aligner.lens.plain_model`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import struct
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, ClassVar, Collection, Iterator

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save
from torch import nn
from torch.distributed.fsdp import FSDPModule
from transformer_lens.hook_points import HookPoint

from aligner.config import ModelShape, check_fields, from_json_object, short_repr
from aligner.files import atomic_write_files, json_bytes, provenance, read_json
from aligner.lens import Handle, add_permanent_hook, any_hooked, is_bridge, plain_model, remove_hook
from aligner.loading import model_fingerprint

FORMAT = "aligner-workbench/adapter/2"
CONFIG_FILE = "adapter.json"
TENSORS_FILE = "adapter.safetensors"
FILE_FIELDS = {
    "format": "str",
    "kind": "str",
    "config": "dict",
    "shape": "dict",
    "base_model": "dict",
    "num_parameters": "int",
    "tensors_sha256": "str",
    "provenance": "dict",
}
# What the adapter was made for. "architecture" is the bridge's (e.g. "LlamaForCausalLM"); None: not recorded.
BASE_MODEL_FIELDS = {"name": "str | None", "fingerprint": "str | None", "architecture": "str | None"}
# Tensor dtypes accepted in a file; each converts to float32 exactly.
FILE_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
# The largest files read: far above any adapter's (a LoRA of rank 64 on every projection of a 70B model is
# about 1 GB), far below what would exhaust memory.
MAX_CONFIG_BYTES = 16 * 2**20
MAX_TENSOR_BYTES = 8 * 2**30
# The layouts before one format: (JSON file, tensors file, format), each read as the kind the function gives.
LEGACY_LAYOUTS = (
    ("aligner.json", "aligner.safetensors", "aligner-workbench/aligner/1"),
    ("method.json", "method.safetensors", "aligner-workbench/method/1"),
)
# Shapes an adapter's tensors must have: a dimension None is any (a width the model shape does not record).
TensorShapes = dict[str, tuple[int | None, ...]]


class Adapter(nn.Module):
    """A trainable change to a frozen TransformerBridge: what `train_sft` and `train_dpo` train, `generate`
    answers with, the suite compares and the app shows. A subclass says what it is (`kind`, `config_type`), what
    tensors it holds (`tensor_shapes`) and how it hooks into a model (`hook_into`, `unhook`)."""

    kind: ClassVar[str]  # the name in adapter.json
    config_type: ClassVar[type]
    has_gates: ClassVar[bool] = False  # per-head gates at `blocks.{l}.aligner.hook_gate` (gate_scale, the gate views)
    can_merge: ClassVar[bool] = False  # folds into the model's weights for inference (`merge_into`)
    # Attaches to a plain transformers model as well as to a bridge: training and generation then run the plain
    # model (`aligner.lens.plain_model`); the others need the bridge's hook points and components.
    runs_on_plain_model: ClassVar[bool] = False

    def __init__(self, config: Any, shape: ModelShape, base_model: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.config = config
        self.shape = shape
        self.base_model = {"name": None, "fingerprint": None, "architecture": None, **(base_model or {})}
        self.provenance: dict[str, Any] = {}
        object.__setattr__(self, "_model", None)  # outside nn.Module's registry: the model holds the adapter
        self._handles: list[Handle] = []

    # ---- made for a model ----

    @classmethod
    def for_model(cls, model: nn.Module, config: Any = None) -> "Adapter":
        """A fresh adapter shaped for `model` (a TransformerBridge, or a transformers model where the kind
        `runs_on_plain_model`), on its device; its random initialisation reads torch's RNG."""
        name, architecture = model_identity(model)
        base_model = {"name": name, "fingerprint": model_fingerprint(model), "architecture": architecture}
        adapter = cls(cls.config_type() if config is None else config, shape_of(model), base_model)
        adapter.initialise(model)
        return adapter.to(next(model.parameters()).device)

    def initialise(self, model: nn.Module) -> None:
        """Set the initial values that depend on the base model; the default has none."""

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def format_prompt(self, prompt: str) -> str:
        """The user's turn as this adapter reads it; only prompt tuning changes it."""
        return prompt

    @property
    def attached_to(self) -> nn.Module | None:
        """The model this adapter is attached to, or None."""
        return self._model

    @contextlib.contextmanager
    def fixed_prefix(self) -> Iterator["Adapter"]:
        """Inside, what the adapter computes apart from the input may be kept from one forward to the next (the
        aligner's prefix keys and values, over a generation); the default keeps nothing."""
        yield self

    @property
    def family(self) -> str:
        """The adapter's family in the registry's names (`aligner-1`, `lora-8`): its kind unless it says."""
        return self.kind

    def describe(self) -> str:
        """What it is and its settings, in a few words: "lora (r=8, alpha=8.0, targets=q,v)"."""
        settings = ", ".join(
            f"{k}={','.join(v) if isinstance(v, tuple) else v}" for k, v in asdict(self.config).items()
        )
        return f"{self.kind} ({settings})"

    # ---- attached to a model ----

    def attach(self, model: nn.Module) -> None:
        """Hook this adapter into `model`; `detach` undoes it. Prefer `with adapter.attached(model):`."""
        if self._model is not None:
            raise RuntimeError(f"this {self.kind} is already attached to a model; detach it first")
        if not (self.runs_on_plain_model or is_bridge(model)):
            raise TypeError(
                f"a {self.kind} hooks into a TransformerBridge's components; attach it to a bridge of this "
                f"{type(model).__name__} (aligner.from_hf), not to the transformers model itself"
            )
        check_fits(self, model)
        name, _ = model_identity(model)
        if self.base_model.get("name") not in (None, name) and is_bridge(model):  # a plain model's name is its path
            warnings.warn(f"{self.kind} was trained on {self.base_model['name']!r}, attaching to {name!r}", stacklevel=3)
        object.__setattr__(self, "_model", model)
        try:
            self.hook_into(model)
        except BaseException:
            self.detach()
            raise

    def detach(self) -> None:
        model = self._model
        if model is None:
            return
        self.unhook(model)
        for handle in self._handles:
            remove_hook(handle)
        self._handles = []
        object.__setattr__(self, "_model", None)

    @contextlib.contextmanager
    def attached(self, model: nn.Module) -> Iterator["Adapter"]:
        """Attached for the duration of a `with` block; detached on exit, also on error."""
        self.attach(model)
        try:
            yield self
        finally:
            self.detach()

    def hook_into(self, model: nn.Module) -> None:
        raise NotImplementedError

    def unhook(self, model: nn.Module) -> None:
        """Undo what `hook_into` did besides adding hooks (`add_hook`'s are removed for every adapter)."""

    def add_hook(self, hook_point: HookPoint, fn: Callable[..., Any], prepend: bool = False) -> None:
        """A hook that stays through a user's `reset_hooks()` and goes on `detach`."""
        self._handles.append(add_permanent_hook(hook_point, fn, prepend))

    @property
    def switchable_layers(self) -> list[int]:
        """The model layers whose write `switched_off` can take away one by one; none by default."""
        return []

    def switched_off(self, layers: Collection[int]) -> contextlib.AbstractContextManager[None]:
        """Inside, this adapter, attached to a bridge, writes nothing at `layers` (of `switchable_layers`) and
        exactly what it writes otherwise at the others: for analyses that take a method apart layer by layer."""
        raise ValueError(f"a {self.kind} cannot be switched off layer by layer")

    # ---- files ----

    @classmethod
    def tensor_shapes(cls, config: Any, shape: ModelShape) -> TensorShapes:
        """The tensors an adapter of `config` on `shape` holds (its state dict) and their shapes."""
        raise NotImplementedError

    @classmethod
    def empty(cls, config: Any, shape: ModelShape, base_model: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> "Adapter":
        """An adapter to load a file's tensors into, of the `shapes` the file's header gives (already checked
        against `tensor_shapes`)."""
        return cls(config, shape, base_model)

    def save(self, path: str | Path, **provenance_extra: Any) -> Path:
        """Write `adapter.safetensors` and `adapter.json` into directory `path`, together (`atomic_write_files`);
        the files of an older layout there are removed."""
        path = Path(path)
        data = save({name: tensor.detach().cpu().contiguous() for name, tensor in self.state_dict().items()})
        self.provenance = {**provenance(), **self.provenance, **provenance_extra}
        meta = {
            "format": FORMAT,
            "kind": self.kind,
            "config": asdict(self.config),
            "shape": self.shape.to_dict(),
            "base_model": self.base_model,
            "num_parameters": self.num_parameters(),
            "tensors_sha256": hashlib.sha256(data).hexdigest(),
            "provenance": self.provenance,
        }
        atomic_write_files({path / TENSORS_FILE: data, path / CONFIG_FILE: json_bytes(meta)})
        for config_file, tensors_file, _ in LEGACY_LAYOUTS:
            (path / config_file).unlink(missing_ok=True)
            (path / tensors_file).unlink(missing_ok=True)
        return path

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> "Adapter":
        """Read an adapter of this class from directory `path` (`load_adapter`, refusing another kind)."""
        adapter = load_adapter(path, device)
        if not isinstance(adapter, cls):
            raise ValueError(f"{path}: holds a {adapter.kind}, not a {cls.kind}")
        return adapter

    def load_tensors(self, tensors: dict[str, torch.Tensor], source: str) -> None:
        """Copy the tensors of its state dict in, in place (an optimizer over them stays valid), after
        `check_tensors`; the error names `source`."""
        check_tensors(tensors, {k: tuple(v.shape) for k, v in self.state_dict().items()}, source)
        with torch.no_grad():
            for name, tensor in self.state_dict().items():
                tensor.copy_(tensors[name])


@contextlib.contextmanager
def attached_to_run(model: nn.Module, adapter: Adapter | None, plain: bool = True) -> Iterator[nn.Module]:
    """`adapter` (None: none) attached, for the block, to the model that training and generation run, which is
    yielded: the plain transformers model under bridge `model` (`aligner.lens.plain_model`), at the model's own
    speed, where the adapter `runs_on_plain_model` (and `plain`). Else the bridge itself: for a kind that needs its
    components, a bridge with anything hooked (a user's hooks, an adapter attached through them), which the plain
    model would leave out, a bridge sharded by FSDP, whose blocks gather their shards, an adapter attached to the
    bridge already, and a plain model that refuses the adapter (its attention outside transformers' attention
    interface), with a warning that says why. A transformers model is itself."""
    if adapter is not None and adapter.attached_to is model:
        yield model
        return
    if adapter is not None:
        check_fits(adapter, model)  # here, so that a misfit names the model as the user knows it, not its plain one
    if (
        plain
        and is_bridge(model)
        and (adapter is None or adapter.runs_on_plain_model)
        and not isinstance(model, FSDPModule)
        and not any_hooked(model)
    ):
        with plain_model(model) as hf:
            try:
                if adapter is not None:
                    adapter.attach(hf)
            except NotImplementedError as err:
                refusal = err
            else:
                try:
                    yield hf
                finally:
                    if adapter is not None:
                        adapter.detach()
                return
        warnings.warn(f"{refusal}; running on the bridge instead, at its speed", stacklevel=3)
    with adapter.attached(model) if adapter is not None else contextlib.nullcontext():
        yield model


def model_identity(model: nn.Module) -> tuple[str | None, str]:
    """(name, architecture) of a bridge or a transformers model, as an adapter records what it was made for: the
    bridge's, or the transformers config's path (None where it has none) and first architecture."""
    cfg = getattr(model, "cfg", None)
    if cfg is not None:
        return cfg.model_name, cfg.architecture
    config = model.config
    return config.name_or_path or None, (config.architectures or [type(model).__name__])[0]


def shape_of(model: nn.Module) -> ModelShape:
    """The shape of a bridge (its cfg) or of a transformers model (its text config)."""
    cfg = getattr(model, "cfg", None)
    if cfg is None:
        config = model.config.get_text_config()
        n_heads = config.num_attention_heads
        return ModelShape(
            d_model=config.hidden_size,
            n_layers=config.num_hidden_layers,
            n_heads=n_heads,
            d_head=getattr(config, "head_dim", None) or config.hidden_size // n_heads,
            n_kv_heads=getattr(config, "num_key_value_heads", None) or n_heads,
        )
    return ModelShape(
        d_model=cfg.d_model,
        n_layers=cfg.n_layers,
        n_heads=cfg.n_heads,
        d_head=cfg.d_head,
        n_kv_heads=getattr(cfg, "n_key_value_heads", None) or cfg.n_heads,
    )


def check_fits(adapter: Adapter, model: nn.Module) -> None:
    """Refuse, naming each mismatch, an adapter whose tensors do not fit `model`, or that was made for another
    architecture: the same d_model, layer and head counts in another model family (Llama-2-7B and Mistral-7B)
    would run, reading tensors that were never trained with its weights."""
    kind = adapter.kind
    model_name, model_architecture = model_identity(model)
    mismatches = [f"{name}: {kind} {mine}, model {theirs}" for name, mine, theirs in adapter.shape.mismatches(shape_of(model))]
    architecture = adapter.base_model.get("architecture")
    if architecture is not None and architecture != model_architecture:
        mismatches.append(
            f"architecture: {kind} {architecture!r}, model {model_architecture!r} (to attach it anyway, set "
            f"{kind}.base_model['architecture'] = None)"
        )
    if mismatches:
        raise ValueError(
            f"{kind} for {adapter.base_model.get('name')!r} does not fit model {model_name!r}: "
            + "; ".join(mismatches)
        )


def check_tensors(tensors: dict[str, Any], expected: TensorShapes, source: str) -> None:
    """Refuse tensors (or a safetensors header's entries: {"dtype", "shape"}) that are not exactly `expected`'s
    names and shapes, in a FILE_DTYPES dtype, all finite; the error names `source`, the tensor, and what was
    expected and found."""
    if set(tensors) != set(expected):
        raise ValueError(
            f"{source}: tensors missing {sorted(set(expected) - set(tensors))}, "
            f"unexpected {sorted(set(tensors) - set(expected))} (expected exactly {sorted(expected)})"
        )
    for name, dims in expected.items():
        value = tensors[name]
        header = isinstance(value, dict)
        found = tuple(value["shape"]) if header else tuple(value.shape)
        if len(found) != len(dims) or any(d is not None and d != f for d, f in zip(dims, found)):
            wanted = tuple("any" if d is None else d for d in dims)
            raise ValueError(f"{source}: tensor {name!r} has shape {found}, expected {wanted}")
        dtype_ok = value["dtype"] in FILE_DTYPES if header else value.dtype in FILE_DTYPES.values()
        if not dtype_ok:
            found_dtype = value["dtype"] if header else str(value.dtype).removeprefix("torch.")
            raise ValueError(
                f"{source}: tensor {name!r} has dtype {found_dtype}, expected one of "
                + ", ".join(f"{code} ({str(dtype).removeprefix('torch.')})" for code, dtype in FILE_DTYPES.items())
            )
        if not header:
            not_finite = int((~torch.isfinite(value)).sum())
            if not_finite:
                raise ValueError(
                    f"{source}: tensor {name!r} has {not_finite} NaN or inf values of {value.numel()}, "
                    "expected all finite"
                )


# ---- reading any adapter ----


# Every kind of adapter a file may hold, by its name in adapter.json: the classes marked `@saved_kind`.
KINDS: dict[str, type[Adapter]] = {}


def saved_kind(cls: type[Adapter]) -> type[Adapter]:
    """Mark `cls` as the class that `load_adapter` makes of a file whose kind is `cls.kind`: the project's own
    (aligner/model.py, aligner/methods.py), or a kind of a user's, defined and marked before it is loaded."""
    if KINDS.get(cls.kind, cls) is not cls:
        raise ValueError(f"two classes save the kind {cls.kind!r}: {KINDS[cls.kind].__qualname__} and {cls.__qualname__}")
    KINDS[cls.kind] = cls
    return cls


def adapter_files(path: Path) -> tuple[Path, Path, str] | None:
    """(JSON file, tensors file, its format) of the adapter in directory `path`, in today's layout or an older
    one; None where it holds none."""
    for config_file, tensors_file, fmt in ((CONFIG_FILE, TENSORS_FILE, FORMAT), *LEGACY_LAYOUTS):
        if (path / config_file).is_file():
            return path / config_file, path / tensors_file, fmt
    return None


def load_adapter(path: str | Path, device: str | torch.device = "cpu") -> Adapter:
    """The adapter saved in directory `path`, of whatever kind. Every field and tensor is checked, and an error
    names the file, the field or tensor, and what was expected and found. Nothing is allocated, and no tensor
    read, before the file's header matches the config."""
    path = Path(path)
    files = adapter_files(path) if path.is_dir() else None
    if files is None:
        raise FileNotFoundError(f"{path}: not an adapter directory (expected {CONFIG_FILE} and {TENSORS_FILE} in it)")
    config_path, tensors_path, fmt = files
    meta = read_meta(config_path, fmt)
    if meta["kind"] not in KINDS:
        raise ValueError(f"{config_path}: field 'kind' is {short_repr(meta['kind'])}, expected one of {sorted(KINDS)}")
    cls = KINDS[meta["kind"]]
    config = from_json_object(cls.config_type, meta["config"], f"{config_path}: field 'config'")
    shape = from_json_object(ModelShape, meta["shape"], f"{config_path}: field 'shape'")
    base_model = check_fields(
        meta["base_model"], BASE_MODEL_FIELDS, f"{config_path}: field 'base_model'", "base model", ("architecture",)
    )
    try:
        expected = cls.tensor_shapes(config, shape)
    except ValueError as err:
        raise ValueError(f"{config_path}: {err}") from err
    header = read_header(tensors_path)
    check_tensors(header, expected, str(tensors_path))
    data = tensors_path.read_bytes()
    if meta["tensors_sha256"] is not None and hashlib.sha256(data).hexdigest() != meta["tensors_sha256"]:
        raise ValueError(
            f"{tensors_path}: contents do not match 'tensors_sha256' in {config_path} "
            "(the file was changed or a save was interrupted)"
        )
    try:
        tensors = load(data)
    except SafetensorError as err:
        raise ValueError(f"{tensors_path}: not a readable safetensors file ({err})") from err
    check_tensors(tensors, expected, str(tensors_path))
    adapter = cls.empty(config, shape, base_model, {name: tuple(t.shape) for name, t in tensors.items()})
    adapter.provenance = meta["provenance"]
    adapter.load_tensors(tensors, str(tensors_path))
    if meta["num_parameters"] != adapter.num_parameters():
        raise ValueError(
            f"{config_path}: field 'num_parameters' is {meta['num_parameters']}, expected "
            f"{adapter.num_parameters()} for {config} on {shape}"
        )
    return adapter.to(device)


def read_meta(config_path: Path, fmt: str) -> dict[str, Any]:
    """adapter.json's fields, checked; a file of an older layout is read into today's fields."""
    meta = read_json(config_path, MAX_CONFIG_BYTES)
    spec = FILE_FIELDS
    if isinstance(meta, dict) and fmt != FORMAT:
        meta = from_legacy(meta, fmt)
        spec = {**FILE_FIELDS, "tensors_sha256": "str | None"}
    meta = check_fields(meta, spec, str(config_path), "adapter file")
    if meta["format"] != FORMAT:
        raise ValueError(f"{config_path}: field 'format' is {short_repr(meta['format'])}, expected {FORMAT!r}")
    return meta


def from_legacy(meta: dict[str, Any], fmt: str) -> dict[str, Any]:
    """An aligner.json or method.json record in adapter.json's fields. Its format must be the one its file name
    says; method.json kept no sha256 of its tensors (None: not checked), and a prompt tuning of that layout
    marked its slots with `<|endoftext|>`."""
    if meta.get("format") != fmt:
        return meta  # refused by the format check, naming what the file holds
    meta = {**meta, "format": FORMAT}
    if fmt == LEGACY_LAYOUTS[0][2]:
        meta.setdefault("kind", "aligner")
    else:
        meta.setdefault("tensors_sha256", None)
        if meta.get("kind") == "prompt-tuning" and isinstance(meta.get("config"), dict):
            meta["config"] = {"placeholder": "<|endoftext|>", **meta["config"]}
    return meta


def read_header(path: Path) -> dict[str, dict[str, Any]]:
    """The tensors a safetensors file declares, {name: {"dtype", "shape", "data_offsets"}}, read from its header
    alone, after checking that the file's size is what the header declares and within MAX_TENSOR_BYTES."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    size = path.stat().st_size
    if size > MAX_TENSOR_BYTES:
        raise ValueError(f"{path}: {size:,} bytes, more than the {MAX_TENSOR_BYTES:,} an adapter's tensors may take")
    with open(path, "rb") as f:
        start = f.read(8)
        if len(start) < 8:
            raise ValueError(f"{path}: not a readable safetensors file ({size} bytes, no header)")
        (length,) = struct.unpack("<Q", start)
        if length > min(size - 8, MAX_CONFIG_BYTES):
            raise ValueError(f"{path}: not a readable safetensors file (a header of {length:,} bytes in {size:,})")
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{path}: not a readable safetensors file (its header: {err})") from err
    if not isinstance(header, dict):
        raise ValueError(f"{path}: not a readable safetensors file (its header is not a JSON object)")
    header.pop("__metadata__", None)
    end = 0
    for name, entry in header.items():
        if not (isinstance(entry, dict) and isinstance(entry.get("shape"), list) and isinstance(entry.get("data_offsets"), list)):
            raise ValueError(f"{path}: not a readable safetensors file (tensor {name!r}: {short_repr(entry)})")
        end = max(end, *entry["data_offsets"]) if entry["data_offsets"] else end
    if 8 + length + end != size:
        raise ValueError(
            f"{path}: {size:,} bytes, but its header declares {8 + length + end:,} (the file is cut short or padded)"
        )
    return header
