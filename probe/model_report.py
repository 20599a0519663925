"""The report on a base model and the aligners trained on it (`probe report`): does an aligner change the form
of the answers and leave the model's knowledge alone?

Read from the runs directory: every aligner trained on this very model (same weights fingerprint), with the
output form it was trained for as it records it, or the user's `checker` (`training_form`; else unknown, and its
behaviour untested). The evidence, one section each: behaviour (form compliance
and content accuracy of greedy answers), the gate-scale curve, gate ablations, the gates and how much each
head's prefix contributes on real prompts, linear probes (form, knowledge, control, transfer from base to
aligned), the geometry of the aligner's effect against the knowledge probes' directions with a null beside its
positive control (a run that injects facts), the mechanism analyses (`probe.mechanism_report`: logit lens, token
readout, layer dissociation, token shift; other methods trained on the model, LoRA among them, are read there
too) and embeddings; then the verdict. This module assembles the report: the numbers come from `probe.analyses`, the
figures from `probe.figures`, the verdict and its thresholds from `probe.verdict`; here they are put in sections
with the text that says what each shows, and summarised (`model_summary`).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
from torch import nn

from aligner import Aligner, model_fingerprint, open_model
from aligner.adapter import Adapter, load_adapter
from aligner.audit import audit
from aligner.runs import list_runs
from aligner.tasks import FORMS, KNOWLEDGE_SETS
from probe.analyses import (
    HEADS_MEASURED,
    MAX_NEW_TOKENS,
    SWITCH_ON,
    activation_frame,
    behaviour,
    form_probe_curves,
    form_scores,
    geometry_summary,
    geometry_table,
    knowledge_probe_curves,
    mechanism_frame,
    peak_selectivity,
    run_table,
    score_table,
    top_prefix_heads,
)
from probe.collect import Activations, collect, condition_name
from probe.dataset import ProbeDataset, evaluation_set, is_injection, knowledge_dataset, training_form
from probe.embeddings import prefix_frame, token_frame
from probe.figures import (
    cumulative_ablation_figure,
    gate_heatmap,
    gate_scale_figure,
    geometry_figure,
    layer_ablation_figure,
    layer_head_heatmap,
    prefix_share_heatmap,
    probe_figure,
    scatter,
)
from probe.gates import DEFAULT_SCALES, answers, gate_range, gate_table, head_activity
from probe.geometry import knowledge_directions
from probe.mechanism_report import mechanism_sections
from probe.probes import selectivity
from probe.report import Report
from probe.verdict import (
    PROBE_TOLERANCE,
    WITHIN_NULL,
    control_sentence,
    geometry_control,
    orthogonal,
    passed_text,
    rule,
    verdict,
    verdict_table,
)


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
    max_new_tokens: int = MAX_NEW_TOKENS,
    scales: Sequence[float] = DEFAULT_SCALES,
    cumulative_points: int = 4,
    folds: int = 5,
    umap: bool = True,
    cache: str | Path | None = None,
    seed: int = 0,
    checker: str | None = None,
    n_mechanism: int = 24,
    n_dissociation: int = 8,
) -> Report:
    """The report on `model` and its aligners under `runs` (`only`: these runs of them), in memory: its sections
    (`Report.show` draws them in a notebook) and metrics, the verdict per aligner among them; `build_model_report`
    writes it out. Behaviour is measured on `n_eval` facts of `knowledge` that no run was trained on and, with
    `known_only`, that the base model answers right (the suite's audit, cached per weights): then a fall in content
    accuracy is knowledge the aligner hides, not knowledge the model never had. `checker`: the regular expression
    a well-formed answer matches in full, the form of every run that records none (a form the suite lacks). The
    mechanism sections read the first `n_mechanism` prompts of the evaluation set, and the layer dissociation the
    first `n_dissociation` of them: each of their analyses runs every run over them, the dissociation twice per
    layer."""
    started = time.perf_counter()
    model_name = model.cfg.model_name
    fingerprint = model_fingerprint(model)
    aligners, others, skipped = usable_runs(runs, fingerprint, only)
    forms = {name: training_form(al, checker) for name, al in aligners.items()}
    dataset = knowledge_dataset(knowledge, n_subjects)
    every_fact = knowledge_dataset(knowledge, len(KNOWLEDGE_SETS[knowledge].facts()))
    known = audit(model, KNOWLEDGE_SETS[knowledge], fingerprint).known if known_only else None
    evaluation = evaluation_set(every_fact, {**aligners, **others}, n_eval, known)
    report = Report(f"Aligner probe report: {model_name}")
    report.metrics["setup"] = setup_section(
        report, model_name, fingerprint, aligners, others, forms, skipped, dataset, evaluation, known_only
    )

    activations = collect(model, dataset, [None, *(Path(runs) / name for name in aligners)], cache=cache)
    names = {name: condition_name(Path(runs) / name) for name in aligners}  # run -> its condition in `activations`
    outputs = {"base": answers(model, evaluation, max_new_tokens=max_new_tokens, batch_size=len(evaluation))}
    report.metrics["behaviour"] = behaviour_sections(
        report, model, evaluation, aligners, forms, outputs, scales, cumulative_points, max_new_tokens
    )
    report.metrics["gates"] = gates_section(report, aligners, activations, names)
    report.metrics["probes"] = probes_section(report, activations, names, folds, seed)
    report.metrics["geometry"], report.metrics["geometry_control"] = geometry_section(report, activations, aligners, names, seed)
    compared = {**aligners, **others}
    frames = {name: mechanism_frame(training_form(run, checker)) for name, run in compared.items()}
    mechanism = evaluation.subset(range(min(n_mechanism, len(evaluation))))
    mechanism_sections(report, model, compared, frames, mechanism, max_new_tokens, n_dissociation)
    report.metrics["embeddings"] = embeddings_section(report, model, aligners, activations, names, forms, evaluation, outputs, umap, seed)
    report.metrics["verdict"] = {name: verdict(report.metrics, name, forms[name], names[name]) for name in aligners}
    report.section("verdict", "Verdict: form changed, knowledge left alone?").table(verdict_table(report.metrics["verdict"]), rule())
    report.metrics["wall_time_s"] = round(time.perf_counter() - started, 1)
    return report


def usable_runs(
    runs: str | Path, fingerprint: str, only: Sequence[str] = ()
) -> tuple[dict[str, Aligner], dict[str, Adapter], list[tuple[str, str]]]:
    """The aligners under `runs` (`only`: of these names) trained on the model with `fingerprint`; the runs of
    other methods trained on it (LoRA, prompt tuning, ...), which only the mechanism sections read; and (run,
    reason) for the others."""
    usable, others, skipped = {}, {}, []
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
        try:  # its tensors too: a file cut short is this run's error, not the report's
            adapter = load_adapter(run.path)
        except (OSError, ValueError) as err:
            skipped.append((run.name, str(err) if str(run.path) in str(err) else f"{run.path}: {err}"))
            continue
        if adapter.base_model.get("fingerprint") != fingerprint:
            skipped.append((run.name, f"trained on another base model ({adapter.base_model.get('name')})"))
        elif isinstance(adapter, Aligner):  # most sections read one aligner's own tokens and gates
            usable[run.name] = adapter
        else:
            others[run.name] = adapter
    if not usable:
        raise ValueError(f"{runs}: no aligner trained on this model (weights fingerprint {fingerprint[:12]}...)")
    return usable, others, skipped


def setup_section(
    report: Report,
    model_name: str,
    fingerprint: str,
    aligners: dict[str, Aligner],
    others: dict[str, Adapter],
    forms: dict[str, str | None],
    skipped: list[tuple[str, str]],
    dataset: ProbeDataset,
    evaluation: ProbeDataset,
    known_only: bool,
) -> dict[str, Any]:
    section = report.section("setup", "Setup: model, aligners, data")
    runs = run_table(aligners, forms)
    section.text(
        f"Base model {model_name} (weights sha256 {fingerprint[:16]}...). Aligners: every run whose base-model "
        f"fingerprint matches; its form is the one its training recorded (the suite task's form), or the "
        f"--checker regular expression for a run that records none, or unknown. Probing data: {dataset.name}, "
        f"{len(dataset)} prompts about {len(set(dataset.entities))} subjects of the "
        f"suite's knowledge set {dataset.knowledge.name}, each asked with both question templates and labelled with "
        f"{', '.join(dataset.labels)}. Behaviour is measured on {len(evaluation)} prompts (first template) about "
        "subjects that no run was trained on"
        + (" and whose answer the base model knows (the task suite's audit)." if known_only else ".")
    )
    section.table(runs)
    methods = pd.DataFrame([{"run": name, "kind": run.kind, "parameters": run.num_parameters()} for name, run in others.items()])
    if others:
        section.table(methods, "Runs of other methods trained on this model: read by the mechanism sections only.")
    if skipped:
        section.table(pd.DataFrame(skipped, columns=["run", "why it is left out"]))
    return {"model": model_name, "fingerprint": fingerprint, "runs": runs, "other_methods": methods, "skipped": skipped,
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
    users_forms = sorted({form for form in forms.values() if form is not None and form not in FORMS})
    metrics: dict[str, Any] = {"base": form_scores(outputs["base"], evaluation, also=users_forms)}
    for name, al in aligners.items():
        form = forms[name]
        if form is None:
            behaviour_section.text(
                f"{name}: its output form is unknown (its provenance names no form task of the suite's, and no --checker "
                "was given); its behaviour is not tested."
            )
            continue
        metrics[name], outputs[name] = behaviour(model, evaluation, al, form, scales, cumulative_points, max_new_tokens)
        ablation, heads = metrics[name]["ablation"], metrics[name]["head_effects"]
        scale_section.figure(gate_scale_figure(metrics[name]["scale_curve"], f"{name}: gate scale ({form} form)"))
        ablation_section.figure(layer_ablation_figure(ablation, f"{name}: one layer's gates off"))
        ablation_section.figure(cumulative_ablation_figure(ablation, f"{name}: layers' gates off, cumulatively"))
        ablation_section.table(metrics[name]["layer_ranking"].head(5), f"{name}: the five layers whose gates matter most for the form.")
        ablation_section.figure(
            layer_head_heatmap(heads, "estimate", f"{name}: loss rise of its own answers, one head's gate off (estimate)", "loss rise")
        )
        ablation_section.table(
            heads.head(HEADS_MEASURED),
            f"{name}: the heads whose gated prefix carries its answers most; estimate = -g dL/dg, exact = measured with "
            "the gate off (mean loss per answer token, nats).",
        )
    behaviour_section.table(
        score_table(metrics),
        "form:F = share of answers that the suite's checker of form F passes; content = share holding a gold answer; n = prompts.",
    )
    examples = pd.DataFrame({"prompt": evaluation.prompts, "gold": evaluation.answers, **outputs}).head(8)
    behaviour_section.table(examples, "The first answers, greedy, as generated.")
    return metrics


def gates_section(report: Report, aligners: dict[str, Aligner], activations: Activations, names: dict[str, str]) -> dict[str, Any]:
    section = report.section("gates", "Gates and the prefix's contribution per head")
    section.text(
        "Heatmaps of the trained gates; then, on the probing prompts (last prompt token), the size of each head's "
        "gated prefix contribution next to the head's own output (share = |g A V_p| / |z_context|). The prefix has "
        "its own softmax, so its attention sums to 1 over its slots whatever the input: the share, not an attention "
        "mass, says how much a head listens to it."
    )
    metrics = {}
    limit = gate_range(aligners)  # one colour scale: the heatmaps compare
    for name, al in aligners.items():
        section.figure(gate_heatmap(al, f"{name}: gates", limit))
        activity = head_activity(activations, names[name])
        section.figure(prefix_share_heatmap(activity, f"{name}: prefix share per head (mean over prompts)"))
        section.table(top_prefix_heads(al, activity), f"{name}: the five heads with the largest prefix share.")
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
        "what is left is whether the classes still lie where the probe looks. 'Retrained': probes trained and "
        "scored on the aligned activations themselves (the same folds), whether the label is still linearly "
        "readable there wherever it has moved. The form probe's folds keep each "
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
    section.table(peak_selectivity(metrics["selectivity"]), "The layer of largest selectivity for each knowledge label.")
    return metrics


def geometry_section(
    report: Report, activations: Activations, aligners: dict[str, Aligner], names: dict[str, str], seed: int
) -> tuple[dict[str, pd.DataFrame], dict[str, Any]]:
    """The geometry per aligner, and its positive control (`probe.verdict.geometry_control`)."""
    section = report.section("geometry", "Geometry: the aligner's effect against the knowledge directions")
    section.text(
        "Per layer, Δ = aligned - base residual activations of the same prompts; its top singular directions (90% "
        "of its energy, at most 8) against the subspace of the knowledge probes' weights (all labels, fitted on base "
        "activations; a probe of K classes gives K - 1 dimensions, its class weights centred). Overlap = mean squared cosine of the principal angles. Bands: 5-95% of the overlap of random "
        "subspaces of Δ's dimension, uniform (random) or drawn from the base activations' covariance (covariance). "
        "Positive control: a run that injects facts writes knowledge, so its Δ must leave the covariance null on more "
        f"than {1 - WITHIN_NULL:.0%} of its layers; where it does not, the test cannot tell an effect that writes "
        "knowledge from one that leaves it alone, and the orthogonality test of every other run is 'cannot tell'."
    )
    knowledge = knowledge_directions(np.asarray(activations.resid("base")), activations.dataset.labels)  # fitted once for all
    controls = [name for name, al in aligners.items() if is_injection(al)]
    tables = {name: geometry_table(activations, names[name], al.layer_indices, seed, knowledge) for name, al in aligners.items()}
    control = geometry_control(tables, controls)
    for name in sorted(tables, key=lambda name: name not in controls):  # the control first, the runs it vouches for beside it
        role = " (positive control)" if name in controls else ""
        section.figure(geometry_figure(tables[name], f"{name}{role}: overlap of Δ with the knowledge subspace"))
    summary = pd.DataFrame(
        [
            {"run": name, "role": "positive control" if name in controls else "tested", **geometry_summary(table),
             "orthogonal": passed_text(orthogonal(table))}
            for name, table in tables.items()
        ]
    )
    section.table(
        summary,
        f"Per run: the share of adapted layers within the covariance null's 95% quantile (orthogonal: >= {WITHIN_NULL:.0%}). "
        + control_sentence(control),
    )
    return tables, control


def embeddings_section(
    report: Report,
    model: nn.Module,
    aligners: dict[str, Aligner],
    activations: Activations,
    names: dict[str, str],
    forms: dict[str, str | None],
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
    layer = model.cfg.n_layers // 2
    conditions = {"base": "base", **names}  # run -> condition
    answered = {conditions[run]: dict(zip(evaluation.prompts, answers)) for run, answers in outputs.items()}
    method = "umap" if umap else "pca"
    frame = activation_frame(activations, layer, list(conditions.values()), {names[n]: forms[n] for n in names}, answered, method, seed)
    for colour in ("condition", *activations.dataset.labels):
        section.figure(
            scatter(frame, colour, f"{method.upper()} of layer {layer} activations, coloured by {colour}", hover=["prompt", "output"], symbol="condition")
        )
    section.text(f"Activations: residual stream after block {layer}, last prompt token; hover for the prompt and the answer (answers for the evaluation prompts only).")
    return {"tokens": tokens, "prefix": prefix, "activations_layer": layer, "activations": frame.drop(columns=["output"])}


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
    control = m["geometry_control"]
    lines.append(
        f"Geometry's positive control ({ref('geometry')}): "
        + ("no run injects facts." if control["passed"] is None else
           ", ".join(f"{run} {'leaves' if left else 'stays within'} the null" for run, left in control["detected"].items())
           + ("." if control["passed"] else "; the orthogonality test cannot tell.")
        )
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
            reached = f"first reaches {SWITCH_ON:.0%} at s = {switch_on}" if np.isfinite(switch_on) else f"never reaches {SWITCH_ON:.0%}"
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
            f"- Knowledge probes ({ref('probes')}, on average over the adapted layers and labels, threshold "
            f"{PROBE_TOLERANCE:.0%} each): retrained on its activations they lose {v['retrained_loss']:+.1%} accuracy "
            f"(readable); trained on the base model's they lose {v['centred_transfer_loss']:+.1%} once its activations "
            f"are centred on the base mean (in place), {v['transfer_loss']:+.1%} as they are."
        )
        lines.append(
            f"- Geometry ({ref('geometry')}): mean overlap of Δ with the knowledge subspace {v['mean_overlap']:.3f} "
            f"against a covariance-null median of {v['mean_covariance_null_median']:.3f}; {v['within_null_share']:.0%} "
            f"of adapted layers within the null's 95% quantile (threshold {WITHIN_NULL:.0%})."
        )
        lines += mechanism_lines(m, name, ref)
        lines.append("- Tests passed: " + ", ".join(f"{k} {passed_text(ok)}" for k, ok in v["passed"].items()) + ".")
    others = [name for name in m["logit_lens"]["frames"] if name not in m["verdict"]]
    for name in others:
        lines += ["", f"## {name}: another method, in the mechanism sections only", *mechanism_lines(m, name, ref)]
    lines += ["", f"Built in {m['wall_time_s']} s. All numbers: metrics.json; figures and tables: report.html."]
    return "\n".join(lines) + "\n"


def mechanism_lines(m: dict[str, Any], name: str, ref: Any) -> list[str]:
    """The summary's lines on run `name` from the mechanism sections' metrics `m`."""
    readable = m["logit_lens"]["readable"]
    readable = readable[readable["run"] == name].set_index("condition")
    lines = [
        f"- Logit lens ({ref('logit_lens')}, {m['logit_lens']['n_items']} items, {m['logit_lens']['frames'][name]} frame): "
        "the gold answer is the top token at the last layer for "
        + ", ".join(f"{readable.top1_last_layer[c]:.0%} ({c})" for c in ("aligned", "base_frame", "base_own"))
        + "; it stays on top from layer "
        + ", ".join(f"{readable.readable_from_median[c]:.0f} ({c})" for c in ("aligned", "base_frame", "base_own"))
        + " (median over the items where it does)."
    ]
    readout = m["token_readout"].get(name)
    if readout is not None:
        per_layer = readout["per_layer"]
        start, answer = (per_layer[per_layer["position"] == p] for p in ("response start", "answer"))
        form = start.loc[start["target_value"].idxmax()]
        gold = answer.loc[answer["target_value"].abs().idxmax()]
        lines.append(
            f"- Token readout ({ref('token_readout')}): at the response's start, layer {int(form.layer)} writes most "
            f"for the form's first token ({form.target_value:+.2f}, mean rank {form.target_rank:.0f}; it promotes "
            f"{form.promoted.split(', ')[0]} most); at the answer, the layer writing most on the gold answers is "
            f"{int(gold.layer)} ({gold.target_value:+.2f}, mean rank {gold.target_rank:.0f}; it promotes "
            f"{gold.promoted.split(', ')[0]} most)."
        )
    dissociation = m["layer_dissociation"].get(name)
    if dissociation is not None:
        d = dissociation["summary"]
        lines.append(
            f"- Layer dissociation ({ref('layer_dissociation')}): the whole run moves the form's log-probability from "
            f"{d['none_form_logprob']:.2f} to {d['all_form_logprob']:.2f} and the gold answer's from "
            f"{d['none_answer_logprob']:.2f} to {d['all_answer_logprob']:.2f}; layer {d['best_only_layer']} alone "
            f"writes the most form ({d['best_only_form_logprob']:.2f}, gold {d['best_only_answer_logprob']:.2f})."
        )
    shares = m["token_shift"]["shares"].set_index("run")
    shifted = m["token_shift"]["most_shifted"]
    shifted = shifted[shifted["run"] == name].head(3)
    lines.append(
        f"- Token shift ({ref('token_shift')}): {shares.shifted[name]:.1%} of its {shares.n[name]} tokens shifted, "
        f"{shares.marginal[name]:.1%} marginal, {shares.unshifted[name]:.1%} unshifted; most often shifted: "
        + (", ".join(f"{row.token} ({row.count}x, where the base model writes {row.base_instead})" for row in shifted.itertuples()) or "none")
        + "."
    )
    return lines
