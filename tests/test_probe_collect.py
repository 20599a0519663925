"""The activation cache: what it stores is what run_with_cache sees, a second call reads it back, and a changed
aligner or a damaged file is never served."""

import multiprocessing
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

import aligner
import aligner.layer
from aligner.tasks import KNOWLEDGE_SETS
from probe.collect import collect
from probe.dataset import ProbeDataset

PROMPTS = ["What is the capital of Peru?", "Name a river.", "Which city is the capital of the United Kingdom of Great Britain?"]


def small_dataset() -> ProbeDataset:
    return ProbeDataset(
        name="small", knowledge=KNOWLEDGE_SETS["capitals"], prompts=PROMPTS, answers=[("Lima",), ("Nile",), ("London",)],
        labels={"kind": np.array(["q", "r", "q"])}, entities=np.arange(3),
    )


def random_aligner(model, seed=0, n_tokens=2):
    torch.manual_seed(seed)
    al = aligner.Aligner.for_model(model, aligner.AlignerConfig(n_tokens=n_tokens))
    with torch.no_grad():
        al.gates.normal_()
    return al


def direct(model, prompt, hook="hook_resid_post"):
    """(n_layers, T, d) activations of one prompt alone, no padding, through run_with_cache."""
    ids = torch.tensor([aligner.chat.prompt_ids(model.tokenizer, prompt)])
    _, cache = model.run_with_cache(ids)
    return torch.stack([cache[f"blocks.{l}.{hook}"][0] for l in range(model.cfg.n_layers)])


def direct_aligner_arrays(model, al, prompt):
    """Per adapted layer, a prompt's pattern (T, H, N), |g A V_p| and its share of the head's output (T, H), from
    run_with_cache on the prompt alone, as the equations of collect.py's top say."""
    ids = torch.tensor([aligner.chat.prompt_ids(model.tokenizer, prompt)])
    with al.attached(model):
        _, cache = model.run_with_cache(ids)
    arrays = {"aligner_pattern": [], "aligner_norm": [], "aligner_share": []}
    for layer in al.layer_indices:
        gated = cache[f"blocks.{layer}.aligner.hook_z"][0]
        norm = gated.norm(dim=-1)
        arrays["aligner_pattern"].append(cache[f"blocks.{layer}.aligner.hook_pattern"][0].transpose(0, 1))
        arrays["aligner_norm"].append(norm)
        arrays["aligner_share"].append(norm / ((cache[f"blocks.{layer}.attn.hook_z"][0] - gated).norm(dim=-1) + 1e-8))
    return {name: torch.stack(values, dim=1) for name, values in arrays.items()}  # (T, n_active, ...)


@pytest.mark.parametrize("positions", ["last_prompt", "prompt_mean"])
def test_collected_activations_equal_run_with_cache_on_each_prompt_alone(tiny, tmp_path, positions):
    al = random_aligner(tiny, n_tokens=3)
    acts = collect(tiny, small_dataset(), [None, al], positions=positions, batch_size=2, cache=tmp_path)

    def pooled(x):
        return (x[-1] if positions == "last_prompt" else x.mean(dim=0)).numpy()

    for name, adapter in (("base", None), (acts.conditions[1], al)):
        for i, prompt in enumerate(PROMPTS):
            if adapter is None:
                expected = direct(tiny, prompt)
            else:
                with adapter.attached(tiny):
                    expected = direct(tiny, prompt)
            np.testing.assert_allclose(acts.resid(name)[i], pooled(expected.transpose(0, 1)), rtol=1e-4, atol=1e-5)
    arrays = acts.arrays[acts.conditions[1]]
    for i, prompt in enumerate(PROMPTS):
        for array, expected in direct_aligner_arrays(tiny, al, prompt).items():
            np.testing.assert_allclose(arrays[array][i], pooled(expected), rtol=1e-4, atol=1e-6)


def test_aligner_arrays_are_the_prefix_attention_and_its_share(tiny, tmp_path):
    al = random_aligner(tiny, n_tokens=3)
    acts = collect(tiny, small_dataset(), [al], cache=tmp_path)
    arrays = acts.arrays[acts.conditions[0]]
    assert arrays["aligner_pattern"].shape == (3, 2, 4, 3)
    np.testing.assert_allclose(arrays["aligner_pattern"].sum(axis=-1), 1, rtol=1e-5)
    assert (arrays["aligner_share"] > 0).all() and (arrays["aligner_norm"] > 0).all()
    with torch.no_grad():
        al.gates.zero_()
    silent = collect(tiny, small_dataset(), [al], cache=tmp_path)
    assert not np.asarray(silent.arrays[silent.conditions[0]]["aligner_norm"]).any()


