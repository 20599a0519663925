"""Importing the authors' released aligners: counts, shapes, aliases, and no pickle ever executed."""

import hashlib
import pickle

import pytest
import torch
from conftest import PAPER_ALIGNERS

import aligner

EXPECTED = {  # file -> (N, d_model, n_layers, n_heads, parameters)
    "alpaca-sft-llama2-7b-1token.pth": (1, 4096, 32, 32, 5056),
    "alpaca-sft-llama2-13b-1token.pth": (1, 5120, 40, 40, 5120 + 38 * 40),
    "alpaca-sft-llama2-13b-10token.pth": (10, 5120, 40, 40, 10 * 5120 + 38 * 40),
    "metamath-sft-llama2-7b-1token.pth": (1, 4096, 32, 32, 5056),
    "metamath-sft-llama2-7b-10token.pth": (10, 4096, 32, 32, 10 * 4096 + 960),
    "metamath-sft-llama2-7b-100token.pth": (100, 4096, 32, 32, 100 * 4096 + 960),
    "metamath-sft-llama2-7b-300token.pth": (300, 4096, 32, 32, 300 * 4096 + 960),
    "beaver-safe-sft-llama2-7b-1token.pth": (1, 4096, 32, 32, 5056),
    "beaver-dpo-llama2-7b-1token.pth": (1, 4096, 32, 32, 5056),
}

needs_paper_files = pytest.mark.skipif(not PAPER_ALIGNERS.is_dir(), reason="../shared/paper_aligners not present")


@needs_paper_files
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_paper_checkpoints_import_with_the_papers_counts(name):
    n_tokens, d_model, n_layers, n_heads, n_params = EXPECTED[name]
    al = aligner.import_paper_checkpoint(PAPER_ALIGNERS / name)
    assert al.config == aligner.AlignerConfig(n_tokens=n_tokens, start_layer=2, shared=True)
    assert al.shape == aligner.ModelShape(d_model=d_model, n_layers=n_layers, n_heads=n_heads)
    assert tuple(al.tokens.shape) == (n_tokens, d_model)
    assert tuple(al.gates.shape) == (n_layers - 2, n_heads)
    assert al.num_parameters() == n_params
    raw = torch.load(PAPER_ALIGNERS / name, map_location="cpu", weights_only=True)
    assert torch.equal(al.tokens, raw["global_value_embedding.weight"].float())  # bf16 -> f32 is exact
    assert torch.equal(al.gates[5], raw["transformer.h.7.attn.gating_factor"].flatten().float())
    assert al.base_model["name"].startswith("meta-llama/Llama-2-")


@needs_paper_files
def test_imported_checkpoint_round_trips_through_safetensors(tmp_path):
    al = aligner.import_paper_checkpoint(PAPER_ALIGNERS / "alpaca-sft-llama2-7b-1token.pth")
    loaded = aligner.Aligner.load(al.save(tmp_path / "alpaca"))
    assert torch.equal(loaded.tokens, al.tokens) and torch.equal(loaded.gates, al.gates)
    want = hashlib.sha256((PAPER_ALIGNERS / "alpaca-sft-llama2-7b-1token.pth").read_bytes()).hexdigest()
    assert loaded.provenance["source_sha256"] == want


def lit_llama_state(n_layers=4, start=2, n_tokens=2, d_model=8, n_heads=2, shared=True):
    state = {}
    prefix = torch.randn(n_tokens, d_model)
    if shared:
        state["global_value_embedding.weight"] = prefix
    for layer in range(start, n_layers):
        state[f"transformer.h.{layer}.attn.gating_factor"] = torch.randn(1, n_heads, 1, 1)
        state[f"transformer.h.{layer}.attn.adapter_wte.weight"] = prefix if shared else torch.randn(n_tokens, d_model)
    return state


def test_lit_llama_adapter_files_import_as_unshared(tmp_path):
    state = lit_llama_state(shared=False)
    torch.save(state, tmp_path / "adapter.pth")
    al = aligner.import_paper_checkpoint(tmp_path / "adapter.pth")
    assert not al.config.shared and tuple(al.tokens.shape) == (2, 2, 8)
    assert torch.equal(al.tokens[1], state["transformer.h.3.attn.adapter_wte.weight"])


def test_alias_that_differs_from_the_shared_prefix_is_refused(tmp_path):
    state = lit_llama_state()
    state["transformer.h.3.attn.adapter_wte.weight"] = torch.randn(2, 8)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=r"bad\.pth: 'transformer\.h\.3\.attn\.adapter_wte\.weight' differs"):
        aligner.import_paper_checkpoint(tmp_path / "bad.pth")


class _WritesAFile:
    """A pickle payload that would create a file when unpickled."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (str(self.target), "w"))


def test_a_pickle_that_would_run_code_is_refused_and_runs_nothing(tmp_path):
    target = tmp_path / "pwned.txt"
    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"global_value_embedding.weight": _WritesAFile(target)}, f)
    with pytest.raises(ValueError, match=r"evil\.pth: refused"):
        aligner.import_paper_checkpoint(tmp_path / "evil.pth")
    assert not target.exists()


def test_truncated_and_foreign_files_get_clear_errors(tmp_path):
    torch.save(lit_llama_state(), tmp_path / "ok.pth")
    (tmp_path / "cut.pth").write_bytes((tmp_path / "ok.pth").read_bytes()[:100])
    with pytest.raises(ValueError, match=r"cut\.pth"):
        aligner.import_paper_checkpoint(tmp_path / "cut.pth")
    torch.save({"model.layers.0.weight": torch.zeros(2)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match=r"other\.pth: unexpected key 'model\.layers\.0\.weight'"):
        aligner.import_paper_checkpoint(tmp_path / "other.pth")
