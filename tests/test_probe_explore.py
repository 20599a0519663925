"""The analyses behind the app's views: prefix attention for one prompt, gate profiles, the paper's checkpoints
(one bad file hides no other) and the suite's summary rows (checked)."""

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import PAPER_ALIGNERS

import aligner
from aligner.loading import open_model
from probe.explore import efficiency_summary, paper_checkpoints
from probe.gates import gate_profiles, prefix_attention


def test_prefix_attention_sums_to_one_over_slots_and_its_share_vanishes_with_the_gates():
    model = open_model("tiny")
    torch.manual_seed(0)
    al = aligner.Aligner.for_model(model, aligner.AlignerConfig(n_tokens=3))
    with torch.no_grad():
        al.gates.fill_(0.5)
    table = prefix_attention(model, al, "What is the capital of France?")
    assert set(table.layer) == set(al.layer_indices) and set(table.slot) == {0, 1, 2}
    totals = table.groupby(["layer", "head", "position"]).attention.sum()
    np.testing.assert_allclose(totals, 1.0, atol=1e-5)
    assert (table.share > 0).all()
    with torch.no_grad():
        al.gates.zero_()
    assert (prefix_attention(model, al, "What is the capital of France?").share == 0).all()


def test_gate_profiles_put_every_aligner_on_one_relative_depth_axis():
    model = open_model("tiny")
    profiles = gate_profiles({"a": aligner.Aligner.for_model(model), "b": aligner.Aligner.for_model(model)})
    assert set(profiles.run) == {"a", "b"} and profiles.depth.max() == 1.0


@pytest.mark.skipif(not PAPER_ALIGNERS.is_dir(), reason="../shared/paper_aligners is not here")
def test_a_bad_paper_checkpoint_is_listed_and_hides_no_other(tmp_path):
    shutil.copy(PAPER_ALIGNERS / "alpaca-sft-llama2-7b-1token.pth", tmp_path)
    (tmp_path / "broken.pth").write_bytes(b"not a zip")
    loaded, failed = paper_checkpoints(tmp_path)
    assert list(loaded) == ["alpaca-sft-llama2-7b-1token"] and loaded["alpaca-sft-llama2-7b-1token"].num_parameters() == 5056
    assert [path for path, _ in failed] == [str(tmp_path / "broken.pth")]


def test_efficiency_summary_names_the_file_and_row_at_fault(tmp_path):
    (tmp_path / "sweep.json").write_text(json.dumps([{"method": "aligner-1"}]))
    with pytest.raises(ValueError, match=r"sweep.json: row 0 lacks model, .*kind, params, .*aligner sweep --tables-only"):
        efficiency_summary(tmp_path)
    with pytest.raises(FileNotFoundError, match="sweep.json"):
        efficiency_summary(tmp_path / "missing")
