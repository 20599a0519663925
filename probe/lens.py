"""Where the answer is readable, and what the prefix writes: the logit lens of the gold answer and the direct logit
attribution of each adapted layer's gated prefix.

Both read the model at the *answer position* (the token readout also at the response's start): the last token of
the frame ('{"answer": "' in the JSON form, "The capital of Chad is " in the base model's own sentence), whose
next-token prediction is the gold answer's first token as it is tokenised in the whole response
(`aligner.recall.answer_span`). Every prompt goes through the chat template, as `aligner.generate` sends it.

    logit_lens     log softmax(W_U LN_f(x^l))[gold]   x^l: the residual stream after block l, read through the
                   final norm (with its own scale) and the unembedding, at every layer (nostalgebraist 2020), for
                   the aligned run in the form's frame, the base model in the same frame and the base model in
                   its own sentence
    token_readout  W_U (w_f / s_f(x^L)) W_O^l (g A V_p)^l     each adapted layer's gated prefix contribution at
                   the answer position and at the response's start (where the form's first token is written),
                   through the output projection and the unembedding, with the final norm's scale s_f frozen at
                   the run's own final residual x^L (direct logit attribution); and the vocabulary tokens whose
                   embeddings are nearest to the tokens P themselves
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from transformer_lens.hook_points import HookPoint
from transformers import PreTrainedTokenizerBase

from aligner.adapter import Adapter
from aligner.chat import example_ids
from aligner.model import Aligner, projection
from aligner.objective import pad_token_id, prompts_for
from aligner.recall import answer_span
from aligner.tasks import Item, frame_of, own_frame_of
from probe.gates import token_text
from probe.progress import steps

T = TypeVar("T")

# The three readings of `logit_lens`: (condition, whether the adapter is attached, which frame).
CONDITIONS = (("aligned", True, "form"), ("base_frame", False, "form"), ("base_own", False, "own"))


@dataclass(frozen=True)
class FramedRow:
    """One teacher-forced sequence: the prompt through the chat template, the frame, and the answer's tokens."""

    ids: list[int]  # prompt + frame + answer, through the answer's last token
    n_prompt: int  # tokens of the prompt; the response starts here
    first: int  # index in `ids` of the answer's first token: position first - 1 predicts it

    @property
    def position(self) -> int:
        """The answer position: the frame's last token, which predicts the answer's first."""
        return self.first - 1


def answer_in_form(item: Item) -> str:
    """The gold answer as it stands in the item's response after its frame ("PARIS" in an all-caps form)."""
    rest = item.response[len(frame_of(item)) :]
    for gold in item.answers:
        if rest[: len(gold)].casefold() == gold.casefold():
            return rest[: len(gold)]
    raise ValueError(f"item {item.prompt!r}: its response {item.response!r} holds no gold answer after its frame")


def framed_rows(
    tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], frames: Sequence[str], answers: Sequence[str], system: str | None = None
) -> list[FramedRow]:
    """Each prompt answered by frame + answer, tokenised as `aligner.recall.answer_scores` tokenises it."""
    rows = []
    for prompt, frame, answer in zip(prompts, frames, answers, strict=True):
        ids, n_prompt = example_ids(tokenizer, prompt, frame + answer, system=system)
        # example_ids puts one space after a base model's "Answer:"; the span is found in the text it tokenised
        lead = frame if tokenizer.chat_template is not None else " " + frame
        first, last = answer_span(tokenizer, ids[n_prompt:-1], lead, answer)
        rows.append(FramedRow(ids[: n_prompt + last + 1], n_prompt, n_prompt + first))
    return rows


def padded(rows: Sequence[FramedRow], pad: int, device: torch.device) -> torch.Tensor:
    """Right-padded input ids (B, T); causal attention never reads the padding after a row's last token."""
    length = max(len(row.ids) for row in rows)
    return torch.tensor([row.ids + [pad] * (length - len(row.ids)) for row in rows], device=device)


def batches(items: Sequence[T], batch_size: int, desc: str) -> Iterator[Sequence[T]]:
    """Consecutive slices of `items`, under a progress bar."""
    for start in steps(range(0, len(items), batch_size), desc, unit="batch"):
        yield items[start : start + batch_size]


