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

from aligner.config import AlignerConfig, ModelShape
from aligner.model import Aligner

# The base models of the released files, by (d_model, n_layers); the files do not name them.
KNOWN_BASES = {(4096, 32): "meta-llama/Llama-2-7b-hf", (5120, 40): "meta-llama/Llama-2-13b-hf"}
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
        raise ValueError(
            f"{path}: refused: the file is not a plain tensor checkpoint; it asks to run code or build objects "
            f"that weights_only loading does not allow ({str(err).splitlines()[0]})"
        ) from err
    except (RuntimeError, EOFError, OSError) as err:
        raise ValueError(f"{path}: not a readable PyTorch checkpoint ({err})") from err
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a flat dict of tensors in lit-llama naming")

    gates: dict[int, torch.Tensor] = {}
    layer_tokens: dict[int, torch.Tensor] = {}
    for key, value in state.items():
        match = _LAYER_KEY.fullmatch(key)
        if match is None:
            if key != SHARED_KEY:
                raise ValueError(f"{path}: unexpected key {key!r}")
            continue
        layer = int(match.group(1))
        (gates if match.group(2) == "gating_factor" else layer_tokens)[layer] = value
    if not gates:
        raise ValueError(f"{path}: no 'transformer.h.{{l}}.attn.gating_factor' keys: not an aligner checkpoint")
    layers = sorted(gates)
    start_layer, n_layers = layers[0], layers[-1] + 1
    if layers != list(range(start_layer, n_layers)) or sorted(layer_tokens) not in ([], layers):
        raise ValueError(f"{path}: gates for layers {layers} and prefixes for {sorted(layer_tokens)} do not match")
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
        tokens = torch.stack([layer_tokens[layer] for layer in layers])
    if tokens.ndim != (2 if shared else 3):
        raise ValueError(f"{path}: prefix has shape {tuple(tokens.shape)}, expected (N, d_model) per layer")
    n_tokens, d_model = tokens.shape[-2:]

    aligner = Aligner(
        AlignerConfig(n_tokens=n_tokens, start_layer=start_layer, shared=shared),
        ModelShape(d_model=d_model, n_layers=n_layers, n_heads=n_heads),
        base_model={"name": KNOWN_BASES.get((d_model, n_layers)), "fingerprint": None},
    )
    aligner.load_tensors(
        {"tokens": tokens.float(), "gates": torch.stack([gates[layer].flatten() for layer in layers]).float()},
        source=str(path),
    )
    aligner.provenance = {"imported_from": path.name, "source_sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    return aligner
