"""How far an adapted model's tokens are from the base model's: the token distribution shift of URIAL (Lin et al.
2023, "The Unlocking Spell on Base LLMs", arXiv 2312.01552).

Each run answers held-out prompts greedily; each token o_t it writes is ranked under the base model given the same
prompt and the same o_<t (one teacher-forced forward of the base over the run's answer):

    rank_t = 1 + #{v : p_base(v | prompt, o_<t) > p_base(o_t | prompt, o_<t)}
    unshifted: rank_t = 1      marginal: rank_t in {2, 3}      shifted: rank_t > 3

URIAL's anchors: 7.8 % of tokens shifted for Llama-2-7b against its chat model, 4.8 % against Vicuna, 5.2 % for
Mistral-7b against its instruct model; the shifted ones are mostly stylistic (discourse markers, safety
disclaimers), not knowledge. The base model reads each prompt as it is, without an adapter's own format (prompt
tuning's placeholders), and through the same chat template.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationConfig

from aligner.adapter import Adapter
from aligner.chat import end_of_turn_id, prompt_ids, stop_ids
from aligner.generation import generate_batch
from aligner.objective import pad_token_id, prompts_for
from probe.gates import token_text
from probe.lens import FramedRow, batches, device_of, gold_rank, padded

SHIFTS = ("unshifted", "marginal", "shifted")


def shift_of(rank: int) -> str:
    """URIAL's three kinds of token by their rank under the base model."""
    return "unshifted" if rank == 1 else "marginal" if rank <= 3 else "shifted"


def greedy_ids(
    model: nn.Module, adapter: Adapter | None, prompts: Sequence[str], system: str | None, max_new_tokens: int, batch_size: int, desc: str
) -> list[list[int]]:
    """The new token ids of each prompt's greedy answer with `adapter` attached (None: the base model), its stop
    token kept where it stopped: `aligner.generate`'s decoding, as ids rather than text, since decoded text
    tokenised again need not give back the tokens the model chose."""
    tokenizer = model.tokenizer
    ids = [prompt_ids(tokenizer, prompt, system=system) for prompt in prompts_for(adapter, prompts)]
    decoding = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        temperature=None,
        top_p=None,
        top_k=None,
        eos_token_id=list(stop_ids(tokenizer)),
        pad_token_id=end_of_turn_id(tokenizer),
    )
    answers: list[list[int]] = []
    with adapter.attached(model) if adapter is not None else contextlib.nullcontext():
        for batch in batches(ids, batch_size, desc):
            with adapter.fixed_prefix() if adapter is not None else contextlib.nullcontext():
                answers += generate_batch(model, list(batch), decoding)
    return answers


@torch.no_grad()
def token_shift(
    model: nn.Module,
    runs: Mapping[str, Adapter | None],
    prompts: Sequence[str],
    system: str | None = None,
    max_new_tokens: int = 32,
    batch_size: int = 16,
) -> pd.DataFrame:
    """Each run's greedy answer to each of `prompts` (a run None: the base model itself), every token ranked under
    the base model given the same prefix (`rank_t` above). One row per run, prompt and generated token: run,
    item, position (0: the answer's first token), token, token_id, base_rank, base_logprob, base_top (the base
    model's own choice there), shift (`SHIFTS`)."""
    tokenizer = model.tokenizer
    base_prompts = [prompt_ids(tokenizer, prompt, system=system) for prompt in prompts]
    pad, device = pad_token_id(tokenizer), device_of(model)
    tables = []
    for run, adapter in runs.items():
        answers = greedy_ids(model, adapter, prompts, system, max_new_tokens, batch_size, f"token shift: {run} answers")
        rows = [
            (item, FramedRow(prompt + answer, len(prompt), len(prompt)))
            for item, (prompt, answer) in enumerate(zip(base_prompts, answers))
            if answer
        ]
        records = []
        for batch in batches(rows, batch_size, f"token shift: {run} under the base"):
            logprobs = F.log_softmax(model(padded([row for _, row in batch], pad, device)).float(), dim=-1)
            for b, (item, row) in enumerate(batch):
                span = slice(row.n_prompt - 1, len(row.ids) - 1)  # position t predicts the token at t + 1
                tokens = torch.tensor(row.ids[row.n_prompt :], device=device)
                rank, logprob = gold_rank(logprobs[b, span], tokens)
                top = logprobs[b, span].argmax(-1)
                records += [
                    (run, item, t, token, int(r), float(lp), int(best))
                    for t, (token, r, lp, best) in enumerate(zip(tokens.tolist(), rank.tolist(), logprob.tolist(), top.tolist()))
                ]
        table = pd.DataFrame(records, columns=["run", "item", "position", "token_id", "base_rank", "base_logprob", "base_top"])
        tables.append(table)
    table = pd.concat(tables, ignore_index=True)
    decoded = {i: token_text(tokenizer, i) for i in set(table["token_id"]) | set(table["base_top"])}
    table["token"] = table["token_id"].map(decoded)
    table["base_top"] = table["base_top"].map(decoded)
    table["shift"] = [shift_of(rank) for rank in table["base_rank"]]
    return table[["run", "item", "position", "token", "token_id", "base_rank", "base_logprob", "base_top", "shift"]]


def shift_shares(table: pd.DataFrame, by: Sequence[str] = ("run",)) -> pd.DataFrame:
    """The share of tokens of each kind (`SHIFTS`) per group of `by` ("run"; ("run", "position") for the shares
    along the answer), with the group's token count n."""
    counts = pd.crosstab([table[column] for column in by], table["shift"]).reindex(columns=list(SHIFTS), fill_value=0)
    shares = counts.div(counts.sum(axis=1), axis=0)
    shares["n"] = counts.sum(axis=1)
    return shares.reset_index().rename_axis(columns=None)


def most_shifted(table: pd.DataFrame, k: int = 10) -> pd.DataFrame:
    """Per run, the `k` tokens written most often where they are shifted, with their count, mean base rank and the
    token the base model would have written there most often."""
    shifted = table[table["shift"] == "shifted"]
    grouped = shifted.groupby(["run", "token"]).agg(
        count=("token", "size"),
        mean_base_rank=("base_rank", "mean"),
        base_instead=("base_top", lambda tops: tops.mode().iloc[0]),
    )
    grouped = grouped.reset_index().sort_values(["run", "count", "mean_base_rank"], ascending=[True, False, False])
    return grouped.groupby("run").head(k).reset_index(drop=True)

