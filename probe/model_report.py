"""The report on a base model and the aligners trained on it (`probe report`): does an aligner change the form
of the answers and leave the model's knowledge alone?

Read from the runs directory: every aligner trained on this very model (same weights fingerprint), with the
output form it was trained for (`training_form`). The evidence, one section each: behaviour (form compliance
and content accuracy of greedy answers), the gate-scale curve, gate ablations, the gates and how much each
head's prefix contributes on real prompts, linear probes (form, knowledge, control, transfer from base to
aligned), the geometry of the aligner's effect against the knowledge probes' directions with a null, and
embeddings. The verdict (`verdict`) combines four tests, each with its threshold below.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
from torch import nn

from aligner import Aligner, model_fingerprint
from aligner.cli import open_model
from aligner.data import load_examples
from aligner.runs import list_runs
from aligner.suite import audit
from aligner.tasks import FORMS, KNOWLEDGE_SETS
from probe.collect import Activations, collect, condition_name
from probe.dataset import ProbeDataset, knowledge_dataset, training_form
from probe.embeddings import embedding_frame, prefix_frame, scatter, token_frame
from probe.gates import (
    DEFAULT_SCALES,
    ablation_curves,
    answers,
    gate_heatmap,
    gate_scale_curve,
    gate_table,
    head_activity,
    head_effects,
    layer_head_heatmap,
    rank_layers,
)
from probe.geometry import knowledge_directions, layer_geometry
from probe.probes import evaluate_probe, selectivity
from probe.report import Report

# The verdict's tests (see `verdict`).
FORM_LEARNED = 0.5  # form compliance gained over the base model, at least
CONTENT_TOLERANCE = 0.1  # content accuracy lost against the base model, at most
TRANSFER_TOLERANCE = 0.05  # mean accuracy lost by base-trained knowledge probes on aligned activations, at most
WITHIN_NULL = 0.8  # share of adapted layers whose overlap is within the covariance null's 95% quantile, at least
HEADS_MEASURED = 8  # heads whose estimated effect is checked by switching their gate off
SCORE_COLUMNS = (*(f"form:{form}" for form in FORMS), "content", "n")  # what `form_scores` gives


def build_model_report(runs: str | Path, model_name: str, out: str | Path, **options: Any) -> dict[str, Path]:
    """Write report.html, metrics.json and summary.md about `model_name` and its aligners under `runs` into `out`;
    `options` are `report_on_model`'s."""
    report = report_on_model(open_model(model_name), runs, **options)
    return report.write(out, model_summary(report))


