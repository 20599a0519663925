"""The `Aligner`: its parameters, and how it attaches to a TransformerLens bridge or to a plain transformers model.

The math is in `layer.py`. Here the prefix tokens and gates are held, and each adapted layer's `AlignerLayer`
is hooked into the bridge through the layer's own hook points (`blocks.{l}.attn.hook_rot_q` is read,
`blocks.{l}.attn.hook_z` is added to); each layer's key/value projections, key norm and attention scale are found
(`attention_parts`; a layer the math does not cover is refused there), and the aligner's hook points join the
bridge's under `aligner.hook_tokens` and `blocks.{l}.aligner.hook_*`, so that `run_with_cache`,
`run_with_hooks` and `hooks()` reach them like any other. That machinery (`AlignerHooks`) is shared with a bank
of aligners (`bank.py`). An aligner with one token can instead be folded into the model's output biases for
inference (`merge_into`), as a LoRA is merged into its weights.

On a plain transformers model (`attached(hf_model)`, the same call) nothing is hooked: transformers hands every
attention to the function its config names (`config._attn_implementation`, looked up in its
`AttentionInterface`), with the layer's rotary queries, keys and values and the module itself. Attached, the
config names `prefix_attention`, which runs the model's own kernel (SDPA, eager, flash: whatever it had) and adds
the prefix's attention from the same `AlignerHooks.add_prefix_attention`; each attention module carries its own
`AttentionSlot`, so two models in one process do not meet. Detached, the config names its kernel again.
"""

from __future__ import annotations

import contextlib
import math
import sys
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, ClassVar, Collection, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformer_lens.hook_points import HookPoint
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from aligner.adapter import Adapter, TensorShapes, check_fits, saved_kind
from aligner.config import AlignerConfig, ModelShape
from aligner.layer import (
    AlignerLayer,
    AttentionParts,
    Prefix,
    prefix_of_all_layers,
    project,
    stacks,
)
from aligner.lens import (
    is_bridge,
    register_hook_point,
    set_submodule,
    submodule,
    unregister_hook_point,
    wrapped,
)


def gates_off(layers: Collection[int], heads: Sequence[int] | None = None) -> list[tuple[str, Callable[..., torch.Tensor]]]:
    """`model.hooks` hooks that zero the gates of `layers` (all heads, or only `heads`)."""

    def zero(gate: torch.Tensor, hook: HookPoint) -> torch.Tensor:
        if heads is None:
            return torch.zeros_like(gate)
        mask = torch.ones_like(gate)
        mask[..., list(heads)] = 0
        return gate * mask

    return [(f"blocks.{layer}.aligner.hook_gate", zero) for layer in layers]


