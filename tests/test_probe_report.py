"""The scripted reports build end to end: on the tiny model with a tiny trained aligner, and from the authors'
released checkpoints (no model)."""

import json
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from conftest import PAPER_ALIGNERS
from typer.testing import CliRunner

import aligner
import probe.analyses
from aligner.data import load_examples
from aligner.loading import open_model
from aligner.runs import train_run
from probe.cli import app
from probe.model_report import build_model_report
from probe.verdict import (
    CONTENT_TOLERANCE,
    FORM_LEARNED,
    PROBE_TOLERANCE,
    WITHIN_NULL,
    geometry_control,
    verdict,
)

JSON_DATA = Path(__file__).resolve().parents[1] / "examples" / "json_form.jsonl"


def figures(html: str) -> dict:
    return json.loads(re.search(r'<script id="figures" type="application/json">(.*?)</script>', html, re.S).group(1))


def test_model_report_builds_end_to_end_on_the_tiny_model(tmp_path, monkeypatch):
    # Switching a layer's gates off can raise the form's compliance too (a negative drop): the summary must say so.
    ranked = probe.analyses.rank_layers
    monkeypatch.setattr(probe.analyses, "rank_layers", lambda *args: ranked(*args).assign(form_drop=-0.25))
    model = open_model("tiny")
    config = aligner.TrainConfig(steps=2, batch_size=4, warmup_steps=1, data=str(JSON_DATA))
    aligner.train_sft(model, load_examples(JSON_DATA)[:8], config, run_dir=tmp_path / "runs" / "tiny-json")
    train_run(model, load_examples(JSON_DATA)[:8], tmp_path / "runs" / "tiny-lora", "lora", 2, config)
    paths = build_model_report(
        tmp_path / "runs", "tiny", tmp_path / "report", n_subjects=10, n_eval=3, known_only=False, max_new_tokens=3,
        scales=(0.0, 1.0), cumulative_points=1, folds=2, umap=False, cache=tmp_path / "cache",
        checker=r'\{"answer": ".*"\}',  # the run records no suite task: its form is the user's
        n_mechanism=2, n_dissociation=1,
    )
    metrics = json.loads(paths["metrics"].read_text())
    mechanism = {"logit_lens", "token_readout", "layer_dissociation", "token_shift"}
    assert set(metrics) >= {"setup", "behaviour", "gates", "probes", "geometry", "geometry_control", "embeddings", "verdict", *mechanism}
    assert metrics["geometry_control"]["passed"] is None  # no run injects facts
    assert [row["run"] for row in metrics["setup"]["other_methods"]] == ["tiny-lora"]
    # A form the suite cannot write is read in the base model's own sentence; the LoRA is read where it applies.
    assert metrics["logit_lens"]["frames"] == {"tiny-json": "own sentence", "tiny-lora": "own sentence"}
    assert metrics["logit_lens"]["n_items"] == 2 and metrics["token_shift"]["n_items"] == 2
    assert metrics["layer_dissociation"]["tiny-json"]["n_items"] == 1
    assert {row["run"] for row in metrics["logit_lens"]["readable"]} == {"tiny-json", "tiny-lora"}
    assert set(metrics["token_readout"]) == {"tiny-json"} and set(metrics["layer_dissociation"]) == {"tiny-json", "tiny-lora"}
    assert {row["layer"] for row in metrics["token_readout"]["tiny-json"]["per_layer"]} == {2, 3}
    shares = {row["run"]: row for row in metrics["token_shift"]["shares"]}
    assert set(shares) == {"base", "tiny-json", "tiny-lora"} and shares["base"]["unshifted"] == 1.0
    assert metrics["setup"]["runs"][0]["form"] == r'/\{"answer": ".*"\}/'
    assert metrics["verdict"]["tiny-json"]["outcome"] in {"supported", "partly supported", "not supported", "not supported (no form learned)"}
    layers = {row["layer"] for row in metrics["geometry"]["tiny-json"]}
    assert layers == {2, 3}  # the adapted layers of the 4-layer tiny model
    html = paths["html"].read_text()
    assert len(figures(html)) >= 10 and "plotly-gzip-base64" in html
    summary = paths["summary"].read_text()
    assert "## tiny-json" in summary and "§7" in summary and "## tiny-lora: another method" in summary
    assert "- Token shift (§" in summary and "- Layer dissociation (§" in summary and "- Logit lens (§" in summary and "- Heads (§4): of the 8 heads estimated to matter most" in summary
    assert "2 (form +25%)" in summary and "3 (form +25%)" in summary and "form -" not in summary
    heads = metrics["behaviour"]["tiny-json"]["head_effects"]
    assert len(heads) == 2 * 4 and sum(row["exact"] is not None for row in heads) == 8  # 2 adapted layers x 4 heads


