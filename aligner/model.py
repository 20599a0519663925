"""The `Aligner`: its parameters, how it attaches to a TransformerLens bridge, and its files.

The math is in `layer.py`. Here the prefix tokens and gates are held, the per-layer `AlignerLayer`s are
hooked into the host model through its own hook points (`blocks.{l}.attn.hook_rot_q` is read,
`blocks.{l}.attn.hook_z` is added to), and the aligner's hook points are registered under
`aligner.hook_tokens` and `blocks.{l}.aligner.hook_*`, so that `run_with_cache`, `run_with_hooks` and
`hooks()` reach them like any other hook of the model.
"""

from __future__ import annotations

import contextlib
import hashlib
import warnings
from functools import partial
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import nn
from transformer_lens.hook_points import HookPoint, LensHandle

from aligner.config import AlignerConfig, ModelShape
from aligner.files import atomic_write_bytes, atomic_write_json, provenance, read_json
from aligner.layer import AlignerLayer

FORMAT = "aligner-workbench/aligner/1"
TENSORS_FILE = "aligner.safetensors"
CONFIG_FILE = "aligner.json"


class Aligner(nn.Module):
    """N prefix tokens (shared by all adapted layers, or one set per layer) and one gate per layer and head."""

    def __init__(
        self,
        config: AlignerConfig,
        shape: ModelShape,
        base_model: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if config.start_layer >= shape.n_layers:
            raise ValueError(
                f"AlignerConfig.start_layer={config.start_layer} leaves no layer to adapt in a "
                f"{shape.n_layers}-layer model"
            )
        self.config = config
        self.shape = shape
        # What the aligner was made for: {"name": ..., "fingerprint": ...}; saved with it.
        self.base_model = dict(base_model or {"name": None, "fingerprint": None})
        self.provenance: dict[str, Any] = {}
        n_active = shape.n_layers - config.start_layer
        tokens_shape = (config.n_tokens, shape.d_model)
        if not config.shared:
            tokens_shape = (n_active, *tokens_shape)
        # Standard normal, as the authors' nn.Embedding initialises the prefix.
        self.tokens = nn.Parameter(torch.randn(tokens_shape))
        self.gates = nn.Parameter(torch.zeros(n_active, shape.n_heads))  # zero: attaching changes nothing
        self.hook_tokens = HookPoint()  # (N, d_model), or (n_active, N, d_model) when not shared
        self.layers = nn.ModuleList(AlignerLayer() for _ in range(n_active))
        self._model: nn.Module | None = None
        self._handles: list[tuple[HookPoint, LensHandle]] = []
        self._hook_names: list[str] = []
        self._queries: dict[int, torch.Tensor] = {}  # rotary queries of the current forward, by adapted layer
        self._tokens_this_forward: torch.Tensor | None = None

    @classmethod
    def for_model(cls, model: nn.Module, config: AlignerConfig | None = None) -> "Aligner":
        """A fresh aligner shaped for `model` (a TransformerBridge), on its device."""
        from aligner.loading import model_fingerprint

        aligner = cls(
            config or AlignerConfig(),
            shape_of(model),
            base_model={"name": model.cfg.model_name, "fingerprint": model_fingerprint(model)},
        )
        return aligner.to(next(model.parameters()).device)

    @property
    def layer_indices(self) -> range:
        """The model layers this aligner adapts."""
        return range(self.config.start_layer, self.shape.n_layers)

    def num_parameters(self) -> int:
        """N * d_model (times the layer count when not shared) + adapted layers * heads."""
        return self.tokens.numel() + self.gates.numel()

    def layer_tokens(self) -> torch.Tensor:
        """The prefix each adapted layer reads, (n_active, N, d_model), whether shared or not."""
        if self.config.shared:
            return self.tokens.expand(len(self.layers), *self.tokens.shape)
        return self.tokens

    # ---- attaching to a model ----

    def attach(self, model: nn.Module) -> None:
        """Hook this aligner into `model`; `detach` undoes it. Prefer `with aligner.attached(model):`."""
        if self._model is not None:
            raise RuntimeError("this aligner is already attached to a model; detach it first")
        if isinstance(getattr(model, "aligner", None), Aligner):
            raise RuntimeError("the model already has an aligner attached; detach that one first")
        check_fits(self, model)
        if self.base_model.get("name") not in (None, model.cfg.model_name):
            warnings.warn(
                f"aligner was trained on {self.base_model['name']!r}, attaching to {model.cfg.model_name!r}",
                stacklevel=2,
            )
        # Kept outside nn.Module's registry: the model holds the aligner, not the other way round.
        object.__setattr__(self, "_model", model)
        try:
            model.aligner = self
            self._register_hook_point("aligner.hook_tokens", self.hook_tokens)
            for i, layer_index in enumerate(self.layer_indices):
                block = model.blocks[layer_index]
                block.aligner = self.layers[i]
                for name in ("hook_k", "hook_v", "hook_pattern", "hook_gate", "hook_z"):
                    self._register_hook_point(f"blocks.{layer_index}.aligner.{name}", getattr(self.layers[i], name))
                attn = block.attn
                queries = attn.hook_rot_q if hasattr(attn, "hook_rot_q") else attn.hook_q
                self._add_hook(queries, partial(self._keep_queries, i))
                self._add_hook(attn.hook_z, partial(self._add_prefix_attention, i, attn))
        except BaseException:
            self.detach()
            raise

    def detach(self) -> None:
        model = self._model
        if model is None:
            return
        for hook_point, handle in self._handles:
            handle.hook.remove()
            if handle in hook_point.fwd_hooks:
                hook_point.fwd_hooks.remove(handle)
        for name in self._hook_names:
            model._hook_registry.pop(name, None)
        for layer_index in self.layer_indices:
            if "aligner" in model.blocks[layer_index]._modules:
                del model.blocks[layer_index].aligner
        if "aligner" in model._modules:
            del model.aligner
        self._handles, self._hook_names = [], []
        object.__setattr__(self, "_model", None)
        self._queries.clear()
        self._tokens_this_forward = None

    @contextlib.contextmanager
    def attached(self, model: nn.Module) -> Iterator["Aligner"]:
        """Attach for the duration of a `with` block; detaches on exit, also on error."""
        self.attach(model)
        try:
            yield self
        finally:
            self.detach()

    def _add_hook(self, hook_point: HookPoint, fn: Any) -> None:
        # Permanent, so that reset_hooks() leaves the aligner in place; first, so that hooks a user adds on
        # attn.hook_z see what enters the output projection, the aligner's share included.
        self._handles.append((hook_point, hook_point.add_hook(fn, is_permanent=True, prepend=True)))

    def _register_hook_point(self, name: str, hook_point: HookPoint) -> None:
        # The bridge keeps its hook names in a registry filled when it is built; hook points added later
        # join it here, under the names a TransformerLens user expects, and leave it on detach.
        hook_point.name = name
        self._model._hook_registry[name] = hook_point
        self._hook_names.append(name)

    def _keep_queries(self, i: int, q: torch.Tensor, hook: HookPoint) -> None:
        if i == 0:  # the first adapted layer runs first: read the tokens once per forward, through their hook
            self._tokens_this_forward = self.hook_tokens(self.tokens)
        self._queries[i] = q

    def _add_prefix_attention(self, i: int, attn: nn.Module, z: torch.Tensor, hook: HookPoint) -> torch.Tensor:
        tokens = self._tokens_this_forward if self.config.shared else self._tokens_this_forward[i]
        return z + self.layers[i](self._queries.pop(i), tokens, self.gates[i], attn.W_K, attn.W_V, attn.b_K, attn.b_V)

    # ---- files ----

    def save(self, path: str | Path, **provenance_extra: Any) -> Path:
        """Write `aligner.safetensors` and `aligner.json` (config, base model, provenance) into directory `path`."""
        path = Path(path)
        tensors = {"tokens": self.tokens.detach().cpu().contiguous(), "gates": self.gates.detach().cpu().contiguous()}
        data = save(tensors)
        self.provenance = {**provenance(), **self.provenance, **provenance_extra}
        atomic_write_bytes(path / TENSORS_FILE, data)
        atomic_write_json(
            path / CONFIG_FILE,
            {
                "format": FORMAT,
                "config": self.config.to_dict(),
                "shape": self.shape.to_dict(),
                "base_model": self.base_model,
                "num_parameters": self.num_parameters(),
                "tensors_sha256": hashlib.sha256(data).hexdigest(),
                "provenance": self.provenance,
            },
        )
        return path

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> "Aligner":
        """Read an aligner saved by `save`; every field and tensor is checked, and errors name the file."""
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"{path}: not an aligner directory (expected {CONFIG_FILE} and {TENSORS_FILE})")
        config_path, tensors_path = path / CONFIG_FILE, path / TENSORS_FILE
        meta = read_json(config_path)
        if not isinstance(meta, dict):
            raise ValueError(f"{config_path}: expected a JSON object")
        expected_keys = {"format", "config", "shape", "base_model", "num_parameters", "tensors_sha256", "provenance"}
        if set(meta) != expected_keys:
            raise ValueError(
                f"{config_path}: fields missing {sorted(expected_keys - set(meta))}, "
                f"unexpected {sorted(set(meta) - expected_keys)}"
            )
        if meta["format"] != FORMAT:
            raise ValueError(f"{config_path}: field 'format' is {meta['format']!r}, expected {FORMAT!r}")
        config = AlignerConfig.from_dict(meta["config"], f"{config_path}: field 'config'")
        shape = ModelShape.from_dict(meta["shape"], f"{config_path}: field 'shape'")
        if not tensors_path.is_file():
            raise FileNotFoundError(f"{tensors_path}: no such file")
        data = tensors_path.read_bytes()
        if hashlib.sha256(data).hexdigest() != meta["tensors_sha256"]:
            raise ValueError(
                f"{tensors_path}: contents do not match 'tensors_sha256' in {config_path} "
                "(the file was changed or a save was interrupted)"
            )
        try:
            tensors = load_file(tensors_path)
        except SafetensorError as err:
            raise ValueError(f"{tensors_path}: not a readable safetensors file ({err})") from err
        aligner = cls(config, shape, base_model=meta["base_model"])
        aligner.provenance = meta["provenance"]
        aligner.load_tensors(tensors, source=str(tensors_path))
        return aligner.to(device)

    def load_tensors(self, tensors: dict[str, torch.Tensor], source: str) -> None:
        """Copy `tokens` and `gates` in, checking names, shapes, dtypes and values against this aligner."""
        expected = {"tokens": self.tokens, "gates": self.gates}
        if set(tensors) != set(expected):
            raise ValueError(
                f"{source}: tensors missing {sorted(set(expected) - set(tensors))}, "
                f"unexpected {sorted(set(tensors) - set(expected))}"
            )
        for name, param in expected.items():
            value = tensors[name]
            if tuple(value.shape) != tuple(param.shape):
                raise ValueError(
                    f"{source}: tensor {name!r} has shape {tuple(value.shape)}, expected {tuple(param.shape)} "
                    f"for {self.config} on {self.shape}"
                )
            if not value.is_floating_point():
                raise ValueError(f"{source}: tensor {name!r} has dtype {value.dtype}, expected a floating dtype")
            if not torch.isfinite(value).all():
                raise ValueError(f"{source}: tensor {name!r} contains NaN or inf")
            with torch.no_grad():
                param.copy_(value.to(param.dtype))


def shape_of(model: nn.Module) -> ModelShape:
    return ModelShape(d_model=model.cfg.d_model, n_layers=model.cfg.n_layers, n_heads=model.cfg.n_heads)


def check_fits(aligner: Aligner, model: nn.Module) -> None:
    """Refuse, naming each mismatch, an aligner whose tensors do not fit `model`."""
    have = shape_of(model)
    mismatches = [
        f"{field}: aligner {getattr(aligner.shape, field)}, model {getattr(have, field)}"
        for field in ("d_model", "n_layers", "n_heads")
        if getattr(aligner.shape, field) != getattr(have, field)
    ]
    if mismatches:
        raise ValueError(
            f"aligner for {aligner.base_model.get('name')!r} does not fit model {model.cfg.model_name!r}: "
            + "; ".join(mismatches)
        )