def at_positions(store: list[torch.Tensor], positions: torch.Tensor) -> Callable[[torch.Tensor, HookPoint], None]:
    """A hook that keeps its activation (B, T, ...) at one position per row, positions (B,), into `store`."""

    def keep(activation: torch.Tensor, hook: HookPoint) -> None:
        store.append(activation[torch.arange(len(positions), device=activation.device), positions])

    return keep


def device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def gold_rank(logprobs: torch.Tensor, gold: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rank, log-probability) of token gold[...] in logprobs (..., vocab); rank 1: the most likely token."""
    gold_logprob = logprobs.gather(-1, gold.unsqueeze(-1)).squeeze(-1)
    return (logprobs > gold_logprob.unsqueeze(-1)).sum(-1) + 1, gold_logprob


def lens_of_rows(model: nn.Module, rows: Sequence[FramedRow], batch_size: int, desc: str) -> dict[str, np.ndarray]:
    """rank, logprob and top token (n_rows, n_layers) of each row's answer token, read after every block."""
    layers = range(model.cfg.n_layers)
    pad, device = pad_token_id(model.tokenizer), device_of(model)
    out: dict[str, list[torch.Tensor]] = {"rank": [], "logprob": [], "top": []}
    for batch in batches(rows, batch_size, desc):
        positions = torch.tensor([row.position for row in batch], device=device)
        store: list[torch.Tensor] = []
        hooks = [(f"blocks.{layer}.hook_resid_post", at_positions(store, positions)) for layer in layers]
        with model.hooks(fwd_hooks=hooks):
            model(padded(batch, pad, device))
        resid = torch.stack(store, dim=1)  # (B, n_layers, d_model), in the order the blocks ran
        logprobs = F.log_softmax(model.unembed(model.ln_final(resid)).float(), dim=-1)  # (B, n_layers, vocab)
        gold = torch.tensor([row.ids[row.first] for row in batch], device=device)
        rank, logprob = gold_rank(logprobs, gold[:, None].expand(-1, len(layers)))
        out["rank"].append(rank.cpu())
        out["logprob"].append(logprob.cpu())
        out["top"].append(logprobs.argmax(-1).cpu())
    return {key: torch.cat(values).numpy() for key, values in out.items()}


@torch.no_grad()
def logit_lens(
    model: nn.Module,
    adapter: Adapter | None,
    items: Sequence[Item],
    system: str | None = None,
    batch_size: int = 8,
    conditions: Collection[str] = tuple(condition for condition, _, _ in CONDITIONS),
) -> pd.DataFrame:
    """log p^l(gold) = log softmax(W_U LN_f(x^l))[gold] at the answer position, for every block l and item.

    Three readings (`condition`): "aligned", `adapter` attached (any adapter) in the form's frame
    (`frame_of(item)`); "base_frame", the base model forced into the same frame; "base_own", the base model in its
    own sentence (`own_frame_of(item)`). Only the readings named in `conditions` are made (the base readings of
    the same items are the same for every adapter), and with `adapter` None the aligned reading is left out. The gold token is
    the answer's first as the whole response tokenises it. At the last block the lens is the model's own
    next-token distribution. One row per item, condition and layer: item, prompt, answer, condition, layer, rank
    (1: the most likely token), logprob, top_token (the lens's most likely token)."""
    tokenizer = model.tokenizer
    frames = {"form": [frame_of(item) for item in items], "own": [own_frame_of(item) for item in items]}
    answers = {"form": [answer_in_form(item) for item in items], "own": [item.answers[0] for item in items]}
    tables = []
    for condition, attached, frame in CONDITIONS:
        if condition not in conditions or (attached and adapter is None):
            continue
        prompts = prompts_for(adapter if attached else None, [item.prompt for item in items])
        rows = framed_rows(tokenizer, prompts, frames[frame], answers[frame], system)
        with adapter.attached(model) if attached else contextlib.nullcontext():
            lens = lens_of_rows(model, rows, batch_size, f"logit lens: {condition}")
        n_items, n_layers = lens["rank"].shape
        top = [token_text(tokenizer, int(token)) for token in lens["top"].ravel()]
        tables.append(
            pd.DataFrame(
                {
                    "item": np.repeat(np.arange(n_items), n_layers),
                    "prompt": np.repeat([item.prompt for item in items], n_layers),
                    "answer": np.repeat(answers[frame], n_layers),
                    "condition": condition,
                    "layer": np.tile(np.arange(n_layers), n_items),
                    "rank": lens["rank"].ravel(),
                    "logprob": lens["logprob"].ravel(),
                    "top_token": top,
                }
            )
        )
    return pd.concat(tables, ignore_index=True)