def report_metrics(
    form_gain: float, content_change: float, transfer_loss: float, within_null: int, retrained_loss: float = 0.0
) -> dict:
    """The metrics `verdict` reads for one aligner "run" (json form) over 10 adapted layers, `within_null` of
    them inside the covariance null, its base-trained knowledge probes losing `transfer_loss` once centred and
    those retrained on its activations `retrained_loss`."""
    layers = range(10)
    geometry = pd.DataFrame(
        {"layer": layers, "overlap": [0.1] * within_null + [0.9] * (10 - within_null), "covariance_q95": 0.5, "covariance_q50": 0.2}
    )
    accuracy = {"base": 0.8, "run": 0.8 - transfer_loss, "run (centred)": 0.8 - transfer_loss, "run (retrained)": 0.8 - retrained_loss}
    probes = pd.DataFrame(
        [{"layer": layer, "target": "task", "scored_on": on, "accuracy": a} for layer in layers for on, a in accuracy.items()]
    )
    base = {"form:json": 0.0, "content": 0.9}
    aligned = {"form:json": form_gain, "content": 0.9 + content_change}
    return {"geometry": {"run": geometry}, "probes": {"knowledge": {"region": probes}}, "behaviour": {"base": base, "run": aligned}}


@pytest.mark.parametrize(
    ("changes", "outcome"),
    [
        ((FORM_LEARNED, 0.0, 0.0, 10), "supported"),
        ((FORM_LEARNED, -CONTENT_TOLERANCE - 0.05, 0.0, 10), "partly supported"),
        ((FORM_LEARNED, 0.0, PROBE_TOLERANCE + 0.05, round(10 * WITHIN_NULL) - 1), "not supported"),
        ((FORM_LEARNED, 0.0, PROBE_TOLERANCE + 0.05, 10), "partly supported"),  # moved: readable, not in place
        ((FORM_LEARNED, 0.0, PROBE_TOLERANCE + 0.05, 10, PROBE_TOLERANCE + 0.05), "not supported"),  # erased
        ((FORM_LEARNED - 0.1, 0.0, 0.0, 10), "not supported (no form learned)"),
    ],
)
def test_verdict_supports_the_claim_only_when_the_form_is_learned_and_knowledge_kept(changes, outcome):
    assert verdict(report_metrics(*changes), "run", "json")["outcome"] == outcome


def test_the_probe_tests_tell_knowledge_moved_from_knowledge_erased():
    moved = verdict(report_metrics(FORM_LEARNED, 0.0, 0.2, 10, retrained_loss=0.01), "run", "json")["passed"]
    erased = verdict(report_metrics(FORM_LEARNED, 0.0, 0.2, 10, retrained_loss=0.2), "run", "json")["passed"]
    assert (moved["knowledge_readable"], moved["knowledge_in_place"]) == (True, False)
    assert (erased["knowledge_readable"], erased["knowledge_in_place"]) == (False, False)


