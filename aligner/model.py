"""The `Aligner`: its parameters, how it attaches to a TransformerLens bridge, and its files.

The math is in `layer.py`. Here the prefix tokens and gates are held, the per-layer `AlignerLayer`s are
hooked into the host model through its own hook points (`blocks.{l}.attn.hook_rot_q` is read,
`blocks.{l}.attn.hook_z` is added to), each layer's key/value projections, key norm and attention scale are
found (`attention_parts`; a layer the math does not cover is refused there), and the aligner's hook points
are registered under
`aligner.hook_tokens` and `blocks.{l}.aligner.hook_*`, so that `run_with_cache`, `run_with_hooks` and
`hooks()` reach them like any other hook of the model. That machinery (`AlignerHooks`) is shared with a bank
of aligners (`bank.py`). An aligner with one token can instead be folded into the model's output biases for
inference (`merge_into`), as a LoRA is merged into its weights.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import warnings
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load, save
from torch import nn
from transformer_lens.hook_points import HookPoint, LensHandle

from aligner.config import AlignerConfig, ModelShape, check_fields
from aligner.files import atomic_write_files, json_bytes, provenance, read_json
from aligner.layer import AlignerLayer, attention_inputs, project, project_stacked

FORMAT = "aligner-workbench/aligner/1"
TENSORS_FILE = "aligner.safetensors"
CONFIG_FILE = "aligner.json"
# The fields of aligner.json, and of its "base_model": what the aligner was made for. "architecture" is the
# bridge's (e.g. "LlamaForCausalLM"); files written before it was recorded lack it and read as None.
FILE_FIELDS = {
    "format": "str",
    "config": "dict",
    "shape": "dict",
    "base_model": "dict",
    "num_parameters": "int",
    "tensors_sha256": "str",
    "provenance": "dict",
}
BASE_MODEL_FIELDS = {"name": "str | None", "fingerprint": "str | None", "architecture": "str | None"}
# Tensor dtypes accepted in a file; each converts to the aligner's float32 exactly.
FILE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# The most that a forward copies of the adapted layers' key/value weights to project every layer's prefix in one
# product (layer.py's `project_stacked`). Below it are the small models, where the host's time per operator
# sets the pace; above it each layer projects its own, as the GPU, not the host, bounds a large model.
STACKED_PREFIX_BYTES = 64 * 2**20
# One layer's prefix: K_p (None where not read) and V_p, or g V_p once formed for the attention (`layer.prefix`).
Prefix = tuple[torch.Tensor | None, torch.Tensor]


class AlignerHooks(nn.Module):
    """How an aligner, or a bank of aligners (aligner/bank.py), is hooked into a TransformerBridge.

    Each adapted layer gets an `AlignerLayer` whose hook points join the model's; the layer's rotary queries are
    read at `blocks.{l}.attn.hook_rot_q` (with N > 1: one slot reads none) and its prefix attention is added at
    `blocks.{l}.attn.hook_z`. A subclass holds the tokens and gates and says which of them a forward reads
    (`_tokens_and_gates`).
    """

    def __init__(self, config: AlignerConfig, shape: ModelShape, base_model: dict[str, Any] | None = None) -> None:
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
        self.hook_tokens = HookPoint()  # (N, d_model), or (n_active, N, d_model) when not shared; a bank adds a batch axis first
        self.layers = nn.ModuleList(AlignerLayer() for _ in range(shape.n_layers - config.start_layer))
        # The same layers, indexed without nn.ModuleList's work per index: read at every layer of every forward.
        self._layers: tuple[AlignerLayer, ...] = tuple(self.layers)
        self._model: nn.Module | None = None
        self._handles: list[tuple[HookPoint, LensHandle]] = []
        self._hook_names: list[str] = []
        self._attention: list[AttentionParts] = []  # what each adapted layer's prefix attention reads of its own
        self._queries: dict[int, torch.Tensor] = {}  # rotary queries of the current forward, by adapted layer
        self._stacked = False  # whether a forward projects every layer's prefix in one product (`stacks`)
        # Each adapted layer's share of one product of the tokens with every layer's projections, made at the first
        # adapted layer and kept to the next forward: K_p and g V_p ready for the attention (`_formed`), or, for a
        # layer that forms its own (`_prefix_of_all_layers`), P W_K + b_K and P W_V + b_V (`_projected`)
        self._formed: dict[int, Prefix] = {}
        self._projected: dict[int, Prefix] = {}
        # This forward's tokens (the shared prefix, or one per adapted layer) and each adapted layer's gates. Set with
        # object.__setattr__: the tokens may be the `tokens` parameter itself, which nn.Module would register again.
        object.__setattr__(self, "_tokens_this_forward", None)
        self._gates_this_forward: tuple[torch.Tensor, ...] = ()
        self._keep_prefix = False  # inside fixed_prefix()
        self._prefix: dict[int, Prefix] = {}  # K_p (None: one slot) and g V_p, kept by fixed_prefix()

    @property
    def layer_indices(self) -> range:
        """The model layers this aligner adapts."""
        return range(self.config.start_layer, self.shape.n_layers)

    def _tokens_and_gates(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This forward's tokens, read through `hook_tokens`, and gates (n_active, ..., H). The tokens are
        (..., N, d_model) when shared, else (n_active, ..., N, d_model); `...` is the batch in a bank, else nothing."""
        raise NotImplementedError

    # ---- attaching to a model ----

    def attach(self, model: nn.Module) -> None:
        """Hook this aligner into `model`; `detach` undoes it. Prefer `with aligner.attached(model):`."""
        if self._model is not None:
            raise RuntimeError("this aligner is already attached to a model; detach it first")
        if isinstance(getattr(model, "aligner", None), AlignerHooks):
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
                block.aligner = self._layers[i]
                for name in ("hook_k", "hook_v", "hook_pattern", "hook_gate", "hook_z"):
                    self._register_hook_point(f"blocks.{layer_index}.aligner.{name}", getattr(self._layers[i], name))
                attn = block.attn
                self._attention.append(attention_parts(attn, model.cfg.d_head, f"blocks.{layer_index}.attn"))
                if self.config.n_tokens > 1:  # a softmax over one slot is 1: it reads no queries
                    queries = attn.hook_rot_q if hasattr(attn, "hook_rot_q") else attn.hook_q
                    self._add_hook(queries, partial(self._keep_queries, i))
                self._add_hook(attn.hook_z, partial(self._add_prefix_attention, i))
            projections = [p for parts in self._attention for p in (parts.k_proj, parts.v_proj)]
            self._stacked = self.config.shared and stacks(projections)
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
        self._handles, self._hook_names, self._attention = [], [], []
        object.__setattr__(self, "_model", None)
        self._queries.clear()
        self._formed.clear()
        self._projected.clear()
        self._stacked = False
        self._prefix.clear()
        object.__setattr__(self, "_tokens_this_forward", None)
        self._gates_this_forward = ()

    @contextlib.contextmanager
    def attached(self, model: nn.Module) -> Iterator["AlignerHooks"]:
        """Attach for the duration of a `with` block; detaches on exit, also on error."""
        self.attach(model)
        try:
            yield self
        finally:
            self.detach()

    @contextlib.contextmanager
    def fixed_prefix(self) -> Iterator["AlignerHooks"]:
        """Inside, each layer's prefix keys and values are computed at the first forward and kept for the next
        ones, since they do not depend on the input: for generation, where each new token is one more forward,
        and for serving many batches. Under autograd nothing is kept. `hook_tokens`, `hook_k`, `hook_v` and
        `hook_gate` fire at that first forward alone."""
        self._keep_prefix = True
        try:
            yield self
        finally:
            self._keep_prefix = False
            self._prefix.clear()

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
        self._queries[i] = q

    def _add_prefix_attention(self, i: int, z: torch.Tensor, hook: HookPoint) -> torch.Tensor:
        # The first adapted layer runs first: tokens and gates are read there, once per forward, and cast once
        # for all layers (the tokens to the projections' dtype, the gates to z's); a layer that forms its own prefix
        # takes its share of the gates from one unbind, which autograd undoes with one stack, not a scatter per layer.
        if i == 0 and not (self._keep_prefix and self._prefix):
            tokens, gates = self._tokens_and_gates(z.shape[0])
            tokens, gates = tokens.to(self._attention[0].k_proj.weight.dtype), gates.to(z.dtype)
            object.__setattr__(self, "_tokens_this_forward", tokens if self.config.shared else tokens.unbind(0))
            self._formed, self._projected = (
                self._prefix_of_all_layers(tokens, gates, z.shape[2], z.shape[3]) if self._stacked else ({}, {})
            )
            # For the layers that form their own prefix, with their own gates.
            self._gates_this_forward = gates.unbind(0) if len(self._formed) < len(self._layers) else ()
        parts, layer = self._attention[i], self._layers[i]
        # Kept, not popped: a layer that gradient checkpointing recomputes reads its share again.
        prefix = self._prefix.get(i) or self._formed.get(i)
        if prefix is None:
            k_v = self._projected.get(i)
            if k_v is None:
                tokens = self._tokens_this_forward if self.config.shared else self._tokens_this_forward[i]
                if tokens.device != z.device:  # a model split over devices (device_map): this layer's
                    tokens = tokens.to(z.device)
                k = project(tokens, parts.k_proj, z.shape[3]) if layer.reads_keys(self.config.n_tokens) else None
                k_v = k, project(tokens, parts.v_proj, z.shape[3])
            gate = self._gates_this_forward[i]
            if gate.device != z.device:
                gate = gate.to(z.device)
            prefix = layer.prefix(*k_v, gate, z.shape[2], key_norm=parts.key_norm)
        if self._keep_prefix and not torch.is_grad_enabled():  # a graph is used once: never kept
            self._prefix[i] = prefix
        return layer.add_attention(z, self._queries.pop(i, None), *prefix, scale=parts.scale)

    def _prefix_of_all_layers(
        self, tokens: torch.Tensor, gates: torch.Tensor, n_heads: int, d_head: int
    ) -> tuple[dict[int, Prefix], dict[int, Prefix]]:
        """Every adapted layer's prefix from one product of the tokens (..., N, d_model) with every layer's W_K
        (where read) and W_V stacked. Returns, by layer, K_p and g V_p ready for the attention, formed for all
        layers at once (`attention_inputs`); and, for each layer that forms its own through its hook points (a
        hook at hook_k, hook_v or hook_gate, or a key norm), its P W_K + b_K and P W_V + b_V. Both are empty where
        a weight is not a plain tensor on the tokens' device: each layer then projects its own, as its module
        brings its weight in (sharded among processes by FSDP and gathered one block at a time, a tensor subclass
        such as a quantised one, offloaded to the meta device, or on another device by device_map)."""
        reads_keys = [layer.reads_keys(self.config.n_tokens) for layer in self._layers]
        key_layers = [i for i, keys in enumerate(reads_keys) if keys]
        projections = [self._attention[i].k_proj for i in key_layers] + [parts.v_proj for parts in self._attention]
        weights = [p.weight for p in projections]
        if any(type(weight) is not nn.Parameter or weight.device != tokens.device for weight in weights):
            return {}, {}
        biases = None if projections[0].bias is None else [p.bias for p in projections]
        shared = tokens.dim() == 2  # one prefix for every row: a batch of one for the attention, (1, N, d_model)
        projected = project_stacked(tokens.unsqueeze(0) if shared else tokens, weights, biases, d_head)
        keys, values = projected[: len(key_layers)], projected[len(key_layers) :]  # (layers, B or 1, N, H_kv, d_head)
        own = {
            i for i, (layer, parts) in enumerate(zip(self._layers, self._attention))
            if layer.prefix_hooked() or parts.key_norm is not None
        }
        formed = {}
        if len(own) < len(self._layers):
            # With one slot only a layer with a hook on hook_k reads K_p, and it forms its own.
            k, v = attention_inputs(
                keys if self.config.n_tokens > 1 else None, values, gates.unsqueeze(1) if shared else gates, n_heads
            )
            k = (None,) * len(v) if k is None else k.unbind(0)
            formed = {i: (k[i], v_i) for i, v_i in enumerate(v.unbind(0)) if i not in own}
        projected_own = {}
        if own:  # their shares, in their hook points' shapes: (projections, [B,] N, H_kv, d_head)
            shares = projected[:, 0] if shared else projected
            for i in own:
                projected_own[i] = (shares[key_layers.index(i)] if reads_keys[i] else None, shares[len(key_layers) + i])
        return formed, projected_own


