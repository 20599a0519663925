"""Aligner workbench: `streamlit run app.py` (`make app`). One tab per view; every number and figure comes from
`aligner` and `probe`, this file only lays them out.

The base model loads once (`st.cache_resource`); runs and activations are kept as resources keyed by their
files' versions, analyses in `st.cache_data` (in memory only, keyed by the base model's weights fingerprint:
Streamlit persists to disk with pickle, which would run whatever a planted file holds), and activations in the
probe's own disk cache (plain `.npy` arrays), so that changing a widget recomputes only what depends on it. Only
the open tab runs (`st.tabs(on_change="rerun")`). Environment variables set the sidebar's defaults:
ALIGNER_APP_MODEL, ALIGNER_APP_RUNS, ALIGNER_APP_PAPERS, ALIGNER_APP_RESULTS, ALIGNER_APP_KNOWN_ONLY (the tests
point them at the tiny model, which knows no fact, and temporary directories).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import pandas as pd
import plotly.graph_objects as go
import streamlit as st
from streamlit.runtime.scriptrunner_utils.script_run_context import in_cached_function
from torch import nn

import aligner
from aligner.adapter import Adapter, load_adapter
from aligner.audit import audit
from aligner.generation import answer
from aligner.loading import open_model
from aligner.model import Aligner
from aligner.registry import FAMILIES, default_lr
from aligner.runs import RunInfo, list_runs, task_examples, train_run
from aligner.tables import markdown_tables
from aligner.tasks import KNOWLEDGE_SETS, TASK_NAMES, get_task
from probe import analyses
from probe.collect import Activations, collect, condition_name
from probe.dataset import ProbeDataset, evaluation_set, form_items, is_injection, knowledge_dataset, training_form
from probe.dissociation import layer_dissociation
from probe.embeddings import prefix_frame, token_frame
from probe.explore import efficiency_frame, efficiency_summary, paper_checkpoints
from probe.figures import (
    cumulative_ablation_figure,
    efficiency_figure,
    gate_heatmap,
    gate_profile_figure,
    gate_scale_figure,
    geometry_figure,
    layer_ablation_figure,
    loss_figure,
    prefix_share_heatmap,
    probe_figure,
    scatter,
    slot_attention_heatmap,
)
from probe.gates import gate_profiles, gate_range, gate_table, prefix_attention
from probe.lens import logit_lens, token_readout
from probe.mechanism_figures import (
    layer_dissociation_figure,
    logit_lens_figure,
    token_readout_figure,
    token_shift_figure,
)
from probe.progress import reporting
from probe.shift import most_shifted, shift_shares, token_shift
from probe.verdict import WITHIN_NULL, control_sentence, geometry_control, orthogonal

ROOT = Path(__file__).resolve().parent
PAPERS = ROOT.parent / "shared" / "paper_aligners"  # the authors' checkpoints, where the workplace lays them
DEFAULTS = {
    "model": os.environ.get("ALIGNER_APP_MODEL", aligner.DEFAULT_MODEL),
    "runs": os.environ.get("ALIGNER_APP_RUNS", str(ROOT / "runs")),
    "papers": os.environ.get("ALIGNER_APP_PAPERS", str(PAPERS) if PAPERS.is_dir() else ""),
    "results": os.environ.get("ALIGNER_APP_RESULTS", str(ROOT / "results")),
    "known_only": os.environ.get("ALIGNER_APP_KNOWN_ONLY", "1") != "0",  # 0: any fact, for a random model
}
TRAINABLE_TASKS = [name for name in TASK_NAMES if not get_task(name).raw_prompts]  # runs answer in the model's format
VIEWS = ("Generate", "Gates", "Embeddings", "Probes", "Geometry", "Mechanism", "Efficiency", "Train")
ANALYSES = ("Logit lens", "Token readout", "Layer dissociation", "Token shift")  # the Mechanism tab's
PRESELECTED = 2  # runs chosen on a tab's first visit: each tab's first computation stays short
# Subjects of the probing data by default: collecting activations is the arithmetic of a forward per prompt and
# condition, so a tab's first visit grows with them.
APP_SUBJECTS = 60
RunKey = tuple[str, str]  # (run path, files' version): what a cached analysis of a run is keyed on
LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class Base:
    """The base model that every session shares (one `st.cache_resource`), its weights fingerprint, and the lock
    that every use of it holds: adapters are attached to this one model and removed again, so a second session
    running it meanwhile would run with the first one's adapter, or with one half removed."""

    model: nn.Module
    fingerprint: str
    lock: threading.RLock = field(default_factory=threading.RLock)  # re-entrant: a cached function calls others


