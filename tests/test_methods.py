"""The methods the suite compares, on the tiny model: the Adapter base, attaching and detaching without a
trace, a one-token aligner as a constant bias, peft's LoRA and prompt tuning through the bridge, steering
vectors, files, and training any method with train_sft."""

import json
from dataclasses import replace

import pytest
import torch

import aligner
from aligner import Aligner, AlignerConfig, TrainConfig, train_sft
from aligner.adapter import Adapter, load_adapter
from aligner.baselines import contrastive_vectors
from aligner.data import Example
from aligner.methods import (
    LoRA,
    LoRAConfig,
    PromptTuning,
    PromptTuningConfig,
    SteeringConfig,
    SteeringVector,
    ZBias,
    ZBiasConfig,
    one_token_aligner_as_bias,
    placeholder_for,
    placeholder_problem,
)
from aligner.objective import formatted_for, heldout_loss, prompts_for
from aligner.tasks import Item

PROMPTS = ["Hi", "What is the capital of France, and why is it there?", "Tell me a joke."]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return aligner.tiny_model(attention_bias=True)  # b_V matters in the one-token equivalence


def logits(model, prompts=PROMPTS, method=None) -> torch.Tensor:
    from aligner.chat import prompt_ids

    ids = [prompt_ids(model.tokenizer, p) for p in prompts_for(method, prompts)]
    length = max(map(len, ids))
    pad = model.tokenizer.pad_token_id
    batch = torch.tensor([i + [pad] * (length - len(i)) for i in ids])  # right-padded: causal, no mask needed
    with torch.no_grad():
        return model(batch)


def randomised(method):
    torch.manual_seed(1)
    with torch.no_grad():
        for p in method.parameters():
            p.normal_(0, 0.3)
    return method


def make(kind, model):
    torch.manual_seed(0)
    return {
        "aligner": lambda: Aligner.for_model(model),
        "adapter": lambda: Aligner.for_model(model, AlignerConfig(n_tokens=2, shared=False)),
        "lora": lambda: LoRA.for_model(model, LoRAConfig(r=2, alpha=2.0)),
        "prompt": lambda: PromptTuning.for_model(model, PromptTuningConfig(3)),
        "zbias": lambda: ZBias.for_model(model, ZBiasConfig()),
    }[kind]()


KINDS = ["aligner", "adapter", "lora", "prompt", "zbias"]


@pytest.mark.parametrize("kind", KINDS)
def test_every_method_fits_the_protocol_and_counts_its_trainable_parameters(model, kind):
    method = make(kind, model)
    assert isinstance(method, Adapter)
    assert method.num_parameters() == sum(p.numel() for p in method.parameters()) > 0
    base_names = {id(p) for p in model.parameters()}
    assert not any(id(p) in base_names for p in method.parameters())  # never a base weight


def test_parameter_counts_match_the_formulas(model):
    d, layers, heads, kv = 64, 4, 4, 2 * 16  # tiny: d_model 64, 4 layers, 4 heads of 16, 2 key/value heads
    assert make("lora", model).num_parameters() == layers * 2 * ((d + d) + (d + kv))  # r=2 on q and v
    assert make("zbias", model).num_parameters() == (layers - 2) * d
    assert make("prompt", model).num_parameters() == 3 * d
    assert make("aligner", model).num_parameters() == d + (layers - 2) * heads