def report_on_model(
    model: nn.Module,
    runs: str | Path,
    knowledge: str = "capitals",
    n_subjects: int = 90,
    n_eval: int = 48,
    known_only: bool = True,
    only: Sequence[str] = (),
    max_new_tokens: int = 24,
    scales: Sequence[float] = DEFAULT_SCALES,
    cumulative_points: int = 4,
    folds: int = 5,
    umap: bool = True,
    cache: str | Path | None = None,
    seed: int = 0,
) -> Report:
    """The report on `model` and its aligners under `runs` (`only`: these runs of them), in memory: its sections
    (`Report.show` draws them in a notebook) and metrics, the verdict per aligner among them; `build_model_report`
    writes it out. Behaviour is measured on `n_eval` facts of `knowledge` that no run was trained on and, with
    `known_only`, that the base model answers right (the suite's audit, cached per weights): then a fall in content
    accuracy is knowledge the aligner hides, not knowledge the model never had."""
    started = time.perf_counter()
    model_name = model.cfg.model_name
    fingerprint = model_fingerprint(model)
    aligners, skipped = usable_runs(runs, fingerprint, only)
    forms = {name: training_form(al) for name, al in aligners.items()}
    dataset = knowledge_dataset(knowledge, n_subjects)
    every_fact = knowledge_dataset(knowledge, len(KNOWLEDGE_SETS[knowledge].facts()))
    known = audit(model, KNOWLEDGE_SETS[knowledge], fingerprint).known if known_only else None
    evaluation = every_fact.subset(evaluation_rows(every_fact, aligners, n_eval, known))
    report = Report(f"Aligner probe report: {model_name}")
    report.metrics["setup"] = setup_section(report, model_name, fingerprint, aligners, forms, skipped, dataset, evaluation, known_only)

    activations = collect(model, dataset, [None, *(Path(runs) / name for name in aligners)], cache=cache)
    names = {name: condition_name(Path(runs) / name) for name in aligners}  # run -> its condition in `activations`
    outputs = {"base": answers(model, evaluation, max_new_tokens=max_new_tokens, batch_size=len(evaluation))}
    report.metrics["behaviour"] = behaviour_sections(
        report, model, evaluation, aligners, forms, outputs, scales, cumulative_points, max_new_tokens
    )
    report.metrics["gates"] = gates_section(report, aligners, activations, names)
    report.metrics["probes"] = probes_section(report, activations, names, folds, seed)
    report.metrics["geometry"] = geometry_section(report, activations, aligners, names, seed)
    report.metrics["embeddings"] = embeddings_section(report, model, aligners, activations, names, evaluation, outputs, umap, seed)
    report.metrics["verdict"] = {name: verdict(report.metrics, name, forms[name]) for name in aligners}
    report.section("verdict", "Verdict: form changed, knowledge left alone?").table(
        verdict_table(report.metrics["verdict"]),
        f"Supported: all four tests pass (form gain >= {FORM_LEARNED:.0%}, content loss <= {CONTENT_TOLERANCE:.0%}, "
        f"centred transfer loss <= {TRANSFER_TOLERANCE:.0%}, a share >= {WITHIN_NULL:.0%} of adapted layers within the "
        "covariance null); partly: the form learned and one other test failing.",
    )
    report.metrics["wall_time_s"] = round(time.perf_counter() - started, 1)
    return report


def usable_runs(runs: str | Path, fingerprint: str, only: Sequence[str] = ()) -> tuple[dict[str, Aligner], list[tuple[str, str]]]:
    """The aligners under `runs` (`only`: of these names) trained on the model with `fingerprint`, and (run, reason)
    for the others."""
    usable, skipped = {}, []
    listed = list_runs(runs)
    missing = set(only) - {run.name for run in listed}
    if missing:
        raise ValueError(f"{runs}: no run named {', '.join(sorted(missing))}; there are {', '.join(r.name for r in listed)}")
    for run in listed:
        if only and run.name not in only:
            continue
        if run.error is not None:
            skipped.append((run.name, run.error))
            continue
        if not run.is_aligner:  # the report reads prefixes and gates, which other methods (LoRA, ...) have none of
            skipped.append((run.name, f"a {run.kind} run, not an aligner"))
            continue
        al = Aligner.load(run.path)
        if al.base_model.get("fingerprint") != fingerprint:
            skipped.append((run.name, f"trained on another base model ({al.base_model.get('name')})"))
        else:
            usable[run.name] = al
    if not usable:
        raise ValueError(f"{runs}: no aligner trained on this model (weights fingerprint {fingerprint[:12]}...)")
    return usable, skipped


def evaluation_rows(
    dataset: ProbeDataset, aligners: dict[str, Aligner], n_eval: int, known: frozenset[str] | None = None
) -> np.ndarray:
    """`n_eval` prompts of the first template, spread over the entities that no run's training prompts name (and,
    given `known`, that are among them)."""
    trained = []
    for al in aligners.values():
        data = al.provenance.get("training", {}).get("config", {}).get("data")
        if data is not None and Path(data).exists():
            trained += [example.prompt for example in load_examples(data)]
    first_prompts = np.sort(np.unique(dataset.entities, return_index=True)[1])  # each entity's first prompt
    fresh = [i for i in first_prompts if not any(dataset.entities[i] in prompt for prompt in trained)]
    if known is not None:
        fresh = [i for i in fresh if dataset.entities[i] in known]
    if not fresh:
        raise ValueError(f"{dataset.name}: no prompt left to evaluate on: every subject is trained on, or none is known")
    return np.array(fresh)[np.linspace(0, len(fresh) - 1, min(n_eval, len(fresh))).round().astype(int)]


