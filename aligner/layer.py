"""The Aligner's math, all of it: one adapted layer's prefix attention, and every layer's prefix at once.

Zhou, Wu, Zhu, Terzopoulos (2023), "Aligner: One Global Token is Worth Millions of Parameters When
Aligning Large Language Models" (arXiv 2312.05503), whose code is lit-llama's LLaMA-Adapter
(Zhang et al. 2023, arXiv 2303.16199) with the prefix shared by every layer. For layer l >= start_layer:

    K_p = P W_K^l + b_K^l,  V_p = P W_V^l + b_V^l        the layer's own frozen projections, applied to
                                                        the raw tokens P (N, d_model): no norm, no rotary
    A   = softmax(q K_p^T / sqrt(d_head))               q: the layer's rotary queries; a softmax over the
                                                        N prefix slots alone, apart from the causal one
    z  <- z + g[l, h] * A V_p                           added per head before the output projection;
                                                        g starts at zero, so an untrained aligner is a no-op

As in lit-llama the gate is used as is (LLaMA-Adapter's own code takes tanh of it).

Layers that do more to their own keys and queries than LLaMA's (Gemma 3, Qwen 3, OLMo 2) are followed where the
paper is silent; on LLaMA both steps are the identity and the equations above are computed exactly as written:
- Key norm. The paper's model has none. A layer with one normalises its own keys before rotary, so
  K_p = k_norm(P W_K^l + b_K^l), still without rotary: the prefix has no position. The queries need nothing
  more, since the layer's queries are read already normed and rotated (`hook_rot_q`). Without the key norm the
  prefix keys would live on another scale than the keys each query was trained against.
- Scale. A = softmax(s q K_p^T) with the layer's own s: 1/sqrt(d_head) by default (the paper's),
  query_pre_attn_scalar^-1/2 on Gemma 3.
- Sliding-window layers (Gemma 3) limit which earlier positions a query sees; the prefix is at no position, so
  every query sees it on every layer, local or global, as in the paper.

The plain computation is `AlignerLayer.add_attention`'s first branch, taken whenever a hook reads or patches
the attention pattern. The other branches are exact shortcuts of it, each pinned to it by
tests/test_performance_correctness.py:
- K_p and V_p do not depend on the input: they are formed once per forward (once per generation inside
  `Aligner.fixed_prefix`), never once per position.
- g A V_p = A (g V_p), since g is one number per head and each row of A weighs the same N slots: the gate scales
  V_p's N rows, not the output's B * T.
- N = 1: a softmax over one slot is 1, so every query receives g V_p; neither q nor K_p is read (and a one-token
  aligner folds into the output projection's bias: `Aligner.merge_into`).
- N > 1: all heads' prefix attention is one fused `scaled_dot_product_attention`. With one prefix for every row,
  the B rows' queries are one sequence of B * T against one K_p, V_p (nothing but the prefix is attended to, so
  nothing tells the rows apart), rather than K_p, V_p broadcast to B rows, which the backward would sum back.
- Stacking (`prefix_of_all_layers`): the shared tokens are projected through every adapted layer's W_K and W_V
  in one product against their weights stacked, instead of two products per layer; the same sums up to their
  order in floating point. On a small model the host's work per operator, not the arithmetic, sets the pace; a
  model whose weights are larger than `STACKED_PREFIX_BYTES`, split over devices, sharded or quantised projects
  layer by layer (`project`). A layer whose prefix hook points are hooked, or with a key norm, forms its own
  from its share of the product, through its hook points.
- Grouped-query attention: K_p and V_p keep the layer's key/value heads at their hook points (as `attn.hook_k`
  does), and are spread to the query heads for the attention (query head h reads key/value head h // (H / H_kv)).
- Hook points are called only where something is hooked (`through`).
- A bank of aligners (bank.py) gives each row b of the batch its own P and g: the same equations with a leading
  batch axis on P, K_p, V_p and g.
- On a plain transformers model (training and generation: `model.prefix_attention`) the queries and z are not
  read at hook points but handed over by transformers' attention interface, z from the model's own kernel
  (SDPA, flash): the same `add_attention` on them, with every shortcut above; the bridge's hook points are not there.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from transformer_lens.hook_points import HookPoint

from aligner.lens import hooked

# The most that a forward copies of the adapted layers' key/value weights to project every layer's prefix in one
# product (`prefix_of_all_layers`). Below it are the small models, where the host's work per operator sets the
# pace; above it each layer projects its own, as the arithmetic, not the host, bounds a large model.
STACKED_PREFIX_BYTES = 64 * 2**20
# One layer's prefix: K_p (None where not read) and V_p, or g V_p once formed for the attention.
Prefix = tuple[torch.Tensor | None, torch.Tensor]


@dataclass(frozen=True)
class AttentionParts:
    """What the aligner reads of one layer's attention, besides its queries: the modules themselves, not their
    weights, so that they stay right after model.to()."""

    k_proj: nn.Linear
    v_proj: nn.Linear
    key_norm: Callable[[torch.Tensor], torch.Tensor] | None  # on (..., H_kv, d_head); None: the layer has none
    scale: float | None  # the attention scale; None: the paper's 1/sqrt(d_head), which the layer uses too


def query_heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """(..., H_kv, d_head) -> (..., H, d_head): query head h reads key/value head h // (H / H_kv), as the model does.
    Expanded rather than repeat_interleave'd, which on CUDA waits for the device (it sums its repeats); x itself
    where every query head has its own key/value head."""
    group = n_heads // x.shape[-2]
    if group == 1:
        return x
    return x.unsqueeze(-2).expand(*x.shape[:-1], group, x.shape[-1]).flatten(-3, -2)


def project(tokens: torch.Tensor, projection: nn.Linear, d_head: int) -> torch.Tensor:
    """P W + b for one layer's projection, (..., N, d_model) -> (..., N, H_kv, d_head). Called as a module, so
    that a model dispatched by accelerate (device_map, offloaded layers) brings the weights in and the tokens to
    them, as for the layer's own keys."""
    return projection(tokens).unflatten(-1, (-1, d_head))