def readable_from(lens: pd.DataFrame, top: int = 1) -> pd.DataFrame:
    """Per condition and item, the first layer from which the gold token stays within the lens's `top` through the
    last layer (NaN: not at the last layer): where the model makes the answer readable and keeps it. Columns:
    condition, item, layer."""

    def first_kept(group: pd.DataFrame) -> float:
        group = group.sort_values("layer")
        out = group["rank"].to_numpy() > top
        if out[-1]:
            return np.nan
        return float(group["layer"].iloc[len(out) - np.argmax(out[::-1]) if out.any() else 0])

    found = lens.groupby(["condition", "item"])[["layer", "rank"]].apply(first_kept)
    return found.rename("layer").reset_index()


# ---- what the prefix writes ----


@contextlib.contextmanager
def frozen_final_scale(model: nn.Module, scale: torch.Tensor) -> Iterator[None]:
    """Inside, `model.ln_final` divides by `scale` instead of its input's own: the norm as the linear map it is at
    the residual stream whose scale that is (for an RMSNorm, x -> w * x / scale)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*hook_scale.*|.*edit.*", category=UserWarning)
        with model.hooks(fwd_hooks=[("ln_final.hook_scale", lambda s, hook: scale.to(s.dtype).expand_as(s))]):
            yield


# Where `token_readout` reads, and the token each position predicts in the trained response: the response's start
# predicts its first token (the form's, `{"` in JSON), the answer position the gold answer's first.
READOUT_POSITIONS: dict[str, Callable[[FramedRow], int]] = {
    "response start": lambda row: row.n_prompt - 1,
    "answer": lambda row: row.position,
}
# What the "target" rows of each position stand for, in their token column and the figure's legend.
READOUT_TARGETS = {"response start": "each item's form token", "answer": "each item's gold"}


@torch.no_grad()
def token_readout(
    model: nn.Module, aligner: Aligner, items: Sequence[Item], k: int = 10, system: str | None = None, batch_size: int = 8
) -> pd.DataFrame:
    """DLA^l = W_U (w_f / s_f(x^L)) W_O^l (g A V_p)^l: what adapted layer l's gated prefix writes onto the logits,
    centred on its mean over the vocabulary (softmax ignores a shift common to every token) and averaged over
    `items`, at two positions of the aligned run's teacher-forced response (`READOUT_POSITIONS`): the response's
    start, where the form is written, and the answer position in the form's frame, where the gold answer is.

    Rows (`kind`): per position and adapted layer, the `k` tokens it promotes most ("promoted") and suppresses most
    ("suppressed"), and "target": the mean over items of what it writes on the token the position predicts in each
    item's response (the form's first token at the response start, the gold answer's first at the answer; value)
    and that token's mean rank among what the layer writes (rank; 1: promoted most); and the `k` vocabulary tokens
    nearest in cosine to each prefix token P[slot] among the input embeddings ("nearest"; position and layer <NA>,
    layer also where the tokens are shared by every layer). Columns: position, kind, layer, slot, rank, token,
    token_id, value."""
    tokenizer = model.tokenizer
    prompts = prompts_for(aligner, [item.prompt for item in items])
    rows = framed_rows(tokenizer, prompts, [frame_of(i) for i in items], [answer_in_form(i) for i in items], system)
    table = []
    for position, at in READOUT_POSITIONS.items():
        written, target_value, target_rank = prefix_logits(model, aligner, rows, at, batch_size, f"token readout ({position})")
        for i, layer in enumerate(aligner.layer_indices):
            for kind, sign in (("promoted", 1.0), ("suppressed", -1.0)):
                values, tokens = (sign * written[i]).topk(k)
                table += [
                    {"position": position, "kind": kind, "layer": layer, "slot": pd.NA, "rank": r + 1, "token_id": int(t), "value": sign * float(v)}
                    for r, (v, t) in enumerate(zip(values, tokens))
                ]
            table.append(
                {"position": position, "kind": "target", "layer": layer, "slot": pd.NA, "rank": float(target_rank[i]),
                 "token_id": pd.NA, "value": float(target_value[i])}
            )
    table += [{"position": pd.NA, **row} for row in nearest_tokens(model, aligner, k)]
    frame = pd.DataFrame(table, columns=["position", "kind", "layer", "slot", "rank", "token", "token_id", "value"])
    frame["token"] = [
        f"({READOUT_TARGETS[position]})" if pd.isna(t) else token_text(tokenizer, int(t))
        for t, position in zip(frame["token_id"], frame["position"])
    ]
    return frame.astype({"layer": "Int64", "slot": "Int64", "token_id": "Int64"})


@torch.no_grad()
def prefix_logits(
    model: nn.Module, aligner: Aligner, rows: Sequence[FramedRow], at: Callable[[FramedRow], int], batch_size: int, desc: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What each adapted layer's gated prefix writes onto the logits at position `at(row)` of each row, centred over
    the vocabulary: its mean over the rows (n_layers, vocab), and the mean value and rank (n_layers,) of what it
    writes on the token that position predicts, row.ids[at(row) + 1]."""
    layers = list(aligner.layer_indices)
    pad, device = pad_token_id(model.tokenizer), device_of(model)
    unembedding = model.W_U  # (d_model, vocab), without the unembedding's bias: a contribution carries none
    total = torch.zeros(len(layers), unembedding.shape[1], device=device)
    target_value, target_rank = torch.zeros(len(layers), device=device), torch.zeros(len(layers), device=device)
    with aligner.attached(model):
        for batch in batches(rows, batch_size, desc):
            positions = torch.tensor([at(row) for row in batch], device=device)
            written: list[torch.Tensor] = []
            final: list[torch.Tensor] = []
            hooks = [(f"blocks.{layer}.aligner.hook_z", at_positions(written, positions)) for layer in layers]
            hooks.append(("ln_final.hook_scale", at_positions(final, positions)))
            with model.hooks(fwd_hooks=hooks):
                model(padded(batch, pad, device))
            # W_O^l applied to the gated prefix alone, (n_active, B, d_model): no bias, the layer's own output has it
            out = torch.stack(
                [F.linear(z.flatten(-2), projection(model.blocks[layer].attn.o).weight) for z, layer in zip(written, layers)]
            )
            scale = final[0]  # (B, 1): the final norm's scale at the position read
            with frozen_final_scale(model, scale):
                normed = model.ln_final(out) - model.ln_final(torch.zeros_like(out))
            logits = (normed.float() @ unembedding.float()).float()  # (n_active, B, vocab)
            logits = logits - logits.mean(-1, keepdim=True)
            total += logits.sum(1)
            target = torch.tensor([row.ids[at(row) + 1] for row in batch], device=device)
            rank, value = gold_rank(logits, target.expand(len(layers), -1))  # rank 1: promoted most
            target_rank += rank.sum(1).float()
            target_value += value.sum(1)
    return total / len(rows), target_value / len(rows), target_rank / len(rows)


def nearest_tokens(model: nn.Module, aligner: Aligner, k: int) -> list[dict]:
    """Rows of `token_readout`'s "nearest" kind: for each prefix token (each adapted layer's, when not shared), the
    `k` input embeddings of highest cosine with it."""
    embeddings = F.normalize(model.W_E.float(), dim=-1)  # (vocab, d_model)
    tokens = aligner.tokens.detach().float().to(embeddings.device)
    per_layer = tokens if not aligner.config.shared else tokens.unsqueeze(0)  # (layers or 1, N, d_model)
    owners = list(aligner.layer_indices) if not aligner.config.shared else [pd.NA]
    rows = []
    for owner, slots in zip(owners, per_layer):
        cosine = F.normalize(slots, dim=-1) @ embeddings.T  # (N, vocab)
        for slot, (values, ids) in enumerate(zip(*cosine.topk(k, dim=-1))):
            rows += [
                {"kind": "nearest", "layer": owner, "slot": slot, "rank": r + 1, "token_id": int(t), "value": float(v)}
                for r, (v, t) in enumerate(zip(values, ids))
            ]
    return rows