@dataclass(frozen=True)
class Workbench:
    """What every view reads: the base model (None when it failed to load) and the runs trained on it."""

    model_name: str
    base: Base | None
    runs: dict[str, RunInfo]  # name -> a readable run trained on this very model
    runs_dir: Path
    papers_dir: Path | None
    results_dir: Path
    knowledge: str
    n_subjects: int
    known_only: bool  # the held-out facts of the Gates and Mechanism tabs: those the base model knows, else any

    @property
    def model(self) -> nn.Module | None:
        return None if self.base is None else self.base.model

    @property
    def cache_key(self) -> str | None:
        """What cached analyses are keyed on: the base model's weights fingerprint."""
        return None if self.base is None else self.base.fingerprint

    def aligner_runs(self) -> dict[str, RunInfo]:
        return {name: run for name, run in self.runs.items() if run.has_gates}


def shows_errors(view: Callable[[Workbench], None]) -> Callable[[Workbench], None]:
    """Run a view; what goes wrong in it is shown as an error, and the other views still work. Only a file or a
    setting (OSError, ValueError: the message names it) is the user's to fix; anything else is the workbench's
    fault, and the message says so."""

    @functools.wraps(view)
    def shown(bench: Workbench) -> None:
        try:
            view(bench)
        except ImportError as err:
            st.error(f"{view.__name__}: a package is missing ({err}). Run `make install`, then restart the app.")
        except FileNotFoundError as err:
            st.error(f"{view.__name__}: {err}. Check the directories in the sidebar.")
        except (OSError, ValueError) as err:
            st.error(f"{view.__name__}: {err}. Fix or remove what it names, or change the setting.")
        except Exception as err:  # a fault of the workbench's own: the page stays usable, the log keeps the traceback
            LOG.exception("%s failed", view.__name__)
            st.error(
                f"{view.__name__} failed: {type(err).__name__}: {err}. This is a fault in the workbench, not in your "
                "settings or files; the other tabs still work, and the server's log holds the traceback."
            )

    return shown


@contextlib.contextmanager
def progress_bar() -> Iterator[None]:
    """A bar at the top of the view, following each long computation the view runs with the n of N that the
    command line prints (`probe.progress`). Its updates are kept out of what Streamlit records inside a cached
    function to replay on a cache hit (`in_cached_function`): the bar belongs to this run of the view, and a replay
    would write to a bar that no longer exists."""
    slot = st.empty()

    def show(desc: str, done: int, total: int | None) -> None:
        token = in_cached_function.set(False)
        try:
            slot.progress(done / total if total else 0.0, text=f"{desc}: {done} of {total}" if total else desc)
        finally:
            in_cached_function.reset(token)

    try:
        with reporting(show):
            yield
    finally:
        slot.empty()


# ---- cached computations (arguments starting with _ are not hashed: their key is the argument after them) ----


@st.cache_resource(show_spinner="Loading the base model…")
def load_base(name: str) -> Base:
    model = open_model(name)
    return Base(model, aligner.model_fingerprint(model))


@st.cache_resource(show_spinner=False)
def load_run(path: str, version: str) -> Adapter:
    return load_adapter(path)


def run_key(run: RunInfo) -> RunKey:
    return (str(run.path), run.version)


@st.cache_data(show_spinner="Generating…")
def generated(_base: Base, cache_key: str, run: RunKey | None, prompt: str, max_new_tokens: int, scale: float) -> str:
    method = None if run is None else load_run(*run)
    with _base.lock:
        return answer(_base.model, method, [prompt], None, max_new_tokens, 1, gate_scale=scale)[0]


@st.cache_data(show_spinner="Reading the prefix attention…")
def prefix_table(_base: Base, cache_key: str, run: RunKey, prompt: str) -> pd.DataFrame:
    with _base.lock:
        return prefix_attention(_base.model, load_run(*run), prompt)


@st.cache_data(show_spinner=False)
def dataset_for(knowledge: str, n_subjects: int) -> ProbeDataset:
    return knowledge_dataset(knowledge, n_subjects)


@st.cache_data(show_spinner="Auditing what the base model knows (kept on disk after the first time)…")
def known_subjects(_base: Base, cache_key: str, knowledge: str, known_only: bool) -> frozenset[str] | None:
    """The subjects of `knowledge` the base model answers right (the suite's audit), the facts `probe report`
    holds out; None (any subject) unless `known_only`."""
    if not known_only:
        return None
    with _base.lock:
        return audit(_base.model, KNOWLEDGE_SETS[knowledge], cache_key).known


@st.cache_resource(show_spinner="Collecting activations (kept on disk after the first time)…")
def activations_for(_base: Base, cache_key: str, runs: tuple[RunKey, ...], knowledge: str, n_subjects: int) -> Activations:
    with _base.lock:
        return collect(_base.model, dataset_for(knowledge, n_subjects), [None, *(Path(path) for path, _ in runs)])


def bench_activations(bench: Workbench, runs: dict[str, RunInfo]) -> Activations:
    keys = tuple(run_key(run) for run in runs.values())
    return activations_for(bench.base, bench.cache_key, keys, bench.knowledge, bench.n_subjects)


def condition(run: RunInfo) -> str:
    """The run's condition name in `Activations`."""
    return condition_name(run.path)


@st.cache_data(show_spinner=False)
def trained_form(run: RunKey) -> str | None:
    return training_form(load_run(*run))