def setup_section(
    report: Report,
    model_name: str,
    fingerprint: str,
    aligners: dict[str, Aligner],
    forms: dict[str, str | None],
    skipped: list[tuple[str, str]],
    dataset: ProbeDataset,
    evaluation: ProbeDataset,
    known_only: bool,
) -> dict[str, Any]:
    section = report.section("setup", "Setup: model, aligners, data")
    runs = pd.DataFrame(
        [
            {
                "run": name, "form": forms[name], "n_tokens": al.config.n_tokens, "start_layer": al.config.start_layer,
                "shared": al.config.shared, "parameters": al.num_parameters(),
                "steps": al.provenance.get("training", {}).get("step"), "final_loss": al.provenance.get("training", {}).get("loss"),
                "data": al.provenance.get("training", {}).get("config", {}).get("data"),
            }
            for name, al in aligners.items()
        ]
    )
    section.text(
        f"Base model {model_name} (weights sha256 {fingerprint[:16]}...). Aligners: every run whose base-model "
        f"fingerprint matches; its form is the output form (of the task suite's) whose checker its training responses "
        f"pass. Probing data: {dataset.name}, {len(dataset)} prompts about {len(set(dataset.entities))} subjects of the "
        f"suite's knowledge set {dataset.knowledge.name}, each asked with both question templates and labelled with "
        f"{', '.join(dataset.labels)}. Behaviour is measured on {len(evaluation)} prompts (first template) about "
        "subjects that no run was trained on"
        + (" and whose answer the base model knows (the task suite's audit)." if known_only else ".")
    )
    section.table(runs)
    if skipped:
        section.table(pd.DataFrame(skipped, columns=["run", "why it is left out"]))
    return {"model": model_name, "fingerprint": fingerprint, "runs": runs, "skipped": skipped,
            "dataset": dataset.name, "n_prompts": len(dataset), "n_eval": len(evaluation), "known_only": known_only}


