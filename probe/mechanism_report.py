"""The mechanism sections of the model report (`probe report`): where the gold answer is readable (logit lens),
what each adapted layer's prefix writes (token readout), which layers carry the form and which lose the knowledge
(layer dissociation), and how far each run's tokens are from the base model's (token shift).

Each section runs one function of `probe.lens`, `probe.dissociation` or `probe.shift` on the first held-out
prompts of the report's evaluation set, read in each run's frame (`probe.analyses.mechanism_frame`), draws its
table with `probe.mechanism_figures`, and returns what goes under its key in metrics.json. Aligners and the other
methods trained on the model (LoRA, prompt tuning, ...) are read alike where the analysis applies to them.
"""

from __future__ import annotations

from typing import Any, Mapping

import pandas as pd
from torch import nn

from aligner.adapter import Adapter
from aligner.model import Aligner
from aligner.tasks import Item
from probe.analyses import dissociation_summary, lens_layers, lens_readable, readout_top
from probe.dataset import ProbeDataset, form_items
from probe.dissociation import layer_dissociation
from probe.lens import logit_lens, token_readout
from probe.mechanism_figures import (
    layer_dissociation_figure,
    logit_lens_figure,
    token_readout_figure,
    token_shift_figure,
)
from probe.report import Report
from probe.shift import most_shifted, shift_shares, token_shift


def mechanism_sections(
    report: Report,
    model: nn.Module,
    runs: Mapping[str, Adapter],
    frames: Mapping[str, str],
    evaluation: ProbeDataset,
    max_new_tokens: int,
    n_dissociation: int = 8,
) -> None:
    """The four sections, on every prompt of `evaluation`, each run of `runs` read in its frame of `frames` (a
    suite form's name, or "own sentence"): their metrics under the keys logit_lens, token_readout,
    layer_dissociation and token_shift. The layer dissociation reads the first `n_dissociation` prompts only: it
    runs them twice per layer of every run."""
    items = {frame: form_items(evaluation, frame) for frame in dict.fromkeys(frames.values())}
    where = f"the first {len(evaluation)} held-out prompts of the behaviour sections"
    report.metrics["logit_lens"] = logit_lens_section(report, model, runs, frames, items, where, evaluation.system)
    aligners = {name: run for name, run in runs.items() if isinstance(run, Aligner)}
    report.metrics["token_readout"] = token_readout_section(report, model, aligners, frames, items, where, evaluation.system)
    switchable = {name: run for name, run in runs.items() if run.switchable_layers}
    few = {frame: framed[:n_dissociation] for frame, framed in items.items()}
    where_few = f"the first {len(next(iter(few.values())))} of those prompts"
    report.metrics["layer_dissociation"] = dissociation_section(report, model, switchable, frames, few, where_few, evaluation.system)
    report.metrics["token_shift"] = token_shift_section(report, model, runs, evaluation, where, max_new_tokens)


def logit_lens_section(
    report: Report,
    model: nn.Module,
    runs: Mapping[str, Adapter],
    frames: Mapping[str, str],
    items: Mapping[str, list[Item]],
    where: str,
    system: str | None,
) -> dict[str, Any]:
    section = report.section("logit_lens", "Logit lens: where the gold answer becomes readable, and where it is lost")
    section.text(
        f"On {where}: the residual stream after each block at the answer position (the frame's last token) read "
        "through the final norm and the unembedding; the gold answer's first token, its rank (1: the lens's top "
        "token) and log-probability. Three readings: the run in its form's frame (aligned), the base model forced "
        "into the same frame (base_frame), and the base model in its own sentence (base_own). At the last layer the "
        "lens is the model's own next-token distribution. A run without a suite form is read in the base model's "
        "own sentence. Readable from: the first layer from which the gold token stays the top one through the last."
    )
    base_own = logit_lens(model, None, next(iter(items.values())), system, conditions=("base_own",))
    base_frame = {frame: logit_lens(model, None, framed, system, conditions=("base_frame",)) for frame, framed in items.items()}
    tables = []
    for name, run in runs.items():
        lens = pd.concat(
            [logit_lens(model, run, items[frames[name]], system, conditions=("aligned",)), base_frame[frames[name]], base_own],
            ignore_index=True,
        )
        section.figure(logit_lens_figure(lens, f"{name}: the gold answer under the logit lens ({frames[name]} frame)"))
        tables.append(lens.assign(run=name))
    lens = pd.concat(tables, ignore_index=True)
    readable = lens_readable(lens)
    section.table(readable, "Per run and reading: n items; the share whose gold token is the top one at the last layer; "
                  "the median layer from which it stays the top one (over those where it does); the share where it never does.")
    return {"n_items": len(base_own["item"].unique()), "frames": dict(frames), "per_layer": lens_layers(lens), "readable": readable}


