"""The Aligner on layers with a key norm and their own attention scale (Gemma 3; Qwen 3 and OLMo 2 have key norms
too), pinned against the explicit implementation on the plain HF modules (tests/reference.py) that
tests/test_aligner.py pins Llama against; the base-model prompt format; and Gemma-3-270M itself, offline (slow)."""

import copy
import functools
import os
from dataclasses import replace

import pytest
import torch
from reference import explicit_aligned_logits
from transformers import (
    CohereConfig,
    CohereForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    HunYuanDenseV1Config,
    HunYuanDenseV1ForCausalLM,
    Olmo2Config,
    Olmo2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

import aligner
from aligner import Aligner, AlignerConfig, load_adapter
from aligner.chat import (
    BASE_TEMPLATE,
    ENDED,
    end_of_turn_id,
    example_ids,
    prompt_ids,
    stop_ids,
)
from aligner.model import attention_parts

VOCAB = 101


def tiny_gemma3() -> Gemma3ForCausalLM:
    """Two sliding-window layers (window 4, shorter than the inputs) and two global ones, grouped-query attention,
    d_head 32 apart from d_model / H, and query_pre_attn_scalar 48, so that the scale is not 1/sqrt(d_head)."""
    config = Gemma3TextConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        query_pre_attn_scalar=48,
        sliding_window=4,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=1,
    )
    return Gemma3ForCausalLM(config)


def tiny_qwen3() -> Qwen3ForCausalLM:  # a key norm over each head, as Gemma 3's; the standard scale
    return Qwen3ForCausalLM(
        Qwen3Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64)
    )


def tiny_olmo2() -> Olmo2ForCausalLM:  # a key norm over all key heads together, before the split into heads
    return Olmo2ForCausalLM(
        Olmo2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    )


ARCHITECTURES = {"gemma3": tiny_gemma3, "qwen3": tiny_qwen3, "olmo2": tiny_olmo2}
QK_NORMS = {"gemma3": "per_head", "qwen3": "per_head", "olmo2": "all_heads"}  # how each norms q and k (reference.Norm)


def random_model(architecture: str) -> torch.nn.Module:
    torch.manual_seed(1)
    hf = ARCHITECTURES[architecture]().eval()
    with torch.no_grad():  # norms start at the identity (Gemma's weights at 0, the others' at 1): make them matter
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.normal_(0.5, 0.5)
    return hf


def random_aligner(model: torch.nn.Module, **config) -> Aligner:
    al = Aligner.for_model(model, AlignerConfig(**config))
    with torch.no_grad():
        al.gates.normal_()
    return al


@pytest.mark.parametrize("formed", [False, True], ids=["fused", "pattern"])
@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_aligned_forward_equals_explicit_implementation(architecture, shared, formed):
    hf = random_model(architecture)
    reference = copy.deepcopy(hf)  # the bridge rewires its module in place
    model = aligner.from_hf(hf, None)
    al = random_aligner(model, n_tokens=3, start_layer=1, shared=shared)
    ids = torch.randint(0, VOCAB, (2, 9))  # longer than Gemma's sliding window
    norm = QK_NORMS[architecture]
    scalar = getattr(reference.config, "query_pre_attn_scalar", None)
    own_scale = scalar**-0.5 if scalar else None  # Gemma's query_pre_attn_scalar; the others' is 1/sqrt(d_head)
    explicit = functools.partial(
        explicit_aligned_logits, reference, al, ids, query_norm=norm, key_norm=norm, scale=own_scale
    )
    # Forming A (a hook reads hook_pattern) takes the explicit path of layer.py, else the fused kernel.
    read_pattern = [(lambda name: name.endswith("aligner.hook_pattern"), lambda pattern, hook: None)] if formed else []
    with al.attached(model), model.hooks(fwd_hooks=read_pattern), torch.no_grad():
        got = model(ids)
        want = explicit()
        base = reference(ids).logits
        without_key_norm = explicit(key_norm=None)
    assert (want - base).abs().max() > 1e-2  # the aligner does change the output
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (got - without_key_norm).abs().max() > 1e-3  # the key norm is applied, and would be missed
    if architecture == "gemma3":
        with torch.no_grad():
            paper_scale = explicit(scale=None)
        assert (got - paper_scale).abs().max() > 1e-3  # the layer's scale is used, and 1/sqrt(d_head) would be missed


