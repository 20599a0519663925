"""The aligner on a plain transformers model (through its attention interface) computes what it computes on the
TransformerBridge: logits and gradients on Llama (grouped-query attention), Gemma 3 (sliding windows, key norm,
query_pre_attn_scalar), Qwen 3 and OLMo 2, shared and unshared, one slot and several, and token by token through
the KV cache; it equals peft's AdaptionPrompt where that is the same method; attaching leaves the model as it was;
and a model whose attention it cannot join is refused by name."""

import copy

import pytest
import torch
from peft import AdaptionPromptConfig, get_peft_model
from test_gemma import VOCAB, random_model, tiny_gemma2, tiny_hunyuan
from transformers import BioGptConfig, BioGptForCausalLM, GPT2Config, GPT2LMHeadModel

import aligner
from aligner import Aligner, AlignerConfig, TrainConfig, load_adapter, train_sft
from aligner.data import Example
from aligner.lens import plain_model
from aligner.methods import LoRA, LoRAConfig, ZBias, ZBiasConfig

pytestmark = pytest.mark.usefixtures("one_thread")

ARCHITECTURES = ("llama", "gemma3", "qwen3", "olmo2")


@pytest.fixture(scope="module")
def bridges():
    """A bridge of each architecture, built once; each test unwraps its transformers model for a while."""
    models = {"llama": aligner.tiny_model().requires_grad_(False)}
    for architecture in ARCHITECTURES[1:]:
        models[architecture] = aligner.from_hf(random_model(architecture), None).requires_grad_(False)
    return models


def random_aligner(model: torch.nn.Module, **config) -> Aligner:
    torch.manual_seed(0)
    al = Aligner.for_model(model, AlignerConfig(**config))
    with torch.no_grad():
        al.gates.normal_()
    return al