class Aligner(AlignerHooks):
    """N prefix tokens (shared by all adapted layers, or one set per layer) and one gate per layer and head."""

    def __init__(
        self,
        config: AlignerConfig,
        shape: ModelShape,
        base_model: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(config, shape, base_model)
        self.provenance: dict[str, Any] = {}
        shapes = parameter_shapes(config, shape)
        # Standard normal, as the authors' nn.Embedding initialises the prefix.
        self.tokens = nn.Parameter(torch.randn(shapes["tokens"]))
        self.gates = nn.Parameter(torch.zeros(shapes["gates"]))  # zero: attaching changes nothing
        self._merged: list[tuple[nn.Linear, nn.Parameter | None]] = []  # output projections and their own biases
        object.__setattr__(self, "_merged_model", None)  # as with _model: not a submodule

    @classmethod
    def for_model(cls, model: nn.Module, config: AlignerConfig | None = None) -> "Aligner":
        """A fresh aligner shaped for `model` (a TransformerBridge), on its device."""
        from aligner.loading import model_fingerprint

        aligner = cls(
            config or AlignerConfig(),
            shape_of(model),
            base_model={
                "name": model.cfg.model_name,
                "fingerprint": model_fingerprint(model),
                "architecture": model.cfg.architecture,
            },
        )
        return aligner.to(next(model.parameters()).device)

    def num_parameters(self) -> int:
        """N * d_model (times the layer count when not shared) + adapted layers * heads."""
        return self.tokens.numel() + self.gates.numel()

    def layer_tokens(self) -> torch.Tensor:
        """The prefix each adapted layer reads, (n_active, N, d_model), whether shared or not."""
        if self.config.shared:
            return self.tokens.expand(len(self.layers), *self.tokens.shape)
        return self.tokens

    def _tokens_and_gates(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.hook_tokens(self.tokens), self.gates  # one prefix for every row of any batch

    # ---- merging into a model, for inference ----

    @torch.no_grad()
    def merge_into(self, model: nn.Module) -> None:
        """Fold this aligner into `model`'s attention output biases, so that the model runs at its own speed;
        `unmerge` restores the model exactly. For N = 1 only: a softmax over one slot is 1, so each adapted
        layer adds the same g V_p to z at every position, and the output projection maps it to one vector,
        W_O (g V_p), that joins the bias; whatever the layer does to keys and scores (a key norm, its scale) then
        cancels, and a norm after the output projection (Gemma 3's) sees the same sum. Merged, the aligner's hook
        points do not fire. A model the aligner cannot attach to is refused here too (`attention_parts`)."""
        if self.config.n_tokens != 1:
            raise ValueError(
                f"only an aligner with one token folds into a bias; this one has {self.config.n_tokens}: attach it"
            )
        if self._merged_model is not None or self._model is not None:
            raise RuntimeError("this aligner is already merged or attached; unmerge or detach it first")
        if getattr(model, "_merged_aligner", None) is not None:
            raise RuntimeError("the model already has an aligner merged into it; unmerge that one first")
        check_fits(self, model)
        # Every layer is read (and refused, if it must be) before any bias changes.
        attns = {f"blocks.{layer_index}.attn": model.blocks[layer_index].attn for layer_index in self.layer_indices}
        layers = [(projection(attn.o), attention_parts(attn, model.cfg.d_head, name)) for name, attn in attns.items()]
        for name, (o_proj, _) in zip(attns, layers):
            if o_proj.weight.is_meta:
                raise ValueError(
                    f"{name}.o: its weights are offloaded (device_map), and merge_into folds the aligner into them "
                    "in memory; attach the aligner instead"
                )
        for i, (o_proj, parts) in enumerate(layers):
            gated = self.one_token_contribution(i, parts.v_proj, model.cfg.d_head).flatten()  # (H * d_head)
            shift = F.linear(gated, o_proj.weight.float())  # W_O (g V_p), in float32 before the one rounding
            self._merged.append((o_proj, o_proj.bias))
            bias = shift if o_proj.bias is None else o_proj.bias.float() + shift
            o_proj.bias = nn.Parameter(bias.to(o_proj.weight.dtype), requires_grad=False)
        object.__setattr__(model, "_merged_aligner", self)
        object.__setattr__(self, "_merged_model", model)

    @torch.no_grad()
    def one_token_contribution(self, i: int, v_proj: nn.Linear, d_head: int) -> torch.Tensor:
        """g V_p of adapted layer i for an aligner with one token, (H, d_head) in float32: what that layer adds to
        z at every position, a softmax over one slot being 1. `v_proj` is the layer's value projection."""
        tokens = self.tokens if self.config.shared else self.tokens[i]
        values = project(tokens.to(v_proj.weight.dtype), v_proj, d_head)
        _, gated = self._layers[i].prefix(None, values.float(), self.gates[i], self.shape.n_heads)
        return gated[0, :, 0]  # (1, H, N = 1, d_head) -> (H, d_head)

    def unmerge(self) -> None:
        """Undo `merge_into`: each output projection gets its own bias (or none) back, the very tensor."""
        if self._merged_model is None:
            return
        for o_proj, bias in self._merged:
            o_proj.bias = bias
        object.__setattr__(self._merged_model, "_merged_aligner", None)
        object.__setattr__(self, "_merged_model", None)
        self._merged = []

    # ---- files ----

    def save(self, path: str | Path, **provenance_extra: Any) -> Path:
        """Write `aligner.safetensors` and `aligner.json` (config, base model, provenance) into directory `path`."""
        path = Path(path)
        tensors = {"tokens": self.tokens.detach().cpu().contiguous(), "gates": self.gates.detach().cpu().contiguous()}
        data = save(tensors)
        self.provenance = {**provenance(), **self.provenance, **provenance_extra}
        meta = {
            "format": FORMAT,
            "config": self.config.to_dict(),
            "shape": self.shape.to_dict(),
            "base_model": self.base_model,
            "num_parameters": self.num_parameters(),
            "tensors_sha256": hashlib.sha256(data).hexdigest(),
            "provenance": self.provenance,
        }
        atomic_write_files({path / TENSORS_FILE: data, path / CONFIG_FILE: json_bytes(meta)})
        return path

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> "Aligner":
        """Read an aligner saved by `save`; every field and tensor is checked, and errors name the file, the
        field, and what was expected and found. Nothing is allocated before the tensors match the config."""
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"{path}: not an aligner directory (expected {CONFIG_FILE} and {TENSORS_FILE})")
        config_path, tensors_path = path / CONFIG_FILE, path / TENSORS_FILE
        meta = check_fields(read_json(config_path), FILE_FIELDS, str(config_path), "aligner file")
        if meta["format"] != FORMAT:
            raise ValueError(f"{config_path}: field 'format' is {meta['format']!r}, expected {FORMAT!r}")
        config = AlignerConfig.from_dict(meta["config"], f"{config_path}: field 'config'")
        shape = ModelShape.from_dict(meta["shape"], f"{config_path}: field 'shape'")
        base_model = check_fields(
            meta["base_model"], BASE_MODEL_FIELDS, f"{config_path}: field 'base_model'", "base model", ("architecture",)
        )
        try:
            shapes = parameter_shapes(config, shape)
        except ValueError as err:
            raise ValueError(f"{config_path}: {err}") from err
        num_parameters = sum(math.prod(dims) for dims in shapes.values())
        if meta["num_parameters"] != num_parameters:
            raise ValueError(
                f"{config_path}: field 'num_parameters' is {meta['num_parameters']}, expected {num_parameters} "
                f"for {config} on {shape}"
            )
        if not tensors_path.is_file():
            raise FileNotFoundError(f"{tensors_path}: no such file")
        data = tensors_path.read_bytes()
        if hashlib.sha256(data).hexdigest() != meta["tensors_sha256"]:
            raise ValueError(
                f"{tensors_path}: contents do not match 'tensors_sha256' in {config_path} "
                "(the file was changed or a save was interrupted)"
            )
        try:
            tensors = load(data)
        except SafetensorError as err:
            raise ValueError(f"{tensors_path}: not a readable safetensors file ({err})") from err
        # Checked before the aligner is made: a config asking for 10^12 parameters is refused, not allocated.
        check_tensors(tensors, config, shape, str(tensors_path))
        aligner = cls(config, shape, base_model={"architecture": None, **base_model})
        aligner.provenance = meta["provenance"]
        aligner.load_tensors(tensors, source=str(tensors_path))
        return aligner.to(device)

    def load_tensors(self, tensors: dict[str, torch.Tensor], source: str) -> None:
        """Copy `tokens` and `gates` in, in place (an optimizer over them stays valid), after `check_tensors`."""
        check_tensors(tensors, self.config, self.shape, source)
        with torch.no_grad():
            self.tokens.copy_(tensors["tokens"])
            self.gates.copy_(tensors["gates"])


def shape_of(model: nn.Module) -> ModelShape:
    return ModelShape(d_model=model.cfg.d_model, n_layers=model.cfg.n_layers, n_heads=model.cfg.n_heads)


def parameter_shapes(config: AlignerConfig, shape: ModelShape) -> dict[str, tuple[int, ...]]:
    """The shapes of an aligner's tensors: tokens (N, d_model), or (n_active, N, d_model) when not shared,
    and gates (n_active, n_heads), for the n_active = n_layers - start_layer adapted layers."""
    n_active = shape.n_layers - config.start_layer
    if n_active < 1:
        raise ValueError(
            f"AlignerConfig.start_layer={config.start_layer} leaves no layer to adapt in a "
            f"{shape.n_layers}-layer model"
        )
    tokens = (config.n_tokens, shape.d_model)
    return {"tokens": tokens if config.shared else (n_active, *tokens), "gates": (n_active, shape.n_heads)}


def check_tensors(tensors: dict[str, torch.Tensor], config: AlignerConfig, shape: ModelShape, source: str) -> None:
    """Refuse tensors that an aligner of `config` on `shape` cannot take: names, shapes, dtypes (FILE_DTYPES)
    and finite values are checked, and the error names `source`, the tensor, and what was expected and found."""
    expected = parameter_shapes(config, shape)
    if set(tensors) != set(expected):
        raise ValueError(
            f"{source}: tensors missing {sorted(set(expected) - set(tensors))}, "
            f"unexpected {sorted(set(tensors) - set(expected))} (expected exactly {sorted(expected)})"
        )
    for name, dims in expected.items():
        value = tensors[name]
        if tuple(value.shape) != dims:
            raise ValueError(
                f"{source}: tensor {name!r} has shape {tuple(value.shape)}, expected {dims} for {config} on {shape}"
            )
        if value.dtype not in FILE_DTYPES:
            raise ValueError(
                f"{source}: tensor {name!r} has dtype {value.dtype}, expected one of "
                + ", ".join(str(dtype) for dtype in FILE_DTYPES)
            )
        not_finite = int((~torch.isfinite(value)).sum())
        if not_finite:
            raise ValueError(
                f"{source}: tensor {name!r} has {not_finite} NaN or inf values of {value.numel()}, expected all finite"
            )


def check_fits(aligner: AlignerHooks, model: nn.Module) -> None:
    """Refuse, naming each mismatch, an aligner whose tensors do not fit `model`, or that was made for another
    architecture: the same d_model, layer and head counts in another model family (Llama-2-7B and Mistral-7B)
    would run, reading its tokens through projections that were never trained on them."""
    have = shape_of(model)
    mismatches = [
        f"{field}: aligner {getattr(aligner.shape, field)}, model {getattr(have, field)}"
        for field in ("d_model", "n_layers", "n_heads")
        if getattr(aligner.shape, field) != getattr(have, field)
    ]
    architecture = aligner.base_model.get("architecture")
    if architecture is not None and architecture != model.cfg.architecture:
        mismatches.append(
            f"architecture: aligner {architecture!r}, model {model.cfg.architecture!r} (to attach it anyway, "
            "set aligner.base_model['architecture'] = None)"
        )
    if mismatches:
        raise ValueError(
            f"aligner for {aligner.base_model.get('name')!r} does not fit model {model.cfg.model_name!r}: "
            + "; ".join(mismatches)
        )


def stacked_bytes(projections: list[nn.Linear]) -> int:
    """The bytes that stacking the weights of `projections` copies at each forward."""
    return sum(p.weight.numel() * p.weight.element_size() for p in projections)


def stacks(projections: list[nn.Linear]) -> bool:
    """Whether a forward projects the prefix through all of `projections` in one product: plain nn.Linear (not a
    quantised or adapted subclass, whose own forward must run) of one shape, dtype and bias presence, whose
    weights together fit in `STACKED_PREFIX_BYTES`."""
    first = projections[0]
    return (
        all(
            type(p) is nn.Linear
            and (p.weight.shape, p.weight.dtype, p.bias is None)
            == (first.weight.shape, first.weight.dtype, first.bias is None)
            for p in projections
        )
        and stacked_bytes(projections) <= STACKED_PREFIX_BYTES
    )


@dataclass(frozen=True)
class AttentionParts:
    """What the aligner reads of one layer's attention, besides its queries: the modules themselves, not their
    weights, so that they stay right after model.to()."""

    k_proj: nn.Linear
    v_proj: nn.Linear
    key_norm: Callable[[torch.Tensor], torch.Tensor] | None  # on (..., H_kv, d_head); None: the layer has none
    scale: float | None  # the attention scale; None: the paper's 1/sqrt(d_head), which the layer uses too


def attention_parts(attn: nn.Module, d_head: int, name: str) -> AttentionParts:
    """The key/value projections, key norm and attention scale of bridge attention component `name`
    (`blocks.{l}.attn`), read from the transformers module it wraps, as the bridge's own forward reads them
    (layer.py says how each enters the math). A layer whose attention the math does not follow is refused,
    naming what it has: scores soft-capped (Gemma 2), queries normed after rotary (so `hook_rot_q` holds
    un-normed ones), or a key norm over neither one head nor all key heads."""
    hf_attn = getattr(attn, "original_component", attn)
    if getattr(hf_attn, "attn_logit_softcapping", None) is not None:
        raise NotImplementedError(
            f"{name}: attention scores soft-capped (attn_logit_softcapping={hf_attn.attn_logit_softcapping}); "
            "the aligner's prefix attention does not follow that"
        )
    if getattr(getattr(attn, "config", None), "qk_norm_after_rope", False):
        raise NotImplementedError(
            f"{name}: queries and keys are normed after rotary, so hook_rot_q holds un-normed queries; "
            "the aligner reads them there"
        )
    k_proj, v_proj = projection(attn.k), projection(attn.v)
    key_norm = None
    # The bridge declares the layer's key norm wherever the model has one, and wraps the model's module.
    norm = getattr(attn._modules.get("k_norm"), "original_component", None)
    if norm is not None:
        weight = getattr(norm, "weight", None)
        shape = None if weight is None else tuple(weight.shape)
        if shape in (None, (d_head,)):  # each head's key on its own (Gemma 3, Qwen 3)
            key_norm = norm
        elif shape == (k_proj.out_features,):  # all key heads together, before the split into heads (OLMo 2)
            key_norm = partial(_norm_over_heads, norm)
        else:
            raise NotImplementedError(
                f"{name}.k_norm: a key norm with weight shape {shape}; the aligner applies one over each head "
                f"({(d_head,)}) or over all key heads ({(k_proj.out_features,)})"
            )
    scaling = getattr(hf_attn, "scaling", None)
    # The paper's 1/sqrt(d_head) stays None (computed as before, to the bit); another scale is the layer's own.
    scale = None if scaling is None or math.isclose(scaling, d_head**-0.5, rel_tol=1e-12) else float(scaling)
    return AttentionParts(k_proj, v_proj, key_norm, scale)


def _norm_over_heads(norm: nn.Module, keys: torch.Tensor) -> torch.Tensor:
    """`norm` over each slot's keys of all heads together, (..., H_kv, d_head) in and out."""
    return norm(keys.flatten(-2)).unflatten(-1, keys.shape[-2:])


def projection(component: nn.Module) -> nn.Linear:
    """The nn.Linear that a bridge component (`attn.k`, `attn.v`, `attn.o`) wraps: the aligner applies the
    layer's own projections to its tokens, through the weight as stored, with no per-forward reshaping."""
    linear = getattr(component, "original_component", component)
    if not isinstance(linear, nn.Linear):
        raise NotImplementedError(
            f"{getattr(component, 'name', component)}: the aligner reads attention projections stored as "
            f"nn.Linear; this model has {type(linear).__name__}"
        )
    return linear
