"""The gates: tables and profiles of a trained aligner's per-head gates (no model needed), how much each head's
gated prefix contributes on real prompts, and what the answers do when gates are switched off or scaled.

Interventions go through the aligner's hook points: `blocks.{l}.aligner.hook_gate` is multiplied by a mask
(layers or heads switched off) with `model.hooks`, and every gate at once by `aligner.generate(gate_scale=s)`.
`prefix_attention` reads, for one prompt, how every head attends to the prefix and how much the gated prefix adds;
`head_effects` ranks the heads by how much their gated prefix carries the aligner's answers.
Answers are greedy and scored with the task suite's checkers: form compliance (the checker of the form the aligner
was trained for, `aligner.tasks.FORMS`) and content accuracy (a gold answer in the output).
"""

from __future__ import annotations

import contextlib
import re
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn
from transformers import PreTrainedTokenizerBase
from transformers.convert_slow_tokenizer import bytes_to_unicode

from aligner import Aligner, generate
from aligner.adapter import Adapter
from aligner.model import gates_off
from aligner.chat import prompt_ids
from aligner.data import Example
from aligner.objective import (
    Formatting,
    count_targets,
    heldout_loss,
    make_batch,
    pad_token_id,
    response_loss,
    tokenize_examples,
)
from probe.collect import Activations
from probe.dataset import ProbeDataset
from probe.progress import steps

DEFAULT_SCALES = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5)


def gate_table(aligner: Aligner) -> pd.DataFrame:
    """One row per adapted layer and head: layer, head, gate, abs_gate."""
    gates = aligner.gates.detach().float().cpu().numpy()  # (n_active, H)
    layers, heads = np.meshgrid(list(aligner.layer_indices), range(gates.shape[1]), indexing="ij")
    return pd.DataFrame(
        {"layer": layers.ravel(), "head": heads.ravel(), "gate": gates.ravel(), "abs_gate": np.abs(gates).ravel()}
    )


def gate_profile(aligner: Aligner) -> pd.DataFrame:
    """Per adapted layer: mean, max and root-mean-square |gate| over heads, and the layer's relative depth
    (layer / (n_layers - 1)), so that models of different depths compare on one axis."""
    table = gate_table(aligner)
    profile = table.groupby("layer").agg(
        mean_abs=("abs_gate", "mean"), max_abs=("abs_gate", "max"), rms=("gate", lambda g: float(np.sqrt(np.mean(g**2))))
    )
    profile["depth"] = profile.index / (aligner.shape.n_layers - 1)
    return profile.reset_index()


def head_activity(activations: Activations, condition: str) -> pd.DataFrame:
    """Per adapted layer and head, averaged over the prompts: the gated prefix contribution's size (norm), its
    size relative to the head's own output (share), and the entropy (nats) of the attention over the N slots."""
    arrays = activations.arrays[condition]
    layers = list(activations.aligners[condition].layer_indices)
    pattern = np.asarray(arrays["aligner_pattern"])  # (n, n_active, H, N)
    entropy = -(pattern * np.log(np.clip(pattern, 1e-12, None))).sum(axis=-1).mean(axis=0)
    norm, share = np.asarray(arrays["aligner_norm"]).mean(axis=0), np.asarray(arrays["aligner_share"]).mean(axis=0)
    rows = [
        (layer, head, norm[i, head], share[i, head], entropy[i, head])
        for i, layer in enumerate(layers)
        for head in range(norm.shape[1])
    ]
    return pd.DataFrame(rows, columns=["layer", "head", "norm", "share", "slot_entropy"])


def answers(
    model: nn.Module,
    dataset: ProbeDataset,
    aligner: Adapter | None = None,
    gate_scale: float = 1.0,
    off: Sequence[int] = (),
    max_new_tokens: int = 16,
    batch_size: int = 16,
) -> list[str]:
    """Greedy answers to `dataset` with `aligner` (any adapter; None: the base model), its gates scaled by
    `gate_scale` where it has gates, and its write at the layers in `off` switched off (`Adapter.switched_off`)."""
    if off and aligner is None:
        raise ValueError(f"off={list(off)} switches an adapter's layers off; the base model has none")
    with contextlib.ExitStack() as stack:
        if aligner is not None:
            stack.enter_context(aligner.attached(model))
            if off:
                stack.enter_context(aligner.switched_off(off))
        return generate(
            model, dataset.prompts, aligner=aligner, gate_scale=gate_scale, system=dataset.system,
            max_new_tokens=max_new_tokens, batch_size=batch_size,
        )