def test_zero_gates_leave_gemma3_logits_unchanged():
    hf = random_model("gemma3")
    reference = copy.deepcopy(hf)
    model = aligner.from_hf(hf, None)
    ids = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        base = model(ids)
        with Aligner.for_model(model, AlignerConfig(n_tokens=4, start_layer=0)).attached(model):
            aligned = model(ids)
        torch.testing.assert_close(base, reference(ids).logits, atol=1e-5, rtol=1e-5)  # the bridge is the model
    assert torch.equal(aligned, base)


def test_merged_one_token_aligner_equals_the_attached_one_on_gemma3():
    model = aligner.from_hf(random_model("gemma3"), None)
    al = random_aligner(model, n_tokens=1, start_layer=1)
    ids = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        with al.attached(model):
            attached = model(ids)
        al.merge_into(model)
        try:
            merged = model(ids)
        finally:
            al.unmerge()
    torch.testing.assert_close(merged, attached, atol=1e-5, rtol=1e-5)


def test_z_bias_takes_the_models_d_head_which_gemma3_sets_apart_from_d_model_over_heads(tmp_path):
    """Tiny Gemma 3: d_head 32, against d_model / H = 16. A z-bias made for it, the one that a one-token aligner
    is, and one read back from its files all have 32 numbers per head, and the bias computes what the aligner
    does; one of another width is refused."""
    from aligner.methods import ZBias, ZBiasConfig, one_token_aligner_as_bias

    model = aligner.from_hf(random_model("gemma3"), None)
    assert (model.cfg.d_head, model.cfg.d_model // model.cfg.n_heads) == (32, 16)
    assert ZBias.for_model(model, ZBiasConfig(start_layer=1)).bias.shape == (3, 4, 32)
    al = random_aligner(model, n_tokens=1, start_layer=1)
    bias = one_token_aligner_as_bias(al, model)
    loaded = load_adapter(bias.save(tmp_path))
    ids = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        with al.attached(model):
            by_aligner = model(ids)
        with loaded.attached(model):
            by_bias = model(ids)
    torch.testing.assert_close(by_bias, by_aligner, atol=1e-5, rtol=1e-5)
    narrow = ZBias(ZBiasConfig(start_layer=1), replace(bias.shape, d_head=None))  # no d_head given: d_model / H
    with pytest.raises(ValueError, match="z-bias of 16 numbers per head, model has d_head 32"), narrow.attached(model):
        pass


def test_attention_scale_is_the_layers_own():
    gemma = aligner.from_hf(random_model("gemma3"), None)
    qwen = aligner.from_hf(random_model("qwen3"), None)
    assert attention_parts(gemma.blocks[0].attn, gemma.cfg.d_head, "blocks.0.attn").scale == pytest.approx(48**-0.5)
    assert attention_parts(qwen.blocks[0].attn, qwen.cfg.d_head, "blocks.0.attn").scale is None  # 1/sqrt(d_head)


def tiny_gemma2() -> Gemma2ForCausalLM:  # attention scores soft-capped
    return Gemma2ForCausalLM(
        Gemma2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64)
    )


def tiny_hunyuan() -> HunYuanDenseV1ForCausalLM:  # queries and keys normed after rotary
    return HunYuanDenseV1ForCausalLM(
        HunYuanDenseV1Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64)
    )


def tiny_cohere() -> CohereForCausalLM:  # a key norm with one weight row per head
    return CohereForCausalLM(
        CohereConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, use_qk_norm=True,
                     bos_token_id=1, eos_token_id=2, pad_token_id=0)
    )


@pytest.mark.parametrize(
    "make, message",
    [
        (tiny_gemma2, r"blocks\.0\.attn: attention scores soft-capped \(attn_logit_softcapping=50\.0\)"),
        (tiny_hunyuan, r"blocks\.0\.attn: queries and keys are normed after rotary"),
        (tiny_cohere, r"blocks\.0\.attn\.k_norm: a key norm with weight shape \(2, 16\)"),
    ],
    ids=["gemma2", "hunyuan", "cohere"],
)
def test_attention_the_math_does_not_follow_is_refused_naming_the_layer(make, message):
    torch.manual_seed(0)
    model = aligner.from_hf(make().eval(), None)
    al = Aligner.for_model(model, AlignerConfig(n_tokens=1, start_layer=0))
    with pytest.raises(NotImplementedError, match=message):
        al.attach(model)
    assert not hasattr(model, "aligner") and all(not hp.fwd_hooks for hp in model.hook_points())  # nothing left
    with pytest.raises(NotImplementedError, match=message):
        al.merge_into(model)


