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
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformer_lens.hook_points import HookPoint


class AlignerLayer(nn.Module):
    """One adapted layer's prefix attention and its hook points.

    It owns no parameters: the tokens and gates live in the `Aligner`, which passes this layer's share in,
    so that the shared prefix really is one tensor.
    """

    def __init__(self) -> None:
        super().__init__()
        self.hook_k = HookPoint()  # (N, H, d_head) prefix keys, key heads expanded to query heads
        self.hook_v = HookPoint()  # (N, H, d_head) prefix values
        self.hook_pattern = HookPoint()  # (B, H, T, N) attention of each query onto the prefix slots
        self.hook_gate = HookPoint()  # (H,) this layer's gates
        self.hook_z = HookPoint()  # (B, T, H, d_head) the gated contribution added to attn.hook_z

    def forward(
        self,
        q: torch.Tensor,  # (B, T, H, d_head) rotary queries
        tokens: torch.Tensor,  # (N, d_model)
        gate: torch.Tensor,  # (H,)
        W_K: torch.Tensor,  # (H_kv, d_model, d_head)
        W_V: torch.Tensor,  # (H_kv, d_model, d_head)
        b_K: torch.Tensor | None,  # (H_kv, d_head)
        b_V: torch.Tensor | None,  # (H_kv, d_head)
    ) -> torch.Tensor:
        n_heads, n_kv_heads, d_head = q.shape[2], W_K.shape[0], q.shape[3]
        tokens = tokens.to(W_K.dtype)
        k = torch.einsum("nm,gmd->ngd", tokens, W_K)  # (N, H_kv, d_head)
        v = torch.einsum("nm,gmd->ngd", tokens, W_V)
        if b_K is not None:
            k = k + b_K
        if b_V is not None:
            v = v + b_V
        # Grouped-query attention: query head h reads key/value head h // (H / H_kv), as the model does.
        k = self.hook_k(k.repeat_interleave(n_heads // n_kv_heads, dim=1))  # (N, H, d_head)
        v = self.hook_v(v.repeat_interleave(n_heads // n_kv_heads, dim=1))
        scores = torch.einsum("bthd,nhd->bhtn", q, k) / math.sqrt(d_head)  # (B, H, T, N)
        pattern = self.hook_pattern(scores.float().softmax(dim=-1).to(q.dtype))
        gate = self.hook_gate(gate.to(q.dtype))
        return self.hook_z(torch.einsum("bhtn,nhd->bthd", pattern, v) * gate[:, None])  # (B, T, H, d_head)
