"""The speed-ups of layer.py and model.py compute what the equations say: the fused and one-token attention
against the formed pattern, the prefix kept across a generation against one recomputed every forward, and an
aligner merged into the output biases against the attached one; and the host work they save stays saved."""

import pytest
import torch

import aligner
import aligner.layer
from aligner import Aligner, AlignerConfig
from aligner.chat import end_of_turn_id, prompt_ids

PROMPTS = ["Hi", "What is the capital of France, and why is it there?", "Tell me a joke about cats."]


def random_aligner(model, **config) -> Aligner:
    al = Aligner.for_model(model, AlignerConfig(**config))
    with torch.no_grad():
        al.gates.normal_()
    return al


def form_the_pattern(pattern: torch.Tensor, hook) -> None:
    """A hook that only reads hook_pattern: the layer then forms A as the equations do."""


def logits_and_grads(model, al: Aligner, ids: torch.Tensor, formed: bool) -> tuple[torch.Tensor, ...]:
    al.zero_grad()
    hooks = [(lambda name: name.endswith("aligner.hook_pattern"), form_the_pattern)] if formed else []
    with al.attached(model), model.hooks(fwd_hooks=hooks):
        logits = model(ids)
    logits.logsumexp(-1).mean().backward()
    return logits.detach(), al.tokens.grad.clone(), al.gates.grad.clone()


@pytest.mark.parametrize("n_tokens", [1, 3])
@pytest.mark.parametrize("shared", [True, False])
def test_fused_attention_equals_the_formed_pattern_forward_and_backward(tiny, n_tokens, shared):
    tiny.requires_grad_(False)
    al = random_aligner(tiny, n_tokens=n_tokens, start_layer=1, shared=shared)
    ids = torch.randint(0, 1000, (2, 9))
    fast = logits_and_grads(tiny, al, ids, formed=False)
    formed = logits_and_grads(tiny, al, ids, formed=True)
    for got, want in zip(fast, formed):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert fast[2].abs().sum() > 0


@pytest.mark.parametrize("n_tokens", [1, 3])
@pytest.mark.parametrize("attention_bias", [False, True])
def test_one_product_for_every_layer_equals_each_layer_projecting_its_own(monkeypatch, n_tokens, attention_bias):
    """The prefix of every adapted layer projected in one product against the stacked key/value weights (a small
    model) gives what each layer's own projection gives (a model over STACKED_PREFIX_BYTES), forward and
    backward; the stacked forward calls no projection module. With one slot a hook on one layer's hook_k makes
    that layer's K_p, and only that one, join the product."""
    model = aligner.tiny_model(attention_bias=attention_bias).requires_grad_(False)
    if attention_bias:  # HF initialises biases at zero; make them matter
        with torch.no_grad():
            for name, p in model.original_model.named_parameters():
                if name.endswith("bias"):
                    p.normal_()
    al = random_aligner(model, n_tokens=n_tokens, start_layer=1)
    ids = torch.randint(0, 1000, (2, 7))
    keys = []
    read_keys = [("blocks.2.aligner.hook_k", lambda k, hook: keys.append(k.detach()))]
    calls = []
    projections = [model.blocks[layer].attn.v.original_component for layer in al.layer_indices]
    # The model's own values come from (B, T, d_model) inputs; the aligner's tokens are (N, d_model).
    handles = [p.register_forward_hook(lambda m, args, out: calls.append(args[0].dim() == 2)) for p in projections]

    def run():
        al.zero_grad()
        calls.clear()
        with al.attached(model), model.hooks(fwd_hooks=read_keys):
            stacked = al._stacked
            logits = model(ids)
        logits.logsumexp(-1).mean().backward()
        return stacked, sum(calls), logits.detach(), al.tokens.grad.clone(), al.gates.grad.clone()

    stacked, called, *one_product = run()
    assert stacked and called == 0
    monkeypatch.setattr(aligner.layer, "STACKED_PREFIX_BYTES", 0)
    stacked, called, *per_layer = run()
    assert not stacked and called == len(projections)
    for handle in handles:
        handle.remove()
    for got, want in zip(one_product, per_layer):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert len(keys) == 2
    torch.testing.assert_close(keys[0], keys[1], atol=1e-6, rtol=1e-6)


