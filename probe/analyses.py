"""What the model report (`probe report`) and the app both show, computed: each function takes runs, a probing
data set, activations or answers and returns a DataFrame (or the few numbers of one row) that `probe.figures`
draws, `probe.verdict` judges, and `probe.model_report` and app.py lay out. Neither of those computes anything of
its own, so that a number in the report and the same number in the app always agree.

    run_table            the aligners of a report: their settings and training
    form_scores          compliance with every form of the suite and content accuracy of a set of answers
    gate_curves          the gate-scale curve and the gate ablations on held-out prompts
    behaviour            those, with the layers ranked and the heads' effects on the aligner's own answers
    top_prefix_heads     the heads whose gated prefix is largest next to their own output
    probe_curves         form and knowledge probes per layer, with control and transfer
    geometry_table       the overlap of the aligner's effect with the knowledge probes' subspace, against nulls
    transfer_losses      how much base-trained knowledge probes lose on an aligner's activations
    activation_frame     a 2-D map of the activations at one layer, with prompt, labels, form and answer
    held_out_answers     each held-out prompt's answer, with a run or without
    prompt_tokens        the prompt's tokens by position, as `prefix_attention` read them
    same_width           the aligners that share the first one's width, for one map of their tokens
    loss_table           the runs' training losses, and which logs cannot be read
    mechanism_frame      the frame a run's mechanism analyses read the gold answer in: its form's, or its own sentence
    lens_layers          the logit lens per layer: the gold token's median rank, mean log-probability, top-1 share
    lens_readable        per reading, where the gold answer becomes and stays the lens's top token
    readout_top          per adapted layer, the tokens its gated prefix promotes and suppresses most, and the gold's
    dissociation_summary the layer that alone writes most of the form, beside the whole adapter and the base
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
from torch import nn

from aligner.adapter import Adapter
from aligner.model import Aligner
from aligner.runs import run_losses
from aligner.tasks import FORMS
from probe.collect import Activations
from probe.dataset import ProbeDataset, evaluation_set
from probe.embeddings import embedding_frame
from probe.gates import (
    DEFAULT_SCALES,
    ablation_curves,
    answers,
    gate_scale_curve,
    gate_table,
    head_effects,
    rank_layers,
)
from probe.geometry import knowledge_directions, layer_geometry
from probe.lens import readable_from
from probe.probes import evaluate_probe

SCORE_COLUMNS = (*(f"form:{form}" for form in FORMS), "content", "n")  # what `form_scores` gives
# The gate scale at which the form "switches on": the first at which most answers take it, so that the scale
# says where the form becomes the answers' usual behaviour rather than where it first shows.
SWITCH_ON = 0.5
# Heads whose estimated effect is also measured by switching their gate off. Each measured head costs a pass over
# every answer, where the estimate costs one for all heads; the heads the estimate ranks first are those whose
# order matters, and eight of them are enough for the rank correlation between estimate and measure to mean
# something.
HEADS_MEASURED = 8
MAX_NEW_TOKENS = 24  # tokens per answer: the task suite's, so that the report and the suite score alike


def run_table(aligners: Mapping[str, Aligner], forms: Mapping[str, str | None]) -> pd.DataFrame:
    """One row per aligner: its trained form (`forms`), prefix tokens, first layer, sharing, parameters, and its
    training's steps, final loss and data file as its provenance records them."""
    rows = []
    for name, al in aligners.items():
        training = al.provenance.get("training", {})
        rows.append(
            {
                "run": name, "form": forms[name], "n_tokens": al.config.n_tokens, "start_layer": al.config.start_layer,
                "shared": al.config.shared, "parameters": al.num_parameters(), "steps": training.get("step"),
                "final_loss": training.get("loss"), "data": training.get("config", {}).get("data"),
            }
        )
    return pd.DataFrame(rows)


