"""Direct preference optimisation (DPO; Rafailov et al. 2023, arXiv 2305.18290) of an aligner, the base model frozen.

The Aligner paper aligned values this way on PKU-SafeRLHF ("Beaver"): the reference is an aligner trained by SFT
on the safe answers, and the policy starts from it. For a pair (prompt x, chosen y_w, rejected y_l), with
log π(y|x) the summed log-probabilities of the response's tokens (its end-of-turn token included):

    h         = [log π(y_w|x) - log π_ref(y_w|x)] - [log π(y_l|x) - log π_ref(y_l|x)]
    loss      = -(1 - ε) log σ(β h) - ε log σ(-β h)       ε: label smoothing (cDPO); ε = 0 is plain DPO
    reward(y) = β [log π(y|x) - log π_ref(y|x)]           the implicit reward; accuracy: reward(y_w) > reward(y_l)

averaged over the pairs of a step: with ε = 0, trl's `DPOTrainer` loss "sigmoid"; with ε > 0, conservative DPO
(Mitchell 2023), which earlier trl versions computed under "sigmoid" too.

The policy and the reference are two adapters of one kind (two Aligners, two LoRAs, ...) on one model; only one
is attached at a time. Before training,
one pass under `torch.no_grad()` with the reference attached (nothing attached when the base model is the
reference) computes every pair's reference log-probabilities, kept as an (n_pairs, 2) tensor indexed by the
pair's position. The reference is frozen, so they never change: each training step is then one policy pass,
chosen and rejected responses in one batch, and no second copy of the model is ever made. Steps, checkpoints,
metrics.jsonl, resumption and the sharing of the work among processes are train.py's (`optimize`); on several
processes each one computes the reference log-probabilities of its share of the pairs, and they are gathered.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ContextManager, Sequence

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import gather_object
from torch import nn
from tqdm import tqdm
from transformers import PreTrainedTokenizerBase

from aligner.adapter import Adapter, attached_to_run, load_adapter
from aligner.checkpoint import run_directory
from aligner.data import Example, Pair
from aligner.distributed import launched_accelerator
from aligner.model import AlignerHooks
from aligner.objective import (
    PromptFormat,
    Tokenized,
    formatted_for,
    make_batch,
    pad_token_id,
    response_logprobs,
    tokenize_examples,
)
from aligner.train import Step, TrainConfig, optimize, shard_if_asked, starting_adapter

# What each DPO step logs besides the learning rate and speed: means over the step's pairs.
METRICS = (
    "loss", "reward_chosen", "reward_rejected", "reward_margin", "reward_accuracy", "logp_chosen", "logp_rejected"
)  # fmt: skip


@dataclass(frozen=True)
class DPOConfig(TrainConfig):
    """TrainConfig's settings (steps, batch_size and grad_accum counted in pairs, AdamW lr, weight decay and
    warm-up, seed, max_length per response, log and save intervals, chat template), and DPO's own."""

    beta: float = 0.1  # β: scales the implicit reward; the larger, the closer the policy is held to the reference
    label_smoothing: float = 0.0  # ε: the assumed chance that a pair's preference is flipped (cDPO); 0: plain DPO
    # Directory of the reference adapter (a run directory: an aligner, a LoRA, ...), which the policy starts from
    # (the paper: the SFT aligner); None: the base model is the reference, and the policy starts as `train_dpo`'s
    # `adapter` or a fresh aligner (zero gates: equal to it at step 0).
    reference: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.beta > 0:
            raise ValueError(f"DPOConfig.beta must be > 0, got {self.beta}")
        if not 0 <= self.label_smoothing < 0.5:
            raise ValueError(f"DPOConfig.label_smoothing must be in [0, 0.5), got {self.label_smoothing}")


def train_dpo(
    model: nn.Module,
    pairs: Sequence[Pair],
    config: DPOConfig,
    run_dir: str | Path | None = None,
    resume: bool = False,
    accelerator: Accelerator | None = None,
    adapter: Adapter | None = None,
    on_step: Callable[[int, float], bool] | None = None,
) -> Adapter:
    """Train by DPO on preference `pairs` against `config.reference`, `model` frozen; return the policy, detached.

    The policy starts as a copy of the reference: `adapter` where given (a copy of the reference's tensors, which
    the caller keeps, for instance to read its best step), else one of its own. When the reference is the base
    model, the policy starts as `adapter` (None: a fresh one-token aligner seeded by `config.seed`, or with
    `resume=True` the run's own). With `run_dir`, checkpoints and metrics are written there as `train_sft` writes
    them; `resume=True` continues a run, refusing other settings, other pairs or a changed reference; the run
    directory is locked as `train_sft` locks it. `accelerator` and `on_step` as in `aligner.train.optimize`.
    """
    accelerator = accelerator or launched_accelerator()
    with run_directory(run_dir, resume, accelerator) as (run_dir, resume):
        return _train_dpo(model, pairs, config, run_dir, resume, accelerator, adapter, on_step)