def token_readout_section(
    report: Report,
    model: nn.Module,
    aligners: Mapping[str, Aligner],
    frames: Mapping[str, str],
    items: Mapping[str, list[Item]],
    where: str,
    system: str | None,
) -> dict[str, Any]:
    section = report.section("token_readout", "Token readout: what each layer's prefix writes onto the logits")
    section.text(
        f"On {where}, at two positions of each aligner's teacher-forced response in its frame: the response's start, "
        "which predicts the form's first token, and the answer position, which predicts the gold answer's first. "
        "Each adapted layer's gated prefix contribution through the output projection, the final norm (its scale "
        "frozen at the run's own final residual) and the unembedding (direct logit attribution), centred over the "
        "vocabulary and averaged over the items: the tokens it promotes and suppresses most, against what it writes "
        "on the token the position predicts in each item's response (its value, and its mean rank among the tokens "
        "the layer promotes); and the vocabulary tokens whose input embeddings are nearest in cosine to the prefix "
        "tokens P themselves."
    )
    metrics = {}
    for name, al in aligners.items():
        readout = token_readout(model, al, items[frames[name]], system=system)
        section.figure(token_readout_figure(readout, f"{name}: what each adapted layer's prefix writes ({frames[name]} frame)"))
        top = readout_top(readout)
        section.table(
            top,
            f"{name}: per position and adapted layer, the five tokens promoted and suppressed most (logit written), and "
            "the mean value and rank of what it writes on the token the position predicts.",
        )
        nearest = readout[readout["kind"] == "nearest"]
        section.table(nearest[["layer", "slot", "rank", "token", "value"]].head(20), f"{name}: the vocabulary tokens nearest to its prefix tokens (cosine).")
        metrics[name] = {"per_layer": top, "nearest": nearest.drop(columns=["kind", "position"])}
    return metrics


def dissociation_section(
    report: Report,
    model: nn.Module,
    runs: Mapping[str, Adapter],
    frames: Mapping[str, str],
    items: Mapping[str, list[Item]],
    where: str,
    system: str | None,
) -> dict[str, Any]:
    section = report.section("layer_dissociation", "Layer dissociation: which layers write the form, which lose the knowledge")
    section.text(
        f"On {where}, under teacher forcing in each run's frame: the run's write switched off at one layer ('off'), "
        "and on at one layer alone with every other off ('only'); an aligner's layer by its gates, a LoRA's by its "
        "update, a z-bias's by its bias. Form: the log-probability of the first two tokens of the trained response (never the answer's). "
        "Knowledge: the gold answer's log-probability after the frame, and the share of items where its first token "
        "is the top one. Dashed: the whole run and the base model. A layer whose 'only' point reaches the run's form "
        "while keeping the base model's knowledge would carry the form without the content loss."
    )
    metrics = {}
    for name, run in runs.items():
        table = layer_dissociation(model, run, items[frames[name]], system=system)
        section.figure(layer_dissociation_figure(table, f"{name}: form and knowledge, one layer off or on alone ({frames[name]} frame)"))
        metrics[name] = {"n_items": len(items[frames[name]]), "table": table, "summary": dissociation_summary(table)}
    if metrics:
        section.table(
            pd.DataFrame([{"run": name, **m["summary"]} for name, m in metrics.items()]),
            "Per run: form and knowledge of the base (none) and the whole run (all); the layer that alone writes the most "
            "form (best_only) and the layer whose switching off costs the form most (costliest_off), with the knowledge there.",
        )
    return metrics


def token_shift_section(
    report: Report, model: nn.Module, runs: Mapping[str, Adapter], evaluation: ProbeDataset, where: str, max_new_tokens: int
) -> dict[str, Any]:
    section = report.section("token_shift", "Token shift: how far each run's tokens are from the base model's")
    section.text(
        f"After URIAL (Lin et al. 2023): each run answers {where} greedily ({max_new_tokens} new tokens at most), and "
        "each token it writes is ranked under the base model given the same prompt and the same tokens before it: "
        "unshifted (the base model's top token), marginal (its 2nd or 3rd), shifted (beyond). The base model against "
        "itself is the check: all unshifted. URIAL's anchors: 7.8% shifted for Llama-2-7b against its chat model, "
        "4.8% against Vicuna, 5.2% for Mistral-7b against its instruct model."
    )
    table = token_shift(model, {"base": None, **runs}, evaluation.prompts, evaluation.system, max_new_tokens, batch_size=len(evaluation))
    section.figure(token_shift_figure(table, "The share of each run's tokens the base model would write"))
    shares = shift_shares(table)
    shifted = most_shifted(table)
    section.table(shares, "Per run: the share of its tokens of each kind, and n tokens.")
    section.table(shifted, "Per run: the tokens written most often where they are shifted, and what the base model would write there.")
    return {"n_items": len(evaluation), "shares": shares, "by_position": shift_shares(table, by=("run", "position")), "most_shifted": shifted}