@pytest.mark.parametrize(
    ("changes", "outcome"),
    [
        ((FORM_LEARNED, 0.0, 0.0, 10), "cannot tell"),  # supported or partly: the geometry decides
        ((FORM_LEARNED, -CONTENT_TOLERANCE - 0.05, 0.0, 10), "cannot tell"),  # partly or not supported
        ((FORM_LEARNED, -CONTENT_TOLERANCE - 0.05, PROBE_TOLERANCE + 0.05, 10), "not supported"),  # whatever it says
    ],
)
def test_a_geometry_control_within_the_null_makes_the_orthogonality_test_cannot_tell(changes, outcome):
    metrics = report_metrics(*changes)
    inject = metrics["geometry"]["run"].assign(overlap=0.1)  # an injection run scored orthogonal: the control fails
    metrics["geometry_control"] = geometry_control({"inject": inject}, ["inject"])
    assert metrics["geometry_control"] == {"runs": ["inject"], "detected": {"inject": False}, "passed": False}
    result = verdict(metrics, "run", "json")
    assert result["passed"]["orthogonal"] is None and result["outcome"] == outcome
    detected = metrics["geometry"]["run"].assign(overlap=0.9)  # an injection run that leaves the null: the test stands
    metrics["geometry_control"] = geometry_control({"inject": detected}, ["inject"])
    assert verdict(metrics, "run", "json")["passed"]["orthogonal"] is True


def test_probes_retrained_on_activations_like_the_bases_score_as_the_bases_and_a_shuffled_copy_at_chance():
    rng = np.random.default_rng(0)
    entities = np.repeat(np.arange(30), 2)  # each subject asked two ways: its rows share a fold
    label = entities % 3
    base = rng.normal(size=(60, 2, 8))
    base[:, 1, 0] += 5 * label  # the label is linearly readable at layer 1
    dataset = SimpleNamespace(labels={"region": label}, entities=entities)
    arrays = {"base": base, "same": base.copy(), "scrambled": rng.permutation(base)}  # rows no longer match labels
    activations = SimpleNamespace(dataset=dataset, resid=lambda condition: arrays[condition])
    results = probe.analyses.knowledge_probe_curves(activations, "region", ["same", "scrambled"])
    task = results[results.target == "task"].pivot(index="layer", columns="scored_on", values="accuracy")
    assert task["same (retrained)"].tolist() == task["base"].tolist() and task.loc[1, "base"] > 0.9
    assert task.loc[1, "scrambled (retrained)"] < 0.6
    assert set(results[results.target == "control"].scored_on) == {"base", "same (retrained)", "scrambled (retrained)"}
    assert probe.analyses.transfer_losses({"region": results}, "same", [1])["retrained"] == 0.0


@pytest.mark.skipif(not PAPER_ALIGNERS.is_dir(), reason="../shared/paper_aligners is not here")
def test_paper_report_builds_from_the_released_checkpoints(tmp_path):
    result = CliRunner().invoke(app, ["paper-report", "--dir", str(PAPER_ALIGNERS), "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    checkpoints = {row["checkpoint"]: row for row in metrics["checkpoints"]}
    assert len(checkpoints) == len(list(PAPER_ALIGNERS.glob("*.pth")))
    assert checkpoints["alpaca-sft-llama2-7b-1token"]["parameters"] == 5056  # the paper's number
    assert checkpoints["alpaca-sft-llama2-13b-1token"]["n_layers"] == 40
    assert list(metrics["tokens"]["dpo_change"]) == ["beaver-dpo-llama2-7b-1token from beaver-safe-sft-llama2-7b-1token"]
    correlation = metrics["profiles"]["correlation"]
    assert all(abs(row[row["checkpoint"]] - 1) < 1e-9 for row in correlation)  # the diagonal
    assert len(figures((tmp_path / "report.html").read_text())) >= len(checkpoints) + 4
    assert "Comparisons" in (tmp_path / "summary.md").read_text()