def _train_dpo(
    model: nn.Module,
    pairs: Sequence[Pair],
    config: DPOConfig,
    run_dir: Path | None,
    resume: bool,
    accelerator: Accelerator,
    adapter: Adapter | None,
    on_step: Callable[[int, float], bool] | None,
) -> Adapter:
    """`train_dpo` in its run directory, held and checked."""
    sharded = shard_if_asked(model, config, accelerator)  # before the reference pass, which then runs sharded too
    device = next(model.parameters()).device
    if config.reference is None:
        reference = None
        policy = adapter or starting_adapter(model, config.seed, run_dir if resume else None)
    else:
        reference = load_adapter(config.reference, device=device)
        if adapter is not None and not same_tensors(adapter, reference):
            raise ValueError(f"the policy starts from the reference {config.reference}; the adapter given is not a copy of it")
        # Tensors of its own: the reference stays as it is.
        policy = adapter or load_adapter(config.reference, device=device)
        policy.provenance = {"initialised_from": config.reference}
    # The user's turns as the policy reads them (prompt tuning puts its placeholders in front; others keep them).
    sequences = tokenize_pairs(model.tokenizer, formatted_for(policy, pairs), config)
    pad_id = pad_token_id(model.tokenizer)
    # Each process scores its share of the pairs, in the mixed precision the policy's log-probabilities will have
    # (at step 0 they must equal the reference's); gathered in process order, the shares are the pairs in order.
    with accelerator.split_between_processes(sequences) as mine, accelerator.autocast():
        n_mine = len(mine)
        if sharded:  # every process runs as many forward passes: a shorter share repeats a pair, dropped after
            mine = mine + [sequences[0]] * (math.ceil(len(sequences) / accelerator.num_processes) - n_mine)
        shares = gather_object([pair_logprobs(model, reference, mine, config.batch_size, pad_id)[:n_mine]])
    reference_logps = torch.cat(shares)  # (n_pairs, 2)

    def dpo_gradients(step: Step) -> tuple[dict[str, float], int]:
        batch = [sequences[i] for i in step.mine]
        metrics = accumulate_dpo_gradients(
            step.model, batch, reference_logps[step.mine], config, pad_id, len(step.items), step.autocast
        )
        return metrics, sum(len(ids) for pair in batch for ids, _ in pair)

    data_sha256 = pairs_sha256(pairs, reference)
    return optimize(
        model, policy, config, dpo_gradients, len(sequences), data_sha256, run_dir, resume, on_step, accelerator
    )


def same_tensors(a: Adapter, b: Adapter) -> bool:
    """Whether two adapters are of one kind and hold equal tensors of the same names."""
    mine, theirs = a.state_dict(), b.state_dict()
    return type(a) is type(b) and mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k].to(mine[k].device)) for k in mine)


