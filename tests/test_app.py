"""The app, driven by Streamlit's AppTest on the tiny model: every tab opens on real runs (an aligner, a
LLaMA-Adapter, a LoRA) with widgets changed and no exception, the Mechanism tab's four analyses among them; bad runs (a truncated tensor file, a torn line in a
training log), checkpoints and models are shown as errors that name what is wrong while the rest keeps working;
the Train tab trains a run that the other tabs then list."""

import json
import shutil
from pathlib import Path

import pytest
from conftest import PAPER_ALIGNERS
from streamlit.testing.v1 import AppTest

from aligner import TrainConfig
from aligner.adapter import CONFIG_FILE
from aligner.data import load_examples
from aligner.loading import open_model
from aligner.runs import train_run

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
JSON_DATA = ROOT / "examples" / "json_form.jsonl"
TIMEOUT = 120  # seconds per script run; the first loads the tiny model


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Tiny-model runs of each kind the app reads, trained for two steps on the JSON form data."""
    root = tmp_path_factory.mktemp("runs")
    model = open_model("tiny")
    examples = load_examples(JSON_DATA)[:8]
    config = TrainConfig(steps=2, batch_size=4, warmup_steps=1)
    for name, kind, size in (("json-aligner", "aligner", 1), ("json-adapter", "adapter", 1), ("json-lora", "lora", 2)):
        recording_task(train_run(model, examples, root / name, kind, size, config), root / name)
    # Recorded as the inject task: the geometry's positive control (its data are the JSON rows: only the record counts).
    recording_task(train_run(model, examples, root / "taught-facts", "aligner", 1, config), root / "taught-facts", "inject")
    return root


def recording_task(adapter, path: Path, task: str = "json") -> None:
    """Save the run again with the suite task it was trained for in its provenance: its form is what the app's
    ablation curves score, and a run's form is only ever the one it records."""
    adapter.provenance["training"]["task"] = task
    adapter.save(path)


@pytest.fixture()
def app(runs, monkeypatch, tmp_path):
    monkeypatch.setenv("ALIGNER_APP_MODEL", "tiny")
    monkeypatch.setenv("ALIGNER_APP_KNOWN_ONLY", "0")  # a random model knows no fact
    monkeypatch.setenv("ALIGNER_APP_RUNS", str(runs))
    monkeypatch.setenv("ALIGNER_APP_PAPERS", str(PAPER_ALIGNERS) if PAPER_ALIGNERS.is_dir() else "")
    monkeypatch.setenv("ALIGNER_APP_RESULTS", str(ROOT / "results"))
    monkeypatch.chdir(ROOT)  # run provenance names data files relative to the repository
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=TIMEOUT)
    at.run()
    at.sidebar.number_input[0].set_value(30).run()  # 30 subjects: quick probes, still several per class
    return at


def open_tab(at: AppTest, view: str) -> AppTest:
    at.session_state["view"] = view
    return at.run()