def behaviour_sections(
    report: Report,
    model: nn.Module,
    evaluation: ProbeDataset,
    aligners: dict[str, Aligner],
    forms: dict[str, str | None],
    outputs: dict[str, list[str]],
    scales: Sequence[float],
    cumulative_points: int,
    max_new_tokens: int,
) -> dict[str, Any]:
    """§ behaviour, gate scale and ablation; fills `outputs` with each run's answers at gate scale 1."""
    behaviour_section = report.section("behaviour", "Behaviour: form compliance and content accuracy")
    scale_section = report.section("gate_scale", "Gate-scale curves")
    ablation_section = report.section("ablation", "Gate ablations")
    scale_section.text(
        "Every gate multiplied by s (0: the base model; 1: the aligner as trained). Where does the form switch on, "
        "and does content accuracy fall with it?"
    )
    ablation_section.text(
        "Gates switched off one adapted layer at a time, and cumulatively from the top and from the bottom. "
        "Layers are ranked by the loss of form compliance when switched off alone. Heads are ranked by how much "
        "the loss of the aligner's own answers rises when one head's gate is switched off: estimated for every head "
        f"from one backward pass (-g dL/dg), and measured for the {HEADS_MEASURED} heads estimated highest."
    )
    metrics: dict[str, Any] = {"base": form_scores(outputs["base"], evaluation)}
    for name, al in aligners.items():
        form = forms[name]
        if form is None:
            behaviour_section.text(f"{name}: its training data fits none of the suite's forms ({', '.join(FORMS)}); no behaviour measured.")
            continue
        options = {"max_new_tokens": max_new_tokens, "batch_size": len(evaluation)}
        curve = gate_scale_curve(model, evaluation, al, form, list(scales) if 1.0 in scales else [*scales, 1.0], **options)
        outputs[name] = curve.loc[curve.scale == 1.0, "outputs"].iloc[0]
        ablation = ablation_curves(model, evaluation, al, form, cumulative_points, **options)
        reference = {"form": curve.loc[curve.scale == 1.0, "form"].iloc[0], "content": curve.loc[curve.scale == 1.0, "content"].iloc[0]}
        ranking = rank_layers(ablation, reference)
        heads = head_effects(model, evaluation, al, outputs[name], exact=HEADS_MEASURED, batch_size=len(evaluation))
        measured = heads.dropna(subset=["exact"])
        switch_on = curve[curve.form >= 0.5].scale.min()
        metrics[name] = {
            "form": form, **form_scores(outputs[name], evaluation, form),
            "scale_curve": curve.drop(columns="outputs"), "form_switch_on_scale": switch_on,
            "ablation": ablation, "layer_ranking": ranking, "head_effects": heads,
            # how well the one-pass estimate orders the heads that were also switched off
            "head_estimate_spearman": float(measured.estimate.corr(measured.exact, method="spearman")),
        }
        long = curve.melt(id_vars="scale", value_vars=["form", "content"], var_name="measure", value_name="share")
        scale_section.figure(px.line(long, x="scale", y="share", color="measure", markers=True, title=f"{name}: gate scale ({form} form)"))
        single = ablation[ablation["mode"] == "single"].melt(id_vars="layer", value_vars=["form", "content"], var_name="measure", value_name="share")
        ablation_section.figure(px.line(single, x="layer", y="share", color="measure", markers=True, title=f"{name}: one layer's gates off"))
        cumulative = ablation[ablation["mode"] != "single"].melt(id_vars=["mode", "n_off"], value_vars=["form", "content"], var_name="measure", value_name="share")
        ablation_section.figure(
            px.line(cumulative, x="n_off", y="share", color="measure", line_dash="mode", markers=True, title=f"{name}: layers' gates off, cumulatively")
        )
        ablation_section.table(ranking.head(5), f"{name}: the five layers whose gates matter most for the form.")
        ablation_section.figure(
            layer_head_heatmap(heads, "estimate", f"{name}: loss rise of its own answers, one head's gate off (estimate)", "loss rise")
        )
        ablation_section.table(
            heads.head(HEADS_MEASURED),
            f"{name}: the heads whose gated prefix carries its answers most; estimate = -g dL/dg, exact = measured with "
            "the gate off (mean loss per answer token, nats).",
        )
    table = pd.DataFrame(
        [{"condition": c, "trained form": m.get("form"), **{k: m[k] for k in SCORE_COLUMNS}} for c, m in metrics.items()]
    )
    behaviour_section.table(table, "form:F = share of answers that the suite's checker of form F passes; content = share holding a gold answer; n = prompts.")
    examples = pd.DataFrame({"prompt": evaluation.prompts, "gold": evaluation.answers, **outputs}).head(8)
    behaviour_section.table(examples, "The first answers, greedy, as generated.")
    return metrics


def form_scores(outputs: list[str], evaluation: ProbeDataset, form: str | None = None) -> dict[str, float]:
    """Compliance of `outputs` with every form of the suite, and their content accuracy (a gold answer as it
    appears in `form`, the form the answers were meant to take): the keys of SCORE_COLUMNS."""
    return {
        **{f"form:{name}": float(evaluation.form_passed(outputs, name).mean()) for name in FORMS},
        "content": float(evaluation.content_correct(outputs, form).mean()),
        "n": len(outputs),
    }


def gates_section(report: Report, aligners: dict[str, Aligner], activations: Activations, names: dict[str, str]) -> dict[str, Any]:
    section = report.section("gates", "Gates and the prefix's contribution per head")
    section.text(
        "Heatmaps of the trained gates; then, on the probing prompts (last prompt token), the size of each head's "
        "gated prefix contribution next to the head's own output (share = |g A V_p| / |z_context|). The prefix has "
        "its own softmax, so its attention sums to 1 over its slots whatever the input: the share, not an attention "
        "mass, says how much a head listens to it."
    )
    metrics = {}
    for name, al in aligners.items():
        section.figure(gate_heatmap(al, f"{name}: gates"))
        activity = head_activity(activations, names[name])
        section.figure(
            px.imshow(activity.pivot(index="layer", columns="head", values="share"), aspect="auto", color_continuous_scale="Viridis",
                      title=f"{name}: prefix share per head (mean over prompts)")
        )
        top = activity.sort_values("share", ascending=False).head(5).merge(gate_table(al), on=["layer", "head"])
        section.table(top, f"{name}: the five heads with the largest prefix share.")
        metrics[name] = {"gates": gate_table(al), "activity": activity}
    return metrics


