"""The notebooks run top to bottom as `make notebooks` runs them (papermill, from notebooks/, parameters injected):
01, 02 and 04 on the tiny model, 03 on the authors' released files. Their HTML draws every figure with the plotly.js
it carries, and the committed notebooks hold no outputs."""

import json
import re
from pathlib import Path

import nbformat
import papermill
import pytest
from conftest import PAPER_ALIGNERS
from nbconvert import HTMLExporter
from traitlets.config import Config

from aligner import TrainConfig
from aligner.data import load_examples
from aligner.loading import open_model
from aligner.runs import train_run
from probe.report import Report

pytestmark = pytest.mark.notebooks

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
NAMES = ("01_train_an_aligner", "02_form_vs_knowledge", "03_paper_checkpoints", "04_mechanism")
PLOTLY = "application/vnd.plotly.v1+json"


def execute(name: str, tmp_path: Path, **parameters) -> nbformat.NotebookNode:
    """notebooks/NAME.ipynb executed with `parameters`; papermill raises on the first cell that fails."""
    out = tmp_path / f"{name}.ipynb"
    papermill.execute_notebook(
        NOTEBOOKS / f"{name}.ipynb", out, parameters=parameters, cwd=NOTEBOOKS, kernel_name="python3", progress_bar=False
    )
    notebook = nbformat.read(out, as_version=4)
    assert all(cell.execution_count for cell in notebook.cells if cell.cell_type == "code")
    return notebook


def text_of(notebook: nbformat.NotebookNode) -> str:
    """Every stream and plain-text output, joined."""
    parts = []
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            parts.append(output.get("text", "") + output.get("data", {}).get("text/plain", ""))
    return "\n".join(parts)


def assert_html_draws_its_figures(notebook: nbformat.NotebookNode) -> None:
    """Exported as `make notebooks` exports it: plotly.js is in the page (no CDN), and every plotly figure of the
    notebook has its Plotly.newPlot call."""
    config = Config({"CoalesceStreamsPreprocessor": {"enabled": True}})
    html, _ = HTMLExporter(config=config).from_notebook_node(notebook)
    figures = sum(PLOTLY in output.get("data", {}) for cell in notebook.cells for output in cell.get("outputs", []))
    assert figures >= 1
    assert html.count("Plotly.newPlot(") == figures
    assert re.search(r"\* plotly\.js v\d", html) and "cdn.plot.ly/plotly" not in html


def test_the_tests_cover_every_notebook():
    assert sorted(path.stem for path in NOTEBOOKS.glob("*.ipynb")) == sorted(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_committed_notebooks_have_no_outputs_and_one_parameters_cell(name):
    notebook = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(cell.outputs == [] and cell.execution_count is None for cell in code), "strip them: nbstripout notebooks/*.ipynb"
    assert [i for i, cell in enumerate(code) if "parameters" in cell.metadata.get("tags", [])] == [0]


def test_report_show_refuses_a_section_it_does_not_have():
    report = Report("a report")
    report.section("gates", "Gates").text("some text")
    with pytest.raises(ValueError, match=r"no sections \['probes'\]; this report has gates"):
        report.show("gates", "probes")


@pytest.mark.parametrize("name", NAMES)
def test_notebooks_use_only_the_public_api(name):
    source = "\n".join(cell.source for cell in nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4).cells if cell.cell_type == "code")
    private = re.findall(r"\._[A-Za-z]\w*|\bimport\s+_\w+|\bfrom\s+\S*\._\w+", source)
    assert not private


def test_train_an_aligner_runs_on_the_tiny_model(tmp_path):
    run = tmp_path / "run"
    notebook = execute("01_train_an_aligner", tmp_path, MODEL="tiny", STEPS=3, RUN_DIR=str(run), N_EVAL=3, MAX_NEW_TOKENS=4, KNOWN_ONLY=False)
    training = json.loads((run / "adapter.json").read_text())["provenance"]["training"]
    assert training["step"] == 3 and training["config"]["data"] == "examples/json_form.jsonl"
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 3  # a line per step: the loss curve
    assert "the saved run holds the trained tensors: True" in text_of(notebook)
    assert_html_draws_its_figures(notebook)


def test_form_vs_knowledge_runs_on_the_tiny_model(tmp_path):
    notebook = execute(
        "02_form_vs_knowledge", tmp_path, MODEL="tiny", QUICK=True, STEPS=2, RUNS=str(tmp_path / "runs"),
        SUITE_OUT=str(tmp_path / "suite"), N_SUBJECTS=10, N_EVAL=3, SCALES=[0.0, 1.0], FOLDS=2, CACHE=str(tmp_path / "cache"),
    )
    assert (tmp_path / "suite" / "sweep.csv").is_file()
    assert {path.parent.name for path in (tmp_path / "runs").glob("*/adapter.json")} == {"json-aligner-1tok", "json-adapter-1tok"}
    verdict = notebook.cells[-1].outputs
    table = next(output.data["text/plain"] for output in verdict if "outcome" in output.get("data", {}).get("text/plain", ""))
    assert "json-aligner-1tok" in table and "json-adapter-1tok" in table
    assert_html_draws_its_figures(notebook)


@pytest.mark.skipif(not PAPER_ALIGNERS.is_dir(), reason="../shared/paper_aligners is not here")
def test_paper_checkpoints_runs_on_the_released_files(tmp_path):
    notebook = execute(
        "03_paper_checkpoints", tmp_path, PAPER_DIR=str(PAPER_ALIGNERS),
        CHECKPOINT=str(PAPER_ALIGNERS / "alpaca-sft-llama2-7b-1token.pth"),
    )
    text = text_of(notebook)
    assert "alpaca-sft-llama2-7b-1token.pth: 5,056 parameters" in text  # the paper's count for one token on 7B
    assert all(path.stem in text for path in PAPER_ALIGNERS.glob("*.pth"))
    assert_html_draws_its_figures(notebook)


def test_mechanism_runs_on_the_tiny_model(tmp_path):
    model = open_model("tiny")
    examples = load_examples(NOTEBOOKS.parent / "examples" / "json_form.jsonl")[:8]
    config = TrainConfig(steps=2, batch_size=4, warmup_steps=1)
    for name, kind, size in (("json-aligner", "aligner", 1), ("json-lora", "lora", 2)):
        train_run(model, examples, tmp_path / name, kind, size, config, task="json")
    notebook = execute(
        "04_mechanism", tmp_path, MODEL="tiny", RUN=str(tmp_path / "json-aligner"), COMPARE=str(tmp_path / "json-lora"),
        N_ITEMS=3, N_DISSOCIATION=2, KNOWN_ONLY=False, MAX_NEW_TOKENS=4,
    )
    text = text_of(notebook)
    assert "3 held-out prompts" in text and """in json-aligner's frame: '{"answer": "'""" in text
    outputs = notebook.cells[-2].outputs  # the token shift's shares per run, after its progress bars
    shares = next(output.data["text/plain"] for output in outputs if "unshifted" in output.get("data", {}).get("text/plain", ""))
    assert all(run in shares for run in ("base", "json-aligner", "json-lora"))
    assert_html_draws_its_figures(notebook)
