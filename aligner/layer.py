"""The Aligner's math, all of it, for one adapted layer.

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

How it is computed, so that it costs next to nothing beside the frozen model (benchmarks/RESULTS.md); each
shortcut is exact and pinned against the equations in tests/test_performance_correctness.py:
- K_p and V_p do not depend on the input: `prefix` runs once per forward, or once per generation
  (`Aligner.fixed_prefix`), never once per new token. The tokens and gates are cast to the model's dtype once
  per forward, not once per layer.
- The gate scales V_p, not the attention's output: g A V_p = A (g V_p), since g is one number per head and each
  row of A weighs the same N slots. V_p has N rows where the output has B * T, and K_p and g V_p are then all a
  layer needs of its prefix (`prefix`, in the fused attention's layout: `attention_inputs`).
- On a small model the host's time per operator, not the GPU, sets the pace, so the shared tokens are projected
  through every adapted layer's W_K and W_V in one product (`project_stacked`, their weights stacked: a copy
  per forward of at most `aligner.model.STACKED_PREFIX_BYTES`) instead of two per layer, and every layer's K_p
  and g V_p are put in the attention's layout at once; the backward is one product too, not a product per
  layer and a sum over the layers. The same sums, up to their order in floating point. A layer with something
  hooked at `hook_k`, `hook_v` or `hook_gate`, or a key norm, forms its own from its share of the product. A
  larger model, one split over devices or sharded among processes, or per-layer tokens project layer by layer
  (`project`).
- Grouped-query attention: K_p and V_p keep the layer's key/value heads at their hook points (as its own
  `attn.hook_k` does); for the attention they are spread to the query heads (query head h reads key/value head
  h // (H / H_kv)), since each query head has its own gate: N rows per head, against the B * T of the output.
- A itself is formed only when a hook reads or patches `hook_pattern`. Otherwise all heads' prefix attention
  is one fused `scaled_dot_product_attention` call, and with N = 1 there is none: a softmax over one slot is 1,
  so every query receives g V_p (which is also why `Aligner.merge_into` can fold it into a bias). With N = 1 the
  queries are not read at all (the layer's `hook_rot_q` is not hooked), and K_p is computed only for a hook on
  `hook_k`. With N > 1 the B rows' queries enter the fused call as one sequence of B * T against one K_p, V_p
  (nothing but the prefix is attended to, so nothing tells the rows apart), rather than K_p, V_p broadcast to B
  rows, which the backward would have to sum back.
- The hook points fire wherever something is hooked, and are not called where nothing is (`through`); the
  layer's math is a method, not a module call. On a small model each call is host time at every layer.
- A bank of aligners (aligner/bank.py) gives each row b of the batch its own P and g: the same equations
  with a leading batch axis on P, K_p, V_p and g.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from transformer_lens.hook_points import HookPoint


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


def hooked(hook_point: HookPoint) -> bool:
    """Whether anything is hooked at `hook_point`: a forward or backward hook, added by TransformerLens
    (`add_hook`, `run_with_cache`, `hooks()`) or by torch on it (`register_forward_hook`, ...). torch's global
    module hooks, which watch every module, do not count."""
    return bool(
        hook_point._forward_hooks
        or hook_point._forward_pre_hooks
        or hook_point._backward_hooks
        or hook_point._backward_pre_hooks
    )


def through(hook_point: HookPoint, x: torch.Tensor) -> torch.Tensor:
    """x as the hooks at `hook_point` leave it. A hook point with nothing hooked is the identity, and is not
    called: on a small model the host's time per layer sets the pace, and a module call is a good part of it."""
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
