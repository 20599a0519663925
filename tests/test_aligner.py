"""The Aligner's math and hook points, pinned against an explicit implementation (tests/reference.py) on a plain HF
Llama: no key norm, the scale 1/sqrt(d_head)."""

import copy

import pytest
import torch
from reference import explicit_aligned_logits
from transformers import LlamaConfig, LlamaForCausalLM

import aligner
from aligner import Aligner, AlignerConfig, ModelShape
from aligner.adapter import shape_of

HOOK_SHAPES = {  # name -> shape for batch B=2, T=7, N=3, H=4, d_head=16, d_model=64
    "aligner.hook_tokens": (3, 64),
    "blocks.{l}.aligner.hook_k": (3, 2, 16),  # the key/value heads, as attn.hook_k
    "blocks.{l}.aligner.hook_v": (3, 2, 16),
    "blocks.{l}.aligner.hook_pattern": (2, 4, 7, 3),
    "blocks.{l}.aligner.hook_gate": (4,),
    "blocks.{l}.aligner.hook_z": (2, 7, 4, 16),
}


def tiny_llama(attention_bias: bool, n_kv_heads: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(1)
    config = LlamaConfig(
        vocab_size=101,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=n_kv_heads,  # 2: grouped-query attention
        attention_bias=attention_bias,
        max_position_embeddings=64,
    )
    hf = LlamaForCausalLM(config).eval()
    if attention_bias:  # HF initialises biases at zero; make them matter
        with torch.no_grad():
            for name, p in hf.named_parameters():
                if name.endswith("bias"):
                    p.normal_()
    return hf


def randomise_gates(al: Aligner) -> None:
    with torch.no_grad():
        al.gates.normal_()


@pytest.mark.parametrize("n_tokens", [1, 3])  # one slot takes its own path (layer.py)
@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("attention_bias", [False, True])
@pytest.mark.parametrize("n_kv_heads", [2, 4])  # grouped-query attention; a key/value head per query head (LLaMA-2's)
def test_aligned_forward_equals_explicit_implementation(n_tokens, shared, attention_bias, n_kv_heads):
    hf = tiny_llama(attention_bias, n_kv_heads)
    reference = copy.deepcopy(hf)  # the bridge rewires its module in place
    model = aligner.from_hf(hf, None)
    al = Aligner.for_model(model, AlignerConfig(n_tokens=n_tokens, start_layer=1, shared=shared))
    randomise_gates(al)
    ids = torch.randint(0, 101, (2, 7))
    with al.attached(model), torch.no_grad():
        got = model(ids)
        want = explicit_aligned_logits(reference, al, ids)  # Llama: no query or key norm, 1/sqrt(d_head)
        base = reference(ids).logits
    assert (want - base).abs().max() > 1e-2  # the aligner does change the output
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_zero_gates_leave_logits_unchanged(tiny):
    ids = torch.randint(0, 1000, (2, 9))
    base = tiny(ids)
    al = Aligner.for_model(tiny, AlignerConfig(n_tokens=4, start_layer=0))
    with al.attached(tiny):
        aligned = tiny(ids)
    assert (aligned - base).abs().max().item() < 1e-6


def test_run_with_cache_returns_aligner_hook_points_with_documented_shapes(tiny):
    al = Aligner.for_model(tiny, AlignerConfig(n_tokens=3, start_layer=2))
    ids = torch.randint(0, 1000, (2, 7))
    with al.attached(tiny):
        _, cache = tiny.run_with_cache(ids)
    for template, shape in HOOK_SHAPES.items():
        for layer in al.layer_indices:
            assert tuple(cache[template.format(l=layer)].shape) == shape, template
    assert "blocks.1.aligner.hook_z" not in cache  # layers below start_layer are not adapted
    torch.testing.assert_close(cache["aligner.hook_tokens"], al.tokens.detach())
    torch.testing.assert_close(cache["blocks.3.aligner.hook_gate"], al.gates[1].detach())


def test_one_token_reads_no_queries_yet_its_cache_is_complete(tiny):
    """With one slot the aligner hooks only attn.hook_z (a softmax over one slot is 1, so no query is read and
    K_p changes nothing); run_with_cache still returns every hook point, K_p and a pattern of ones included."""
    al = Aligner.for_model(tiny, AlignerConfig(n_tokens=1, start_layer=2))
    ids = torch.randint(0, 1000, (2, 7))
    with al.attached(tiny):
        assert not tiny.blocks[2].attn.hook_rot_q.has_hooks() and tiny.blocks[2].attn.hook_z.has_hooks()
        _, cache = tiny.run_with_cache(ids)
    for template, shape in HOOK_SHAPES.items():
        assert tuple(cache[template.format(l=3)].shape) == tuple(1 if d == 3 else d for d in shape), template
    assert torch.equal(cache["blocks.3.aligner.hook_pattern"], torch.ones(2, 4, 7, 1))
    k_proj = tiny.blocks[3].attn.k.original_component
    torch.testing.assert_close(cache["blocks.3.aligner.hook_k"], k_proj(al.tokens.detach()).unflatten(-1, (2, 16)))


def test_unshared_tokens_have_one_prefix_per_layer(tiny):
    al = Aligner.for_model(tiny, AlignerConfig(n_tokens=2, start_layer=1, shared=False))
    assert tuple(al.tokens.shape) == (3, 2, 64)
    with al.attached(tiny):
        _, cache = tiny.run_with_cache(torch.randint(0, 1000, (1, 5)))
    assert tuple(cache["aligner.hook_tokens"].shape) == (3, 2, 64)


def test_zero_ablating_one_layers_gate_is_a_one_line_hook(tiny):
    al = Aligner.for_model(tiny, AlignerConfig(n_tokens=2, start_layer=1))
    randomise_gates(al)
    ids = torch.randint(0, 1000, (1, 6))
    with al.attached(tiny):
        _, cache = tiny.run_with_cache(ids)
        logits = tiny.run_with_hooks(
            ids, fwd_hooks=[("blocks.2.aligner.hook_gate", lambda gate, hook: torch.zeros_like(gate))]
        )
        with tiny.hooks(fwd_hooks=[("blocks.2.aligner.hook_gate", lambda gate, hook: torch.zeros_like(gate))]):
            _, ablated = tiny.run_with_cache(ids)
    assert ablated["blocks.2.aligner.hook_z"].abs().max() == 0
    assert ablated["blocks.3.aligner.hook_z"].abs().max() > 0
    assert not torch.equal(cache["blocks.2.aligner.hook_z"], ablated["blocks.2.aligner.hook_z"])
    assert logits.shape == (1, 6, tiny.cfg.d_vocab)


def test_hooks_added_through_torch_fire_too(tiny):
    """The aligner calls a hook point only where something is hooked there (layer.py's `through`), whoever added
    it: a forward hook added with torch's own `register_forward_hook` patches as one added by TransformerLens, and a
    full backward hook gets its gradient."""
    al = Aligner.for_model(tiny, AlignerConfig(n_tokens=2, start_layer=1))
    randomise_gates(al)
    ids = torch.randint(0, 1000, (1, 6))
    layer = al.layers[1]  # model layer 2's
    grads = []
    with al.attached(tiny):
        want = tiny.run_with_hooks(
            ids, fwd_hooks=[("blocks.2.aligner.hook_gate", lambda gate, hook: torch.zeros_like(gate))]
        )
        handle = layer.hook_gate.register_forward_hook(lambda module, args, gate: torch.zeros_like(gate))
        got = tiny(ids)
        handle.remove()
        handle = layer.hook_z.register_full_backward_hook(lambda module, grad_in, grad_out: grads.append(grad_out))
        unhooked = tiny(ids)
        unhooked.sum().backward()
        handle.remove()
    torch.testing.assert_close(got, want)
    assert (unhooked - want).abs().max() > 1e-3
    assert len(grads) == 1 and grads[0][0].shape == (1, 6, tiny.cfg.n_heads, tiny.cfg.d_head)


def test_patching_the_aligner_contribution_patches_the_model(tiny):
    al = Aligner.for_model(tiny, AlignerConfig(n_tokens=2, start_layer=1))
    randomise_gates(al)
    ids = torch.randint(0, 1000, (1, 6))
    base = tiny(ids)
    with al.attached(tiny):
        zeroed = tiny.run_with_hooks(
            ids, fwd_hooks=[(lambda name: name.endswith("aligner.hook_z"), lambda z, hook: torch.zeros_like(z))]
        )
        aligned = tiny(ids)  # run_with_hooks removed its hooks; the aligner's own stay
    assert (zeroed - base).abs().max() < 1e-6
    assert (aligned - base).abs().max() > 1e-3


def test_gradients_reach_only_tokens_and_gates(tiny):
    tiny.requires_grad_(False)
    al = Aligner.for_model(tiny, AlignerConfig(n_tokens=2, start_layer=1))
    randomise_gates(al)
    with al.attached(tiny):
        tiny(torch.randint(0, 1000, (2, 5))).logsumexp(-1).mean().backward()
    assert not any(p.requires_grad or p.grad is not None for p in tiny.original_model.parameters())
    assert {name for name, p in al.named_parameters() if p.requires_grad} == {"tokens", "gates"}
    assert al.tokens.grad.abs().sum() > 0 and al.gates.grad.abs().sum() > 0


def test_detach_restores_the_model(tiny):
    names_before = set(tiny.hook_dict)
    al = Aligner.for_model(tiny, AlignerConfig(start_layer=1))
    with pytest.raises(ZeroDivisionError), al.attached(tiny):
        assert "blocks.1.aligner.hook_pattern" in tiny.hook_dict
        1 / 0
    assert set(tiny.hook_dict) == names_before
    assert not hasattr(tiny, "aligner") and not hasattr(tiny.blocks[1], "aligner")
    assert all(not hp.fwd_hooks for hp in tiny.hook_points())
    with al.attached(tiny):  # and it can be attached again
        pass


def test_attaching_twice_or_to_a_wrong_shape_is_refused(tiny):
    al = Aligner.for_model(tiny, AlignerConfig())
    with al.attached(tiny):
        with pytest.raises(RuntimeError, match="already attached"):
            al.attach(tiny)
        with pytest.raises(RuntimeError, match="already has an aligner"):
            Aligner.for_model(tiny, AlignerConfig()).attach(tiny)
    wrong = Aligner(AlignerConfig(), ModelShape(d_model=64, n_layers=4, n_heads=8))
    with pytest.raises(ValueError, match="n_heads: aligner 8, model 4"):
        wrong.attach(tiny)


def test_parameter_counts_match_the_paper():
    # LLaMA-2-7B built on the meta device: no weights, just the shapes the bridge reads.
    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32)
    with torch.device("meta"):
        hf = LlamaForCausalLM(config)
    llama7b = aligner.from_hf(hf, None, name="llama-2-7b-shape")
    assert Aligner(AlignerConfig(n_tokens=1, start_layer=2), shape_of(llama7b)).num_parameters() == 5056
    smollm2 = ModelShape(d_model=576, n_layers=30, n_heads=9)
    assert Aligner(AlignerConfig(n_tokens=1, start_layer=2), smollm2).num_parameters() == 828
    assert Aligner(AlignerConfig(n_tokens=10, start_layer=2, shared=False), smollm2).num_parameters() == 28 * 10 * 576 + 28 * 9