def test_fixed_prefix_computes_keys_once_and_changes_nothing(tiny):
    al = random_aligner(tiny, n_tokens=3, start_layer=1)
    first, second = torch.randint(0, 1000, (2, 6)), torch.randint(0, 1000, (2, 4))
    seen = []
    count_keys = [("blocks.2.aligner.hook_k", lambda k, hook: seen.append(k))]
    with al.attached(tiny), torch.no_grad():
        want = [tiny(first), tiny(second)]
        seen.clear()
        with al.fixed_prefix(), tiny.hooks(fwd_hooks=count_keys):
            got = [tiny(first), tiny(second)]
        assert len(seen) == 1 and not al._prefix  # computed at the first forward, dropped on exit
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=0, rtol=0)
    with al.attached(tiny), al.fixed_prefix():  # under autograd a graph is used once: nothing is kept
        tiny(first).sum().backward()
        assert not al._prefix


def test_generation_with_the_kept_prefix_equals_recomputing_everything(tiny):
    """Greedy answers through the KV cache and the kept prefix equal an argmax loop that reruns the whole
    sequence, aligner and all, at every step."""
    al = random_aligner(tiny, n_tokens=3, start_layer=1)
    expected = []
    with al.attached(tiny), torch.no_grad():
        for prompt in PROMPTS:
            ids, new = prompt_ids(tiny.tokenizer, prompt), []
            for _ in range(6):
                token = int(tiny(torch.tensor([ids + new]))[0, -1].argmax())
                if token == end_of_turn_id(tiny.tokenizer):
                    break
                new.append(token)
            expected.append(new)
    texts = aligner.generate(tiny, PROMPTS, al, max_new_tokens=6)
    assert texts == tiny.tokenizer.batch_decode(expected, skip_special_tokens=True)


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("attention_bias", [False, True])
def test_merged_one_token_aligner_equals_the_attached_one(shared, attention_bias):
    model = aligner.tiny_model(attention_bias=attention_bias)
    if attention_bias:  # HF initialises biases at zero; make them matter
        with torch.no_grad():
            for name, p in model.original_model.named_parameters():
                if name.endswith("bias"):
                    p.normal_()
    al = random_aligner(model, n_tokens=1, start_layer=1, shared=shared)
    ids = torch.randint(0, 1000, (2, 7))
    with torch.no_grad():
        base = model(ids)
        with al.attached(model):
            attached = model(ids)
        al.merge_into(model)
        merged = model(ids)
        al.unmerge()
        after = model(ids)
    assert (attached - base).abs().max() > 1e-2
    torch.testing.assert_close(merged, attached, atol=1e-5, rtol=1e-5)
    assert torch.equal(after, base)


def test_unmerge_gives_back_the_very_biases(tiny):
    fingerprint = aligner.model_fingerprint(tiny)
    o_proj = tiny.blocks[1].attn.o.original_component
    assert o_proj.bias is None
    al = random_aligner(tiny, n_tokens=1, start_layer=1)
    al.merge_into(tiny)
    assert o_proj.bias is not None and not o_proj.bias.requires_grad
    with pytest.raises(RuntimeError, match="already merged"):
        al.merge_into(tiny)
    with pytest.raises(RuntimeError, match="already has an aligner merged"):
        random_aligner(tiny, n_tokens=1).merge_into(tiny)
    al.unmerge()
    assert o_proj.bias is None and aligner.model_fingerprint(tiny) == fingerprint
    al.merge_into(tiny)  # and it merges again
    al.unmerge()


def test_only_one_token_merges(tiny):
    with pytest.raises(ValueError, match="one token"):
        random_aligner(tiny, n_tokens=2).merge_into(tiny)


@pytest.mark.parametrize("n_tokens", [1, 10])
def test_a_forward_reads_no_module_attribute_by_name_per_layer_but_the_stacked_weights(tiny, monkeypatch, n_tokens):
    """nn.Module.__getattr__ is Python work at each read, at every layer of every forward: the aligner reads its
    hook points from tuples, and by name only each adapted layer's W_K and W_V, once, for the stacked product
    (benchmarks/RESULTS.md, "Hook points read from a tuple"). A count, not a time: an aligner of 3 adapted layers
    against one of 1."""
    ids = torch.randint(0, 1000, (2, 5))
    lookup, count = torch.nn.Module.__getattr__, [0]

    def counted(module, name):
        count[0] += 1
        return lookup(module, name)

    def lookups(start_layer: int) -> int:
        with random_aligner(tiny, n_tokens=n_tokens, start_layer=start_layer).attached(tiny), torch.no_grad():
            tiny(ids)  # the first forward after attaching
            count[0] = 0
            with monkeypatch.context() as patch:
                patch.setattr(torch.nn.Module, "__getattr__", counted)
                tiny(ids)
        return count[0]

    weights_per_layer = 2 if n_tokens > 1 else 1  # W_K and W_V; one slot reads no keys
    assert lookups(start_layer=1) - lookups(start_layer=3) == 2 * weights_per_layer