class AlignerHooks(Adapter):
    """How an aligner, or a bank of aligners (aligner/bank.py), is hooked into a TransformerBridge.

    Each adapted layer gets an `AlignerLayer` whose hook points join the model's; the layer's rotary queries are
    read at `blocks.{l}.attn.hook_rot_q` (with N > 1: one slot reads none) and its prefix attention is added at
    `blocks.{l}.attn.hook_z`. A subclass holds the tokens and gates and says which of them a forward reads
    (`_tokens_and_gates`).
    """

    kind = "aligner"
    config_type = AlignerConfig
    has_gates = True

    def __init__(self, config: AlignerConfig, shape: ModelShape, base_model: dict[str, Any] | None = None) -> None:
        super().__init__(config, shape, base_model)
        if config.start_layer >= shape.n_layers:
            raise ValueError(
                f"AlignerConfig.start_layer={config.start_layer} leaves no layer to adapt in a "
                f"{shape.n_layers}-layer model"
            )
        self.hook_tokens = HookPoint()  # (N, d_model), or (n_active, N, d_model) when not shared; a bank adds a batch axis first
        self.layers = nn.ModuleList(AlignerLayer() for _ in range(shape.n_layers - config.start_layer))
        # The same layers, indexed without nn.ModuleList's work per index: read at every layer of every forward.
        self._layers: tuple[AlignerLayer, ...] = tuple(self.layers)
        self._hook_names: list[str] = []
        self._attention: list[AttentionParts] = []  # what each adapted layer's prefix attention reads of its own
        self._queries: dict[int, torch.Tensor] = {}  # rotary queries of the current forward, by adapted layer
        self._stacked = False  # whether a forward projects every layer's prefix in one product (`stacks`)
        # Each adapted layer's share of one product of the tokens with every layer's projections, made at the first
        # adapted layer and kept to the next forward (`prefix_of_all_layers`): K_p and g V_p ready for the
        # attention (`_formed`), or, for a layer that forms its own, P W_K + b_K and P W_V + b_V (`_projected`).
        self._formed: dict[int, Prefix] = {}
        self._projected: dict[int, Prefix] = {}
        # This forward's tokens (the shared prefix, or one per adapted layer) and each adapted layer's gates. Set with
        # object.__setattr__: the tokens may be the `tokens` parameter itself, which nn.Module would register again.
        object.__setattr__(self, "_tokens_this_forward", None)
        self._gates_this_forward: tuple[torch.Tensor, ...] = ()
        self._keep_prefix = False  # inside fixed_prefix()
        self._prefix: dict[int, Prefix] = {}  # K_p (None: one slot) and g V_p, kept by fixed_prefix()
        # Attached to a plain transformers model: its config, the kernel it named, and its attention modules.
        object.__setattr__(self, "_plain", None)

    @property
    def layer_indices(self) -> range:
        """The model layers this aligner adapts."""
        return range(self.config.start_layer, self.shape.n_layers)

    @property
    def family(self) -> str:
        return "aligner" if self.config.shared else "adapter"

    @property
    def switchable_layers(self) -> list[int]:
        return list(self.layer_indices)

    def switched_off(self, layers: Collection[int]) -> contextlib.AbstractContextManager[None]:
        """Its gates at `layers` read as zero (`gates_off`): the prefix adds nothing there."""
        return self.attached_to.hooks(fwd_hooks=gates_off(layers))

    def describe(self) -> str:
        kind = "Aligner" if self.config.shared else "LLaMA-Adapter"
        layers = f"layers {self.config.start_layer}-{self.shape.n_layers - 1} x {self.shape.n_heads} heads"
        return f"{kind}, N={self.config.n_tokens}, {layers}"

    def _tokens_and_gates(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This forward's tokens, read through `hook_tokens`, and gates (n_active, ..., H). The tokens are
        (..., N, d_model) when shared, else (n_active, ..., N, d_model); `...` is the batch in a bank, else nothing."""
        raise NotImplementedError

    # ---- attaching to a model ----

    def hook_into(self, model: nn.Module) -> None:
        if not is_bridge(model):
            self._hook_into_transformers(model)
            return
        if isinstance(getattr(model, "aligner", None), AlignerHooks):
            raise RuntimeError("the model already has an aligner attached; detach that one first")
        set_submodule(model, "aligner", self)
        self._register_hook_point(model, "aligner.hook_tokens", self.hook_tokens)
        for i, layer_index in enumerate(self.layer_indices):
            block = model.blocks[layer_index]
            set_submodule(block, "aligner", self._layers[i])
            for name in ("hook_k", "hook_v", "hook_pattern", "hook_gate", "hook_z"):
                self._register_hook_point(model, f"blocks.{layer_index}.aligner.{name}", getattr(self._layers[i], name))
            attn = block.attn
            self._attention.append(attention_parts(attn, model.cfg.d_head, f"blocks.{layer_index}.attn"))
            # Prepended, so that hooks a user adds on attn.hook_z see what enters the output projection, the
            # aligner's share included. A softmax over one slot is 1: it reads no queries.
            if self.config.n_tokens > 1:
                queries = attn.hook_rot_q if hasattr(attn, "hook_rot_q") else attn.hook_q
                self.add_hook(queries, partial(self._keep_queries, i), prepend=True)
            self.add_hook(attn.hook_z, partial(self._add_prefix_attention, i), prepend=True)
        projections = [p for parts in self._attention for p in (parts.k_proj, parts.v_proj)]
        self._stacked = self.config.shared and stacks(projections)

    def _hook_into_transformers(self, model: nn.Module) -> None:
        """Attach to a plain transformers model: every decoder layer's attention module gets its `AttentionSlot`,
        and the config names `prefix_attention` in place of the model's kernel. Every layer is read (and refused,
        if it must be) before anything changes."""
        config = model.config
        implementation = config._attn_implementation
        if implementation.startswith(PREFIX_ATTENTION):
            raise RuntimeError("the model already has an aligner attached; detach that one first")
        if not getattr(model, "_supports_attention_backend", False):
            raise NotImplementedError(
                f"{type(model).__name__}: its attention does not go through transformers' attention interface "
                "(_supports_attention_backend is not set), where the aligner joins a plain model; attach it to a "
                "TransformerBridge of the model (aligner.from_hf)"
            )
        modules = decoder_attentions(model)
        slots = []
        for layer_index, (name, attn) in enumerate(modules):
            kernel = model_kernel(attn, implementation, name)
            i = layer_index - self.config.start_layer
            if i >= 0:
                self._attention.append(attention_parts(attn, attn.head_dim, name))
            slots.append((attn, AttentionSlot(kernel, self if i >= 0 else None, i)))
        for attn, slot in slots:
            attn.aligner_slot = slot
        object.__setattr__(self, "_plain", (config, implementation, [attn for attn, _ in slots]))
        config._attn_implementation = registered_prefix_attention(implementation)
        projections = [p for parts in self._attention for p in (parts.k_proj, parts.v_proj)]
        self._stacked = self.config.shared and stacks(projections)

    def unhook(self, model: nn.Module) -> None:
        if self._plain is not None:
            config, implementation, modules = self._plain
            for attn in modules:
                del attn.aligner_slot
            config._attn_implementation = implementation
            object.__setattr__(self, "_plain", None)
        for name in self._hook_names:
            unregister_hook_point(model, name)
        if is_bridge(model):
            for layer_index in self.layer_indices:
                set_submodule(model.blocks[layer_index], "aligner", None)
            set_submodule(model, "aligner", None)
        self._hook_names, self._attention = [], []
        self._queries.clear()
        self._formed.clear()
        self._projected.clear()
        self._stacked = False
        self._prefix.clear()
        object.__setattr__(self, "_tokens_this_forward", None)
        self._gates_this_forward = ()

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

    def _register_hook_point(self, model: nn.Module, name: str, hook_point: HookPoint) -> None:
        register_hook_point(model, name, hook_point)
        self._hook_names.append(name)

    def _keep_queries(self, i: int, q: torch.Tensor, hook: HookPoint) -> None:
        self._queries[i] = q

    def _add_prefix_attention(self, i: int, z: torch.Tensor, hook: HookPoint) -> torch.Tensor:
        return self.add_prefix_attention(i, z, self._queries.pop(i, None))

    def add_prefix_attention(self, i: int, z: torch.Tensor, q: torch.Tensor | None) -> torch.Tensor:
        """z (B, T, H, d_head) of adapted layer i plus its prefix attention, given the layer's rotary queries q
        (B, T, H, d_head; None with one slot): `AlignerLayer.add_attention` on this forward's prefix."""
        # The first adapted layer runs first: tokens and gates are read there, once per forward, and cast once
        # for all layers (the tokens to the projections' dtype, the gates to z's); a layer that forms its own prefix
        # takes its share of the gates from one unbind, which autograd undoes with one stack, not a scatter per layer.
        if i == 0 and not (self._keep_prefix and self._prefix):
            tokens, gates = self._tokens_and_gates(z.shape[0])
            tokens, gates = tokens.to(self._attention[0].k_proj.weight.dtype), gates.to(z.dtype)
            object.__setattr__(self, "_tokens_this_forward", tokens if self.config.shared else tokens.unbind(0))
            self._formed, self._projected = ({}, {})
            if self._stacked:
                self._formed, self._projected = prefix_of_all_layers(
                    tokens, gates, self._layers, self._attention, self.config.n_tokens, z.shape[2], z.shape[3]
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
        return layer.add_attention(z, q, *prefix, scale=parts.scale)


@saved_kind
class Aligner(AlignerHooks):
    """N prefix tokens (shared by all adapted layers, or one set per layer: LLaMA-Adapter) and one gate per layer
    and head."""

    can_merge: ClassVar[bool] = True  # with one token: `merge_into`
    runs_on_plain_model: ClassVar[bool] = True  # through transformers' attention interface: `prefix_attention`

    def __init__(self, config: AlignerConfig, shape: ModelShape, base_model: dict[str, Any] | None = None) -> None:
        super().__init__(config, shape, base_model)
        shapes = self.tensor_shapes(config, shape)
        # Standard normal, as the authors' nn.Embedding initialises the prefix.
        self.tokens = nn.Parameter(torch.randn(shapes["tokens"]))
        self.gates = nn.Parameter(torch.zeros(shapes["gates"]))  # zero: attaching changes nothing
        self._merged: list[tuple[nn.Linear, nn.Parameter | None]] = []  # output projections and their own biases
        object.__setattr__(self, "_merged_model", None)  # as with _model: not a submodule

    @classmethod
    def tensor_shapes(cls, config: AlignerConfig, shape: ModelShape) -> TensorShapes:
        """tokens (N, d_model), or (n_active, N, d_model) when not shared, and gates (n_active, n_heads), for the
        n_active = n_layers - start_layer adapted layers."""
        n_active = shape.n_layers - config.start_layer
        if n_active < 1:
            raise ValueError(
                f"AlignerConfig.start_layer={config.start_layer} leaves no layer to adapt in a "
                f"{shape.n_layers}-layer model"
            )
        tokens = (config.n_tokens, shape.d_model)
        return {"tokens": tokens if config.shared else (n_active, *tokens), "gates": (n_active, shape.n_heads)}

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

    def attach(self, model: nn.Module) -> None:
        if self._merged_model is not None:
            raise RuntimeError("this aligner is merged into a model; unmerge it first")
        super().attach(model)

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


def attention_parts(attn: nn.Module, d_head: int, name: str) -> AttentionParts:
    """The key/value projections, key norm and attention scale of attention `name`: a bridge component
    (`blocks.{l}.attn`), read from the transformers module it wraps as the bridge's own forward reads them, or
    that transformers module itself (`model.layers.{l}.self_attn`) (layer.py says how each enters the math). A
    layer whose attention the math does not follow is refused, naming what it has: scores soft-capped (Gemma 2),
    queries normed after rotary (so the queries read are not the ones attended with), or a key norm over neither
    one head nor all key heads."""
    hf_attn = wrapped(attn)
    bridge = hf_attn is not attn
    if getattr(hf_attn, "attn_logit_softcapping", None) is not None:
        raise NotImplementedError(
            f"{name}: attention scores soft-capped (attn_logit_softcapping={hf_attn.attn_logit_softcapping}); "
            "the aligner's prefix attention does not follow that"
        )
    # A plain module's norms besides q_norm and k_norm (HunYuan's query_layernorm, after rotary): the bridge's
    # architecture adapter says the same with qk_norm_after_rope.
    other_norms = [
        child for child, module in hf_attn.named_children()
        if child not in ("q_norm", "k_norm") and "norm" in type(wrapped(module)).__name__.lower()
    ]
    if getattr(getattr(attn, "config", None), "qk_norm_after_rope", False) or (not bridge and other_norms):
        raise NotImplementedError(
            f"{name}: queries and keys are normed after rotary ({', '.join(other_norms) or 'qk_norm_after_rope'}), "
            "so the rotary queries the aligner reads are not the ones the layer attends with"
        )
    if bridge:
        k_proj, v_proj = projection(attn.k), projection(attn.v)
    else:
        if not all(isinstance(getattr(hf_attn, p, None), nn.Module) for p in ("k_proj", "v_proj")):
            raise NotImplementedError(
                f"{name}: {type(hf_attn).__name__} has no k_proj and v_proj; the aligner applies a layer's own "
                "key and value projections to its tokens"
            )
        k_proj, v_proj = projection(hf_attn.k_proj), projection(hf_attn.v_proj)
    key_norm = None
    # The bridge declares the layer's key norm wherever the model has one, and wraps the model's module.
    norm_component = submodule(attn, "k_norm")
    norm = None if norm_component is None else wrapped(norm_component)
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
    # The paper's 1/sqrt(d_head) stays None (computed as the equations say, to the bit); another is the layer's own.
    scale = None if scaling is None or math.isclose(scaling, d_head**-0.5, rel_tol=1e-12) else float(scaling)
    return AttentionParts(k_proj, v_proj, key_norm, scale)


def _norm_over_heads(norm: nn.Module, keys: torch.Tensor) -> torch.Tensor:
    """`norm` over each slot's keys of all heads together, (..., H_kv, d_head) in and out."""
    return norm(keys.flatten(-2)).unflatten(-1, keys.shape[-2:])


def projection(component: nn.Module) -> nn.Linear:
    """The nn.Linear that a bridge component (`attn.k`, `attn.v`, `attn.o`) wraps: the aligner applies the
    layer's own projections to its tokens, through the weight as stored, with no per-forward reshaping."""
    linear = wrapped(component)
    if not isinstance(linear, nn.Linear):
        raise NotImplementedError(
            f"{getattr(component, 'name', component)}: the aligner reads attention projections stored as "
            f"nn.Linear; this model has {type(linear).__name__}"
        )
    return linear


# ---- attached to a plain transformers model ----

# What the names registered in transformers' attention and mask interfaces start with: "aligner_sdpa" runs SDPA
# and adds the prefix's attention. The rest of the name is the model's own kernel's, whose mask it takes, and which
# transformers' checks by name (flash attention's) still read.
PREFIX_ATTENTION = "aligner_"


@dataclass(frozen=True)
class AttentionSlot:
    """What `prefix_attention` reads of one attention module of a model an aligner is attached to."""

    kernel: Callable[..., tuple[torch.Tensor, torch.Tensor | None]]  # the model's own attention function
    aligner: AlignerHooks | None  # None: a layer below start_layer, which the kernel alone computes
    index: int  # the adapted layer's index in the aligner


def prefix_attention(
    module: nn.Module,
    query: torch.Tensor,  # (B, H, T, d_head) rotary queries, as the layer attends with them
    key: torch.Tensor,  # (B, H_kv, T_kv, d_head), the KV cache's included
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """transformers' attention function while an aligner is attached: the layer's own kernel for the causal
    attention, then the prefix's added to its output (B, T, H, d_head) before the output projection, from the
    queries the layer computed (none computed again). The module's own `AttentionSlot` says which kernel and
    which aligner."""
    slot: AttentionSlot | None = getattr(module, "aligner_slot", None)
    if slot is None:  # a copy of an attached model, or another model sharing its config
        raise RuntimeError(
            f"{type(module).__name__} (layer {getattr(module, 'layer_idx', '?')}): its config names "
            f"{module.config._attn_implementation!r}, an aligner's, but no aligner is attached to this module; "
            "attach one to this model (or copy the model before attaching)"
        )
    z, weights = slot.kernel(module, query, key, value, attention_mask, **kwargs)
    if slot.aligner is not None:
        z = slot.aligner.add_prefix_attention(slot.index, z, query.transpose(1, 2))
    return z, weights


def registered_prefix_attention(implementation: str) -> str:
    """The name under which `prefix_attention` stands in for kernel `implementation`, registered with transformers'
    attention interface (and its mask interface, with the kernel's own mask) at the first use."""
    name = PREFIX_ATTENTION + implementation
    if name not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(name, prefix_attention)
        if implementation in ALL_MASK_ATTENTION_FUNCTIONS:
            AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[implementation])
    return name


def model_kernel(attn: nn.Module, implementation: str, name: str) -> Callable[..., Any]:
    """The attention function module `attn` runs under `implementation`: the registered one, or, for "eager", the
    one its modelling file defines (Gemma's soft-caps, for one)."""
    if implementation != "eager":
        return ALL_ATTENTION_FUNCTIONS[implementation]
    kernel = getattr(sys.modules[type(attn).__module__], "eager_attention_forward", None)
    if kernel is None:
        raise NotImplementedError(f"{name}: {type(attn).__module__} defines no eager_attention_forward")
    return kernel


def decoder_attentions(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of the self-attention of each decoder layer of transformers model `model`, in order; the
    bridge's own components, which compute the attention themselves, are refused."""
    names = {id(module): name for name, module in model.named_modules()}
    layers = getattr(model.get_decoder(), "layers", None)
    if layers is None:
        raise NotImplementedError(f"{type(model).__name__}: its decoder has no `layers`, where the aligner looks for them")
    attentions = []
    for layer in layers:
        attn = getattr(layer, "self_attn", None)
        if attn is None:
            raise NotImplementedError(f"{names[id(layer)]}: a decoder layer with no self_attn; the aligner adapts that")
        if wrapped(attn) is not attn:
            raise ValueError(
                f"{names[id(attn)]}: a TransformerBridge component, which computes the attention itself; attach to "
                "the bridge, or to the model inside `aligner.lens.plain_model(bridge)`"
            )
        attentions.append((names[id(attn)], attn))
    return attentions