@pytest.mark.parametrize("kind", ["lora", "zbias"])
def test_untrained_lora_and_bias_change_nothing(model, kind):
    method = make(kind, model)
    base = logits(model)
    with method.attached(model):
        torch.testing.assert_close(logits(model), base, rtol=0, atol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_attached_methods_change_the_logits_and_detaching_leaves_no_trace(model, kind):
    fingerprint = aligner.model_fingerprint(model)
    before = logits(model)
    method = randomised(make(kind, model))
    unchanged = logits(model, method=method)  # prompt tuning's placeholders, read as plain tokens
    with method.attached(model):
        changed = logits(model, method=method)
    assert not torch.allclose(changed, unchanged, atol=1e-4)
    torch.testing.assert_close(logits(model), before, rtol=0, atol=0)
    assert aligner.model_fingerprint(model) == fingerprint
    assert not any("lora" in name for name, _ in model.named_modules())


def test_a_one_token_aligner_is_a_constant_bias_on_each_heads_output(model):
    """N = 1: the prefix softmax has one slot, so the aligner adds g[l, h] * (W_V P + b_V) at every position."""
    al = randomised(Aligner.for_model(model))
    bias = one_token_aligner_as_bias(al, model)
    with al.attached(model):
        by_aligner = logits(model)
    with bias.attached(model):
        by_bias = logits(model)
    assert not torch.allclose(by_aligner, logits(model), atol=1e-3)  # it does something
    torch.testing.assert_close(by_bias, by_aligner, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="N=2"):
        one_token_aligner_as_bias(Aligner.for_model(model, AlignerConfig(n_tokens=2)), model)


def test_two_tokens_are_not_a_constant(model):
    """With N >= 2 the softmax over prefix slots depends on the query: no constant bias reproduces it."""
    al = randomised(Aligner.for_model(model, AlignerConfig(n_tokens=2)))
    contributions = []
    with al.attached(model), model.hooks(fwd_hooks=[("blocks.2.aligner.hook_z", lambda z, hook: contributions.append(z))]):
        logits(model, prompts=PROMPTS[1:2])
    z = contributions[0][0]  # (T, H, d_head)
    assert not torch.allclose(z[1:], z[:1].expand_as(z[1:]), atol=1e-4)


def test_lora_goes_through_peft_and_leaves_the_linear_components_as_they_were(model):
    from peft.tuners.lora import Linear as PeftLoraLinear

    originals = [block.attn.q.original_component for block in model.blocks]
    lora = randomised(make("lora", model))
    with lora.attached(model):
        assert all(isinstance(block.attn.q.original_component, PeftLoraLinear) for block in model.blocks)
        assert isinstance(model.blocks[0].attn.k.original_component, torch.nn.Linear)  # not a target
    assert [block.attn.q.original_component for block in model.blocks] == originals


def test_prompt_tuning_answers_batched_as_one_at_a_time(model):
    """Its virtual tokens ride on placeholder tokens, so left padding and the KV cache are the bridge's own."""
    prompt = randomised(make("prompt", model))
    from aligner.generation import answer

    batched = answer(model, prompt, PROMPTS, None, max_new_tokens=5, batch_size=3)
    alone = [answer(model, prompt, [p], None, max_new_tokens=5, batch_size=1)[0] for p in PROMPTS]
    assert batched == alone
    assert prompts_for(prompt, ["Hi"]) == ["<|endoftext|>" * 3 + "Hi"]


def test_prompt_tuning_refuses_a_prompt_without_its_placeholders_or_with_them_twice(model):
    """Without its placeholders the method would read nothing and learn nothing, silently; twice, it would read
    its tokens twice over."""
    from aligner.chat import prompt_ids

    prompt = make("prompt", model)  # 3 virtual tokens
    once, twice = prompts_for(prompt, ["Hi", "Hey"]), prompts_for(prompt, prompts_for(prompt, ["Hi"]))
    with prompt.attached(model):
        model(torch.tensor([prompt_ids(model.tokenizer, p) for p in once]))  # 3 each: read
        unformatted = r"reads 3 placeholder tokens '<\|endoftext\|>' .*; row 0 of the input holds 0\."
        with pytest.raises(ValueError, match=unformatted):
            model(torch.tensor([prompt_ids(model.tokenizer, "Hi")]))
        with pytest.raises(ValueError, match=r"row 0 of the input holds 6\. Format each prompt once with"):
            model(torch.tensor([prompt_ids(model.tokenizer, twice[0])]))


def with_tokenizer(**special_tokens):
    """The tiny model with a copy of its tokenizer whose special tokens are reassigned (None: the role unset)."""
    import copy

    model = aligner.tiny_model()
    model.tokenizer = copy.deepcopy(model.tokenizer)
    for role, token in special_tokens.items():
        setattr(model.tokenizer, role, token)
    return model


def test_prompt_tuning_placeholder_is_a_special_token_nothing_else_puts_in_a_prompt(model):
    """SmolLM2's unknown token, `<|endoftext|>`; where padding or the end of a sequence is that token, the next
    special token the chat template does not write; where there is none, an error that says what to do."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    assert placeholder_for(model.tokenizer) == "<|endoftext|>"
    padded = with_tokenizer(pad_token="<|endoftext|>", unk_token=None).tokenizer
    assert placeholder_problem(padded, "<|endoftext|>") == "it is the tokenizer's pad token"
    assert placeholder_problem(padded, "<|im_start|>") == "it is the tokenizer's beginning-of-sequence token"
    assert placeholder_for(padded) == "<repo_name>"  # <|im_end|> ends SmolLM2's sequences and its turns
    assert placeholder_problem(model.tokenizer, "<|placeholder|>") == "it is 5 tokens of this tokenizer, not one"
    # GPT-2's way: one special token, which begins and ends every sequence
    word_level = Tokenizer(WordLevel({"<|endoftext|>": 0, "Hi": 1}, unk_token="<|endoftext|>"))
    gpt2_like = PreTrainedTokenizerFast(
        tokenizer_object=word_level, unk_token="<|endoftext|>", bos_token="<|endoftext|>", eos_token="<|endoftext|>"
    )
    with pytest.raises(ValueError, match=r"has no special token free to mark prompt tuning's slots.*placeholder=\.\.\."):
        placeholder_for(gpt2_like)


def test_prompt_tuning_counts_its_slots_from_each_rows_own_whatever_the_padding():
    """A model whose sequences end, and are padded, with `<|endoftext|>`: raw prompts end their answers with it,
    and generation left-pads with it. Were it the placeholder, a padded row would hold more slots than N and
    read the wrong virtual tokens; the placeholder is another token, and a batch answers as each prompt alone."""
    model = with_tokenizer(eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    prompt = randomised(PromptTuning.for_model(model, PromptTuningConfig(3)))
    assert prompt.config.placeholder == "<repo_name>"
    from aligner.generation import answer

    batched = answer(model, prompt, PROMPTS, None, max_new_tokens=5, batch_size=3, raw_prompts=True)
    alone = [answer(model, prompt, [p], None, max_new_tokens=5, batch_size=1, raw_prompts=True)[0] for p in PROMPTS]
    assert batched == alone
    # What the hook puts in: each row's slots, after its left padding, hold virtual tokens 0, 1, 2 in order.
    from aligner.chat import end_of_turn_id, prompt_ids

    ids = [prompt_ids(model.tokenizer, p, chat_template=False) for p in prompts_for(prompt, PROMPTS)]
    pad, length = end_of_turn_id(model.tokenizer, chat_template=False), max(map(len, ids))
    batch = torch.tensor([[pad] * (length - len(i)) + i for i in ids])
    with prompt.attached(model), torch.no_grad():
        _, cache = model.run_with_cache(batch, names_filter="hook_embed")
    slots = batch == model.tokenizer.convert_tokens_to_ids("<repo_name>")
    for row in range(len(PROMPTS)):
        torch.testing.assert_close(cache["hook_embed"][row, slots[row]], prompt.prompt.embedding.weight, rtol=0, atol=0)
    config = TrainConfig(steps=1, batch_size=3, chat_template=False)  # right-padded with <|endoftext|>, which ends each
    train_sft(model, [Example(p, "Yes.") for p in PROMPTS], config, adapter=prompt)


def test_prompt_tuning_files_of_the_method_json_layout_read_endoftext(model, tmp_path):
    prompt = make("prompt", model)
    prompt.save(tmp_path)
    meta = json.loads((tmp_path / "adapter.json").read_text())
    assert meta["config"] == {"n_tokens": 3, "placeholder": "<|endoftext|>"}
    # The layout before one format: method.json (no placeholder field, no tensors' sha256), method.safetensors.
    del meta["config"]["placeholder"], meta["tensors_sha256"]
    (tmp_path / "method.json").write_text(json.dumps({**meta, "format": "aligner-workbench/method/1"}))
    (tmp_path / "adapter.json").unlink()
    (tmp_path / "adapter.safetensors").rename(tmp_path / "method.safetensors")
    assert load_adapter(tmp_path).config == PromptTuningConfig(3, "<|endoftext|>")


def test_prompt_tuning_refuses_a_placeholder_that_padding_puts_in_prompts(model):
    prompt = PromptTuning.for_model(model, PromptTuningConfig(3, placeholder="<|im_end|>"))
    message = r"placeholder '<\|im_end\|>' cannot mark its slots on tiny-llama.*: it is the tokenizer's pad token"
    with pytest.raises(ValueError, match=message), prompt.attached(model):
        pass
    with pytest.raises(ValueError, match=r"no placeholder yet: make it with PromptTuning\.for_model"):
        PromptTuning(PromptTuningConfig(3), prompt.shape).format_prompt("Hi")


@pytest.mark.parametrize("kind", KINDS)
def test_saved_methods_load_back_equal(model, kind, tmp_path):
    method = randomised(make(kind, model))
    method.save(tmp_path / kind)
    loaded = load_adapter(tmp_path / kind)
    assert type(loaded) is type(method)
    for (name, a), (_, b) in zip(method.named_parameters(), loaded.named_parameters()):
        assert torch.equal(a, b), name
    with method.attached(model):
        expected = logits(model, method=method)
    with loaded.attached(model):
        torch.testing.assert_close(logits(model, method=loaded), expected, rtol=0, atol=0)


def test_steering_vector_is_the_contrastive_mean_difference(model):
    items = [Item(f"Question {i}?", "YES INDEED.", contrast="no, not at all") for i in range(3)]
    swapped = [Item(i.prompt, i.contrast, contrast=i.response) for i in items]
    forward, backward = contrastive_vectors(model, items, batch_size=4), contrastive_vectors(model, swapped, batch_size=2)
    torch.testing.assert_close(forward, -backward, rtol=1e-5, atol=1e-5)
    steering = SteeringVector.for_model(model, SteeringConfig(layer=1, multiplier=0.0))
    steering.vector.copy_(forward[1])
    assert steering.num_parameters() == 0  # nothing trained
    base = logits(model)
    with steering.attached(model):
        torch.testing.assert_close(logits(model), base, rtol=0, atol=0)
    steering.config = SteeringConfig(layer=1, multiplier=4.0)
    with steering.attached(model):
        assert not torch.allclose(logits(model), base, atol=1e-3)
    with pytest.raises(ValueError, match="contrast"):
        contrastive_vectors(model, [Item("Q?", "A")])


EXAMPLES = [Example(f"What is {i} + {i}?", "Bananas are yellow.") for i in range(8)]


@pytest.mark.parametrize("kind", ["lora", "prompt", "zbias", "adapter"])
def test_train_sft_trains_any_method_and_the_base_stays(model, kind):

    fingerprint = aligner.model_fingerprint(model)
    method = make(kind, model)
    # heldout_loss reads the prompts as given; train_sft formats them for the method (prompt tuning's placeholders)
    examples = formatted_for(method, EXAMPLES)
    with method.attached(model):
        before = heldout_loss(model, examples)
    config = TrainConfig(steps=10, batch_size=4, lr=0.02 if kind == "lora" else 0.1, warmup_steps=0)
    assert train_sft(model, EXAMPLES, config, adapter=method) is method
    with method.attached(model):
        after = heldout_loss(model, examples)
    assert after < before - 0.05, (before, after)
    assert aligner.model_fingerprint(model) == fingerprint
    assert all(not p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("kind", ["lora", "prompt", "zbias"])
def test_a_run_of_any_method_resumes_to_the_method_of_a_straight_run(model, tmp_path, kind):
    config = TrainConfig(steps=6, batch_size=2, grad_accum=2, save_every=2, lr=0.02, warmup_steps=0)
    straight = train_sft(model, EXAMPLES, config, run_dir=tmp_path / "straight", adapter=make(kind, model))
    train_sft(model, EXAMPLES, replace(config, steps=3), run_dir=tmp_path / "split", adapter=make(kind, model))
    fresh = randomised(make(kind, model))  # its own values are replaced by the checkpoint's
    resumed = train_sft(model, EXAMPLES, config, run_dir=tmp_path / "split", resume=True, adapter=fresh)
    assert resumed is fresh
    for (name, value), expected in zip(resumed.state_dict().items(), straight.state_dict().values()):
        assert torch.equal(value, expected), name
    saved = load_adapter(tmp_path / "split")
    assert type(saved) is type(straight) and saved.provenance["training"]["step"] == 6
    assert all(torch.equal(a, b) for a, b in zip(saved.state_dict().values(), straight.state_dict().values()))
    steps = [json.loads(line)["step"] for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [3, 6]  # log_every 10: the last step of each call


def test_resuming_a_run_of_one_method_with_another_is_refused(model, tmp_path):
    config = TrainConfig(steps=2, batch_size=2, lr=0.02, warmup_steps=0)
    train_sft(model, EXAMPLES, config, run_dir=tmp_path / "lora", adapter=make("lora", model))
    other_rank = LoRA.for_model(model, LoRAConfig(r=4, alpha=4.0))
    with pytest.raises(ValueError, match=r'the run holds lora \{"alpha": 2.0, "r": 2, .*\}, not the lora \{"alpha": 4'):
        train_sft(model, EXAMPLES, replace(config, steps=4), run_dir=tmp_path / "lora", resume=True, adapter=other_rank)
    # Without one, the run's own adapter is resumed.
    resumed = train_sft(model, EXAMPLES, replace(config, steps=4), run_dir=tmp_path / "lora", resume=True)
    assert isinstance(resumed, LoRA) and resumed.provenance["training"]["step"] == 4
    train_sft(model, EXAMPLES, config, run_dir=tmp_path / "aligner")
    zbias = make("zbias", model)
    message = r'aligner: the run holds aligner \{"n_tokens": 1, "shared": true, "start_layer": 2\}, not the z-bias \{"start'
    with pytest.raises(ValueError, match=message):
        train_sft(model, EXAMPLES, replace(config, steps=4), run_dir=tmp_path / "aligner", resume=True, adapter=zbias)


def test_an_aligner_keeps_two_tensors_in_its_state_after_a_forward(model):
    al = make("aligner", model)
    with al.attached(model):
        logits(model)
        assert set(al.state_dict()) == {"tokens", "gates"}


def test_on_step_ends_training_where_it_says(model):
    seen = []

    def stop_at_three(step, loss):
        seen.append(step)
        return step == 3

    al = train_sft(model, EXAMPLES, TrainConfig(steps=10, batch_size=4, warmup_steps=0), on_step=stop_at_three)
    assert seen == [1, 2, 3] and al.provenance["training"]["step"] == 3
