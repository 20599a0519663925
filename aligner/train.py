"""Supervised fine-tuning of an Aligner (or another method: LoRA, prompt tuning, ...) on (prompt, response) pairs,
the base model frozen.

As the authors' code (lit-llama's `finetune/adapter.py`, which the Aligner paper builds on): AdamW over the
prefix tokens and gates alone, lr 9e-3, weight decay 0.02, a linear warm-up then a constant rate, and the loss
on the response tokens only. A run directory holds the aligner, `metrics.jsonl` and a training state from
which `resume=True` continues exactly where the run stopped:

    runs/NAME/aligner.safetensors, aligner.json   the aligner (provenance: this config, data, step, loss), or
                                                  method.safetensors, method.json for another method
    runs/NAME/metrics.jsonl                       one line per logged step
    runs/NAME/state.json                          step, data position, time, checks; names the file below
    runs/NAME/state-STEP.safetensors              the parameters (an aligner's tokens and gates), AdamW's
                                                  moments and the torch RNG state

The loop runs under Hugging Face accelerate, on one process or many (`accelerate launch -m aligner train ...`):
each step's examples are shared among the processes, their gradients summed, and the same step taken on each;
the main process writes the run directory. See `optimize`.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import math
import re
import time
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator, DistributedType
from safetensors import SafetensorError
from safetensors.torch import load, save
from torch import nn
from tqdm import tqdm
from transformers import PreTrainedTokenizerBase
from transformers.modeling_layers import GradientCheckpointingLayer

from aligner.chat import example_ids
from aligner.config import AlignerConfig, check_fields, dataclass_spec
from aligner.data import Example
from aligner.distributed import check_joined, launched_accelerator, shard_frozen_model
from aligner.files import atomic_write_bytes, atomic_write_json, read_json
from aligner.methods import CONFIG_FILE as METHOD_FILE
from aligner.methods import formatted_for
from aligner.model import CONFIG_FILE as ALIGNER_FILE
from aligner.model import Aligner

if TYPE_CHECKING:
    from aligner.methods import Method

STATE_FORMAT = "aligner-workbench/train-state/1"
STATE_FILE = "state.json"
METRICS_FILE = "metrics.jsonl"
IGNORE_INDEX = -100  # label of a position that takes no loss (prompt and padding), as in HF and PyTorch
# What may change between a run and its resumption: none of it alters the steps already taken.
RESUMABLE_CHANGES = {"steps", "log_every", "save_every", "data", "gradient_checkpointing", "shard_model"}
# TrainConfig's fields that shape an aligner (`aligner_config`), which another method does not read.
ALIGNER_FIELDS = tuple(field.name for field in fields(AlignerConfig))
# TrainConfig fields added since runs were first saved: a state.json written before them resumes without them.
LATER_FIELDS = ("gradient_checkpointing", "shard_model")
STATE_TENSORS_FILE = re.compile(r"state-\d{8}\.safetensors")  # the tensors of the checkpoint of one step


@dataclass(frozen=True)
class TrainConfig:
    n_tokens: int = 1  # N prefix tokens (AlignerConfig.n_tokens)
    start_layer: int = 2  # first adapted layer (AlignerConfig.start_layer)
    shared: bool = True  # one prefix for every layer (Aligner); False: one per layer (LLaMA-Adapter v1)
    steps: int = 1000  # optimizer steps in all; a resumed run counts the steps already taken
    # A step's batch_size * grad_accum examples, however many processes share them (the result does not depend on
    # that number): each process forwards its share of them batch_size at a time.
    batch_size: int = 8  # examples per forward pass (of one process, at most)
    grad_accum: int = 1  # forward passes per optimizer step on one process: a step sees batch_size * grad_accum examples
    lr: float = 9e-3  # learning rate after warm-up (the authors')
    weight_decay: float = 0.02  # AdamW's decoupled weight decay on tokens and gates (the authors')
    warmup_steps: int = 100  # the rate rises linearly to `lr` over these steps, then stays constant (lit-llama)
    max_length: int = 512  # tokens per example, prompt and response; longer ones are cut, with a warning
    seed: int = 0  # seeds the initial tokens and the order of the examples (a new permutation each epoch)
    log_every: int = 10  # steps between lines of metrics.jsonl and loss updates on the bar; the last step always
    save_every: int = 100  # steps between checkpoints in the run directory; the last step always
    system: str | None = None  # system prompt of the chat template; None: the model's default
    chat_template: bool = True  # False: raw prompt text, no chat template (base models)
    data: str | None = None  # where the examples came from (file or dataset name), recorded in provenance
    # Recompute each frozen layer's activations in the backward pass instead of keeping them from the forward
    # (transformers' checkpointing of its decoder layers): less memory, one more forward's compute.
    gradient_checkpointing: bool = False
    # Shard the frozen model among the launched processes (FSDP2) instead of a whole copy on each: for a model too
    # large for one GPU. An `accelerate launch --use_fsdp` shards whether or not this is set.
    shard_model: bool = False

    def __post_init__(self) -> None:
        positive = ("n_tokens", "steps", "batch_size", "grad_accum", "max_length", "log_every", "save_every")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("start_layer", "warmup_steps", "weight_decay"):
            if getattr(self, name) < 0:
                raise ValueError(f"TrainConfig.{name} must be >= 0, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"TrainConfig.lr must be > 0, got {self.lr}")

    def aligner_config(self) -> AlignerConfig:
        return AlignerConfig(n_tokens=self.n_tokens, start_layer=self.start_layer, shared=self.shared)


def train_sft(
    model: nn.Module,
    examples: Sequence[Example],
    config: TrainConfig,
    run_dir: str | Path | None = None,
    resume: bool = False,
    aligner: Method | None = None,
    on_step: Callable[[int, float], bool] | None = None,
    accelerator: Accelerator | None = None,
) -> Method:
    """Train an aligner on `examples` with `model` frozen, and return it (detached).

    A fresh aligner is made from `config` (seeded by `config.seed`) unless `aligner` is given to continue.
    With `run_dir`, checkpoints and metrics are written there; a directory that is not empty is refused
    unless `resume=True`, which continues its saved state: 3 steps, then resuming to 6, give the aligner that
    6 steps straight give. The base model is left with `requires_grad=False` on every weight.
    `aligner` may be any `aligner.methods.Method` (LoRA, prompt tuning, a bias), trained the same way, on each
    prompt as it reads it (`prompts_for`: prompt tuning's placeholders in front); to resume the run of one, pass a
    fresh one of the run's kind and config (an aligner is made from `config` instead), and the checkpoint's
    parameters replace its own. `on_step(step, loss)`, called after each step while the method
    is attached, ends training there by returning True (the suite's early stopping). `accelerator` (default:
    `launched_accelerator()`, the processes and mixed precision of `accelerate launch`) runs the loop; see
    `optimize`.
    """
    run_dir = check_run_dir(run_dir, resume)
    if resume and isinstance(aligner, Aligner):
        raise ValueError("resume=True continues the run's own aligner, made from the config; do not pass one")
    if aligner is None:
        torch.manual_seed(config.seed)
        aligner = Aligner.for_model(model, config.aligner_config())
    elif isinstance(aligner, Aligner) and aligner.config != config.aligner_config():
        raise ValueError(f"the aligner given has {aligner.config}, the training config {config.aligner_config()}")
    # The user's turns as the method reads them (prompt tuning puts its placeholders in front; others keep them).
    examples = formatted_for(aligner, examples)
    sequences = tokenize_examples(model.tokenizer, examples, config)
    pad_id = pad_token_id(model.tokenizer)

    def sft_gradients(step: Step) -> tuple[dict[str, float], int]:
        n_targets = count_targets([sequences[i] for i in step.items])  # the whole step's, on every process
        batch = [sequences[i] for i in step.mine]
        loss = accumulate_gradients(model, batch, config.batch_size, pad_id, n_targets, step.autocast)
        return {"loss": loss}, sum(len(ids) for ids, _ in batch)

    data_sha256 = examples_sha256(examples)
    return optimize(
        model, aligner, config, sft_gradients, len(sequences), data_sha256, run_dir, resume, on_step, accelerator
    )


def check_run_dir(run_dir: str | Path | None, resume: bool) -> Path | None:
    """`run_dir` as a Path, refused before any work if it cannot be resumed or would be overwritten."""
    run_dir = None if run_dir is None else Path(run_dir)
    if resume and run_dir is None:
        raise ValueError("resume=True needs the run_dir to resume")
    if not resume and run_dir is not None and run_dir.exists() and any(run_dir.iterdir()):
        raise FileExistsError(f"{run_dir}: run directory exists; resume it (resume=True, --resume) or choose another")
    return run_dir


@dataclass(frozen=True)
class Step:
    """One optimizer step's data, as `optimize` hands it to the objective's `gradients`."""

    items: list[int]  # positions of the step's items (examples, pairs) in the seeded stream, over every process
    mine: list[int]  # the share of `items` this process computes: a contiguous slice; all of them on one process
    autocast: Callable[[], ContextManager]  # entered around each forward pass: the accelerator's mixed precision


def optimize(
    model: nn.Module,
    aligner: Method,
    config: TrainConfig,
    gradients: Callable[[Step], tuple[dict[str, float], int]],
    n_items: int,
    data_sha256: str,
    run_dir: Path | None,
    resume: bool,
    on_step: Callable[[int, float], bool] | None = None,
    accelerator: Accelerator | None = None,
) -> Method:
    """The training loop of every objective: AdamW on `aligner` attached to `model` frozen, `config.steps` steps.

    Each step, `gradients(step)` adds to the aligner's gradients for this process's share (`step.mine`) of the
    step's items (examples, pairs) at positions `step.items` of the seeded stream over `n_items`, and returns
    that share's metrics ("loss" among them) and the number of tokens it read, each a share that adds up over
    the processes to the step's. Metrics, checkpoints and resumption as described at the top of this file.

    On several processes (`accelerate launch`, `accelerator` defaulting to `launched_accelerator()`), each holds
    the whole aligner, starting from the same tokens and gates (one seed, or one checkpoint); the shares'
    gradients are summed over the processes, one all-reduce of the aligner's few parameters a step (accelerate's
    `reduce`), and each process takes the same AdamW step. Torch's DistributedDataParallel does not wrap the
    frozen model: it would need every forward to pass through its wrapper and as many backward passes on every
    process, where here a process may have fewer forward passes than another, or none. With
    `config.shard_model` (or under `accelerate launch --use_fsdp`) FSDP2 shards the frozen model among the
    processes (`shard_frozen_model`); then each step's items must split into as many forward passes on every
    process. The main process alone writes to `run_dir`.
    """
    accelerator = accelerator or launched_accelerator()
    shard_if_asked(model, config, accelerator)
    _check_device(accelerator, model)
    main = accelerator.is_main_process
    model.requires_grad_(False)  # before attaching: the attached aligner becomes a submodule of the model
    model.eval()
    aligner.requires_grad_(True)
    optimizer = torch.optim.AdamW(aligner.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    run = _Run(step=0, position=0, elapsed_s=0.0, loss=None, saved_step=None)
    if resume:
        run = _load_state(run_dir, config, aligner, optimizer, data_sha256)  # every process reads the checkpoint
        if main:
            _drop_metrics_after(run_dir / METRICS_FILE, run.step)
    elif run_dir is not None and main:
        run_dir.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()  # every process has read the run directory before the main one writes to it

    per_step = config.batch_size * config.grad_accum
    started = time.perf_counter() - run.elapsed_s
    logged_at, logged_tokens = time.perf_counter(), 0
    bar = tqdm(total=config.steps, initial=run.step, desc="train", unit="step", disable=not main)
    with aligner.attached(model), checkpointing(model, config.gradient_checkpointing), bar:
        while run.step < config.steps:
            lr = learning_rate(run.step + 1, config)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.zero_grad(set_to_none=True)
            items = stream_order(n_items, config.seed, run.position, per_step)
            with accelerator.split_between_processes(items) as mine:
                metrics, n_tokens = gradients(Step(items, mine, accelerator.autocast))
            metrics, n_tokens = _sum_over_processes(accelerator, aligner, metrics, n_tokens)
            loss = metrics["loss"]
            if not math.isfinite(loss):
                raise FloatingPointError(f"loss is {loss} at step {run.step + 1}; {_stopped(run)}")
            optimizer.step()
            if not all(bool(torch.isfinite(p).all()) for p in aligner.parameters()):  # before any save could keep it
                raise FloatingPointError(
                    f"the trained parameters became NaN or inf in the update of step {run.step + 1} (its loss was "
                    f"finite: the gradients overflowed); {_stopped(run)}"
                )
            run.step, run.position, run.loss = run.step + 1, run.position + per_step, loss
            run.elapsed_s = time.perf_counter() - started
            logged_tokens += n_tokens
            bar.update()
            stop = on_step is not None and on_step(run.step, loss)
            if run.step % config.log_every == 0 or run.step == config.steps or stop:
                now = time.perf_counter()
                tokens_per_s = logged_tokens / (now - logged_at)
                logged_at, logged_tokens = now, 0
                bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_s:.0f}")
                if run_dir is not None and main:
                    row = {"step": run.step, **metrics, "lr": lr, "tokens_per_s": tokens_per_s}
                    with open(run_dir / METRICS_FILE, "a", encoding="utf-8") as f:
                        f.write(json.dumps({**row, "elapsed_s": run.elapsed_s}) + "\n")
            if run_dir is not None and (run.step % config.save_every == 0 or run.step == config.steps or stop):
                aligner.provenance["training"] = _training_record(aligner, config, run, n_items, data_sha256)
                if main:
                    _save_state(run_dir, aligner, optimizer, config, run, data_sha256)
                run.saved_step = run.step  # on every process: what a later stop says is kept
            if stop:
                break
    accelerator.wait_for_everyone()  # no process returns before the last checkpoint is written
    aligner.provenance["training"] = _training_record(aligner, config, run, n_items, data_sha256)
    return aligner


def shard_if_asked(model: nn.Module, config: TrainConfig, accelerator: Accelerator) -> bool:
    """Shard the frozen model among the processes (`shard_frozen_model`) where `config.shard_model` or an
    `accelerate launch --use_fsdp` asks for it, after refusing what the loop cannot run (`_check_accelerator`);
    whether it is sharded. From wherever it was loaded (the CPU, for a model larger than one device) each block's
    shard moves onto this process's device."""
    _check_accelerator(accelerator)
    if not (config.shard_model or accelerator.distributed_type == DistributedType.FSDP):
        return False
    per_step = config.batch_size * config.grad_accum
    if per_step % accelerator.num_processes:
        raise ValueError(
            f"a sharded model needs every process to run as many forward passes: batch_size * grad_accum "
            f"({per_step}) must divide by the number of processes ({accelerator.num_processes})"
        )
    shard_frozen_model(model, accelerator)
    return True