def test_second_call_is_a_cache_hit(tiny, tmp_path, monkeypatch):
    first = collect(tiny, small_dataset(), [None], cache=tmp_path)

    def must_not_run(*args, **kwargs):
        raise AssertionError("the activations were computed again")

    # the module, not the function of the same name that `probe` exports
    monkeypatch.setattr(sys.modules["probe.collect"], "_write_activations", must_not_run)
    second = collect(tiny, small_dataset(), [None], cache=tmp_path)
    assert second.paths == first.paths
    np.testing.assert_array_equal(second.resid("base"), first.resid("base"))


def test_a_change_to_the_code_the_forward_runs_through_makes_a_new_entry(tiny, tmp_path, monkeypatch):
    first = collect(tiny, small_dataset(), [None], cache=tmp_path)
    layer = tmp_path / "layer.py"  # aligner/layer.py as a user's edit leaves it
    layer.write_text(Path(aligner.layer.__file__).read_text() + "\n# edited\n")
    edited = types.ModuleType("aligner.layer")
    edited.__file__ = str(layer)
    code = sys.modules["probe.collect"].CODE
    monkeypatch.setattr(sys.modules["probe.collect"], "CODE", tuple(edited if m is aligner.layer else m for m in code))
    second = collect(tiny, small_dataset(), [None], cache=tmp_path)
    assert second.paths["base"] != first.paths["base"]


def test_cache_is_invalidated_when_the_aligner_changes(tiny, tmp_path):
    al = random_aligner(tiny)
    before = collect(tiny, small_dataset(), [al], cache=tmp_path)
    old = np.array(before.resid(before.conditions[0]))
    with torch.no_grad():
        al.gates.mul_(2)
    after = collect(tiny, small_dataset(), [al], cache=tmp_path)
    assert after.paths[after.conditions[0]] != before.paths[before.conditions[0]]
    assert not np.allclose(after.resid(after.conditions[0])[:, -1], old[:, -1])


def test_damaged_entry_is_rebuilt_not_served(tiny, tmp_path):
    first = collect(tiny, small_dataset(), [None], cache=tmp_path)
    good, entry = np.array(first.resid("base")), first.paths["base"]
    data = np.load(entry / "hook_resid_post.npy", mmap_mode="r+")
    data[0, 0, :4] = 123.0  # a silent change inside the first MiB
    data.flush()
    del data
    with pytest.warns(UserWarning, match="rebuilding"):
        rebuilt = collect(tiny, small_dataset(), [None], cache=tmp_path)
    np.testing.assert_array_equal(rebuilt.resid("base"), good)


def collect_in_another_process(cache, queue):
    acts = collect(aligner.tiny_model(), small_dataset(), [None], cache=cache)
    queue.put(np.array(acts.resid("base")))


@pytest.mark.subprocess
def test_two_processes_share_one_cache(tmp_path):
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    workers = [context.Process(target=collect_in_another_process, args=(tmp_path, queue)) for _ in range(2)]
    for worker in workers:
        worker.start()
    results = [queue.get(timeout=300) for _ in workers]
    for worker in workers:
        worker.join(timeout=60)
        assert worker.exitcode == 0
    np.testing.assert_array_equal(results[0], results[1])
    assert len([p for p in tmp_path.iterdir() if p.is_dir()]) == 1  # one entry, no staging left behind


def test_a_hook_point_of_another_shape_is_refused_by_name_and_leaves_no_entry(tiny, tmp_path):
    with pytest.raises(ValueError, match=r"blocks\.0\.attn\.hook_z gives activations shaped \(3, \d+, 4, 16\)"):
        collect(tiny, small_dataset(), [None], hooks=("attn.hook_z",), cache=tmp_path)
    assert not [p for p in tmp_path.iterdir() if p.is_dir()]  # no entry, no staging directory left behind
    acts = collect(tiny, small_dataset(), [None], hooks=("hook_attn_out",), cache=tmp_path)
    assert acts.arrays["base"]["hook_attn_out"].shape == (3, tiny.cfg.n_layers, tiny.cfg.d_model)