def logits_and_grads(model: torch.nn.Module, al: Aligner, ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The logits of `model` (a bridge or a transformers model) with `al` attached, and the gradients of a loss
    on them with respect to the aligner's tokens and gates."""
    al.zero_grad()
    with al.attached(model):
        out = model(ids)
    logits = getattr(out, "logits", out)
    logits.logsumexp(-1).mean().backward()
    return logits.detach(), al.tokens.grad.clone(), al.gates.grad.clone()


def test_the_unwrapped_model_gives_the_bridges_logits_and_the_bridge_comes_back(tiny):
    ids = torch.randint(0, 1000, (2, 9))
    with torch.no_grad():
        want = tiny(ids)
        with plain_model(tiny) as hf:
            assert type(hf.model.layers[0].self_attn).__name__ == "LlamaAttention"
            assert type(hf.model.layers[0].self_attn.k_proj) is torch.nn.Linear
            plain = hf(ids).logits
        after = tiny(ids)
    torch.testing.assert_close(plain, want, atol=1e-5, rtol=1e-5)
    assert torch.equal(after, want)
    assert type(tiny.original_model.model.layers[0].self_attn).__name__ == "PositionEmbeddingsAttentionBridge"


@pytest.mark.parametrize("n_tokens", [1, 3])
@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_plain_model_gives_the_bridges_logits_and_gradients(bridges, architecture, shared, n_tokens):
    bridge = bridges[architecture]
    al = random_aligner(bridge, n_tokens=n_tokens, start_layer=1, shared=shared)
    ids = torch.randint(0, min(VOCAB, bridge.cfg.d_vocab), (2, 9))  # longer than Gemma's sliding window of 4
    want = logits_and_grads(bridge, al, ids)
    with plain_model(bridge) as hf:
        got = logits_and_grads(hf, al, ids)
        with torch.no_grad():
            base = hf(ids).logits
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
    assert (got[0] - base).abs().max() > 1e-3  # the aligner changes the output
    assert got[2].abs().sum() > 0


@pytest.mark.parametrize("n_tokens", [1, 3])
@pytest.mark.parametrize("architecture", ["llama", "gemma3"])
def test_cached_generation_token_by_token_gives_the_bridges_logits(bridges, architecture, n_tokens):
    """The plain model decoding one token at a time through its KV cache, with the prefix kept (fixed_prefix),
    gives at each position the bridge's logits over the whole sequence."""
    bridge = bridges[architecture]
    al = random_aligner(bridge, n_tokens=n_tokens, start_layer=1)
    ids = torch.randint(0, min(VOCAB, bridge.cfg.d_vocab), (2, 10))
    prompt = 3
    with torch.no_grad():
        with al.attached(bridge):
            want = bridge(ids)
        with plain_model(bridge) as hf, al.attached(hf), al.fixed_prefix():
            out = hf(ids[:, :prompt], use_cache=True)
            steps, cache = [out.logits], out.past_key_values
            for t in range(prompt, ids.shape[1]):
                out = hf(ids[:, t : t + 1], past_key_values=cache, use_cache=True)
                steps.append(out.logits)
                cache = out.past_key_values
            assert al._prefix  # kept across the steps
    torch.testing.assert_close(torch.cat(steps, dim=1), want, atol=1e-5, rtol=1e-5)


def test_generate_on_the_plain_model_equals_generate_on_the_bridge(tiny):
    """`generate` runs the plain model by default; with the bridge's hooks in play (a gate scale) it runs the
    bridge: the same answers."""
    al = random_aligner(tiny, n_tokens=3, start_layer=1)
    prompts = ["Hi", "What is the capital of France?"]
    plain = aligner.generate(tiny, prompts, al, max_new_tokens=6)
    with al.attached(tiny):  # attached to the bridge: generate keeps it there
        bridged = aligner.generate(tiny, prompts, al, max_new_tokens=6)
    assert plain == bridged


def test_unshared_with_one_gate_per_layer_equals_peft_adaption_prompt(tiny):
    """LLaMA-Adapter as peft computes it (AdaptionPrompt: a prefix per layer and one gate per layer) is the
    unshared aligner with each layer's gate given to all its heads."""
    start_layer, n_tokens = 1, 3
    al = random_aligner(tiny, n_tokens=n_tokens, start_layer=start_layer, shared=False)
    with plain_model(tiny) as hf:
        peft_model = get_peft_model(
            copy.deepcopy(hf),
            AdaptionPromptConfig(adapter_len=n_tokens, adapter_layers=tiny.cfg.n_layers - start_layer, task_type="CAUSAL_LM"),
        )
        adapted = [m for m in peft_model.modules() if type(m).__name__ == "AdaptedAttention"]
        assert len(adapted) == al.gates.shape[0]
        with torch.no_grad():
            for i, module in enumerate(adapted):
                module.adaption_prompt.copy_(al.tokens[i].unsqueeze(0))
                module.adaption_gate.fill_(0.5 + i)
                al.gates[i].fill_(0.5 + i)
        ids = torch.randint(0, 1000, (2, 9))
        with torch.no_grad():
            base = hf(ids).logits
            with al.attached(hf):
                ours = hf(ids).logits
            theirs = peft_model(input_ids=ids).logits
    assert (ours - base).abs().max() > 1e-3
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_detach_restores_the_model_and_two_models_do_not_meet(bridges):
    llama, gemma = bridges["llama"], bridges["gemma3"]
    al_llama = random_aligner(llama, n_tokens=3, start_layer=1)
    al_gemma = random_aligner(gemma, n_tokens=2, start_layer=0)
    ids_llama, ids_gemma = torch.randint(0, 1000, (1, 6)), torch.randint(0, VOCAB, (1, 6))
    with torch.no_grad():
        with al_llama.attached(llama):
            want_llama = llama(ids_llama)
        with al_gemma.attached(gemma):
            want_gemma = gemma(ids_gemma)
        with plain_model(llama) as hf_llama, plain_model(gemma) as hf_gemma:
            before = {
                name: (hf.config._attn_implementation, {n for n, _ in hf.named_modules()}, hf.state_dict().keys())
                for name, hf in (("llama", hf_llama), ("gemma", hf_gemma))
            }
            base_llama = hf_llama(ids_llama).logits
            with al_llama.attached(hf_llama), al_gemma.attached(hf_gemma):
                torch.testing.assert_close(hf_gemma(ids_gemma).logits, want_gemma, atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(hf_llama(ids_llama).logits, want_llama, atol=1e-5, rtol=1e-5)
                with pytest.raises(RuntimeError, match="already has an aligner"):
                    random_aligner(llama, n_tokens=1).attach(hf_llama)
            after = {
                name: (hf.config._attn_implementation, {n for n, _ in hf.named_modules()}, hf.state_dict().keys())
                for name, hf in (("llama", hf_llama), ("gemma", hf_gemma))
            }
            assert after == before
            assert not any(hasattr(m, "aligner_slot") for m in hf_llama.modules())
            assert torch.equal(hf_llama(ids_llama).logits, base_llama)


def test_one_file_serves_the_bridge_and_the_plain_model(tiny, tmp_path):
    al = random_aligner(tiny, n_tokens=2, start_layer=2)
    loaded = load_adapter(al.save(tmp_path))
    ids = torch.randint(0, 1000, (2, 7))
    with torch.no_grad():
        with al.attached(tiny):
            want = tiny(ids)
        with plain_model(tiny) as hf, loaded.attached(hf):
            got = hf(ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (tiny_gemma2, r"model\.layers\.0\.self_attn: attention scores soft-capped"),
        (tiny_hunyuan, r"model\.layers\.0\.self_attn: queries and keys are normed after rotary \(query_layernorm"),
        (
            lambda: GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=32)),
            r"GPT2LMHeadModel: its decoder has no `layers`",
        ),
        (
            lambda: BioGptForCausalLM(
                BioGptConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96)
            ),
            r"BioGptForCausalLM: its attention does not go through transformers' attention interface",
        ),
    ],
    ids=["gemma2", "hunyuan", "gpt2", "biogpt"],
)
def test_a_plain_model_the_aligner_cannot_join_is_refused_by_name(make, message):
    hf = make().eval()
    config = AlignerConfig(n_tokens=2, start_layer=0)
    al = Aligner(config, aligner.adapter.shape_of(hf))
    implementation = hf.config._attn_implementation
    with pytest.raises((NotImplementedError, ValueError), match=message), al.attached(hf):
        pass
    assert hf.config._attn_implementation == implementation and al.attached_to is None


