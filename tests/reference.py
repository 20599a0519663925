"""The Aligner's forward written out on a plain transformers model with forward hooks: an independent re-derivation
of the paper's equations that tests/test_aligner.py (Llama) and tests/test_gemma.py (Gemma 3, Qwen 3, OLMo 2) pin
aligner/ against. It reads only the HF modules; nothing here comes from aligner/'s layer code."""

from typing import TYPE_CHECKING, Literal

import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

if TYPE_CHECKING:  # for the annotation only: the reference reads the aligner's parameters, never its code
    from aligner import Aligner

# How a layer norms its queries or keys, and so how the reference norms them:
#   None         no norm (Llama)
#   "per_head"   one norm over each head's d_head (Gemma 3, Qwen 3)
#   "all_heads"  one norm over all heads together, before the split into heads (OLMo 2)
Norm = Literal["per_head", "all_heads"] | None


def split_heads(norm: torch.nn.Module | None, how: Norm, x: torch.Tensor, n_heads: int, d_head: int) -> torch.Tensor:
    """x: (..., n_heads * d_head) -> (..., n_heads, d_head), normed as `how` says."""
    if how == "all_heads":
        return norm(x).unflatten(-1, (n_heads, d_head))
    heads = x.unflatten(-1, (n_heads, d_head))
    return norm(heads) if how == "per_head" else heads


def explicit_aligned_logits(
    hf: torch.nn.Module,
    al: "Aligner",
    ids: torch.Tensor,
    query_norm: Norm = None,
    key_norm: Norm = None,
    scale: float | None = None,
) -> torch.Tensor:
    """The aligner's equations on a plain transformers model: each query as the layer makes it (projected, normed by
    `query_norm`, rotated), the prefix keys k_norm(P W_K) normed by `key_norm` (no rotary), the scores times `scale`
    (None: 1/sqrt(d_head)), a softmax over the N slots, gated per head and added to the input of o_proj.

    `query_norm` must be the layer's own; `key_norm` and `scale` may be set apart from the layer's, to show that a
    test would see the key norm or the layer's scale gone."""
    cfg = hf.config
    H, H_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    d_head = getattr(cfg, "head_dim", None) or cfg.hidden_size // H
    scale = d_head**-0.5 if scale is None else scale
    handles = []
    for i, layer in enumerate(al.layer_indices):
        attn = hf.model.layers[layer].self_attn
        P = al.tokens if al.config.shared else al.tokens[i]  # (N, d_model)
        stash = {}

        def keep_query(module, args, kwargs, stash=stash, attn=attn):
            x = attn.q_proj(kwargs["hidden_states"])  # (B, T, H * d_head)
            q = split_heads(getattr(attn, "q_norm", None), query_norm, x, H, d_head)  # (B, T, H, d_head)
            q = q.transpose(1, 2)  # (B, H, T, d_head)
            cos, sin = kwargs["position_embeddings"]  # the layer's own: local or global rotary on Gemma 3
            stash["q"], _ = apply_rotary_pos_emb(q, q, cos, sin)

        def add_prefix(module, args, stash=stash, attn=attn, P=P, i=i):
            (z,) = args  # (B, T, H * d_head), the input of o_proj
            k = split_heads(getattr(attn, "k_norm", None), key_norm, attn.k_proj(P), H_kv, d_head)  # (N, H_kv, d_head)
            k = k.repeat_interleave(H // H_kv, dim=1)  # (N, H, d_head)
            v = attn.v_proj(P).view(-1, H_kv, d_head).repeat_interleave(H // H_kv, dim=1)
            out = torch.zeros_like(z).view(*z.shape[:2], H, d_head)
            for h in range(H):
                scores = stash["q"][:, h] @ k[:, h].T * scale  # (B, T, N): every query sees every slot
                out[:, :, h] = al.gates[i, h] * (scores.softmax(-1) @ v[:, h])
            return (z + out.flatten(2),)

        handles.append(attn.register_forward_pre_hook(keep_query, with_kwargs=True))
        handles.append(attn.o_proj.register_forward_pre_hook(add_prefix))
    try:
        return hf(ids).logits
    finally:
        for h in handles:
            h.remove()
