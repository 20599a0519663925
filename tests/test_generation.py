"""`generate`: pinned against a plain argmax loop over the bridge's logits, batched against one prompt at a time,
and with the aligner's gates at zero, scaled, attached and detached."""

import pytest
import torch

import aligner
from aligner import Aligner
from aligner.chat import end_of_turn_id, prompt_ids

# Different lengths, so that left padding matters; "Hi" is the shortest by far without the chat template.
PROMPTS = ["Hi", "What is the capital of France, and why is it there?", "Tell me a joke about cats."]
N_NEW = 8


@pytest.fixture(scope="module")
def model():
    return aligner.tiny_model()


@pytest.fixture()
def nonzero(model) -> Aligner:
    """An aligner whose gates are random and non-zero, so that attaching it changes the model."""
    al = Aligner.for_model(model)
    torch.manual_seed(0)
    with torch.no_grad():
        al.gates.normal_()
    return al


def argmax_loop(model, prompt: str, chat_template: bool) -> list[int]:
    """The greedy answer written out: one prompt, no padding, no mask, the whole sequence every step."""
    ids = prompt_ids(model.tokenizer, prompt, chat_template=chat_template)
    new: list[int] = []
    with torch.no_grad():
        for _ in range(N_NEW):
            token = int(model(torch.tensor([ids + new]))[0, -1].argmax())
            if token == end_of_turn_id(model.tokenizer):
                break
            new.append(token)
    return new


def first_step_logits(model, prompts: list[str], **kwargs) -> torch.Tensor:
    """The logits `generate` reads for its first new token, caught at the unembedding's hook."""
    seen: list[torch.Tensor] = []
    with model.hooks(fwd_hooks=[("unembed.hook_out", lambda logits, hook: seen.append(logits[:, -1].clone()))]):
        aligner.generate(model, prompts, max_new_tokens=1, **kwargs)
    return seen[0]


@pytest.mark.parametrize("chat_template", [True, False])
def test_greedy_matches_an_argmax_loop(model, chat_template):
    expected = [argmax_loop(model, prompt, chat_template) for prompt in PROMPTS]
    assert any(expected), "the reference answered nothing; the comparison would be empty"
    texts = aligner.generate(model, PROMPTS, max_new_tokens=N_NEW, chat_template=chat_template)
    assert texts == model.tokenizer.batch_decode(expected, skip_special_tokens=True)


def test_batched_equals_one_prompt_at_a_time(model, nonzero):
    one_by_one = [aligner.generate(model, [prompt], nonzero, max_new_tokens=N_NEW)[0] for prompt in PROMPTS]
    assert aligner.generate(model, PROMPTS, nonzero, max_new_tokens=N_NEW) == one_by_one
    # Batches of two: a batch of one at the end, and the progress bar on.
    assert aligner.generate(model, PROMPTS, nonzero, max_new_tokens=N_NEW, batch_size=2) == one_by_one


def test_zero_gate_aligner_gives_the_base_text(model):
    base = aligner.generate(model, PROMPTS, max_new_tokens=N_NEW)
    assert aligner.generate(model, PROMPTS, Aligner.for_model(model), max_new_tokens=N_NEW) == base


def test_gate_scale_zero_gives_the_base_model(model, nonzero):
    base = aligner.generate(model, PROMPTS, max_new_tokens=N_NEW)
    assert aligner.generate(model, PROMPTS, nonzero, max_new_tokens=N_NEW, gate_scale=0.0) == base
    assert torch.equal(first_step_logits(model, PROMPTS, aligner=nonzero, gate_scale=0.0), first_step_logits(model, PROMPTS))


def test_gate_scale_moves_the_logits(model, nonzero):
    base = first_step_logits(model, PROMPTS)
    full = first_step_logits(model, PROMPTS, aligner=nonzero)
    half = first_step_logits(model, PROMPTS, aligner=nonzero, gate_scale=0.5)
    assert not torch.allclose(full, base, atol=1e-4)
    assert not torch.allclose(half, base, atol=1e-4) and not torch.allclose(half, full, atol=1e-4)


def test_gate_scale_is_the_same_as_scaled_gates(model, nonzero):
    halved = Aligner.for_model(model)
    with torch.no_grad():
        halved.gates.copy_(nonzero.gates * 0.5)
    torch.testing.assert_close(
        first_step_logits(model, PROMPTS, aligner=nonzero, gate_scale=0.5), first_step_logits(model, PROMPTS, aligner=halved)
    )


def test_aligner_is_detached_after_the_call(model, nonzero):
    aligner.generate(model, PROMPTS[:1], nonzero, max_new_tokens=2, gate_scale=0.5)
    assert not hasattr(model, "aligner") and nonzero._model is None
    assert not any("aligner" in name for name in model.hook_dict)
    assert all(not layer.hook_gate.fwd_hooks for layer in nonzero.layers)  # the gate_scale hooks went too


def test_aligner_is_detached_when_generation_raises(model, nonzero, monkeypatch):
    def fail(*args, **kwargs):
        assert model.aligner is nonzero
        raise RuntimeError("boom")

    monkeypatch.setattr("aligner.generation.generate_batch", fail)
    with pytest.raises(RuntimeError, match="boom"):
        aligner.generate(model, PROMPTS, nonzero, gate_scale=0.5)
    assert not hasattr(model, "aligner") and nonzero._model is None
    assert all(not layer.hook_gate.fwd_hooks for layer in nonzero.layers)


def test_an_attached_aligner_is_used_as_is_and_left_attached(model, nonzero):
    expected = aligner.generate(model, PROMPTS, nonzero, max_new_tokens=N_NEW)
    with nonzero.attached(model):
        assert aligner.generate(model, PROMPTS, nonzero, max_new_tokens=N_NEW) == expected
        assert model.aligner is nonzero
        with pytest.raises(ValueError, match="aligner attached"):
            aligner.generate(model, PROMPTS)


def test_seeded_sampling_is_reproducible(model):
    rng_before = torch.get_rng_state()
    first = aligner.generate(model, PROMPTS, max_new_tokens=N_NEW, do_sample=True, seed=0)
    assert aligner.generate(model, PROMPTS, max_new_tokens=N_NEW, do_sample=True, seed=0) == first
    assert aligner.generate(model, PROMPTS, max_new_tokens=N_NEW, do_sample=True, seed=1) != first
    assert torch.equal(torch.get_rng_state(), rng_before)  # a private generator: the global one is untouched


def test_a_tiny_nucleus_is_greedy(model):
    greedy = aligner.generate(model, PROMPTS, max_new_tokens=N_NEW)
    assert aligner.generate(model, PROMPTS, max_new_tokens=N_NEW, do_sample=True, top_p=1e-9, seed=0) == greedy


def test_bad_arguments(model):
    assert aligner.generate(model, []) == []
    with pytest.raises(TypeError, match=r"prompts\[1\]"):
        aligner.generate(model, ["fine", 3])
    with pytest.raises(TypeError, match="not one string"):
        aligner.generate(model, "a string, not a list")
    with pytest.raises(ValueError, match="gate_scale"):
        aligner.generate(model, PROMPTS, gate_scale=0.5)
    with pytest.raises(ValueError, match="temperature"):
        aligner.generate(model, PROMPTS, do_sample=True, temperature=0.0)


@pytest.mark.slow
def test_smollm2_knows_the_capital_of_france(smollm2):
    answer = aligner.generate(smollm2, ["What is the capital of France?"], max_new_tokens=16)[0]
    assert "Paris" in answer