def heldout_dpo_loss(
    model: nn.Module, pairs: Sequence[tuple[Tokenized, Tokenized]], reference_logps: torch.Tensor, config: DPOConfig, pad_id: int
) -> float:
    """The mean DPO loss of held-out `pairs` (`tokenize_pairs`'s) under whatever is attached to `model` now, against
    the reference's log-probabilities of each pair (`pair_logprobs`'s, (n_pairs, 2)); no gradients. At a policy
    equal to its reference it is log 2."""
    total = 0.0
    with torch.no_grad():
        for k in range(0, len(pairs), config.batch_size):
            chosen, rejected = _pair_logprobs(model, pairs[k : k + config.batch_size], pad_id)
            reference = reference_logps[k : k + config.batch_size].to(chosen.device)
            losses, _, _ = dpo_loss(chosen, rejected, reference[:, 0], reference[:, 1], config.beta, config.label_smoothing)
            total += losses.sum().item()
    return total / len(pairs)


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, chosen reward, rejected reward) of each pair, all (B,), from summed response log-probabilities (B,);
    the rewards carry no gradient."""
    h = (policy_chosen - reference_chosen) - (policy_rejected - reference_rejected)
    losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    chosen_rewards = beta * (policy_chosen - reference_chosen).detach()
    rejected_rewards = beta * (policy_rejected - reference_rejected).detach()
    return losses, chosen_rewards, rejected_rewards


def accumulate_dpo_gradients(
    model: nn.Module,
    pairs: Sequence[tuple[Tokenized, Tokenized]],
    reference_logps: torch.Tensor,
    config: DPOConfig,
    pad_id: int,
    n_pairs: int | None = None,
    autocast: Callable[[], ContextManager] = contextlib.nullcontext,
) -> dict[str, float]:
    """Forward and backward over `pairs` with the policy attached, `config.batch_size` pairs at a time, adding to
    the gradients of the DPO loss summed over them and divided by `n_pairs`; returns the sums of METRICS over them
    divided by `n_pairs`. The default, len(pairs), gives the means; a process's share of a step passes the whole
    step's count, so that the shares add up to the step's means. `reference_logps` (len(pairs), 2) holds each
    pair's reference log-probabilities of (chosen, rejected). Each forward pass runs inside `autocast()`."""
    n_pairs = len(pairs) if n_pairs is None else n_pairs
    totals = dict.fromkeys(METRICS, 0.0)
    for k in range(0, len(pairs), config.batch_size):
        with autocast():
            chosen, rejected = _pair_logprobs(model, pairs[k : k + config.batch_size], pad_id)
        reference = reference_logps[k : k + config.batch_size].to(chosen.device)
        losses, chosen_rewards, rejected_rewards = dpo_loss(
            chosen, rejected, reference[:, 0], reference[:, 1], config.beta, config.label_smoothing
        )
        (losses.sum() / n_pairs).backward()
        values = {
            "loss": losses.detach(),
            "reward_chosen": chosen_rewards,
            "reward_rejected": rejected_rewards,
            "reward_margin": chosen_rewards - rejected_rewards,
            "reward_accuracy": (chosen_rewards > rejected_rewards).float(),
            "logp_chosen": chosen.detach(),
            "logp_rejected": rejected.detach(),
        }
        for name, value in values.items():
            totals[name] += value.sum().item()
    return {name: total / n_pairs for name, total in totals.items()}


def pair_logprobs(
    model: nn.Module,
    adapter: Adapter | None,
    pairs: Sequence[tuple[Tokenized, Tokenized]],
    batch_size: int,
    pad_id: int,
) -> torch.Tensor:
    """(log π(chosen|x), log π(rejected|x)) of each pair, (n_pairs, 2) on the CPU, by `model` with `adapter`
    attached for the call (None: the base model), without gradients."""
    if isinstance(getattr(model, "aligner", None), AlignerHooks):
        raise ValueError("the model has an aligner attached; detach it and pass the one to score with as adapter=")
    rows = []
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.no_grad())
        runner = stack.enter_context(attached_to_run(model, adapter))  # as the policy is trained: `optimize`
        for k in tqdm(range(0, len(pairs), batch_size), desc="log-probs", unit="batch"):
            chosen, rejected = _pair_logprobs(runner, pairs[k : k + batch_size], pad_id)
            rows.append(torch.stack([chosen, rejected], dim=1).cpu())  # (b, 2)
    return torch.cat(rows) if rows else torch.empty(0, 2)  # no pairs: a process with no share of them


def _pair_logprobs(
    model: nn.Module, pairs: Sequence[tuple[Tokenized, Tokenized]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed response log-probabilities (b,) of the chosen and of the rejected responses, in one forward pass."""
    input_ids, labels = make_batch([chosen for chosen, _ in pairs] + [rejected for _, rejected in pairs], pad_id)
    device = next(model.parameters()).device
    logps = response_logprobs(model, input_ids.to(device), labels.to(device))  # (2b,): chosen rows, then rejected
    return logps[: len(pairs)], logps[len(pairs) :]


def tokenize_pairs(
    tokenizer: PreTrainedTokenizerBase, pairs: Sequence[Pair], config: PromptFormat
) -> list[tuple[Tokenized, Tokenized]]:
    """(chosen, rejected) token sequences of each pair, made as `tokenize_examples` makes SFT examples (chat
    template, cut to `config.max_length`). Both responses follow the same prompt tokens, so a prompt that leaves
    no room drops both of them, never one: the sequences stay in (chosen, rejected) order, a pair at a time."""
    examples = [Example(pair.prompt, response, pair.row) for pair in pairs for response in (pair.chosen, pair.rejected)]
    flat = tokenize_examples(tokenizer, examples, config)
    return list(zip(flat[0::2], flat[1::2]))


def pairs_sha256(pairs: Sequence[Pair], reference: Adapter | None) -> str:
    """A digest of what the policy is trained against: the pairs and the reference's tensors (its
    log-probabilities are part of each pair's target), so that a run is never resumed on other data."""
    digest = hashlib.sha256(json.dumps([[p.prompt, p.chosen, p.rejected] for p in pairs]).encode())
    if reference is not None:
        for name, tensor in sorted(reference.state_dict().items()):
            digest.update(name.encode() + tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()
