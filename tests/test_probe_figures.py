"""The figures compare: gate heatmaps on one colour scale, PCA axes that say how much variance they explain, a
log loss axis labelled at 1-2-5, the suite's points faceted by task family with its intervals as error bars, and
prompt tokens shown as text, a piece of a character as its bytes."""

from types import SimpleNamespace

import numpy as np
import pandas as pd
import torch

from probe.embeddings import embedding_frame
from probe.explore import efficiency_frame
from probe.figures import efficiency_figure, layer_head_heatmap, loss_figure, scatter
from probe.gates import gate_range, readable_token, token_text


def test_heatmaps_given_the_runs_gate_range_share_one_colour_scale():
    small, large = SimpleNamespace(gates=torch.tensor([[0.1, -0.2]])), SimpleNamespace(gates=torch.tensor([[0.5, -3.0]]))
    limit = gate_range({"small": small, "large": large})
    assert limit == 3.0
    table = pd.DataFrame({"layer": [2, 2], "head": [0, 1], "gate": [0.1, -0.2]})
    fig = layer_head_heatmap(table, "gate", "small", limit=limit)
    assert (fig.layout.coloraxis.cmin, fig.layout.coloraxis.cmax) == (-3.0, 3.0)


def test_pca_axes_name_the_variance_they_explain():
    rng = np.random.default_rng(0)
    frame = embedding_frame(rng.normal(size=(20, 5)) * [10, 3, 1, 1, 1], pd.DataFrame({"run": ["a"] * 20}))
    assert frame.attrs["axes"][0].startswith("PC1 (") and "of the variance" in frame.attrs["axes"][0]
    fig = scatter(frame, "run", "map")
    assert fig.layout.xaxis.title.text == frame.attrs["axes"][0]


def test_the_loss_axis_is_labelled_at_one_two_and_five_of_each_decade():
    fig = loss_figure(pd.DataFrame({"step": [1, 2, 3], "loss": [9.0, 0.7, 0.3], "run": "a"}), "loss")
    assert list(fig.layout.yaxis.ticktext) == ["0.1", "0.2", "0.5", "1", "2", "5", "10", "20", "50"]


def test_the_suites_points_are_faceted_by_panel_coloured_by_method_family_with_interval_error_bars():
    row = {"model": "m", "task": "json", "family": "form", "split": "test", "metric": "form", "n_seeds": 2, "std": 0.1}
    rows = [
        {**row, "method": "aligner-1", "params": 828, "mean": 0.9, "ci_low": 0.8, "ci_high": 0.95},
        {**row, "method": "lora-8", "params": 9000, "mean": 0.5},
        {**row, "method": "base", "params": 0, "mean": 0.0, "std": None},
        {**row, "method": "aligner-1:lr=0.1", "params": 828, "mean": 0.2},  # a variant: left out
    ]
    points = efficiency_frame(rows)
    assert list(points["method family"]) == ["base", "aligner", "lora"]
    assert list(points.params) == [1, 828, 9000]
    assert np.allclose(points.above, [0.0, 0.05, 0.1]) and np.allclose(points.below, [0.0, 0.1, 0.1])
    fig = efficiency_figure(points, "suite")
    assert fig.layout.xaxis.type == "log" and {trace.name for trace in fig.data} == {"base, json", "aligner, json", "lora, json"}


def test_prompt_tokens_are_shown_as_text():
    assert [readable_token(t) for t in ("\n", " Paris", "é")] == ["\\n", "␣Paris", "é"]


def test_a_token_that_is_a_piece_of_a_character_shows_its_bytes():
    byte_level = SimpleNamespace(decode=lambda ids: "\ufffd", convert_ids_to_tokens=lambda i: "ĠåĪ")  # GPT-2's alphabet
    byte_fallback = SimpleNamespace(decode=lambda ids: "\ufffd", convert_ids_to_tokens=lambda i: "<0xE5>")  # sentencepiece
    replacement = SimpleNamespace(decode=lambda ids: "\ufffd", convert_ids_to_tokens=lambda i: "\ufffd")  # a token of its own
    whole = SimpleNamespace(decode=lambda ids: " Paris", convert_ids_to_tokens=lambda i: "ĠParis")
    assert [token_text(t, 0) for t in (byte_level, byte_fallback, replacement, whole)] == [
        "␣\\xe5\\x88", "\\xe5", "\ufffd", "␣Paris"
    ]