def _check_accelerator(accelerator: Accelerator) -> None:
    """Refuse what the loop cannot run: processes launched together that accelerate did not join (each would
    train alone and write the same run directory), DeepSpeed launches (the loop shards with FSDP2, not with
    DeepSpeed's engine) and fp16 (the loop takes no gradient scaler)."""
    check_joined(accelerator)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        raise ValueError(
            "accelerate launch with DEEPSPEED is not supported: the training loop shards the frozen model with "
            "FSDP2; launch with --use_fsdp, or with --multi_gpu and `aligner train --shard-model`"
        )
    if accelerator.mixed_precision not in ("no", "bf16"):
        raise ValueError(
            f"mixed precision {accelerator.mixed_precision!r} is not supported: the training loop uses no gradient "
            "scaler, which fp16 needs; use bf16 (accelerate launch --mixed_precision bf16) or none"
        )


def _check_device(accelerator: Accelerator, model: nn.Module) -> None:
    """On several processes, refuse a model that is not on this process's device: each process trains on its own
    device's copy (or shard)."""
    device = next(model.parameters()).device
    if accelerator.num_processes > 1 and (device.type, device.index or 0) != (
        accelerator.device.type,
        accelerator.device.index or 0,
    ):
        raise ValueError(
            f"the model is on {device}, and this process (of {accelerator.num_processes}) on {accelerator.device}: "
            "move the model to accelerator.device before training on several processes"
        )