def scores(outputs: list[str], dataset: ProbeDataset, form: str) -> dict[str, float]:
    """{"form": share of `outputs` in `form`, "content": share holding a gold answer}, by the suite's checkers."""
    return {"form": float(dataset.form_passed(outputs, form).mean()), "content": float(dataset.content_correct(outputs, form).mean())}


def gate_scale_curve(
    model: nn.Module, dataset: ProbeDataset, aligner: Aligner, form: str, scales: Sequence[float] = DEFAULT_SCALES, **options
) -> pd.DataFrame:
    """Form compliance, content accuracy and the outputs with every gate multiplied by s, for s in `scales`."""
    rows = []
    for scale in steps(scales, "gate scale", unit="scale"):
        outputs = answers(model, dataset, aligner, gate_scale=scale, **options)
        rows.append({"scale": scale, **scores(outputs, dataset, form), "outputs": outputs})
    return pd.DataFrame(rows)


def ablation_curves(
    model: nn.Module, dataset: ProbeDataset, aligner: Aligner, form: str, cumulative_points: int = 4, **options
) -> pd.DataFrame:
    """Form compliance and content accuracy with gates switched off: each adapted layer alone ("single"), and
    the top or bottom k layers together ("from_top", "from_bottom") for `cumulative_points` values of k up to
    all of them. Columns: mode, layer (the layer switched off alone; for the cumulative modes the last one
    added), n_off, form, content."""
    layers = list(aligner.layer_indices)
    counts = sorted({int(np.ceil(k)) for k in np.linspace(0, len(layers), cumulative_points + 1)[1:]})
    plans = [("single", [layer]) for layer in layers]
    plans += [("from_top", layers[len(layers) - k :]) for k in counts]
    plans += [("from_bottom", layers[:k]) for k in counts]
    scored: dict[frozenset[int], dict[str, float]] = {}  # all layers off is reached from both ends: scored once
    rows = []
    for mode, off in steps(plans, "gate ablation", unit="condition"):
        if frozenset(off) not in scored:
            scored[frozenset(off)] = scores(answers(model, dataset, aligner, off=off, **options), dataset, form)
        last = off[0] if mode == "from_top" else off[-1]
        rows.append({"mode": mode, "layer": last, "n_off": len(off), **scored[frozenset(off)]})
    return pd.DataFrame(rows)


def rank_layers(ablation: pd.DataFrame, reference: dict[str, float]) -> pd.DataFrame:
    """Adapted layers by the drop in form compliance (then content) when switched off alone, largest first."""
    single = ablation[ablation["mode"] == "single"].copy()
    single["form_drop"] = reference["form"] - single["form"]
    single["content_drop"] = reference["content"] - single["content"]
    return single.sort_values(["form_drop", "content_drop"], ascending=False)[["layer", "form", "content", "form_drop", "content_drop"]]


def head_effects(
    model: nn.Module, dataset: ProbeDataset, aligner: Aligner, targets: Sequence[str], exact: int = 8, batch_size: int = 16
) -> pd.DataFrame:
    """How much each head's gated prefix carries the answers `targets` (one per prompt of `dataset`; the aligner's
    own greedy answers, say): the rise in their mean loss per token when that head's gate alone is switched off.
    Every adapted head gets the first-order estimate -g dL/dg from one backward pass (attribution patching: exact
    for a loss linear in the gate, and one pass for all heads, where switching each gate off takes a pass per
    head); the `exact` heads it ranks first are also measured with their gate off. Columns: layer, head, gate, estimate,
    exact (NaN where not measured), largest estimate first."""
    examples = [Example(prompt, target) for prompt, target in zip(dataset.prompts, targets, strict=True)]
    sequences = tokenize_examples(model.tokenizer, examples, Formatting(dataset.system))
    n_targets, device = count_targets(sequences), next(model.parameters()).device
    gradient = torch.zeros_like(aligner.gates)
    with aligner.attached(model), torch.enable_grad():
        for start in steps(range(0, len(sequences), batch_size), "head attribution", unit="batch"):
            input_ids, labels = make_batch(sequences[start : start + batch_size], pad_token_id(model.tokenizer))
            loss = response_loss(model, input_ids.to(device), labels.to(device)) / n_targets
            gradient += torch.autograd.grad(loss, aligner.gates)[0]
    table = gate_table(aligner)
    table["estimate"] = (-aligner.gates.detach() * gradient).flatten().float().cpu().numpy()
    table = table.sort_values("estimate", ascending=False, ignore_index=True)
    table["exact"] = np.nan
    with aligner.attached(model):
        reference = heldout_loss(model, examples, dataset.system, batch_size)
        for row in steps(table.head(exact).itertuples(), "head ablation", unit="head", total=min(exact, len(table))):
            with model.hooks(fwd_hooks=gates_off([row.layer], [row.head])):
                table.loc[row.Index, "exact"] = heldout_loss(model, examples, dataset.system, batch_size) - reference
    return table