def form_scores(
    outputs: list[str], evaluation: ProbeDataset, form: str | None = None, also: Sequence[str] = ()
) -> dict[str, float]:
    """Compliance of `outputs` with every form of the suite, with `form` (the form the answers were meant to take)
    and with the forms `also` (users' "/REGEX/" forms), and their content accuracy (a gold answer as it appears in
    `form`): the keys of SCORE_COLUMNS, and form:F for each form F beyond the suite's."""
    names = dict.fromkeys([*FORMS, *also, *([form] if form is not None else [])])
    return {
        **{f"form:{name}": float(evaluation.form_passed(outputs, name).mean()) for name in names},
        "content": float(evaluation.content_correct(outputs, form).mean()),
        "n": len(outputs),
    }


def score_table(scores: Mapping[str, Mapping[str, Any]]) -> pd.DataFrame:
    """One row per condition of `scores` (condition -> `form_scores`, with the trained "form" where there is one)."""
    return pd.DataFrame(
        [
            {"condition": c, "trained form": s.get("form"), **{k: v for k, v in s.items() if k.startswith("form:")},
             "content": s["content"], "n": s["n"]}
            for c, s in scores.items()
        ]
    )


def gate_curves(
    model: nn.Module,
    evaluation: ProbeDataset,
    aligner: Aligner,
    form: str,
    scales: Sequence[float] = DEFAULT_SCALES,
    cumulative_points: int = 4,
    max_new_tokens: int = MAX_NEW_TOKENS,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The gate-scale curve on `evaluation` (`gate_scale_curve`, scale 1, the aligner as trained, always among its
    scales; its outputs column holds the answers) and the ablation curves (`ablation_curves`), scored by `form`."""
    options = {"max_new_tokens": max_new_tokens, "batch_size": len(evaluation)}
    scales = list(scales) if 1.0 in scales else [*scales, 1.0]
    curve = gate_scale_curve(model, evaluation, aligner, form, scales, **options)
    return curve, ablation_curves(model, evaluation, aligner, form, cumulative_points, **options)


def switch_on_scale(curve: pd.DataFrame) -> float:
    """The smallest gate scale at which form compliance reaches SWITCH_ON; NaN when none does."""
    return curve[curve.form >= SWITCH_ON].scale.min()


def estimate_agreement(heads: pd.DataFrame) -> float:
    """Spearman correlation of the one-pass estimate with the measured effect, over the heads measured: how well
    the estimate orders the heads that matter (`head_effects`)."""
    measured = heads.dropna(subset=["exact"])
    return float(measured.estimate.corr(measured.exact, method="spearman"))


def behaviour(
    model: nn.Module,
    evaluation: ProbeDataset,
    aligner: Aligner,
    form: str,
    scales: Sequence[float] = DEFAULT_SCALES,
    cumulative_points: int = 4,
    max_new_tokens: int = MAX_NEW_TOKENS,
    heads_measured: int = HEADS_MEASURED,
) -> tuple[dict[str, Any], list[str]]:
    """What an aligner trained for `form` does to the answers to `evaluation`, and those answers (at gate scale 1):
    its `form_scores`, the gate-scale curve and the scale where the form switches on, the ablation curves with the
    layers ranked by how much the form needs them, and each head's effect on the loss of the aligner's own answers
    (`head_effects`, `heads_measured` heads measured) with the estimate's agreement."""
    curve, ablation = gate_curves(model, evaluation, aligner, form, scales, cumulative_points, max_new_tokens)
    trained = curve[curve.scale == 1.0].iloc[0]
    heads = head_effects(model, evaluation, aligner, trained.outputs, exact=heads_measured, batch_size=len(evaluation))
    metrics = {
        "form": form, **form_scores(trained.outputs, evaluation, form),
        "scale_curve": curve.drop(columns="outputs"), "form_switch_on_scale": switch_on_scale(curve),
        "ablation": ablation, "layer_ranking": rank_layers(ablation, {"form": trained.form, "content": trained.content}),
        "head_effects": heads, "head_estimate_spearman": estimate_agreement(heads),
    }
    return metrics, trained.outputs


def top_prefix_heads(aligner: Aligner, activity: pd.DataFrame, n: int = 5) -> pd.DataFrame:
    """The `n` heads with the largest prefix share in `activity` (`head_activity`), with their gates."""
    return activity.sort_values("share", ascending=False).head(n).merge(gate_table(aligner), on=["layer", "head"])


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
    """Accuracy per layer of probes for the knowledge label `label` on held-out prompts: trained on the base model's
    activations and scored on base ("base"), on each aligned condition ("NAME") and on it centred on the base mean
    ("NAME (centred)": a constant shift taken out); and trained and scored on each aligned condition's own
    activations ("NAME (retrained)": whether the label is still linearly readable there, wherever it has moved).
    The control task on base and on each retrained condition. `conditions` are aligned conditions of
    `activations`."""
    base = np.asarray(activations.resid("base"))
    dataset = activations.dataset
    y, entities = dataset.labels[label], dataset.entities
    transfer = {}
    retrained = []
    for condition in conditions:
        aligned = np.asarray(activations.resid(condition))
        transfer[condition] = aligned
        transfer[f"{condition} (centred)"] = aligned - aligned.mean(axis=0) + base.mean(axis=0)  # per layer and feature
        own = evaluate_probe(aligned, y, entities, folds=folds, seed=seed, desc=f"{label} probe on {condition}")
        retrained.append(own.assign(scored_on=f"{condition} (retrained)"))
    results = evaluate_probe(base, y, entities, transfer=transfer, folds=folds, seed=seed, desc=f"{label} probe")
    results["scored_on"] = results["scored_on"].replace({"self": "base"})
    return pd.concat([results, *retrained], ignore_index=True)


def probe_curves(activations: Activations, label: str, conditions: Sequence[str], folds: int = 5, seed: int = 0) -> pd.DataFrame:
    """The form probe over base and the aligned `conditions` (`label` "form"), or the knowledge probe of `label`
    with its transfer to each of them."""
    if label == "form":
        return form_probe_curves(activations, ["base", *conditions], folds=folds, seed=seed)
    return knowledge_probe_curves(activations, label, conditions, folds=folds, seed=seed)


def peak_selectivity(selectivities: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """Per knowledge label, the layer of largest selectivity and its value (`probe.probes.selectivity` tables)."""
    peaks = {label: table.loc[table.selectivity.idxmax()] for label, table in selectivities.items()}
    return pd.DataFrame([{"label": label, "layer": int(row.layer), "selectivity": row.selectivity} for label, row in peaks.items()])


def geometry_table(
    activations: Activations, condition: str, layers: Sequence[int], seed: int = 0, knowledge: Sequence[np.ndarray] | None = None
) -> pd.DataFrame:
    """`probe.geometry.layer_geometry` of one aligned condition against the knowledge subspace, per layer of
    `layers`; `knowledge`: the `knowledge_directions` of the base activations, if already fitted."""
    base = np.asarray(activations.resid("base"))
    if knowledge is None:
        knowledge = knowledge_directions(base, activations.dataset.labels)
    return layer_geometry(base, np.asarray(activations.resid(condition)), knowledge, list(layers), seed=seed)


def transfer_losses(knowledge: Mapping[str, pd.DataFrame], condition: str, layers: Sequence[int]) -> dict[str, float]:
    """The accuracy that knowledge probes lose on `condition`'s activations against base probes on base: base-trained
    probes on them as they are ("raw") and centred on the base mean ("centred"), and probes retrained on them
    ("retrained"): per label the mean over `layers` of base minus that task accuracy, then the mean over labels
    (`knowledge`: label -> `knowledge_probe_curves`)."""
    columns = {"raw": condition, "centred": f"{condition} (centred)", "retrained": f"{condition} (retrained)"}
    losses: dict[str, list[float]] = {kind: [] for kind in columns}
    for results in knowledge.values():
        task = results[(results.target == "task") & results.layer.isin(list(layers))]
        accuracy = task.pivot(index="layer", columns="scored_on", values="accuracy")
        for kind, column in columns.items():
            losses[kind].append(float((accuracy["base"] - accuracy[column]).mean()))
    return {kind: float(np.mean(values)) for kind, values in losses.items()}


def geometry_summary(table: pd.DataFrame) -> dict[str, float]:
    """Over the layers of a `geometry_table`: the share within the covariance null's 95% quantile, the mean
    overlap and the mean of the covariance null's median."""
    return {
        "within_null_share": float((table.overlap <= table.covariance_q95).mean()),
        "mean_overlap": float(table.overlap.mean()),
        "mean_covariance_null_median": float(table.covariance_q50.mean()),
    }


def activation_frame(
    activations: Activations,
    layer: int,
    conditions: Sequence[str],
    forms: Mapping[str, str | None],
    outputs: Mapping[str, Mapping[str, str]],
    method: str = "pca",
    seed: int = 0,
) -> pd.DataFrame:
    """The residual stream after block `layer` (last prompt token) of every prompt under every condition, embedded
    together (`method`: pca or umap): one row per (condition, prompt) with the prompt, its subject and knowledge
    labels, the condition's trained form (`forms`, "none" for base and form-less runs) and its answer where
    `outputs[condition]` (prompt -> answer) holds one, else ""."""
    dataset = activations.dataset
    info = pd.concat(
        [
            pd.DataFrame(
                {
                    "condition": condition, "form": forms.get(condition) or "none", "prompt": dataset.prompts,
                    "entity": dataset.entities, **dataset.labels,
                    "output": [outputs.get(condition, {}).get(prompt, "") for prompt in dataset.prompts],
                }
            )
            for condition in conditions
        ],
        ignore_index=True,
    )
    X = np.concatenate([np.asarray(activations.resid(condition))[:, layer] for condition in conditions])
    return embedding_frame(X, info, method, seed)


def held_out_answers(
    model: nn.Module,
    dataset: ProbeDataset,
    runs: Mapping[str, Adapter],
    adapter: Adapter | None = None,
    n_eval: int = 12,
    max_new_tokens: int = MAX_NEW_TOKENS,
) -> dict[str, str]:
    """prompt -> greedy answer with `adapter` (None: the base model) on the held-out prompts of `runs`
    (`evaluation_set`: subjects none of them was trained on)."""
    evaluation = evaluation_set(dataset, runs, n_eval)
    outputs = answers(model, evaluation, adapter, max_new_tokens=max_new_tokens, batch_size=len(evaluation))
    return dict(zip(evaluation.prompts, outputs))


def prompt_tokens(table: pd.DataFrame) -> pd.Series:
    """position -> token of the prompt that a `prefix_attention` table was read on."""
    return table.drop_duplicates("position").set_index("position")["token"]


def same_width(aligners: Mapping[str, Aligner]) -> dict[str, Aligner]:
    """The aligners of the first one's d_model: a map of tokens puts them in one space."""
    if not aligners:
        return {}
    width = next(iter(aligners.values())).shape.d_model
    return {name: al for name, al in aligners.items() if al.shape.d_model == width}


def loss_table(runs: Mapping[str, str | Path]) -> tuple[pd.DataFrame, dict[str, str]]:
    """step, loss and run of every logged training step of `runs` (name -> run directory, its metrics.jsonl), and
    name -> why for each run whose log cannot be read (a torn line names the file and line): one bad log hides
    none of the other curves."""
    frames, unreadable = [], {}
    for name, path in runs.items():
        try:
            frames.append(pd.DataFrame(run_losses(path), columns=["step", "loss"]).assign(run=name))
        except (OSError, ValueError) as err:
            unreadable[name] = str(err)
    frames = [frame for frame in frames if len(frame)]
    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["step", "loss", "run"])
    return table, unreadable


def mechanism_frame(form: str | None) -> str:
    """The frame in which the mechanism analyses read a run trained for `form` (`probe.dataset.form_items`): the
    form's own where the suite writes it, else the base model's own sentence ("own sentence")."""
    return form if form in FORMS else "own sentence"


def lens_layers(lens: pd.DataFrame) -> pd.DataFrame:
    """Per reading (run and condition, where `lens` has a run column) and layer of a `probe.lens.logit_lens` table:
    the gold token's median rank, its mean log-probability, and the share of items where it is the lens's top
    token."""
    keys = [column for column in ("run", "condition") if column in lens] + ["layer"]
    return (
        lens.assign(top1=lens["rank"] == 1)
        .groupby(keys, sort=False)
        .agg(median_rank=("rank", "median"), mean_logprob=("logprob", "mean"), top1=("top1", "mean"), n=("item", "size"))
        .reset_index()
    )


def lens_readable(lens: pd.DataFrame) -> pd.DataFrame:
    """Per reading of a `probe.lens.logit_lens` table: the share of items whose gold token is the top one at the
    last layer, the median first layer from which it stays the top one through the last (`readable_from`, over the
    items where it does), and the share of items where it never does."""
    keys = [column for column in ("run", "condition") if column in lens]
    rows = []
    for key, group in lens.groupby(keys, sort=False):
        last = group[group["layer"] == group["layer"].max()]
        found = readable_from(group)["layer"]
        rows.append(
            {**dict(zip(keys, key if isinstance(key, tuple) else (key,))), "n": len(last),
             "top1_last_layer": float((last["rank"] == 1).mean()), "readable_from_median": float(found.median()),
             "never_readable": float(found.isna().mean())}
        )
    return pd.DataFrame(rows)


def readout_top(readout: pd.DataFrame, k: int = 5) -> pd.DataFrame:
    """One row per position read and adapted layer of a `probe.lens.token_readout` table: its `k` most promoted and
    most suppressed tokens (with the logit each writes), and what it writes on the token the position predicts
    (the form's first at the response start, the gold answer's first at the answer; mean value, mean rank)."""
    rows = []
    written = readout[readout["kind"] != "nearest"]
    for (position, layer), group in written.groupby(["position", "layer"], sort=False):
        listed = {
            kind: ", ".join(f"{token} ({value:+.2f})" for token, value in group[(group["kind"] == kind) & (group["rank"] <= k)][["token", "value"]].itertuples(index=False))
            for kind in ("promoted", "suppressed")
        }
        target = group[group["kind"] == "target"].iloc[0]
        rows.append({"position": position, "layer": int(layer), **listed, "target_value": float(target["value"]), "target_rank": float(target["rank"])})
    return pd.DataFrame(rows)


def dissociation_summary(table: pd.DataFrame) -> dict[str, Any]:
    """From a `probe.dissociation.layer_dissociation` table: form and knowledge of the base model and of the whole
    adapter, and the layer that alone ("only") writes the most form, with the knowledge kept there, and the layer
    whose switching off ("off") costs the form most."""
    row = {mode: table[table["mode"] == mode].iloc[0] for mode in ("none", "all")}
    only, off = table[table["mode"] == "only"], table[table["mode"] == "off"]
    best, costliest = only.loc[only["form_logprob"].idxmax()], off.loc[off["form_logprob"].idxmin()]
    measures = ("form_logprob", "answer_logprob", "answer_rank1")
    return {
        **{f"{mode}_{m}": float(row[mode][m]) for mode in row for m in measures},
        "best_only_layer": int(best["layer"]), **{f"best_only_{m}": float(best[m]) for m in measures},
        "costliest_off_layer": int(costliest["layer"]), **{f"costliest_off_{m}": float(costliest[m]) for m in measures},
    }