def test_save_then_load_is_bit_exact(tiny, tmp_path):
    al = Aligner.for_model(tiny, AlignerConfig(n_tokens=2, start_layer=1, shared=False))
    randomise_gates(al)
    al.save(tmp_path / "run", note="test")
    loaded = Aligner.load(tmp_path / "run")
    assert torch.equal(loaded.tokens, al.tokens) and torch.equal(loaded.gates, al.gates)
    assert loaded.config == al.config and loaded.shape == al.shape and loaded.base_model == al.base_model
    assert loaded.provenance["note"] == "test" and loaded.provenance["versions"]["torch"]
    ids = torch.randint(0, 1000, (1, 5))
    with al.attached(tiny):
        want = tiny(ids)
    with loaded.attached(tiny):
        assert torch.equal(tiny(ids), want)


def test_load_names_the_file_and_field_at_fault(tiny, tmp_path):
    import json

    al = Aligner.for_model(tiny, AlignerConfig())
    run = al.save(tmp_path / "run")
    meta = json.loads((run / "adapter.json").read_text())
    meta["config"]["n_tokens"] = "one"
    (run / "adapter.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"adapter\.json.*'n_tokens' must be int"):
        Aligner.load(run)
    al.save(run)
    (run / "adapter.safetensors").write_bytes((run / "adapter.safetensors").read_bytes()[:-8])
    with pytest.raises(ValueError, match=r"adapter\.safetensors: .*cut short or padded"):
        Aligner.load(run)
    with pytest.raises(FileNotFoundError, match="not an adapter directory"):
        Aligner.load(tmp_path / "missing")