def prefix_attention(model: nn.Module, aligner: Aligner, prompt: str, system: str | None = None) -> pd.DataFrame:
    """How each head of each adapted layer reads the prefix while `model` reads `prompt` (its chat template, as
    `generate` sends it): one row per layer, head, prefix slot and prompt position, with the attention onto
    the slot (`blocks.{l}.aligner.hook_pattern`; it sums to 1 over the slots) and, per head and position, the
    gated prefix contribution's norm and its ratio to the head's own output (share = |g A V_p| / |z_context|).
    Tokens are as text, whitespace and control characters escaped ("\\n", not the tokenizer's "Ċ")."""
    ids = prompt_ids(model.tokenizer, prompt, system=system)
    tokens = [token_text(model.tokenizer, i) for i in ids]
    layers = list(aligner.layer_indices)
    names = {f"blocks.{layer}.{hook}" for layer in layers for hook in ("aligner.hook_pattern", "aligner.hook_z", "attn.hook_z")}
    with aligner.attached(model), torch.no_grad():
        _, cache = model.run_with_cache(torch.tensor([ids], device=next(model.parameters()).device), names_filter=names.__contains__)
    frames = []
    for layer in layers:
        pattern = cache[f"blocks.{layer}.aligner.hook_pattern"][0].float().cpu().numpy()  # (H, T, N)
        gated = cache[f"blocks.{layer}.aligner.hook_z"][0].float()  # (T, H, d_head)
        context = cache[f"blocks.{layer}.attn.hook_z"][0].float() - gated  # the head's output without the prefix
        norm = gated.norm(dim=-1).T.cpu().numpy()  # (H, T)
        share = norm / (context.norm(dim=-1).T.cpu().numpy() + 1e-8)
        heads, positions, slots = np.meshgrid(*(np.arange(n) for n in pattern.shape), indexing="ij")
        frames.append(
            pd.DataFrame(
                {
                    "layer": layer, "head": heads.ravel(), "slot": slots.ravel(), "position": positions.ravel(),
                    "token": np.asarray(tokens, dtype=object)[positions.ravel()], "attention": pattern.ravel(),
                    "norm": norm[heads.ravel(), positions.ravel()], "share": share[heads.ravel(), positions.ravel()],
                }
            )
        )
    return pd.concat(frames, ignore_index=True)


def readable_token(text: str) -> str:
    """A token's text as one visible line: newlines, tabs and other control characters escaped, spaces shown."""
    visible = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)
    return visible.replace(" ", "␣")


BYTE_LEVEL = {char: byte for byte, char in bytes_to_unicode().items()}  # GPT-2's byte-level alphabet, inverted
SENTENCEPIECE_BYTE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def token_text(tokenizer: PreTrainedTokenizerBase, token_id: int) -> str:
    """Token `token_id` as `readable_token` shows it. A piece of a multi-byte character decodes to U+FFFD alone, so
    such a token shows its bytes instead ("␣\\xe5\\x88"), from its byte-level (GPT-2) or byte-fallback
    (sentencepiece, "<0xE5>") piece, so that tokens that differ stay apart in tables and legends."""
    text = tokenizer.decode([token_id])
    if "\ufffd" not in text:
        return readable_token(text)
    piece = tokenizer.convert_ids_to_tokens(token_id)
    if byte := SENTENCEPIECE_BYTE.fullmatch(piece):
        raw = bytes([int(byte[1], 16)])
    elif all(char in BYTE_LEVEL for char in piece):
        raw = bytes(BYTE_LEVEL[char] for char in piece)
    else:  # the vocabulary's own U+FFFD
        return readable_token(text)
    return readable_token(raw.decode("utf-8", errors="backslashreplace"))


def gate_range(aligners: Mapping[str, Aligner]) -> float:
    """The largest |gate| of all `aligners`: one colour scale for all their heatmaps, so that they compare."""
    return max((float(al.gates.detach().abs().max()) for al in aligners.values()), default=0.0) or 1.0


def gate_profiles(aligners: Mapping[str, Aligner]) -> pd.DataFrame:
    """`gate_profile` of every aligner, with a column `run`: models of different depths on one relative-depth axis."""
    return pd.concat([gate_profile(al).assign(run=name) for name, al in aligners.items()], ignore_index=True)
