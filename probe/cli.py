"""The command line: `probe report`, `probe paper-report`, `probe train-demo` (also `python -m probe ...`).

Each command imports what it runs (torch, TransformerLens) when it runs: `--help` answers without them."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from aligner.errors import one_line_errors
from aligner.packaged import DEFAULT_MODEL, MODEL_HELP

app = typer.Typer(
    rich_markup_mode="markdown",
    help="Probe what aligners change inside a model: activations, probes, gates, geometry, embeddings, reports.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def wrote(paths: dict[str, Path], started: float) -> None:
    for path in paths.values():
        typer.echo(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB)")
    typer.echo(f"in {time.perf_counter() - started:.0f} s")


@app.command()
def report(
    out: Annotated[Path, typer.Option(help="report directory, e.g. reports/NAME/")],
    runs: Annotated[Path, typer.Option(help="directory of runs; every aligner trained on --model is used")] = Path("runs"),
    model: Annotated[str, typer.Option(help=MODEL_HELP)] = DEFAULT_MODEL,
    knowledge: Annotated[str, typer.Option(help="the suite's knowledge set asked about: capitals, elements, cities")] = "capitals",
    n_subjects: Annotated[int, typer.Option(help="subjects (countries, elements, cities) in the probing data")] = 90,
    n_eval: Annotated[int, typer.Option(help="held-out prompts answered for the behaviour sections")] = 48,
    known_only: Annotated[bool, typer.Option(help="behaviour on facts the base model knows (--no-known-only: any, for a random model)")] = True,
    run: Annotated[Optional[list[str]], typer.Option(help="report on this run of --runs only (repeatable)")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="tokens per answer (the suite's tasks use 24)")] = 24,
    folds: Annotated[int, typer.Option(help="cross-validation folds of the probes")] = 5,
    umap: Annotated[bool, typer.Option(help="UMAP for the activation maps (--no-umap: PCA)")] = True,
    cache: Annotated[Optional[Path], typer.Option(help="activation cache (default: the aligner cache's probe/)")] = None,
    seed: Annotated[int, typer.Option(help="seeds folds, control labels, nulls and UMAP")] = 0,
    checker: Annotated[Optional[str], typer.Option(help="regex a well-formed answer matches in full: the form of runs that record no suite task")] = None,
    n_mechanism: Annotated[int, typer.Option(help="held-out prompts read by the mechanism sections (lens, readout, shift)")] = 24,
    n_dissociation: Annotated[int, typer.Option(help="of those, the prompts the layer dissociation reads (twice per layer)")] = 8,
) -> None:
    """The report on one model and its aligners: report.html, metrics.json, summary.md. A run's output form is the
    one its training recorded, else --checker's, else unknown (its behaviour is then untested)."""
    from probe.model_report import build_model_report

    started = time.perf_counter()
    with one_line_errors():
        paths = build_model_report(
            runs, model, out, knowledge=knowledge, n_subjects=n_subjects, n_eval=n_eval, known_only=known_only,
            only=tuple(run or ()), max_new_tokens=max_new_tokens, folds=folds, umap=umap, cache=cache, seed=seed,
            checker=checker, n_mechanism=n_mechanism,
            n_dissociation=n_dissociation,
        )
    wrote(paths, started)


@app.command("paper-report")
def paper_report(
    out: Annotated[Path, typer.Option(help="report directory, e.g. reports/paper-gates/")],
    dir: Annotated[Path, typer.Option(help="directory of the authors' .pth checkpoints")] = Path("../shared/paper_aligners"),
) -> None:
    """The gate and token report of the paper's released checkpoints; needs no base model."""
    from probe.paper_report import build_paper_report

    started = time.perf_counter()
    with one_line_errors():
        paths = build_paper_report(dir, out)
    wrote(paths, started)


@app.command("train-demo")
def train_demo(
    runs: Annotated[Path, typer.Option(help="where the runs go: RUNS/probe-demo-*")] = Path("runs"),
    model: Annotated[str, typer.Option(help=MODEL_HELP)] = DEFAULT_MODEL,
    steps: Annotated[int, typer.Option(help="optimizer steps per run")] = 50,
    only: Annotated[Optional[list[str]], typer.Option(help="train only this demo run (repeatable)")] = None,
    known_only: Annotated[bool, typer.Option(help="the suite's audit picks the facts (--no-known-only: any, for a random model)")] = True,
) -> None:
    """Train the demonstration runs (output forms, a value aligner, knowledge injection, LoRA and LLaMA-Adapter
    counterparts) that the app and the report read; runs already there are kept."""
    from aligner.loading import open_model
    from probe.demo import train_demo_runs

    with one_line_errors():
        paths = train_demo_runs(open_model(model), runs, steps=steps, known_only=known_only, only=tuple(only or ()))
    typer.echo("\n".join(f"run {path}" for path in paths))