@st.cache_data(show_spinner="Answering the held-out prompts…")
def held_out_answers(
    _base: Base, cache_key: str, run: RunKey | None, runs: tuple[RunKey, ...], knowledge: str, n_subjects: int
) -> dict[str, str]:
    """prompt -> answer on the held-out prompts of `runs` (the base model for run None)."""
    adapter = None if run is None else load_run(*run)
    runs_read = {path: load_run(path, v) for path, v in runs}
    with _base.lock:
        return analyses.held_out_answers(_base.model, dataset_for(knowledge, n_subjects), runs_read, adapter)


@st.cache_data(show_spinner="Switching gates off, layer by layer…")
def gate_curves(
    _base: Base, cache_key: str, run: RunKey, form: str, knowledge: str, n_subjects: int, known_only: bool
) -> tuple[pd.DataFrame, pd.DataFrame]:
    al = load_run(*run)
    known = known_subjects(_base, cache_key, knowledge, known_only)
    evaluation = evaluation_set(dataset_for(knowledge, n_subjects), {run[0]: al}, known=known)
    with _base.lock:
        scale, ablation = analyses.gate_curves(_base.model, evaluation, al, form)
    return scale.drop(columns="outputs"), ablation


@st.cache_data(show_spinner="Fitting probes…")
def probe_results(_activations: Activations, cache_key: str, runs: tuple[RunKey, ...], knowledge: str, n_subjects: int, label: str, conditions: tuple[str, ...]) -> pd.DataFrame:
    return analyses.probe_curves(_activations, label, conditions)


@st.cache_data(show_spinner="Measuring overlaps against the nulls…")
def geometry_results(_activations: Activations, cache_key: str, runs: tuple[RunKey, ...], knowledge: str, n_subjects: int, name: str, layers: tuple[int, ...]) -> pd.DataFrame:
    return analyses.geometry_table(_activations, name, layers)


@st.cache_data(show_spinner="Embedding…")
def activation_map(
    _activations: Activations, cache_key: str, runs: tuple[RunKey, ...], knowledge: str, n_subjects: int,
    layer: int, conditions: tuple[str, ...], forms: tuple[tuple[str, str | None], ...], outputs: tuple[tuple[str, tuple[tuple[str, str], ...]], ...], method: str,
) -> pd.DataFrame:
    return analyses.activation_frame(_activations, layer, conditions, dict(forms), {c: dict(o) for c, o in outputs}, method)


@st.cache_data(show_spinner="Embedding the tokens…")
def token_map(runs: tuple[RunKey, ...], names: tuple[str, ...], method: str) -> pd.DataFrame:
    return token_frame({name: load_run(*run) for name, run in zip(names, runs)}, method)


@st.cache_data(show_spinner="Embedding the prefix keys and values…")
def prefix_map(_base: Base, cache_key: str, runs: tuple[RunKey, ...], names: tuple[str, ...], method: str) -> pd.DataFrame:
    adapters = {name: load_run(*run) for name, run in zip(names, runs)}
    with _base.lock:
        return prefix_frame(_base.model, adapters, method)


def mechanism_evaluation(
    _base: Base, cache_key: str, runs: tuple[RunKey, ...], knowledge: str, n_subjects: int, known_only: bool, n_items: int
) -> ProbeDataset:
    """The held-out prompts of the Mechanism tab: about subjects none of `runs` was trained on (and, with
    `known_only`, that the base model knows)."""
    known = known_subjects(_base, cache_key, knowledge, known_only)
    return evaluation_set(dataset_for(knowledge, n_subjects), {path: load_run(path, v) for path, v in runs}, n_items, known)


# The Mechanism tab's analyses of one run on its form's items, by name.
RUN_ANALYSES = {"Logit lens": logit_lens, "Token readout": token_readout, "Layer dissociation": layer_dissociation}


@st.cache_data(show_spinner="Reading the model with the run…")
def run_analysis(
    _base: Base,
    cache_key: str,
    analysis: str,
    run: RunKey,
    runs: tuple[RunKey, ...],
    knowledge: str,
    n_subjects: int,
    known_only: bool,
    n_items: int,
) -> pd.DataFrame:
    """`analysis` (RUN_ANALYSES) of `run` on the held-out prompts of `runs`, in its form's frame."""
    evaluation = mechanism_evaluation(_base, cache_key, runs, knowledge, n_subjects, known_only, n_items)
    items = form_items(evaluation, trained_form(run))
    with _base.lock:
        return RUN_ANALYSES[analysis](_base.model, load_run(*run), items, system=evaluation.system)


@st.cache_data(show_spinner="Answering and ranking under the base model…")
def shift_table(
    _base: Base,
    cache_key: str,
    runs: tuple[RunKey, ...],
    names: tuple[str, ...],
    knowledge: str,
    n_subjects: int,
    known_only: bool,
    n_items: int,
    max_new_tokens: int,
) -> pd.DataFrame:
    evaluation = mechanism_evaluation(_base, cache_key, runs, knowledge, n_subjects, known_only, n_items)
    adapters = {"base": None, **{name: load_run(*run) for name, run in zip(names, runs)}}
    with _base.lock:
        return token_shift(_base.model, adapters, evaluation.prompts, evaluation.system, max_new_tokens, batch_size=len(evaluation))


