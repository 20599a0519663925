"""A bank of aligners, one per row of a batch, against each aligner run on its own."""

import pytest
import torch

import aligner
from aligner import Aligner, AlignerConfig
from aligner.bank import AlignerBank

PROMPTS = ["Hi", "What is the capital of France, and why is it there?", "Tell me a joke about cats."]


@pytest.fixture(scope="module")
def model():
    return aligner.tiny_model()


def random_aligners(model, k: int, **config) -> list[Aligner]:
    aligners = [Aligner.for_model(model, AlignerConfig(**config)) for _ in range(k)]
    with torch.no_grad():
        for al in aligners:
            al.gates.normal_()
    return aligners


@pytest.mark.parametrize("n_tokens", [1, 3])
@pytest.mark.parametrize("shared", [True, False])
def test_each_row_equals_its_aligner_alone(model, n_tokens, shared):
    aligners = random_aligners(model, 4, n_tokens=n_tokens, start_layer=1, shared=shared)
    rows = [3, 0, 3, 1]
    ids = torch.randint(0, 1000, (4, 8))
    with torch.no_grad():
        alone = []
        for b, row in enumerate(rows):
            with aligners[row].attached(model):
                alone.append(model(ids[b : b + 1]))
        bank = AlignerBank(aligners)
        with bank.attached(model), bank.selected(rows):
            together = model(ids)
    torch.testing.assert_close(together, torch.cat(alone), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(alone[0], alone[1], atol=1e-3)  # the rows do differ


def test_generate_with_one_aligner_per_prompt_equals_one_call_each(model):
    first, second = random_aligners(model, 2, n_tokens=2)
    per_prompt = [first, second, first]
    alone = [aligner.generate(model, [p], al, max_new_tokens=8)[0] for p, al in zip(PROMPTS, per_prompt)]
    # Batches of two: the same aligner in two batches, and a batch of one at the end.
    assert aligner.generate(model, PROMPTS, aligners=per_prompt, max_new_tokens=8, batch_size=2) == alone
    base = aligner.generate(model, PROMPTS, max_new_tokens=8)
    assert aligner.generate(model, PROMPTS, aligners=per_prompt, max_new_tokens=8, gate_scale=0.0) == base
    assert not hasattr(model, "aligner")


def test_bank_hook_points_carry_the_batch_axis(model):
    bank = AlignerBank(random_aligners(model, 3, n_tokens=2, start_layer=2))
    with bank.attached(model), bank.selected([2, 2]):
        _, cache = model.run_with_cache(torch.randint(0, 1000, (2, 5)))
    assert tuple(cache["aligner.hook_tokens"].shape) == (2, 2, 64)
    assert tuple(cache["blocks.3.aligner.hook_k"].shape) == (2, 2, 2, 16)  # (B, N, H_kv, d_head)
    assert tuple(cache["blocks.3.aligner.hook_gate"].shape) == (2, 4)
    assert tuple(cache["blocks.3.aligner.hook_pattern"].shape) == (2, 4, 5, 2)
    assert tuple(cache["blocks.3.aligner.hook_z"].shape) == (2, 5, 4, 16)
    torch.testing.assert_close(cache["blocks.3.aligner.hook_gate"], bank.gates[[2, 2], 1])


def test_bad_banks_and_selections(model):
    one, two = random_aligners(model, 2, n_tokens=1)
    with pytest.raises(ValueError, match="one configuration"):
        AlignerBank([one, Aligner.for_model(model, AlignerConfig(n_tokens=2))])
    bank = AlignerBank([one, two])
    ids = torch.randint(0, 1000, (2, 4))
    with bank.attached(model):
        with pytest.raises(RuntimeError, match="bank.selected"):
            model(ids)
        with pytest.raises(IndexError, match=r"\[0, 2\)"), bank.selected([0, 2]):
            pass
        with bank.selected([0, 1, 1]), pytest.raises(ValueError, match="the batch has 2 rows"):
            model(ids)
    with pytest.raises(ValueError, match="not both"):
        aligner.generate(model, PROMPTS[:2], one, aligners=[one, two])
    with pytest.raises(ValueError, match="one aligner per prompt"):
        aligner.generate(model, PROMPTS, aligners=[one, two])
    with pytest.raises(TypeError, match=r"aligners\[1\]"):
        aligner.generate(model, PROMPTS[:2], aligners=[one, "two"])