def probes_section(report: Report, activations: Activations, names: dict[str, str], folds: int, seed: int) -> dict[str, Any]:
    section = report.section("probes", "Linear probes: form, knowledge, control, transfer")
    section.text(
        f"Standardised logistic regression per layer, {folds}-fold cross-validated, on the residual stream after each "
        "block at the last prompt token; 95% Wilson intervals over the out-of-fold predictions. Control: each "
        "subject's label replaced by a random one, kept wherever the subject appears (Hewitt & Liang), so a probe that memorises subjects scores on "
        "it too; selectivity = task - control. Transfer: the probes trained on base activations, scored on the "
        "aligned activations of the same held-out prompts; 'centred': those activations moved by the difference of "
        "the two conditions' means first, so that a constant shift (which moves every probe's bias) is taken out and "
        "what is left is whether the classes still lie where the probe looks. The form probe's folds keep each "
        "prompt's rows under every condition together, so that it never scores a prompt it saw under another "
        "condition: before an aligner's first layer those rows are identical, and there it is at chance."
    )
    form_results = form_probe_curves(activations, ["base", *names.values()], folds=folds, seed=seed)
    section.figure(probe_figure(form_results, "Form probe: which condition (base or which aligner) produced the activations"))
    metrics: dict[str, Any] = {"form": form_results, "form_selectivity": selectivity(form_results), "knowledge": {}, "selectivity": {}}
    for label in activations.dataset.labels:  # each run's condition is named after it
        results = knowledge_probe_curves(activations, label, list(names.values()), folds=folds, seed=seed)
        metrics["selectivity"][label] = selectivity(results, scored_on="base")
        section.figure(probe_figure(results, f"Knowledge probe: {label}, trained on base activations"))
        metrics["knowledge"][label] = results
    peak = {label: s.loc[s.selectivity.idxmax()] for label, s in metrics["selectivity"].items()}
    section.table(
        pd.DataFrame([{"label": label, "layer": int(row.layer), "selectivity": row.selectivity} for label, row in peak.items()]),
        "The layer of largest selectivity for each knowledge label.",
    )
    return metrics


def probe_figure(results: pd.DataFrame, title: str) -> go.Figure:
    """Accuracy per layer with its interval, one line per (target, scored_on), and the majority-class rate."""
    frame = results.assign(curve=results.target + " / " + results.scored_on)
    fig = px.line(
        frame, x="layer", y="accuracy", color="curve", markers=True, title=title,
        error_y=frame.ci_high - frame.accuracy, error_y_minus=frame.accuracy - frame.ci_low,
    )
    fig.add_hline(y=float(results.chance.iloc[0]), line_dash="dot", annotation_text="majority class")
    return fig


def form_probe_curves(activations: Activations, conditions: Sequence[str], folds: int = 5, seed: int = 0) -> pd.DataFrame:
    """Accuracy per layer of a probe telling which of `conditions` (base, runs) produced the residual stream,
    with its control task: how early and how linearly each aligner's form is written in. A prompt's rows under the
    conditions share a fold: before the aligner's first layer they are identical, and there the probe is at chance."""
    n = len(activations.dataset)
    stacked = np.concatenate([np.asarray(activations.resid(c)) for c in conditions])
    labels, prompts = np.repeat(list(conditions), n), np.tile(np.arange(n), len(conditions))
    return evaluate_probe(stacked, labels, prompts, folds=folds, seed=seed, desc="form probe", groups=prompts)