def papers_version(directory: Path) -> str:
    return "-".join(f"{p.name}:{p.stat().st_mtime_ns}" for p in sorted(directory.glob("*.pth")))


@st.cache_resource(show_spinner="Reading the paper's checkpoints…")
def load_papers(directory: str, version: str) -> tuple[dict[str, aligner.Aligner], list[tuple[str, str]]]:
    return paper_checkpoints(directory)


# ---- views ----


def needs_model(bench: Workbench) -> bool:
    if bench.model is None:
        st.info("This view needs the base model, which did not load (see the error above).")
        return False
    return True


def pick_runs(bench: Workbench, runs: dict[str, RunInfo], key: str, label: str = "Runs") -> dict[str, RunInfo]:
    """A choice among `runs`, preselecting the same runs on every tab: the first PRESELECTED aligners (those every
    view can show), else the first run."""
    if not runs:
        st.info(f"No runs trained on {bench.model_name} in {bench.runs_dir}: train one in the Train tab.")
        return {}
    default = [name for name in list(bench.aligner_runs())[:PRESELECTED] if name in runs] or list(runs)[:1]
    chosen = st.multiselect(label, list(runs), default=default, key=key)
    return {name: runs[name] for name in chosen}


def show_figure(fig: go.Figure, key: str, table: pd.DataFrame | None = None, **options: object) -> object:
    """Draw `fig` with buttons to download it (HTML) and, given, the `table` it draws (CSV); `options` are
    st.plotly_chart's. Returns what st.plotly_chart returns (a selection event with on_select)."""
    event = st.plotly_chart(fig, key=key, **options)
    left, right = st.columns(2)
    left.download_button("Figure (HTML)", fig.to_html(include_plotlyjs="cdn"), f"{key}.html", "text/html", key=f"{key}:html")
    if table is not None:
        right.download_button("Data (CSV)", table.to_csv(index=False), f"{key}.csv", "text/csv", key=f"{key}:csv")
    return event


@shows_errors
def generate_view(bench: Workbench) -> None:
    if not needs_model(bench):
        return
    prompt = st.text_area("Prompt", "What is the capital of France?", key="prompt")
    chosen = pick_runs(bench, bench.runs, "generate_runs")
    max_new_tokens = st.slider("Max new tokens", 8, 128, 32, key="max_new_tokens")
    columns = st.columns(1 + len(chosen))
    with columns[0]:
        st.subheader("Base model")
        st.write(generated(bench.base, bench.cache_key, None, prompt, max_new_tokens, 1.0))
    for column, (name, run) in zip(columns[1:], chosen.items()):
        with column:
            st.subheader(name)
            st.caption(run.summary)
            scale = 1.0
            if run.has_gates:
                scale = st.slider("Gate scale", 0.0, 1.5, 1.0, 0.05, key=f"scale:{name}", help="Every gate multiplied by this (0: the base model)")
            st.write(generated(bench.base, bench.cache_key, run_key(run), prompt, max_new_tokens, scale))

    st.subheader("Prefix attention for this prompt")
    aligners = {name: run for name, run in chosen.items() if run.has_gates}
    if not aligners:
        st.info("Choose an aligner or LLaMA-Adapter run above to see how its prefix is read.")
        return
    name = st.selectbox("Run", list(aligners), key="attention_run")
    table = prefix_table(bench.base, bench.cache_key, run_key(aligners[name]), prompt)
    tokens = analyses.prompt_tokens(table)
    position = st.select_slider(
        "Prompt token", options=list(tokens.index), value=int(tokens.index.max()), format_func=lambda p: f"{p}: {tokens[p]}", key="attention_position"
    )
    at = table[table.position == position]
    left, right = st.columns(2)
    with left:
        title = f"{name}: ratio |g A V_p| / |z_context| per head at {tokens[position]}"
        show_figure(prefix_share_heatmap(at, title), "attention_share", at)
    with right:
        n_tokens = load_run(*run_key(aligners[name])).config.n_tokens
        if n_tokens == 1:
            st.info(
                f"{name} has one prefix token: the prefix's own softmax over one slot is always 1, so the attention "
                "over the slots says nothing. How much each head listens to the prefix is the ratio on the left."
            )
        else:
            head = st.selectbox("Head", sorted(at["head"].unique()), key="attention_head")
            slots = at[at["head"] == head]
            show_figure(slot_attention_heatmap(slots, f"Attention over the prefix slots, head {head}"), "attention_slots", slots)
    st.caption(
        "Ratio: the size of the gated prefix contribution next to the head's own output, |g A V_p| / |z_context|. "
        "The prefix has a softmax of its own, summing to 1 over its N slots whatever the prompt."
    )


