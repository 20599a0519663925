"""Aligner workbench: `streamlit run app.py`. This page only presents what `aligner` computes."""

from __future__ import annotations

from pathlib import Path

import streamlit as st

import aligner
from aligner.runs import RunInfo, list_runs

st.set_page_config(page_title="Aligner workbench", layout="wide")


@st.cache_resource(show_spinner="Loading the base model…")
def get_model(name: str):
    return aligner.load_model(name) if name != "tiny" else aligner.tiny_model()


@st.cache_data(show_spinner="Generating…")
def cached_generate(model_name: str, run_path: str | None, prompt: str, max_new_tokens: int, gate_scale: float) -> str:
    al = aligner.Aligner.load(run_path) if run_path else None
    return aligner.generate(
        get_model(model_name), [prompt], aligner=al, max_new_tokens=max_new_tokens, gate_scale=gate_scale
    )[0]


st.title("Aligner workbench")
with st.sidebar:
    model_name = st.text_input("Base model", aligner.DEFAULT_MODEL, help="A packaged model, a Hugging Face id or a path")
    runs_dir = st.text_input("Runs directory", "runs")

try:
    model = get_model(model_name)
except Exception as err:  # shown to the user, not a traceback
    st.error(f"Could not load model {model_name!r}: {err}. Run `make install`, or name another model.")
    st.stop()

runs = list_runs(Path(runs_dir))
for run in runs:
    if run.error:
        st.error(f"Run {run.path}: {run.error}")
usable: dict[str, RunInfo] = {run.name: run for run in runs if not run.error}
if not usable:
    st.info(f"No runs in {runs_dir!r} yet. Train one: `aligner train --data examples.jsonl --out runs/NAME`.")

st.header("Generate: base vs aligned")
prompt = st.text_area("Prompt", "What is the capital of France?")
chosen = st.multiselect("Runs", list(usable), default=list(usable)[:2])
max_new_tokens = st.slider("Max new tokens", 8, 256, 48)
scales = {name: st.slider(f"Gate scale: {name}", 0.0, 1.5, 1.0, 0.05) for name in chosen}

columns = st.columns(1 + len(chosen))
with columns[0]:
    st.subheader("Base model")
    st.write(cached_generate(model_name, None, prompt, max_new_tokens, 1.0))
for column, name in zip(columns[1:], chosen):
    run = usable[name]
    with column:
        st.subheader(name)
        st.caption(run.summary)
        try:
            st.write(cached_generate(model_name, str(run.path), prompt, max_new_tokens, scales[name]))
        except ValueError as err:  # an aligner that does not fit this model
            st.error(str(err))