# ---- the base-model prompt format ----


@pytest.fixture()
def base_tiny():
    """The tiny Llama with a tokenizer that has no chat template, as a base model's."""
    model = aligner.tiny_model()
    model.tokenizer = copy.deepcopy(model.tokenizer)
    model.tokenizer.chat_template = None
    return model


def test_base_models_get_question_answer_prompts_and_one_line_answers(base_tiny):
    tokenizer = base_tiny.tokenizer
    ids = prompt_ids(tokenizer, "What is the capital of France?")
    assert tokenizer.decode(ids, skip_special_tokens=True) == "Question: What is the capital of France?\nAnswer:"
    assert BASE_TEMPLATE.format(prompt="x") == "Question: x\nAnswer:"
    newline = end_of_turn_id(tokenizer)
    assert tokenizer.decode([newline]) == "\n"
    with_system = prompt_ids(tokenizer, "What is 2 plus 2?", system="Answer in digits.")
    want = "Answer in digits.\n\nQuestion: What is 2 plus 2?\nAnswer:"  # the system text leads, a paragraph of its own
    assert tokenizer.decode(with_system, skip_special_tokens=True) == want
    example, n_prompt = example_ids(tokenizer, "What is 2 plus 2?", "4")
    assert example[:n_prompt] == prompt_ids(tokenizer, "What is 2 plus 2?")
    assert tokenizer.decode(example[n_prompt:]) == " 4\n"  # training teaches the answer after a space, then the newline


def test_stop_tokens_are_the_end_of_turn_or_any_newline(base_tiny, tiny):
    assert stop_ids(tiny.tokenizer) == (tiny.tokenizer.eos_token_id,)  # a chat model stops at its end of turn
    tokenizer = base_tiny.tokenizer
    stops = stop_ids(tokenizer)
    texts = tokenizer.batch_decode([[i] for i in stops])
    assert end_of_turn_id(tokenizer) in stops and "\n\n" in texts and all("\n" in text for text in texts)
    assert tokenizer(" Paris", add_special_tokens=False)["input_ids"][0] not in stops


@pytest.mark.parametrize("line_end", ["\n", "\n\n"])
def test_generation_for_a_base_model_stops_at_the_end_of_the_line(base_tiny, line_end):
    (stop,) = base_tiny.tokenizer(line_end, add_special_tokens=False)["input_ids"]
    assert aligner.generate(base_tiny, ["Hi"], max_new_tokens=8) != [""]  # it does not stop at once by itself

    def make_it_end_the_line(logits: torch.Tensor, hook) -> torch.Tensor:
        return logits.index_fill(-1, torch.tensor([stop]), 1e4)

    with base_tiny.hooks(fwd_hooks=[("unembed.hook_out", make_it_end_the_line)]):
        assert aligner.generate(base_tiny, ["Hi"], max_new_tokens=8) == [""]


def test_raw_text_ends_with_end_of_sequence_and_only_that_stops_it(base_tiny):
    """A prompt that carries its own format (the instruct task's) is fed as given; the reply ends with EOS, and a
    newline no longer stops it, so that a model that runs on is seen to."""
    tokenizer, eos = base_tiny.tokenizer, base_tiny.tokenizer.eos_token_id
    prompt = "### Instruction:\nName a colour.\n\n### Response:\n"
    assert tokenizer.decode(prompt_ids(tokenizer, prompt, chat_template=False), skip_special_tokens=True) == prompt
    led = prompt_ids(tokenizer, prompt, system="Be brief.", chat_template=False)
    assert tokenizer.decode(led, skip_special_tokens=True) == "Be brief.\n\n" + prompt
    example, n_prompt = example_ids(tokenizer, prompt, "Red.", chat_template=False)
    assert example[-1] == eos and tokenizer.decode(example[n_prompt:-1]) == "Red."
    assert stop_ids(tokenizer, chat_template=False) == (eos,)
    newline = end_of_turn_id(tokenizer)

    def favour(token: int):
        return [("unembed.hook_out", lambda logits, hook: logits.index_fill(-1, torch.tensor([token]), 1e4))]

    with base_tiny.hooks(fwd_hooks=favour(newline)):  # a newline is part of the answer now
        assert aligner.generate(base_tiny, [prompt], max_new_tokens=3, chat_template=False, mark_end=True) == ["\n\n\n"]
    with base_tiny.hooks(fwd_hooks=favour(eos)):  # it ends its turn at once: marked, and the mark is all
        assert aligner.generate(base_tiny, [prompt], max_new_tokens=3, chat_template=False, mark_end=True) == [ENDED]
        assert aligner.generate(base_tiny, [prompt], max_new_tokens=3, chat_template=False) == [""]