@shows_errors
def gates_view(bench: Workbench) -> None:
    runs = bench.aligner_runs()
    chosen = pick_runs(bench, runs, "gate_runs")
    papers, failed = ({}, [])
    if bench.papers_dir is not None:
        papers, failed = load_papers(str(bench.papers_dir), papers_version(bench.papers_dir))
    for path, reason in failed:
        st.error(f"Paper checkpoint {path} skipped: {reason}")
    chosen_papers: list[str] = []
    if papers:
        chosen_papers = st.multiselect(
            "The paper's checkpoints (LLaMA-2, from the sidebar's directory)", list(papers),
            default=[name for name in papers if name.endswith("7b-1token")][:2], key="gate_papers",
        )
    else:
        st.info(
            "To compare with the paper's released aligners, point the sidebar's \"The paper's checkpoints\" at the "
            "directory of their .pth files (the workplace keeps them in ../shared/paper_aligners)."
        )
    adapters = {name: load_run(*run_key(run)) for name, run in chosen.items()}
    compared = {**adapters, **{f"{n} (paper)": papers[n] for n in chosen_papers}}
    limit = gate_range(compared)  # one colour scale: the heatmaps compare
    columns = st.columns(2)
    for i, (name, al) in enumerate(compared.items()):
        with columns[i % 2]:
            show_figure(gate_heatmap(al, f"{name}: gates", limit), f"heatmap:{name}", gate_table(al))
    if compared:
        title = "Mean |gate| per layer, on relative depth (layer / (n_layers - 1))"
        profiles = gate_profiles(compared)
        show_figure(gate_profile_figure(profiles, title), "gate_profiles", profiles)
    if chosen_papers:
        tokens = token_frame(analyses.same_width({n: papers[n] for n in chosen_papers}))
        show_figure(scatter(tokens, "run", "PCA of the paper checkpoints' tokens (the first one's width)", hover=["slot", "norm"]), "paper_tokens", tokens)

    st.subheader("Ablation curves")
    if not chosen or not needs_model(bench):
        return
    name = st.selectbox("Run", list(chosen), key="ablation_run")
    run = chosen[name]
    form = trained_form(run_key(run))
    if form is None:
        st.info(
            f"{name}: its output form is unknown (its provenance names no form task of the suite's), and the curves "
            "score answers by their form; choose a run trained on a form task."
        )
        return
    if not st.toggle("Compute the gate-scale and ablation curves (minutes on a CPU the first time, then cached)", key="ablation_on"):
        return
    scale, ablation = gate_curves(bench.base, bench.cache_key, run_key(run), form, bench.knowledge, bench.n_subjects, bench.known_only)
    left, right = st.columns(2)
    with left:
        show_figure(gate_scale_figure(scale, f"{name}: every gate × s ({form} form)"), "scale_curve", scale)
    with right:
        show_figure(layer_ablation_figure(ablation, f"{name}: one layer's gates off"), "single_ablation", ablation)
    show_figure(cumulative_ablation_figure(ablation, f"{name}: gates off from the top or the bottom"), "cumulative_ablation", ablation)


