"""Import the aligners the paper's authors released (lit-llama naming, `.pth`) without executing any pickle.

Their files are flat dicts: `global_value_embedding.weight` (N, d_model) is the shared prefix, saved again as
`transformer.h.{l}.attn.adapter_wte.weight` under every adapted layer (aliases of one tensor, not extra
parameters), and `transformer.h.{l}.attn.gating_factor` (1, n_heads, 1, 1) holds layer l's per-head gates.
A lit-llama LLaMA-Adapter file has the per-layer `adapter_wte` alone, one prefix per layer.
"""

from __future__ import annotations

import hashlib
import pickle
import re
from pathlib import Path

import torch

from aligner.adapter import FILE_DTYPES
from aligner.config import AlignerConfig, ModelShape
from aligner.model import Aligner

# The base models of the released files, by (d_model, n_layers); the files do not name them. All are
# lit-llama LLaMA-2 models, which a TransformerBridge calls "LlamaForCausalLM".
KNOWN_BASES = {(4096, 32): "meta-llama/Llama-2-7b-hf", (5120, 40): "meta-llama/Llama-2-13b-hf"}
PAPER_ARCHITECTURE = "LlamaForCausalLM"
_LAYER_KEY = re.compile(r"transformer\.h\.(\d+)\.attn\.(gating_factor|adapter_wte\.weight)")
SHARED_KEY = "global_value_embedding.weight"


def import_paper_checkpoint(path: str | Path) -> Aligner:
    """An `Aligner` (float32, on the CPU) holding the tokens and gates of one of the authors' files."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # torch's message: advice on weights_only=False, then what it stopped at, then how to allow that: the
        # middle part alone, since neither piece of advice is taken here.
        stopped_at = str(err).split("WeightsUnpickler error:")[-1].split("Check the documentation")[0]
        detail = " ".join(stopped_at.split(" Please use ")[0].split())
        raise ValueError(
            f"{path}: refused: it holds pickled objects beyond plain tensors, which could run code when loaded; "
            f"none of it was run (weights-only loading stopped at: {detail})"
        ) from err
    except Exception as err:  # torch's readers meet a damaged file with IndexError, KeyError, struct.error, ...
        raise ValueError(f"{path}: not a readable PyTorch checkpoint ({type(err).__name__}: {err})") from err
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a flat dict of tensors in lit-llama naming, found {type(state).__name__}")
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise ValueError(
                f"{path}: expected a flat dict of tensors in lit-llama naming, found {type(value).__name__} "
                f"under key {key!r}"
            )
        if value.dtype not in FILE_DTYPES.values():
            raise ValueError(
                f"{path}: {key!r} has dtype {value.dtype}, expected one of " + ", ".join(map(str, FILE_DTYPES.values()))
            )

    gates: dict[int, torch.Tensor] = {}
    layer_tokens: dict[int, torch.Tensor] = {}
    keys: dict[tuple[str, int], str] = {}  # the key that gave each layer's gate or prefix
    for key, value in state.items():
        match = _LAYER_KEY.fullmatch(key)
        if match is None:
            if key != SHARED_KEY:
                raise ValueError(f"{path}: unexpected key {key!r}")
            continue
        layer, part = int(match.group(1)), match.group(2)
        if (part, layer) in keys:  # "3" and "03": neither may silently win
            raise ValueError(f"{path}: keys {keys[part, layer]!r} and {key!r} both give layer {layer}'s {part}")
        keys[part, layer] = key
        (gates if part == "gating_factor" else layer_tokens)[layer] = value
    if not gates:
        raise ValueError(f"{path}: no 'transformer.h.{{l}}.attn.gating_factor' keys: not an aligner checkpoint")
    layers = sorted(gates)
    start_layer, n_layers = layers[0], layers[-1] + 1
    if len(layers) != n_layers - start_layer:
        raise ValueError(
            f"{path}: gates for layers {layers}, expected one for every layer from {start_layer} to {n_layers - 1}"
        )
    if sorted(layer_tokens) not in ([], layers):
        raise ValueError(
            f"{path}: per-layer prefixes ('adapter_wte.weight') for layers {sorted(layer_tokens)}, expected none "
            f"or one for each gated layer {layers}"
        )
    n_heads = gates[start_layer].numel()
    for layer, gate in gates.items():
        if tuple(gate.shape) != (1, n_heads, 1, 1):
            raise ValueError(
                f"{path}: 'transformer.h.{layer}.attn.gating_factor' has shape {tuple(gate.shape)}, "
                f"expected (1, {n_heads}, 1, 1)"
            )

    shared = SHARED_KEY in state
    if shared:
        tokens = state[SHARED_KEY]
        for layer, alias in layer_tokens.items():
            if not torch.equal(alias, tokens):
                raise ValueError(
                    f"{path}: 'transformer.h.{layer}.attn.adapter_wte.weight' differs from {SHARED_KEY!r}; "
                    "a shared-prefix file must save one tensor under both names"
                )
    else:
        if not layer_tokens:
            raise ValueError(f"{path}: neither {SHARED_KEY!r} nor per-layer 'adapter_wte.weight' prefixes found")
        first = layer_tokens[start_layer]
        for layer, prefix in layer_tokens.items():
            if prefix.shape != first.shape or prefix.dtype != first.dtype:
                raise ValueError(
                    f"{path}: 'transformer.h.{layer}.attn.adapter_wte.weight' is {tuple(prefix.shape)} {prefix.dtype}, "
                    f"expected {tuple(first.shape)} {first.dtype} as in layer {start_layer}"
                )
        tokens = torch.stack([layer_tokens[layer] for layer in layers])
    if tokens.ndim != (2 if shared else 3):
        raise ValueError(f"{path}: prefix has shape {tuple(tokens.shape)}, expected (N, d_model) per layer")
    n_tokens, d_model = tokens.shape[-2:]

    try:
        config = AlignerConfig(n_tokens=n_tokens, start_layer=start_layer, shared=shared)
        shape = ModelShape(d_model=d_model, n_layers=n_layers, n_heads=n_heads)
    except ValueError as err:  # an empty prefix or gate
        raise ValueError(f"{path}: {err}") from err
    aligner = Aligner(
        config,
        shape,
        base_model={"name": KNOWN_BASES.get((d_model, n_layers)), "fingerprint": None, "architecture": PAPER_ARCHITECTURE},
    )
    aligner.load_tensors(
        {"tokens": tokens.float(), "gates": torch.stack([gates[layer].flatten().float() for layer in layers])},
        source=str(path),
    )
    aligner.provenance = {"imported_from": path.name, "source_sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    return aligner