def assert_clean(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def charts(at: AppTest) -> int:
    return len(at.get("plotly_chart"))


def test_generate_tab_compares_base_and_runs_and_shows_the_prefix_attention(app):
    assert_clean(app)
    assert set(app.multiselect(key="generate_runs").options) == {"json-aligner", "json-adapter", "json-lora", "taught-facts"}
    assert app.multiselect(key="generate_runs").value == ["json-adapter", "json-aligner"]  # the aligners, on every tab
    app.multiselect(key="generate_runs").set_value(["json-aligner", "json-lora"]).run()
    app.slider(key="scale:json-aligner").set_value(0.0).run()
    app.text_area(key="prompt").set_value("What is 2 plus 2?").run()
    app.select_slider(key="attention_position").set_value(3).run()
    assert_clean(app)
    assert [s.value for s in app.subheader][:3] == ["Base model", "json-aligner", "json-lora"]
    assert charts(app) == 1  # the ratio per head; a one-token prefix's attention over its slot is always 1
    assert "one prefix token" in " ".join(i.value for i in app.info)
    assert len(app.get("download_button")) == 2  # the figure and its data


def test_gates_tab_shows_heatmaps_profiles_paper_checkpoints_and_ablations(app):
    open_tab(app, "Gates")
    assert_clean(app)
    app.multiselect(key="gate_runs").set_value(["json-aligner", "json-adapter"]).run()
    app.toggle(key="ablation_on").set_value(True).run()
    assert_clean(app)
    papers = len(app.multiselect(key="gate_papers").value) if PAPER_ALIGNERS.is_dir() else 0
    if not papers:
        assert "../shared/paper_aligners" in " ".join(i.value for i in app.info)
    # 2 heatmaps + paper heatmaps + profiles + (paper tokens) + gate-scale, one-layer and cumulative curves
    assert charts(app) == 2 + papers + 1 + (1 if papers else 0) + 3


def test_embeddings_tab_maps_activations_tokens_and_prefixes(app):
    open_tab(app, "Embeddings")
    assert_clean(app)
    assert charts(app) == 1
    app.toggle(key="map_answers").set_value(True).run()
    app.selectbox(key="map_colour").set_value("region").run()
    app.slider(key="map_layer").set_value(1).run()
    assert_clean(app)
    app.radio(key="map_kind").set_value("Prefix tokens").run()
    assert_clean(app)
    assert charts(app) == 1
    app.radio(key="map_kind").set_value("Prefix keys and values").run()
    assert_clean(app)
    assert charts(app) == 2


def test_probes_geometry_and_efficiency_tabs(app):
    open_tab(app, "Probes")
    assert_clean(app)
    app.selectbox(key="probe_label").set_value("region").run()
    assert_clean(app)
    assert charts(app) == 1
    open_tab(app, "Geometry")
    assert app.selectbox(key="geometry_run").options == ["json-adapter", "json-aligner"]  # the control is not tested
    assert app.selectbox(key="geometry_control").value == "taught-facts"
    app.selectbox(key="geometry_run").set_value("json-adapter").run()
    assert_clean(app)
    assert charts(app) == 2 and len(app.dataframe) == 1  # the run and its positive control, side by side
    assert "positive control (taught-facts)" in app.info[0].value
    open_tab(app, "Efficiency")
    assert_clean(app)
    assert charts(app) == 1
    models = app.multiselect(key="efficiency_models")  # the committed results hold two base models
    assert set(models.options) == {"smollm2-135m-instruct", "gemma-3-270m"}
    models.set_value(["gemma-3-270m"]).run()
    assert_clean(app)
    assert "smollm2" not in str(app.get("plotly_chart")[0].proto.spec)


def test_mechanism_tab_shows_each_analysis_of_the_chosen_runs(app):
    open_tab(app, "Mechanism")
    assert_clean(app)
    assert charts(app) == 0  # nothing computed before the toggle
    app.multiselect(key="mechanism_runs").set_value(["json-aligner", "json-lora"]).run()
    app.slider(key="mechanism_items").set_value(2).run()
    app.toggle(key="mechanism_on").set_value(True).run()
    assert_clean(app)
    assert charts(app) == 2 and len(app.dataframe) == 2  # the logit lens of each run, with where it is readable
    app.radio(key="mechanism_analysis").set_value("Token readout").run()
    assert_clean(app)
    assert charts(app) == 1 and "json-lora: a lora run has no prefix" in " ".join(i.value for i in app.info)
    app.radio(key="mechanism_analysis").set_value("Layer dissociation").run()
    assert_clean(app)
    assert charts(app) == 2  # an aligner's layers and a LoRA's alike
    app.radio(key="mechanism_analysis").set_value("Token shift").run()
    assert_clean(app)
    assert charts(app) == 1 and len(app.dataframe) == 2
    assert list(app.dataframe[0].value["run"]) == ["base", "json-aligner", "json-lora"]


@pytest.mark.parametrize("kind", ["lora", "prompt"])
def test_train_tab_trains_a_run_that_the_other_tabs_then_list(app, runs, kind):
    open_tab(app, "Train")
    assert "instruct" not in app.selectbox(key="train_task").options  # its own prompt format: `aligner sweep` runs it
    kinds = [option.split()[0] for option in app.selectbox(key="train_kind").options]  # "lora (size: rank)"
    assert kinds == ["aligner", "adapter", "lora", "prompt"]
    app.selectbox(key="train_task").set_value("value")
    app.selectbox(key="train_kind").set_value(kind)
    app.number_input(key="train_size").set_value(2)
    app.number_input(key="train_steps").set_value(2)
    app.number_input(key="train_items").set_value(4)
    app.text_input(key="train_name").set_value(f"value-{kind}")
    app.button[0].click().run()
    assert_clean(app)
    assert f"value-{kind}" in app.success[0].value
    assert json.loads((runs / f"value-{kind}" / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 2
    open_tab(app, "Generate")
    assert f"value-{kind}" in app.multiselect(key="generate_runs").options
    shutil.rmtree(runs / f"value-{kind}")  # the module's other tests see the three runs they expect


def test_bad_runs_checkpoints_and_models_are_errors_that_hide_nothing_else(runs, monkeypatch, tmp_path):
    bad = tmp_path / "runs"
    shutil.copytree(runs, bad)
    (bad / "json-aligner" / CONFIG_FILE).write_text("{ not json")  # corrupt
    tensors = bad / "json-lora" / "adapter.safetensors"
    tensors.write_bytes(tensors.read_bytes()[:-100])  # cut short
    with open(bad / "json-adapter" / "metrics.jsonl", "a", encoding="utf-8") as log:
        log.write('{"step": 3, "lo\n{"step": 4, "loss": 1.0}\n')  # a torn line, and lines after it
    (bad / "foreign").mkdir()
    (bad / "foreign" / "method.json").write_text(json.dumps({"format": "someone-else/1", "kind": "magic"}))  # foreign
    papers = tmp_path / "papers"
    papers.mkdir()
    (papers / "broken-llama2-7b-1token.pth").write_bytes(b"not a checkpoint")
    monkeypatch.setenv("ALIGNER_APP_MODEL", "tiny")
    monkeypatch.setenv("ALIGNER_APP_KNOWN_ONLY", "0")  # a random model knows no fact
    monkeypatch.setenv("ALIGNER_APP_RUNS", str(bad))
    monkeypatch.setenv("ALIGNER_APP_PAPERS", str(papers))
    monkeypatch.setenv("ALIGNER_APP_RESULTS", str(tmp_path / "no-results"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the bad model name must fail here, not on a network
    monkeypatch.chdir(ROOT)
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=TIMEOUT).run()
    assert not at.exception
    errors = " ".join(e.value for e in at.error)
    assert "json-aligner" in errors and CONFIG_FILE in errors and "foreign" in errors and str(tensors) in errors
    assert set(at.multiselect(key="generate_runs").options) == {"json-adapter", "taught-facts"}  # the others still there
    open_tab(at, "Gates")
    assert not at.exception and "broken-llama2-7b-1token.pth" in " ".join(e.value for e in at.error)
    for view in ("Embeddings", "Probes", "Geometry"):
        open_tab(at, view)
        assert not at.exception and charts(at) >= 1, view
    open_tab(at, "Train")
    assert not at.exception and "metrics.jsonl" in " ".join(e.value for e in at.error)
    open_tab(at, "Efficiency")
    assert not at.exception and "sweep.json" in " ".join(e.value for e in at.error)
    at.sidebar.text_input[0].set_value("no-such-model-anywhere").run()
    assert not at.exception
    assert "no-such-model-anywhere" in " ".join(e.value for e in at.error)


def test_the_screenshots_show_the_runs_git_tracks_not_those_trained_since(tmp_path, monkeypatch):
    import subprocess

    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    import app_screenshots

    repo = tmp_path / "repo"
    for name in ("runs/json-1tok/adapter.json", "runs/data/train.jsonl", "runs/notebooks/01/adapter.json"):
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_text(name)
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "runs/json-1tok", "runs/data"], check=True)  # runs/notebooks/: trained since
    subprocess.run([*git, "commit", "-q", "-m", "runs"], check=True)
    monkeypatch.setattr(app_screenshots, "ROOT", repo)
    copy = app_screenshots.committed_runs(tmp_path / "copy")
    assert sorted(p.relative_to(copy).as_posix() for p in copy.rglob("*") if p.is_file()) == [
        "data/train.jsonl", "json-1tok/adapter.json"
    ]
    copied, tracked = copy / "json-1tok" / "adapter.json", repo / "runs" / "json-1tok" / "adapter.json"
    assert copied.stat().st_mtime_ns == tracked.stat().st_mtime_ns  # the app's caches key runs by their files' times