def knowledge_probe_curves(
    activations: Activations, label: str, conditions: Sequence[str], folds: int = 5, seed: int = 0
) -> pd.DataFrame:
    """Accuracy per layer of probes for the knowledge label `label`, trained on the base model's activations and
    scored on held-out prompts: on base ("base"), on each aligned condition ("NAME") and on it centred on the
    base mean ("NAME (centred)": a constant shift taken out); the control task on base. `conditions` are
    aligned conditions of `activations`."""
    base = np.asarray(activations.resid("base"))
    transfer = {}
    for condition in conditions:
        aligned = np.asarray(activations.resid(condition))
        transfer[condition] = aligned
        transfer[f"{condition} (centred)"] = aligned - aligned.mean(axis=0) + base.mean(axis=0)  # per layer and feature
    dataset = activations.dataset
    results = evaluate_probe(
        base, dataset.labels[label], dataset.entities, transfer=transfer, folds=folds, seed=seed, desc=f"{label} probe"
    )
    results["scored_on"] = results["scored_on"].replace({"self": "base"})
    return results


def geometry_section(report: Report, activations: Activations, aligners: dict[str, Aligner], names: dict[str, str], seed: int) -> dict[str, Any]:
    section = report.section("geometry", "Geometry: the aligner's effect against the knowledge directions")
    section.text(
        "Per layer, Δ = aligned - base residual activations of the same prompts; its top singular directions (90% "
        "of its energy, at most 8) against the subspace of the knowledge probes' weights (all labels, fitted on base "
        "activations; a probe of K classes gives K - 1 dimensions, its class weights centred). Overlap = mean squared cosine of the principal angles. Bands: 5-95% of the overlap of random "
        "subspaces of Δ's dimension, uniform (random) or drawn from the base activations' covariance (covariance)."
    )
    base = np.asarray(activations.resid("base"))
    knowledge = knowledge_directions(base, activations.dataset.labels)
    metrics = {}
    for name, al in aligners.items():
        table = layer_geometry(base, np.asarray(activations.resid(names[name])), knowledge, list(al.layer_indices), seed=seed)
        section.figure(geometry_figure(table, f"{name}: overlap of Δ with the knowledge subspace"))
        metrics[name] = table
    return metrics


def geometry_figure(table: pd.DataFrame, title: str) -> go.Figure:
    fig = go.Figure()
    for null, colour in (("random", "rgba(120,120,120,0.25)"), ("covariance", "rgba(230,120,30,0.25)")):
        fig.add_trace(go.Scatter(x=table.layer, y=table[f"{null}_q95"], mode="lines", line={"width": 0}, showlegend=False))
        fig.add_trace(go.Scatter(x=table.layer, y=table[f"{null}_q05"], mode="lines", line={"width": 0}, fill="tonexty", fillcolor=colour, name=f"{null} null, 5-95%"))
    fig.add_trace(go.Scatter(x=table.layer, y=table.overlap, mode="lines+markers", name="observed", line={"color": "black"}))
    fig.update_layout(title=title, xaxis_title="layer", yaxis_title="overlap (mean cos² of principal angles)")
    return fig