def _sum_over_processes(
    accelerator: Accelerator, aligner: Method, metrics: dict[str, float], n_tokens: int
) -> tuple[dict[str, float], int]:
    """The step's gradients (left in the aligner), metrics and token count: each process's shares summed over the
    processes, every process receiving the sums. One process holds the step's already."""
    if accelerator.num_processes == 1:
        return metrics, n_tokens
    params = list(aligner.parameters())
    # One all-reduce for all of them; a process that had no item this step adds zeros.
    grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
    summed = accelerator.reduce(torch.cat([grad.flatten() for grad in grads]), reduction="sum")
    for param, grad in zip(params, summed.split([p.numel() for p in params])):
        param.grad = grad.view_as(param)
    values = torch.tensor([*metrics.values(), n_tokens], dtype=torch.float64, device=accelerator.device)
    values = accelerator.reduce(values, reduction="sum").tolist()
    return dict(zip(metrics, values)), round(values[-1])


@contextlib.contextmanager
def checkpointing(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Inside, if `enabled`, the frozen model's decoder layers keep no activations for the backward pass but
    compute them again there (transformers' gradient checkpointing, non-reentrant); the aligner's hooks run again
    with them, and its gradients are those of the plain backward pass."""
    if not enabled:
        yield
        return
    hf_model = model.original_model
    layers = [module for module in hf_model.modules() if isinstance(module, GradientCheckpointingLayer)]
    if not layers:
        raise ValueError(f"{type(hf_model).__name__} has no layers that transformers can checkpoint")
    with warnings.catch_warnings():
        # transformers 5.23 renames it activation_checkpointing_enable; the older versions it supports know this name.
        warnings.simplefilter("ignore", FutureWarning)
        hf_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # transformers also makes the embeddings' output require gradients (for peft's reentrant checkpointing); the
    # aligner's gradient needs none from below its first layer, so the backward pass keeps stopping there.
    hf_model.disable_input_require_grads()
    # transformers checkpoints a layer in training mode only; set on the layers alone, so that the rest of the
    # frozen model (its dropout) stays in eval mode.
    for layer in layers:
        layer.training = True
    try:
        yield
    finally:
        for layer in layers:
            layer.training = False
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            hf_model.gradient_checkpointing_disable()


def _stopped(run: _Run) -> str:
    """The end of a message that stops training: what is kept on disk."""
    kept = "no checkpoint yet" if run.saved_step is None else f"checkpoint of step {run.saved_step} kept"
    return f"training stopped ({kept})"


@dataclass
class _Run:
    """Where a run stands; what `state.json` records."""

    step: int  # optimizer steps taken
    position: int  # examples consumed from the seeded stream of epochs
    elapsed_s: float  # training time so far, over every resumption
    loss: float | None  # the last step's loss
    saved_step: int | None  # the step of the last checkpoint written


# The fields of state.json: where the run stands, and what it must be resumed with.
STATE_FIELDS = {
    "format": "str",
    "config": "dict",  # the TrainConfig (or DPOConfig) of the run
    "data_sha256": "str",
    "base_fingerprint": "str | None",
    "tensors": "str",  # the file of this checkpoint's tensors, state-STEP.safetensors
    "tensors_sha256": "str",
    **dataclass_spec(_Run),
}


def learning_rate(step: int, config: TrainConfig) -> float:
    """The rate of optimizer step `step` (from 1): linear warm-up over `warmup_steps`, then constant."""
    return config.lr * min(1.0, step / config.warmup_steps) if config.warmup_steps else config.lr


def accumulate_gradients(
    model: nn.Module,
    sequences: Sequence[tuple[list[int], int]],
    batch_size: int,
    pad_id: int,
    n_targets: int | None = None,
    autocast: Callable[[], ContextManager] = contextlib.nullcontext,
) -> float:
    """Forward and backward over `sequences`, `batch_size` at a time, adding to the gradients of their summed
    response-token loss divided by `n_targets`, and returning that loss. The default, their own count of response
    tokens, makes it the mean loss per token (so that the split into forward passes does not weigh examples); a
    process's share of a step passes the whole step's count, so that the shares add up to the step's mean.
    Each forward pass runs inside `autocast()` (mixed precision), each backward outside it."""
    n_targets = count_targets(sequences) if n_targets is None else n_targets
    device = next(model.parameters()).device
    total = 0.0
    for k in range(0, len(sequences), batch_size):
        input_ids, labels = make_batch(sequences[k : k + batch_size], pad_id)
        with autocast():
            loss = response_loss(model, input_ids.to(device), labels.to(device)) / n_targets
        loss.backward()
        total += loss.item()
    return total


def count_targets(sequences: Sequence[tuple[list[int], int]]) -> int:
    """The response tokens that take loss in `sequences`: every labelled position but the first of a sequence,
    which nothing predicts (the labels of `make_batch`, shifted by one)."""
    return sum(len(ids) - max(n_prompt, 1) for ids, n_prompt in sequences)


def tokenize_examples(
    tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example], config: TrainConfig
) -> list[tuple[list[int], int]]:
    """(token ids, number of prompt tokens) per example, through the chat template, cut to `max_length`.
    An example whose response is cut away entirely is left out: it would teach nothing."""
    sequences, truncated = [], []
    for position, example in enumerate(examples, start=1):
        ids, n_prompt = example_ids(
            tokenizer, example.prompt, example.response, system=config.system, chat_template=config.chat_template
        )
        if len(ids) > config.max_length:
            truncated.append(f"row {example.row}" if example.row is not None else f"example {position}")
            ids = ids[: config.max_length]
        if len(ids) > n_prompt:
            sequences.append((ids, n_prompt))
    if truncated:
        dropped = len(examples) - len(sequences)
        shown = ", ".join(truncated[:10]) + (f" and {len(truncated) - 10} more" if len(truncated) > 10 else "")
        warnings.warn(
            f"{len(truncated)} of {len(examples)} examples are longer than max_length={config.max_length} tokens and "
            f"were truncated ({shown}); {dropped} of them lost their whole response and are left out",
            stacklevel=2,
        )
    if not sequences:
        raise ValueError(f"no example keeps a response token within max_length={config.max_length}")
    return sequences


def make_batch(sequences: Sequence[tuple[list[int], int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (input_ids, labels), both (B, T). labels[b, t] is the token at t where it belongs to the
    response (its end-of-turn token included) and IGNORE_INDEX on prompt and padding; the loss shifts by one,
    as in HF. Right padding needs no attention mask: causal attention never looks ahead to the padding."""
    length = max(len(ids) for ids, _ in sequences)
    input_ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    labels = torch.full((len(sequences), length), IGNORE_INDEX, dtype=torch.long)
    for b, (ids, n_prompt) in enumerate(sequences):
        input_ids[b, : len(ids)] = torch.tensor(ids)
        labels[b, n_prompt : len(ids)] = torch.tensor(ids[n_prompt:])
    return input_ids, labels


def response_loss(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy of `model` over the labelled positions; input_ids and labels (B, T)."""
    return -response_logprobs(model, input_ids, labels).sum()


def response_logprobs(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(response | prompt) of each sequence, (B,): the log-probabilities of its labelled tokens, summed.
    The logits are taken from the first position that predicts a response token on (`logits_to_keep`, where the
    model's forward reads it), not over the prompt: the unembedding is most of a step when the vocabulary is large
    and the response short (Gemma 3: 262,144 tokens; a capital's sentence after a 40-token prompt)."""
    labelled = (labels != IGNORE_INDEX).any(dim=0).nonzero()
    first = max(int(labelled[0]) - 1, 0) if len(labelled) else 0  # the position that predicts the first label
    keep = {"logits_to_keep": labels.shape[1] - first} if reads_logits_to_keep(model) else {}
    logits = model(input_ids, **keep)  # (B, T', vocab): the last T' positions
    labels = labels[:, labels.shape[1] - logits.shape[1] :]
    token_losses = F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX, reduction="none"
    )  # (B * (T - 1),), zero where ignored
    return -token_losses.view(labels.shape[0], -1).sum(dim=1)


def reads_logits_to_keep(model: nn.Module) -> bool:
    """Whether the Hugging Face model under the bridge computes logits for the last positions only when asked
    (`logits_to_keep`, which the bridge passes on): most causal LMs of transformers do."""
    hf_model = getattr(model, "original_model", None)
    return hf_model is not None and "logits_to_keep" in inspect.signature(hf_model.forward).parameters


def pad_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id that fills batches out to one length: the pad token, else end of sequence (never read: right padding)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def stream_order(n: int, seed: int, start: int, count: int) -> list[int]:
    """Example indices at positions [start, start + count) of an endless stream of epochs, each a permutation
    drawn from (seed, epoch) alone: any position is found again without replaying the ones before it."""
    indices: list[int] = []
    position = start
    while position < start + count:
        epoch, offset = divmod(position, n)
        take = min(n - offset, start + count - position)
        indices += np.random.default_rng([seed, epoch]).permutation(n)[offset : offset + take].tolist()
        position += take
    return indices


def examples_sha256(examples: Sequence[Example]) -> str:
    """A digest of the training data, so that a run is never resumed on other data."""
    return hashlib.sha256(json.dumps([[e.prompt, e.response] for e in examples]).encode()).hexdigest()


def _training_record(
    method: Method, config: TrainConfig, run: _Run, n_examples: int, data_sha256: str
) -> dict[str, Any]:
    """What the method's provenance says about its training. The config's aligner fields are left out for another
    method, whose shape is its own config: a prompt tuning of 3 tokens is not recorded with n_tokens=1."""
    settings = asdict(config)
    if not isinstance(method, Aligner):
        settings = {name: value for name, value in settings.items() if name not in ALIGNER_FIELDS}
    return {
        "config": settings,
        "step": run.step,
        "loss": run.loss,
        "elapsed_s": run.elapsed_s,
        "examples": n_examples,
        "data_sha256": data_sha256,
    }


def _save_state(
    run_dir: Path, aligner: Method, optimizer: torch.optim.Optimizer, config: TrainConfig, run: _Run, data_sha256: str
) -> None:
    """Write the aligner (or method), then the training state. `state.json` is written last and names its tensor
    file, so that an interruption at any moment leaves the previous checkpoint whole."""
    aligner.save(run_dir)
    tensors = {**aligner.state_dict(), "rng.torch": torch.get_rng_state()}  # an aligner's: tokens, gates
    for index, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            tensors[f"optimizer.{index}.{key}"] = value
    data = save({name: value.detach().cpu().contiguous() for name, value in tensors.items()})
    tensors_file = f"state-{run.step:08d}.safetensors"
    atomic_write_bytes(run_dir / tensors_file, data)
    run.saved_step = run.step
    atomic_write_json(
        run_dir / STATE_FILE,
        {
            "format": STATE_FORMAT,
            **asdict(run),
            "config": asdict(config),
            "data_sha256": data_sha256,
            "base_fingerprint": aligner.base_model["fingerprint"],
            "tensors": tensors_file,
            "tensors_sha256": hashlib.sha256(data).hexdigest(),
        },
    )
    for old in run_dir.glob("state-*.safetensors"):
        if old.name != tensors_file:
            old.unlink()


def _load_state(
    run_dir: Path, config: TrainConfig, aligner: Method, optimizer: torch.optim.Optimizer, data_sha256: str
) -> _Run:
    """Restore the parameters (an aligner's tokens and gates), optimizer and RNG from `run_dir`, refusing a state
    that belongs to other settings, other data, another base model or another kind of method."""
    state_path = run_dir / STATE_FILE
    if not state_path.is_file():
        raise FileNotFoundError(f"{state_path}: no training state to resume")
    _check_same_method(run_dir, aligner)
    state = check_fields(read_json(state_path), STATE_FIELDS, str(state_path), "training state")
    if state["format"] != STATE_FORMAT:
        raise ValueError(f"{state_path}: field 'format' is {state['format']!r}, expected {STATE_FORMAT!r}")
    for name in ("step", "position"):
        if state[name] < 0:
            raise ValueError(f"{state_path}: field {name!r} is {state[name]}, expected >= 0")
    saved = check_fields(
        state["config"], dataclass_spec(type(config)), f"{state_path}: field 'config'", type(config).__name__, LATER_FIELDS
    )
    changed = [
        f"{f.name}: {saved[f.name]!r} -> {getattr(config, f.name)!r}"
        for f in fields(config)
        if f.name not in RESUMABLE_CHANGES and saved[f.name] != getattr(config, f.name)
    ]
    if changed:
        raise ValueError(f"{state_path}: cannot resume with other settings ({'; '.join(changed)})")
    if state["data_sha256"] != data_sha256:
        raise ValueError(f"{state_path}: the run was trained on other data (examples differ)")
    if state["base_fingerprint"] != aligner.base_model["fingerprint"]:
        raise ValueError(f"{state_path}: the run was trained on another base model (weights fingerprint differs)")
    if not STATE_TENSORS_FILE.fullmatch(state["tensors"]):
        raise ValueError(
            f"{state_path}: field 'tensors' is {state['tensors']!r}, expected a file name like 'state-00000100.safetensors'"
        )
    tensors_path = run_dir / state["tensors"]
    data = tensors_path.read_bytes() if tensors_path.is_file() else b""
    if hashlib.sha256(data).hexdigest() != state["tensors_sha256"]:
        raise ValueError(f"{tensors_path}: missing or does not match 'tensors_sha256' in {state_path}")
    try:
        tensors = load(data)
    except SafetensorError as err:
        raise ValueError(f"{tensors_path}: not a readable safetensors file ({err})") from err
    # What _save_state writes: the parameters, the torch RNG state, and AdamW's moments and step per parameter.
    own = set(aligner.state_dict())
    expected = {"rng.torch": (tuple(torch.get_rng_state().shape), torch.uint8)}
    for index, param in enumerate(aligner.parameters()):
        expected |= {f"optimizer.{index}.{key}": (tuple(param.shape), torch.float32) for key in ("exp_avg", "exp_avg_sq")}
        expected[f"optimizer.{index}.step"] = ((), torch.float32)
    found = {name: tensors[name] for name in tensors if name not in own}
    if set(found) != set(expected):
        raise ValueError(
            f"{tensors_path}: tensors missing {sorted(set(expected) - set(found))}, "
            f"unexpected {sorted(set(found) - set(expected))}"
        )
    for name, (dims, dtype) in expected.items():
        value = found[name]
        if (tuple(value.shape), value.dtype) != (dims, dtype):
            raise ValueError(
                f"{tensors_path}: tensor {name!r} is {tuple(value.shape)} {value.dtype}, expected {dims} {dtype}"
            )
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise ValueError(f"{tensors_path}: tensor {name!r} has NaN or inf values, expected all finite")
    aligner.load_tensors({name: tensors[name] for name in own if name in tensors}, str(tensors_path))
    torch.set_rng_state(found.pop("rng.torch"))
    optimizer_state: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in found.items():
        _, index, key = name.split(".")
        optimizer_state.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": optimizer_state, "param_groups": optimizer.state_dict()["param_groups"]})
    return _Run(state["step"], state["position"], state["elapsed_s"], state["loss"], state["step"])


def _check_same_method(run_dir: Path, method: Method) -> None:
    """Refuse to resume a run of another kind of method, or of other settings, than `method`: an aligner's
    settings are checked with the training config; another method's against the run's method.json."""
    saved = {"kind": "aligner"} if (run_dir / ALIGNER_FILE).is_file() else read_json(run_dir / METHOD_FILE)
    if not isinstance(saved, dict):
        raise ValueError(f"{run_dir / METHOD_FILE}: expected a JSON object, found {type(saved).__name__}")
    given = {"kind": "aligner"}
    if not isinstance(method, Aligner):  # its config as JSON reads it back: tuples as lists
        given = {"kind": method.kind, "config": json.loads(json.dumps(asdict(method.config)))}
    if {key: saved.get(key) for key in given} != given:
        raise ValueError(
            f"{run_dir}: the run holds {_described(saved)}, not the {_described(given)} given to resume it"
        )


def _described(method_record: dict[str, Any]) -> str:
    """A method's kind and config as method.json records them: 'lora {"alpha": 8.0, ...}', or 'aligner'."""
    config = method_record.get("config")
    return str(method_record.get("kind")) + ("" if config is None else f" {json.dumps(config, sort_keys=True)}")


def _drop_metrics_after(path: Path, step: int) -> None:
    """Forget metrics logged after the checkpoint being resumed: those steps are taken again. A last line cut
    short (the run was killed while appending it) is dropped too; a bad line before it is an error."""
    if not path.is_file():
        return
    lines = path.read_bytes().splitlines(keepends=True)
    kept = []
    for number, line in enumerate(lines, start=1):
        try:
            logged_after = json.loads(line)["step"] > step
        except (ValueError, TypeError, KeyError) as err:
            if number == len(lines) and not line.endswith(b"\n"):
                continue
            raise ValueError(f"{path}, line {number}: not a metrics row with a 'step' ({type(err).__name__}: {err})") from err
        if not logged_after:
            kept.append(line)
    if len(kept) != len(lines):
        atomic_write_bytes(path, b"".join(kept))