def project_stacked(
    tokens: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor] | None, d_head: int
) -> torch.Tensor:
    """`project` for many projections of one width (every adapted layer's), as one product against their weights
    stacked: the same sums (up to their order in floating point) in one operator instead of one or more each.
    (..., N, d_model) -> (n_projections, ..., N, H_kv, d_head), views of one tensor."""
    weight = torch.cat(weights)
    bias = None if biases is None else torch.cat(biases)
    return F.linear(tokens, weight, bias).unflatten(-1, (len(weights), -1, d_head)).movedim(-3, 0)


def attention_inputs(
    k: torch.Tensor | None, v: torch.Tensor, gate: torch.Tensor, n_heads: int
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """K_p and g V_p as the attention reads them, (..., B, H, N, d_head), from K_p and V_p (..., B, N, H_kv, d_head)
    and the gates (..., B, H); B is 1 for one prefix shared by every row, and `...` may hold every layer at once.
    Each query head reads its key/value head, and scales its values by its own gate."""
    v = query_heads(v, n_heads).transpose(-3, -2) * gate.unsqueeze(-1).unsqueeze(-1)
    return (None if k is None else query_heads(k, n_heads).transpose(-3, -2)), v


def through(hook_point: HookPoint, x: torch.Tensor) -> torch.Tensor:
    """x as the hooks at `hook_point` leave it. A hook point with nothing hooked is the identity, and is not
    called: on a small model a module call at every layer is a good part of the host's work."""
    return hook_point(x) if hooked(hook_point) else x


class LayerHookPoints(NamedTuple):
    k: HookPoint
    v: HookPoint
    pattern: HookPoint
    gate: HookPoint
    z: HookPoint


class AlignerLayer(nn.Module):
    """One adapted layer's prefix attention and its hook points.

    It owns no parameters: the tokens and gates live in the `Aligner`, which passes this layer's share in,
    so that the shared prefix really is one tensor. It is a module for its hook points' sake, and has no forward:
    the aligner calls `prefix` and `add_attention` as methods, without a module call's work at every layer.
    """

    def __init__(self) -> None:
        super().__init__()
        # A bank of aligners (bank.py) puts a batch axis first on hook_k, hook_v (B, N, H_kv, d_head) and hook_gate (B, H).
        self.hook_k = HookPoint()  # (N, H_kv, d_head) prefix keys, one per key/value head, as attn.hook_k
        self.hook_v = HookPoint()  # (N, H_kv, d_head) prefix values
        self.hook_pattern = HookPoint()  # (B, H, T, N) attention of each query onto the prefix slots
        self.hook_gate = HookPoint()  # (H,) this layer's gates
        self.hook_z = HookPoint()  # (B, T, H, d_head) the gated contribution added to attn.hook_z
        # The same hook points where the methods below read them, at every layer of every forward: a submodule's name
        # goes through nn.Module.__getattr__, Python work at each read; a field of this tuple does not.
        self._points = LayerHookPoints(self.hook_k, self.hook_v, self.hook_pattern, self.hook_gate, self.hook_z)

    def reads_keys(self, n_slots: int) -> bool:
        """Whether K_p is needed: with one slot it changes nothing (a softmax over one slot is 1), so it is
        computed only for a hook on `hook_k`."""
        return n_slots > 1 or hooked(self._points.k)

    def prefix_hooked(self) -> bool:
        """Whether a hook reads or patches K_p, V_p or the gates: then `prefix` forms this layer's own, through
        them, rather than taking its share of every layer's formed at once."""
        points = self._points
        return hooked(points.k) or hooked(points.v) or hooked(points.gate)

    def prefix(
        self,
        k: torch.Tensor | None,  # P W_K + b_K (N, H_kv, d_head), or (B, N, H_kv, d_head) in a bank; None: not read
        v: torch.Tensor,  # P W_V + b_V, the same shape
        gate: torch.Tensor,  # (H,), or (B, H) in a bank
        n_heads: int,
        key_norm: Callable[[torch.Tensor], torch.Tensor] | None = None,  # the layer's, on (..., H_kv, d_head)
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """K_p and g V_p from the projected tokens (`project`), through this layer's hook points, as
        `add_attention` reads them (`attention_inputs`)."""
        v = through(self._points.v, v)
        if k is not None:
            if key_norm is not None:  # as the layer normalises its keys (before their rotary, which K_p has none of)
                k = key_norm(k)
            k = through(self._points.k, k)
        gate = through(self._points.gate, gate)
        if v.dim() == 3:  # one prefix for every row: a batch of one
            k, v, gate = (None if x is None else x.unsqueeze(0) for x in (k, v, gate))
        return attention_inputs(k, v, gate, n_heads)

    def add_attention(
        self,
        z: torch.Tensor,  # (B, T, H, d_head) the layer's attention output per head, before its output projection
        q: torch.Tensor | None,  # (B, T, H, d_head) rotary queries; None with one slot, which does not read them
        k: torch.Tensor | None,  # K_p (B or 1, H, N, d_head), from `prefix`; None with one slot
        v: torch.Tensor,  # g V_p (B or 1, H, N, d_head), from `prefix`: each head's values scaled by its gate
        scale: float | None = None,  # the layer's attention scale; None: the paper's 1/sqrt(d_head)
    ) -> torch.Tensor:
        """z plus the gated prefix attention of every query, (B, T, H, d_head)."""
        B, T, H, d_head = z.shape
        n_slots = v.shape[-2]
        if hooked(self._points.pattern):  # a hook reads or patches A: form it, as the equations say
            if n_slots == 1:  # the softmax over one slot is 1 whatever the score: q and K_p are not read
                scores = z.new_zeros(B, H, T, 1)
            else:
                scores = q.transpose(1, 2) @ k.transpose(-1, -2)  # (B, H, T, N)
                scores = scores / math.sqrt(d_head) if scale is None else scores * scale
            pattern = self._points.pattern(scores.float().softmax(dim=-1).to(z.dtype))
            out = (pattern @ v).transpose(1, 2)
        elif n_slots == 1:  # A = 1 for every query, so A g V_p = g V_p, the same at every position
            out = v.transpose(1, 2).expand(B, T, H, d_head)
        elif k.shape[0] == 1:  # one prefix for every row: no mask and no position tie a query to its row, so the B
            # rows' queries are one sequence of B * T, against one copy of K_p and g V_p; all heads in one fused kernel
            out = F.scaled_dot_product_attention(q.reshape(1, B * T, H, d_head).transpose(1, 2), k, v, scale=scale)
            out = out.transpose(1, 2).reshape(B, T, H, d_head)
        else:  # a bank: each row its own prefix
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, scale=scale).transpose(1, 2)
        return z + through(self._points.z, out)


def stacks(projections: Sequence[nn.Linear]) -> bool:
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


def stacked_bytes(projections: Sequence[nn.Linear]) -> int:
    """The bytes that stacking the weights of `projections` copies at each forward."""
    return sum(p.weight.numel() * p.weight.element_size() for p in projections)


def prefix_of_all_layers(
    tokens: torch.Tensor,  # (N, d_model) shared by every row, or (B, N, d_model) in a bank
    gates: torch.Tensor,  # (n_active, H), or (n_active, B, H) in a bank
    layers: Sequence[AlignerLayer],
    parts: Sequence[AttentionParts],
    n_slots: int,
    n_heads: int,
    d_head: int,
) -> tuple[dict[int, Prefix], dict[int, Prefix]]:
    """Every adapted layer's prefix from one product of the tokens with every layer's W_K (where read) and W_V
    stacked. Returns, by adapted layer, K_p and g V_p ready for the attention, formed for all layers at once
    (`attention_inputs`); and, for each layer that forms its own through its hook points (a hook at hook_k,
    hook_v or hook_gate, or a key norm), its P W_K + b_K and P W_V + b_V. Both are empty where a weight is not a
    plain tensor on the tokens' device: each layer then projects its own, as its module brings its weight in
    (sharded by FSDP and gathered one block at a time, a tensor subclass such as a quantised one, offloaded to
    the meta device, or on another device by device_map)."""
    reads_keys = [layer.reads_keys(n_slots) for layer in layers]
    key_layers = [i for i, keys in enumerate(reads_keys) if keys]
    projections = [parts[i].k_proj for i in key_layers] + [p.v_proj for p in parts]
    weights = [p.weight for p in projections]
    if any(type(weight) is not nn.Parameter or weight.device != tokens.device for weight in weights):
        return {}, {}
    biases = None if projections[0].bias is None else [p.bias for p in projections]
    shared = tokens.dim() == 2  # one prefix for every row: a batch of one for the attention, (1, N, d_model)
    projected = project_stacked(tokens.unsqueeze(0) if shared else tokens, weights, biases, d_head)
    keys, values = projected[: len(key_layers)], projected[len(key_layers) :]  # (layers, B or 1, N, H_kv, d_head)
    own = {i for i, (layer, part) in enumerate(zip(layers, parts)) if layer.prefix_hooked() or part.key_norm is not None}
    formed = {}
    if len(own) < len(layers):
        # With one slot only a layer with a hook on hook_k reads K_p, and it forms its own.
        k, v = attention_inputs(keys if n_slots > 1 else None, values, gates.unsqueeze(1) if shared else gates, n_heads)
        k = (None,) * len(v) if k is None else k.unbind(0)
        formed = {i: (k[i], v_i) for i, v_i in enumerate(v.unbind(0)) if i not in own}
    projected_own = {}
    if own:  # their shares, in their hook points' shapes: (projections, [B,] N, H_kv, d_head)
        shares = projected[:, 0] if shared else projected
        for i in own:
            projected_own[i] = (shares[key_layers.index(i)] if reads_keys[i] else None, shares[len(key_layers) + i])
    return formed, projected_own