def embeddings_section(
    report: Report,
    model: nn.Module,
    aligners: dict[str, Aligner],
    activations: Activations,
    names: dict[str, str],
    evaluation: ProbeDataset,
    outputs: dict[str, list[str]],
    umap: bool,
    seed: int,
) -> dict[str, Any]:
    section = report.section("embeddings", "Embeddings: tokens, prefix keys and values, activations")
    tokens = token_frame(aligners, seed=seed)
    section.figure(scatter(tokens, "run", "PCA of the aligners' tokens", hover=["slot", "n_tokens", "norm"]))
    prefix = prefix_frame(model, aligners, seed=seed)
    for kind, frame in prefix.groupby("kind"):
        section.figure(scatter(frame, "layer", f"PCA of the per-layer prefix {'keys' if kind == 'k' else 'values'}", hover=["run", "slot"], symbol="run"))
    dataset = activations.dataset
    layer = model.cfg.n_layers // 2
    answered = dict(zip(evaluation.prompts, range(len(evaluation))))
    conditions = {"base": "base", **names}
    info = pd.concat(
        [
            pd.DataFrame(
                {
                    "condition": run, "prompt": dataset.prompts, "entity": dataset.entities,
                    **{label: values for label, values in dataset.labels.items()},
                    "output": [outputs[run][answered[p]] if run in outputs and p in answered else "" for p in dataset.prompts],
                }
            )
            for run in conditions
        ],
        ignore_index=True,
    )
    X = np.concatenate([np.asarray(activations.resid(condition))[:, layer] for condition in conditions.values()])
    frame = embedding_frame(X, info, "umap" if umap else "pca", seed)
    method = "UMAP" if umap else "PCA"
    for colour in ("condition", *dataset.labels):
        section.figure(scatter(frame, colour, f"{method} of layer {layer} activations, coloured by {colour}", hover=["prompt", "output"], symbol="condition"))
    section.text(f"Activations: residual stream after block {layer}, last prompt token; hover for the prompt and the answer (answers for the evaluation prompts only).")
    return {"tokens": tokens, "prefix": prefix, "activations_layer": layer, "activations": frame.drop(columns=["output"])}


def verdict(metrics: dict[str, Any], name: str, form: str | None) -> dict[str, Any]:
    """The claim "this aligner changes the form of the answers and leaves knowledge alone", as four tests:
    form learned (compliance gain >= FORM_LEARNED), content kept (accuracy loss <= CONTENT_TOLERANCE),
    knowledge readable as before (mean loss of the base-trained probes over adapted layers and labels, on the
    aligned activations centred on the base mean, <= TRANSFER_TOLERANCE: a constant shift is the geometry test's
    business; the raw loss is reported beside it), and
    orthogonal (a share >= WITHIN_NULL of adapted layers with overlap within the covariance null's 95% quantile).
    Supported: all four; partly: form learned and one of the other three failing; else not supported."""
    geometry = metrics["geometry"][name]
    layers = set(geometry.layer)
    losses: dict[str, list[float]] = {name: [], f"{name} (centred)": []}
    for results in metrics["probes"]["knowledge"].values():
        task = results[(results.target == "task") & results.layer.isin(layers)].pivot(index="layer", columns="scored_on", values="accuracy")
        for scored_on in losses:
            losses[scored_on].append(float((task["base"] - task[scored_on]).mean()))
    tests: dict[str, Any] = {
        "transfer_loss": float(np.mean(losses[name])),
        "centred_transfer_loss": float(np.mean(losses[f"{name} (centred)"])),
        "within_null_share": float((geometry.overlap <= geometry.covariance_q95).mean()),
        "mean_overlap": float(geometry.overlap.mean()),
        "mean_covariance_null_median": float(geometry.covariance_q50.mean()),
    }
    passed = {
        "knowledge_readable": tests["centred_transfer_loss"] <= TRANSFER_TOLERANCE,
        "orthogonal": tests["within_null_share"] >= WITHIN_NULL,
    }
    behaviour = metrics["behaviour"].get(name)
    if behaviour is not None:
        base = metrics["behaviour"]["base"]
        tests["form_gain"] = behaviour[f"form:{form}"] - base[f"form:{form}"]
        tests["content_change"] = behaviour["content"] - base["content"]
        passed["form_learned"] = tests["form_gain"] >= FORM_LEARNED
        passed["content_kept"] = tests["content_change"] >= -CONTENT_TOLERANCE
    if not passed.get("form_learned", False):
        outcome = "not supported (no form learned)" if behaviour is not None else "untested (no known form)"
    else:
        failing = [test for test, ok in passed.items() if not ok]
        outcome = "supported" if not failing else "partly supported" if len(failing) == 1 else "not supported"
    return {**tests, "passed": passed, "outcome": outcome}