def test_the_bridges_own_modules_and_hooks_only_kinds_are_refused_on_a_transformers_model(tiny):
    al = random_aligner(tiny, n_tokens=2, start_layer=1)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.\S*self_attn: a TransformerBridge component"):
        al.attach(tiny.original_model)
    z_bias = ZBias.for_model(tiny, ZBiasConfig(start_layer=1))
    with plain_model(tiny) as hf, pytest.raises(TypeError, match="a z-bias hooks into a TransformerBridge"):
        z_bias.attach(hf)


def test_lora_on_the_plain_model_gives_the_bridges_logits_and_trains_the_same(tiny):
    """peft's LoRA layer in place of the plain model's projections computes what it computes inside the bridge's
    components, and training (on the plain model by default) gives the same matrices as on the bridge."""
    torch.manual_seed(0)
    lora = LoRA.for_model(tiny, LoRAConfig(r=4, targets=("q", "v", "o")))
    with torch.no_grad():
        for linear in lora.lora_B.values():
            linear.weight.normal_(std=0.1)
    ids = torch.randint(0, 1000, (2, 9))
    with torch.no_grad():
        base = tiny(ids)
        with lora.attached(tiny):
            want = tiny(ids)
        with plain_model(tiny) as hf:
            with lora.attached(hf):
                got = hf(ids).logits
            assert type(hf.model.layers[0].self_attn.q_proj) is torch.nn.Linear  # given back
    assert (want - base).abs().max() > 1e-3
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    examples = [Example(f"What is {i} + {i}?", "Bananas are yellow.") for i in range(4)]
    config = TrainConfig(steps=3, batch_size=2, lr=0.01, warmup_steps=1)
    trained = []
    for hooks in ([], [("blocks.0.hook_resid_pre", lambda resid, hook: None)]):  # a hook keeps it on the bridge
        torch.manual_seed(0)
        with tiny.hooks(fwd_hooks=hooks):
            trained.append(train_sft(tiny, examples, config, adapter=LoRA.for_model(tiny, LoRAConfig(r=4))))
    for got, want in zip(*(t.state_dict().values() for t in trained)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("checkpointed", [False, True])
def test_train_sft_runs_the_plain_model_and_trains_what_the_bridge_trains(tiny, checkpointed):
    """Training runs the plain model by default (its own attention modules run); a hook on the bridge keeps it
    on the bridge. Both train the same tensors."""
    examples = [Example(f"What is {i} + {i}?", "Bananas are yellow.") for i in range(4)]
    config = TrainConfig(steps=3, batch_size=2, lr=0.1, warmup_steps=1, gradient_checkpointing=checkpointed)
    runs = []
    with plain_model(tiny) as hf:
        attention = hf.model.layers[1].self_attn  # the bridge computes its attention without calling this module
    handle = attention.register_forward_hook(lambda module, args, out: runs.append(1))
    plain = train_sft(tiny, examples, config, adapter=random_aligner(tiny, n_tokens=2, start_layer=1))
    assert runs
    runs.clear()
    with tiny.hooks(fwd_hooks=[("blocks.0.hook_resid_pre", lambda resid, hook: None)]):
        bridged = train_sft(tiny, examples, config, adapter=random_aligner(tiny, n_tokens=2, start_layer=1))
    handle.remove()
    assert not runs
    for got, want in zip(plain.state_dict().values(), bridged.state_dict().values()):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_a_copy_of_an_attached_model_says_that_no_aligner_is_attached_to_it(tiny):
    al = random_aligner(tiny, n_tokens=2, start_layer=1)
    with plain_model(tiny) as hf:
        copy_config = copy.deepcopy(hf.config)
        with al.attached(hf):
            copy_config._attn_implementation = hf.config._attn_implementation
        other = type(hf)(copy_config).eval()  # its config names the aligner's attention, its modules hold none
    with pytest.raises(RuntimeError, match=r"LlamaAttention \(layer 0\): its config names 'aligner_sdpa'"):
        other(torch.randint(0, 1000, (1, 4)))


@pytest.mark.slow
def test_smollm2_on_the_plain_model_gives_the_bridges_logits_and_answers(smollm2):
    """On SmolLM2's real weights the plain model's SDPA and the bridge's eager attention differ in float32 rounding
    alone: the aligned logits agree to 1e-3 (of logits near 20), and greedy answers are the same words."""
    al = random_aligner(smollm2, n_tokens=10)
    with torch.no_grad():
        al.gates.mul_(0.1)
        ids = smollm2.to_tokens("The capital of France is")
        with al.attached(smollm2):
            want = smollm2(ids)
        with plain_model(smollm2) as hf, al.attached(hf):
            got = hf(ids).logits
    torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-4)
    prompts = ["What is the capital of France?", "Name three colours."]
    plain = aligner.generate(smollm2, prompts, al, max_new_tokens=12)
    with al.attached(smollm2):  # attached to the bridge: generate keeps it there
        bridged = aligner.generate(smollm2, prompts, al, max_new_tokens=12)
    assert plain == bridged


def test_a_model_the_plain_path_refuses_runs_on_the_bridge_with_a_warning(tiny, monkeypatch):
    """An architecture the bridge supports but whose attention is outside transformers' interface is trained and
    answered on the bridge, saying so, rather than refused."""
    al = random_aligner(tiny, n_tokens=3, start_layer=1)
    prompts = ["Hi", "What is the capital of France?"]
    want = aligner.generate(tiny, prompts, al, max_new_tokens=5)
    monkeypatch.setattr(type(tiny.original_model), "_supports_attention_backend", False)
    with pytest.warns(UserWarning, match="its attention does not go through transformers' attention interface.*on the bridge"):
        got = aligner.generate(tiny, prompts, al, max_new_tokens=5)
    assert got == want
    assert type(tiny.original_model.model.layers[0].self_attn).__name__ == "PositionEmbeddingsAttentionBridge"