@shows_errors
def embeddings_view(bench: Workbench) -> None:
    if not needs_model(bench):
        return
    runs = bench.aligner_runs()
    what = st.radio("Map", ["Activations", "Prefix tokens", "Prefix keys and values"], horizontal=True, key="map_kind")
    method = st.radio("Method", ["pca", "umap"], horizontal=True, key="map_method", format_func=str.upper)
    chosen = pick_runs(bench, runs, "map_runs")
    if not chosen:
        return
    keys, names = tuple(run_key(run) for run in chosen.values()), tuple(chosen)
    if what == "Prefix tokens":
        frame = token_map(keys, names, method)
        show_figure(scatter(frame, "run", f"{method.upper()} of the aligners' tokens", hover=["layer", "slot", "norm"]), "token_map", frame)
        return
    if what == "Prefix keys and values":
        frame = prefix_map(bench.base, bench.cache_key, keys, names, method)
        for kind, title in (("k", "keys"), ("v", "values")):
            part = frame[frame.kind == kind]
            fig = scatter(part, "layer", f"{method.upper()} of the per-layer prefix {title}", hover=["run", "slot"], symbol="run", axes=frame.attrs["axes"][kind])
            show_figure(fig, f"prefix_map:{kind}", part)
        return
    activations = bench_activations(bench, chosen)
    layer = st.slider("Layer (residual stream after the block, last prompt token)", 0, bench.model.cfg.n_layers - 1, bench.model.cfg.n_layers // 2, key="map_layer")
    conditions = ("base", *(condition(run) for run in chosen.values()))
    forms = tuple((condition(run), trained_form(run_key(run))) for run in chosen.values())
    outputs: tuple = ()
    if st.toggle("Answers in the hover: the held-out prompts answered under each condition (minutes on a CPU the first time, then cached)", key="map_answers"):
        outputs = tuple(
            (c, tuple(held_out_answers(bench.base, bench.cache_key, key, keys, bench.knowledge, bench.n_subjects).items()))
            for c, key in zip(conditions, (None, *keys))
        )
    frame = activation_map(activations, bench.cache_key, keys, bench.knowledge, bench.n_subjects, layer, conditions, forms, outputs, method)
    colour = st.selectbox("Colour by", ["condition", "form", *activations.dataset.labels], key="map_colour")
    fig = scatter(
        frame, colour, f"{method.upper()} of layer {layer} activations, coloured by {colour}", hover=["prompt", "output"],
        symbol="condition", selectable=True,
    )
    event = show_figure(fig, "activation_map", frame, on_select="rerun", selection_mode=("box", "lasso"))
    st.caption("Answers are shown for the held-out prompts (subjects none of the chosen runs was trained on). Select points with the box or lasso to list them.")
    rows = [point["customdata"][0] for point in event.selection.points] if event and event.selection.points else []
    if rows:
        st.dataframe(frame.loc[frame.index.isin(rows), ["condition", "form", "prompt", "output", *activations.dataset.labels]], hide_index=True)


@shows_errors
def probes_view(bench: Workbench) -> None:
    if not needs_model(bench):
        return
    chosen = pick_runs(bench, bench.aligner_runs(), "probe_runs")
    if not chosen:
        return
    activations = bench_activations(bench, chosen)
    keys = tuple(run_key(run) for run in chosen.values())
    label = st.selectbox("Label", ["form", *activations.dataset.labels], key="probe_label",
                         help="form: which condition (base or an aligner) produced the activations; the others: knowledge labels of the subjects")
    conditions = tuple(condition(run) for run in chosen.values())
    results = probe_results(activations, bench.cache_key, keys, bench.knowledge, bench.n_subjects, label, conditions)
    title = "Form probe: base vs " + ", ".join(conditions) if label == "form" else f"Knowledge probe: {label}, trained on base, scored on each condition"
    show_figure(probe_figure(results, title), "probe_curves", results)
    st.caption(
        "Cross-validated linear probes on the residual stream after each block (last prompt token), 95% Wilson intervals. "
        "Control: each subject's label replaced by a random one (Hewitt & Liang). Transfer: probes trained on base activations "
        "scored on an aligner's; 'centred' first moves them by the difference of the means. The form probe's folds keep each "
        "prompt's rows under every condition together, so it is at chance before an aligner's first layer."
    )


@shows_errors
def geometry_view(bench: Workbench) -> None:
    if not needs_model(bench):
        return
    runs = bench.aligner_runs()
    if not runs:
        st.info(f"No aligner runs trained on {bench.model_name} in {bench.runs_dir}.")
        return
    injections = [name for name, run in runs.items() if is_injection(load_run(*run_key(run)))]
    tested = [name for name in runs if name not in injections] or list(runs)
    left, right = st.columns(2)
    name = left.selectbox("Run", tested, key="geometry_run")
    control = right.selectbox(
        "Positive control", injections, key="geometry_control", placeholder="no run here injects facts",
        help="a run that injects facts writes knowledge: the test must find its effect outside the null, or it cannot tell",
    )
    shown = {name: runs[name]} | ({control: runs[control]} if control else {})
    activations = bench_activations(bench, shown)
    keys = tuple(run_key(run) for run in shown.values())
    tables = {
        shown_name: geometry_results(activations, bench.cache_key, keys, bench.knowledge, bench.n_subjects, condition(run), tuple(load_run(*run_key(run)).layer_indices))
        for shown_name, run in shown.items()
    }
    for shown_name, table in tables.items():
        role = " (positive control)" if shown_name == control else ""
        show_figure(geometry_figure(table, f"{shown_name}{role}: overlap of its effect Δ with the knowledge subspace"), f"geometry:{shown_name}", table)
    st.dataframe(pd.DataFrame([{"run": n, **analyses.geometry_summary(t), "orthogonal": orthogonal(t)} for n, t in tables.items()]), hide_index=True)
    st.info(control_sentence(geometry_control(tables, [control] if control else [])))
    st.caption(
        "Per layer: Δ = aligned − base activations; its top singular directions against the subspace of the knowledge probes' "
        "weights (a probe of K classes gives K − 1 dimensions). Bands: 5–95% of the overlap of random subspaces of Δ's dimension "
        f"(uniform, or drawn from the base activations' covariance). Orthogonal: within the covariance null's 95% quantile on at least {WITHIN_NULL:.0%} of the layers."
    )


@shows_errors
def mechanism_view(bench: Workbench) -> None:
    if not needs_model(bench):
        return
    analysis = st.radio("Analysis", ANALYSES, horizontal=True, key="mechanism_analysis")
    chosen = pick_runs(bench, bench.runs, "mechanism_runs")
    n_items = st.slider("Held-out prompts", 2, 48, 12, key="mechanism_items", help="about subjects none of the chosen runs was trained on")
    if not chosen:
        return
    keys = tuple(run_key(run) for run in chosen.values())
    adapters = {name: load_run(*run_key(run)) for name, run in chosen.items()}
    if not st.toggle("Compute (a minute or more per run on a CPU the first time, then cached)", key="mechanism_on"):
        return
    options = (keys, bench.knowledge, bench.n_subjects, bench.known_only, n_items)
    if analysis == "Token shift":
        table = shift_table(bench.base, bench.cache_key, keys, tuple(chosen), *options[1:], 24)
        show_figure(token_shift_figure(table, "The share of each run's tokens the base model would write"), "token_shift", table)
        st.dataframe(shift_shares(table), hide_index=True)
        st.dataframe(most_shifted(table), hide_index=True)
        st.caption(
            "Each run answers greedily; each token it writes is ranked under the base model given the same prefix (URIAL): "
            "unshifted (the base model's top token), marginal (2nd or 3rd), shifted (beyond). The base model against itself is all unshifted."
        )
        return
    for name, run in chosen.items():
        frame = analyses.mechanism_frame(trained_form(run_key(run)))
        if analysis == "Logit lens":
            lens = run_analysis(bench.base, bench.cache_key, analysis, run_key(run), *options)
            show_figure(logit_lens_figure(lens, f"{name}: the gold answer under the logit lens ({frame} frame)"), f"lens:{name}", lens)
            st.dataframe(analyses.lens_readable(lens), hide_index=True)
        elif analysis == "Token readout":
            if not isinstance(adapters[name], Aligner):
                st.info(f"{name}: a {run.kind} run has no prefix to read; the token readout is an aligner's.")
                continue
            readout = run_analysis(bench.base, bench.cache_key, analysis, run_key(run), *options)
            show_figure(token_readout_figure(readout, f"{name}: what each adapted layer's prefix writes ({frame} frame)"), f"readout:{name}", readout)
            st.dataframe(analyses.readout_top(readout), hide_index=True)
        else:
            if not adapters[name].switchable_layers:
                st.info(f"{name}: a {run.kind} run has no layers to switch off one by one.")
                continue
            table = run_analysis(bench.base, bench.cache_key, analysis, run_key(run), *options)
            show_figure(layer_dissociation_figure(table, f"{name}: form and knowledge, one layer off or on alone ({frame} frame)"), f"dissociation:{name}", table)
    st.caption(
        {
            "Logit lens": "The residual stream after each block at the answer position, read through the final norm and the unembedding: "
            "the gold answer's rank and log-probability, for the run in its form's frame, the base model in the same frame, and the base "
            "model in its own sentence. A run without a suite form is read in the base model's own sentence.",
            "Token readout": "Each adapted layer's gated prefix through W_O, the final norm and the unembedding (direct logit attribution), "
            "centred over the vocabulary, at the response's start and at the answer position: the tokens it promotes and suppresses, "
            "against the form's first token there and the gold answers here.",
            "Layer dissociation": "The run's write switched off at one layer, and on at one layer alone: the form's first tokens and the "
            "gold answer's log-probability under teacher forcing in its frame; dashed, the whole run and the base model.",
        }[analysis]
    )


@shows_errors
def efficiency_view(bench: Workbench) -> None:
    rows = efficiency_summary(bench.results_dir)
    models = list(dict.fromkeys(row["model"] for row in rows))
    if len(models) > 1:
        chosen = st.multiselect("Base models", models, models, key="efficiency_models")
        rows = [row for row in rows if row["model"] in chosen]
    points = efficiency_frame(rows)
    show_figure(efficiency_figure(points, "The suite's metrics against trainable parameters"), "efficiency", points)
    with st.expander("The tables (mean and interval over items and seeds)"):
        st.markdown(markdown_tables(rows))
    st.caption(f"From {bench.results_dir / 'sweep.json'}, written by `aligner sweep`.")


@shows_errors
def train_view(bench: Workbench) -> None:
    if not needs_model(bench):
        return
    if "trained" in st.session_state:
        st.success(st.session_state.pop("trained"))
    with st.form("train"):
        left, right = st.columns(2)
        task = left.selectbox("Task (the suite's)", TRAINABLE_TASKS, key="train_task", help="instruct, in a prompt format of its own, runs in `aligner sweep`")
        kind = right.selectbox(
            "Method", list(FAMILIES), key="train_kind", format_func=lambda k: f"{k} (size: {FAMILIES[k].counts})"
        )
        size = left.number_input("Size (prefix tokens, rank or virtual tokens: see Method)", 1, 64, 1, key="train_size")
        steps = right.number_input("Steps", 1, 2000, 30, key="train_steps")
        batch_size = left.number_input("Batch size", 1, 64, 8, key="train_batch")
        n_train = right.number_input("Training items", 4, 200, 40, key="train_items")
        known_only = left.checkbox("Only facts the base model knows (the suite's audit)", True, key="train_known")
        name = right.text_input("Run name", "", key="train_name", placeholder=f"e.g. {task}-{kind}-{size}")
        submitted = st.form_submit_button("Train")
    if not submitted:
        history, unreadable = analyses.loss_table({name: run.path for name, run in bench.runs.items()})
        for name, error in unreadable.items():
            st.error(f"The loss curve of {name} is left out: {error}")
        if len(history):
            show_figure(loss_figure(history, "Training loss of the runs (metrics.jsonl)"), "loss_curves", history)
        return
    name = name.strip() or f"{task}-{kind}-{size}"
    if not re.fullmatch(r"[A-Za-z0-9._-]+", name):
        st.error(f"Run name {name!r}: use letters, digits, '.', '_' and '-' only.")
        return
    with bench.base.lock:  # the audit runs the shared model
        examples = task_examples(bench.model, task, int(n_train), known_only)
    config = aligner.TrainConfig(
        steps=int(steps), batch_size=int(batch_size), lr=default_lr(kind), warmup_steps=min(10, int(steps) // 5)
    )
    progress, chart = st.progress(0.0, "Training…"), st.empty()
    losses: list[dict[str, float]] = []

    def on_step(step: int, loss: float) -> bool:
        losses.append({"step": step, "loss": loss})
        progress.progress(step / config.steps, f"step {step}/{config.steps}, loss {loss:.4f}")
        chart.line_chart(pd.DataFrame(losses), x="step", y="loss")
        return False

    with bench.base.lock:  # the adapter stays attached to the shared model while it trains
        train_run(bench.model, examples, bench.runs_dir / name, kind, int(size), config, on_step=on_step, task=task)
    st.session_state["trained"] = f"Trained {name} ({len(examples)} examples of {task}, {steps} steps): it is in every tab now."
    st.rerun()


def sidebar() -> tuple[str, Path, Path | None, Path, str, int, bool]:
    with st.sidebar:
        model_name = st.text_input("Base model", DEFAULTS["model"], help=f"{aligner.DEFAULT_MODEL} (packaged), a Hugging Face id, a path, or 'tiny'")
        runs_dir = st.text_input("Runs directory", DEFAULTS["runs"])
        papers_dir = st.text_input("The paper's checkpoints (directory of .pth)", DEFAULTS["papers"])
        results_dir = st.text_input("Suite results directory", DEFAULTS["results"])
        st.caption("Probing data (Embeddings, Probes, Geometry, ablations)")
        knowledge = st.selectbox("Knowledge set", sorted(KNOWLEDGE_SETS), index=sorted(KNOWLEDGE_SETS).index("capitals"))
        n_subjects = st.number_input(
            "Subjects", 10, 300, APP_SUBJECTS, step=10,
            help=f"each asked with two question templates; {APP_SUBJECTS} by default so that a tab's first visit stays "
            "within a minute on a 2-core CPU (`probe report` reads 90)",
        )
        known_only = st.checkbox(
            "Held out: only facts the base model knows", DEFAULTS["known_only"],
            help="the Gates and Mechanism tabs' held-out facts, as `probe report` picks them (the suite's audit); "
            "off for a random model, which knows none",
        )
    papers = Path(papers_dir) if papers_dir.strip() else None
    return model_name, Path(runs_dir), papers, Path(results_dir), knowledge, int(n_subjects), known_only


def run_list(runs_dir: Path, fingerprint: str | None) -> dict[str, RunInfo]:
    """The readable runs trained on this model; each unreadable run gets an error, the others a note."""
    usable, others = {}, []
    for run in list_runs(runs_dir):
        error = run.error
        if error is None:
            try:  # its tensors too: a run whose file is cut short must not take the views that read it down
                load_run(*run_key(run))
            except (OSError, ValueError) as err:
                error = str(err) if str(run.path) in str(err) else f"{run.path}: {err}"
        if error is not None:
            st.error(f"Run {run.name} skipped: {error}. Remove the directory or retrain it.")
        elif fingerprint is not None and run.base_fingerprint != fingerprint:
            others.append(run.name)
        else:
            usable[run.name] = run
    if others:
        st.caption(f"{len(others)} runs trained on another base model are not shown: {', '.join(others)}.")
    return usable


def main() -> None:
    st.set_page_config(page_title="Aligner workbench", layout="wide")
    st.title("Aligner workbench")
    model_name, runs_dir, papers_dir, results_dir, knowledge, n_subjects, known_only = sidebar()
    base = None
    try:
        base = load_base(model_name)
    except ImportError as err:
        st.error(f"Could not load {model_name!r}: a package is missing ({err}). Run `make install`.")
    except Exception as err:  # shown to the user, not a traceback: the other views still work
        st.error(f"Could not load model {model_name!r}: {err}. Run `make install`, or name another model in the sidebar.")
    if papers_dir is not None and not papers_dir.is_dir():
        st.error(f"The paper's checkpoints: {papers_dir} is not a directory. Point the sidebar at ../shared/paper_aligners or clear it.")
        papers_dir = None
    fingerprint = None if base is None else base.fingerprint
    bench = Workbench(model_name, base, run_list(runs_dir, fingerprint), runs_dir, papers_dir, results_dir, knowledge, n_subjects, known_only)
    views = dict(
        zip(VIEWS, (generate_view, gates_view, embeddings_view, probes_view, geometry_view, mechanism_view, efficiency_view, train_view))
    )
    for tab, (title, view) in zip(st.tabs(list(views), key="view", on_change="rerun"), views.items()):
        with tab:
            if tab.open:
                with progress_bar():
                    view(bench)


main()