def verdict_table(verdicts: dict[str, dict[str, Any]]) -> pd.DataFrame:
    """One row per aligner (the `verdict` of each, by run name): its outcome, whether each test passed, and the
    numbers the tests read."""
    return pd.DataFrame(
        [
            {"run": name, "outcome": v["outcome"], **{f"{test} passed": ok for test, ok in v["passed"].items()},
             **{key: value for key, value in v.items() if key not in ("outcome", "passed")}}
            for name, v in verdicts.items()
        ]
    )


def model_summary(report: Report) -> str:
    """summary.md: the verdict per aligner, each number with the section it comes from."""
    m = report.metrics
    ref = report.ref
    aligners = list(m["verdict"])
    lines = [f"# {report.title}", "", f"Model {m['setup']['model']}; {len(aligners)} aligners; probing data {m['setup']['dataset']} "
             f"({m['setup']['n_prompts']} prompts), behaviour on {m['setup']['n_eval']} held-out prompts"
             + (" about facts the base model knows" if m["setup"]["known_only"] else "") + f" ({ref('setup')}).", ""]
    base = m["behaviour"]["base"]
    lines.append(
        f"Base model ({ref('behaviour')}): content accuracy {base['content']:.0%}; "
        + ", ".join(f"{form} form {base[f'form:{form}']:.0%}" for form in FORMS) + "."
    )
    for name in aligners:
        v = m["verdict"][name]
        lines += ["", f"## {name}: {v['outcome']}"]
        b = m["behaviour"].get(name)
        if b is not None:
            lines.append(
                f"- Form ({ref('behaviour')}): {b['form']} compliance {b['form:' + b['form']]:.0%} (gain {v['form_gain']:+.0%}); "
                f"content {b['content']:.0%} (change {v['content_change']:+.0%})."
            )
            switch_on = b["form_switch_on_scale"]
            reached = f"first reaches 50% at s = {switch_on}" if np.isfinite(switch_on) else "never reaches 50%"
            curve = b["scale_curve"].set_index("scale")
            lines.append(
                f"- Gate scale ({ref('gate_scale')}): form compliance {reached}; content accuracy "
                + ", ".join(f"{curve.content[s]:.0%} at s = {s}" for s in (curve.index.min(), 1.0, curve.index.max())) + "."
            )
            top = b["layer_ranking"].head(3)
            lines.append(
                f"- Ablation ({ref('ablation')}): the layers whose gates matter most for the form are "
                + ", ".join(f"{int(r.layer)} (form {-r.form_drop:+.0%})" for r in top.itertuples()) + "."
            )
            measured = b["head_effects"].dropna(subset=["exact"]).sort_values("exact", ascending=False)
            lines.append(
                f"- Heads ({ref('ablation')}): of the {len(measured)} heads estimated to matter most, switching off the gate of "
                + ", ".join(f"L{int(r.layer)}H{int(r.head)} ({r.exact:+.3f})" for r in measured.head(3).itertuples())
                + f" raises the loss of its own answers most (nats/token); the one-pass estimate orders these heads with "
                f"Spearman {b['head_estimate_spearman']:.2f} against switching them off."
            )
        lines.append(
            f"- Transfer ({ref('probes')}): base-trained knowledge probes lose {v['transfer_loss']:+.1%} accuracy on "
            f"its activations as they are and {v['centred_transfer_loss']:+.1%} once they are centred on the base mean, "
            f"on average over the adapted layers and labels (threshold {TRANSFER_TOLERANCE:.0%}, centred)."
        )
        lines.append(
            f"- Geometry ({ref('geometry')}): mean overlap of Δ with the knowledge subspace {v['mean_overlap']:.3f} "
            f"against a covariance-null median of {v['mean_covariance_null_median']:.3f}; {v['within_null_share']:.0%} "
            f"of adapted layers within the null's 95% quantile (threshold {WITHIN_NULL:.0%})."
        )
        lines.append("- Tests passed: " + ", ".join(f"{k} {'yes' if ok else 'NO'}" for k, ok in v["passed"].items()) + ".")
    lines += ["", f"Built in {m['wall_time_s']} s. All numbers: metrics.json; figures and tables: report.html."]
    return "\n".join(lines) + "\n"