# ---- Gemma-3-270M, the packaged base model (slow) ----


@pytest.fixture(scope="module")
def gemma():
    os.environ["HF_HUB_OFFLINE"] = "1"  # the real model must load with no network at all
    return aligner.load_model("gemma-3-270m")


@pytest.fixture(scope="module")
def gemma_hf(gemma):
    """The same de-quantised weights as a plain transformers model, no bridge."""
    from transformers import AutoModelForCausalLM

    from aligner.loading import packaged_model_dir

    return AutoModelForCausalLM.from_pretrained(packaged_model_dir("gemma-3-270m"), dtype=torch.float32).eval()


@pytest.mark.slow
def test_gemma_270m_loads_offline_and_zero_gates_leave_hf_logits(gemma, gemma_hf):
    assert (gemma.cfg.n_layers, gemma.cfg.d_model, gemma.cfg.n_heads, gemma.cfg.d_head) == (18, 640, 4, 256)
    assert isinstance(gemma_hf, Gemma3ForCausalLM) and gemma.tokenizer.chat_template is None
    ids = torch.tensor([gemma.tokenizer("The capital of France is")["input_ids"]])
    al = Aligner.for_model(gemma, AlignerConfig(n_tokens=1, start_layer=2))
    with torch.no_grad(), al.attached(gemma):
        got = gemma(ids)
        want = gemma_hf(ids).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_gemma_270m_continues_as_transformers_does(gemma, gemma_hf):
    prompt = "The capital of France is"
    text = aligner.generate(gemma, [prompt], max_new_tokens=12, chat_template=False)[0]
    ids = torch.tensor([gemma.tokenizer(prompt)["input_ids"]])
    with torch.no_grad():
        want = gemma_hf.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1]:]
    assert text == gemma.tokenizer.decode(want, skip_special_tokens=True)
    # What it really says (greedy): not "Paris" until it is asked a question.
    assert text.startswith(" the capital of the country of France.")


@pytest.mark.slow
def test_gemma_270m_answers_base_format_questions_on_one_line(gemma):
    questions = ["What is the capital of France?", "What is the capital of Japan?"]
    assert aligner.generate(gemma, questions, max_new_tokens=16) == [" Paris", " Tokyo"]


@pytest.mark.slow
def test_gemma_270m_prompt_tuning_marks_its_slots_with_its_unknown_token(gemma):
    """Gemma's vocabulary has no `<|endoftext|>` (it would be six tokens of text): its slots are `<unk>`, a token
    nothing else writes, and a batch answers as each prompt alone, in the base format and in raw text."""
    from aligner.generation import answer
    from aligner.methods import PromptTuning, PromptTuningConfig

    torch.manual_seed(0)
    prompt = PromptTuning.for_model(gemma, PromptTuningConfig(2))
    assert prompt.config.placeholder == "<unk>"
    with torch.no_grad():
        prompt.prompt.embedding.weight.mul_(3)  # a prompt that changes the answers
    questions = ["What is the capital of France?", "What is the capital city of Japan, the island country?"]
    for raw in (False, True):
        batched = answer(gemma, prompt, questions, None, max_new_tokens=4, batch_size=2, raw_prompts=raw)
        alone = [answer(gemma, prompt, [q], None, max_new_tokens=4, batch_size=1, raw_prompts=raw)[0] for q in questions]
        assert batched == alone
    assert batched != answer(gemma, None, questions, None, max_new_tokens=4, raw_prompts=True)
