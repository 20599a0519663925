"""Training an adapter with the base model frozen: the loop every objective shares (`optimize`), and supervised
fine-tuning on (prompt, response) pairs (`train_sft`).

As the authors' code (lit-llama's `finetune/adapter.py`, which the Aligner paper builds on): AdamW over the
adapter's parameters alone, lr 9e-3, weight decay 0.02, a linear warm-up then a constant rate, and the loss on
the response tokens only (aligner/objective.py). With a run directory, checkpoints and metrics are written
there, and `resume=True` continues exactly where the run stopped (aligner/checkpoint.py).

The loop runs under Hugging Face accelerate, on one process or many (`accelerate launch -m aligner train ...`):
each step's examples are shared among the processes, their gradients summed, and the same step taken on each;
the main process writes the run directory. See `optimize`.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
import warnings
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Callable, ContextManager, Iterator, Sequence

import numpy as np
import torch
from accelerate import Accelerator, DistributedType
from torch import nn
from tqdm import tqdm
from transformers.modeling_layers import GradientCheckpointingLayer

from aligner.adapter import Adapter, adapter_files, attached_to_run, load_adapter
from aligner.checkpoint import (
    METRICS_FILE,
    RunState,
    drop_metrics_after,
    load_state,
    run_directory,
    save_state,
    stopped,
    training_record,
)
from aligner.data import Example
from aligner.distributed import check_joined, launched_accelerator, shard_frozen_model
from aligner.lens import transformers_model
from aligner.loading import model_fingerprint
from aligner.model import Aligner
from aligner.objective import (
    accumulate_gradients,
    count_targets,
    examples_sha256,
    formatted_for,
    pad_token_id,
    tokenize_examples,
)
from aligner.registry import default_lr


@dataclass(frozen=True)
class TrainConfig:
    """How an adapter is trained: optimisation, data formatting and bookkeeping; what it is trained is the
    adapter's own config."""

    steps: int = 1000  # optimizer steps in all; a resumed run counts the steps already taken
    # A step's batch_size * grad_accum examples, however many processes share them (the result does not depend on
    # that number): each process forwards its share of them batch_size at a time.
    batch_size: int = 8  # examples per forward pass (of one process, at most)
    grad_accum: int = 1  # forward passes per optimizer step on one process: a step sees batch_size * grad_accum examples
    # Learning rate after warm-up; None: the adapter family's (`aligner.registry.default_lr`; an aligner's is the
    # authors' 9e-3).
    lr: float | None = None
    weight_decay: float = 0.02  # AdamW's decoupled weight decay on tokens and gates (the authors')
    warmup_steps: int = 100  # the rate rises linearly to `lr` over these steps, then stays constant (lit-llama)
    max_length: int = 512  # tokens per example, prompt and response; longer ones are cut, with a warning
    seed: int = 0  # seeds the initial tokens and the order of the examples (a new permutation each epoch)
    log_every: int = 10  # steps between lines of metrics.jsonl and loss updates on the bar; the last step always
    save_every: int = 100  # steps between checkpoints in the run directory; the last step always
    system: str | None = None  # system prompt of the chat template; None: the model's default
    chat_template: bool = True  # False: raw prompt text, no chat template (base models)
    data: str | None = None  # where the examples came from (file or dataset name), recorded in provenance
    # The suite task whose form the examples show ("json", "bracket@elements"), recorded: what `probe report`
    # scores the run's form by. None: a form of the user's own (give `probe report --checker`).
    task: str | None = None
    # Recompute each frozen layer's activations in the backward pass instead of keeping them from the forward
    # (transformers' checkpointing of its decoder layers): less memory, one more forward's compute.
    gradient_checkpointing: bool = False
    # Shard the frozen model among the launched processes (FSDP2) instead of a whole copy on each: for a model too
    # large for one GPU. An `accelerate launch --use_fsdp` shards whether or not this is set.
    shard_model: bool = False

    def __post_init__(self) -> None:
        positive = ("steps", "batch_size", "grad_accum", "max_length", "log_every", "save_every")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "weight_decay"):
            if getattr(self, name) < 0:
                raise ValueError(f"TrainConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"TrainConfig.lr must be finite and > 0, got {self.lr}")
        for f in fields(self):  # JSON and the command line give 2.0 for 2; 2.5 steps is a mistake
            if f.type == "int" and not (isinstance(getattr(self, f.name), int) and not isinstance(getattr(self, f.name), bool)):
                raise ValueError(f"TrainConfig.{f.name} must be an integer, got {getattr(self, f.name)!r}")


def train_sft(
    model: nn.Module,
    examples: Sequence[Example],
    config: TrainConfig,
    run_dir: str | Path | None = None,
    resume: bool = False,
    adapter: Adapter | None = None,
    on_step: Callable[[int, float], bool] | None = None,
    accelerator: Accelerator | None = None,
) -> Adapter:
    """Train `adapter` on `examples` with `model` frozen, and return it (detached).

    `adapter` is any `aligner.Adapter` (an Aligner, LoRA, prompt tuning, a z-bias), trained on each prompt as it
    reads it (`prompts_for`: prompt tuning's placeholders in front); None: a fresh one-token Aligner, seeded by
    `config.seed`, or, with `resume=True`, the run's own. With `run_dir`, checkpoints and metrics are written
    there; a directory that is not empty is refused unless `resume=True`, which continues its saved state (an
    adapter given must be of the run's kind and config; the checkpoint's tensors replace its own): 3 steps, then
    resuming to 6, give the adapter that 6 steps straight give; a run stopped before its first checkpoint starts
    afresh. The run directory is locked while it trains: a second training of it is refused at once
    (`aligner.checkpoint.run_lock`). The base model is left with
    `requires_grad=False` on every weight. `on_step(step, loss)`, called after each step while the adapter is
    attached, ends training there by returning True (the suite's early stopping). `accelerator` (default:
    `launched_accelerator()`, the processes and mixed precision of `accelerate launch`) runs the loop; see
    `optimize`.
    """
    accelerator = accelerator or launched_accelerator()
    with run_directory(run_dir, resume, accelerator) as (run_dir, resume):
        adapter = adapter or starting_adapter(model, config.seed, run_dir if resume else None)
        # The user's turns as the adapter reads them (prompt tuning puts its placeholders in front; others keep them).
        examples = formatted_for(adapter, examples)
        sequences = tokenize_examples(model.tokenizer, examples, config)
        pad_id = pad_token_id(model.tokenizer)

        def sft_gradients(step: Step) -> tuple[dict[str, float], int]:
            n_targets = count_targets([sequences[i] for i in step.items])  # the whole step's, on every process
            batch = [sequences[i] for i in step.mine]
            loss = accumulate_gradients(step.model, batch, config.batch_size, pad_id, n_targets, step.autocast)
            return {"loss": loss}, sum(len(ids) for ids, _ in batch)

        data_sha256 = examples_sha256(examples)
        return optimize(
            model, adapter, config, sft_gradients, len(sequences), data_sha256, run_dir, resume, on_step, accelerator
        )


def starting_adapter(model: nn.Module, seed: int, run_dir: Path | None) -> Adapter:
    """What training starts from when no adapter is given: the adapter saved in `run_dir` (its checkpoint's
    tensors then replace these), or, without one, a fresh one-token Aligner seeded by `seed`."""
    if run_dir is not None and adapter_files(run_dir) is not None:
        return load_adapter(run_dir, device=next(model.parameters()).device)
    torch.manual_seed(seed)
    return Aligner.for_model(model)


@dataclass(frozen=True)
class Step:
    """One optimizer step's data, as `optimize` hands it to the objective's `gradients`."""

    items: list[int]  # positions of the step's items (examples, pairs) in the seeded stream, over every process
    mine: list[int]  # the share of `items` this process computes: a contiguous slice; all of them on one process
    autocast: Callable[[], ContextManager]  # entered around each forward pass: the accelerator's mixed precision
    model: nn.Module  # what each forward pass runs, the adapter attached: the plain transformers model or the bridge


def optimize(
    model: nn.Module,
    adapter: Adapter,
    config: TrainConfig,
    gradients: Callable[[Step], tuple[dict[str, float], int]],
    n_items: int,
    data_sha256: str,
    run_dir: Path | None,
    resume: bool,
    on_step: Callable[[int, float], bool] | None = None,
    accelerator: Accelerator | None = None,
) -> Adapter:
    """The training loop of every objective: AdamW on `adapter` attached to `model` frozen, `config.steps` steps.

    Each step, `gradients(step)` adds to the adapter's gradients for this process's share (`step.mine`) of the
    step's items (examples, pairs) at positions `step.items` of the seeded stream over `n_items`, and returns
    that share's metrics ("loss" among them) and the number of tokens it read, each a share that adds up over
    the processes to the step's. Metrics, checkpoints and resumption as described at the top of this file.

    On several processes (`accelerate launch`, `accelerator` defaulting to `launched_accelerator()`), each holds
    the whole adapter, starting from the same tokens and gates (one seed, or one checkpoint); the shares'
    gradients are summed over the processes, one all-reduce of the adapter's few parameters a step (accelerate's
    `reduce`), and each process takes the same AdamW step. Torch's DistributedDataParallel does not wrap the
    frozen model: it would need every forward to pass through its wrapper and as many backward passes on every
    process, where here a process may have fewer forward passes than another, or none. With
    `config.shard_model` (or under `accelerate launch --use_fsdp`) FSDP2 shards the frozen model among the
    processes (`shard_frozen_model`); then each step's items must split into as many forward passes on every
    process. The main process alone writes to `run_dir`.
    """
    accelerator = accelerator or launched_accelerator()
    if config.lr is None:
        config = replace(config, lr=default_lr(adapter.family))
    shard_if_asked(model, config, accelerator)
    _check_device(accelerator, model)
    main = accelerator.is_main_process
    model.requires_grad_(False)  # before attaching: the attached adapter becomes a submodule of the model
    model.eval()
    adapter.requires_grad_(True)
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    run = RunState(step=0, position=0, elapsed_s=0.0, loss=None, saved_step=None)
    if resume:
        # Every process reads the checkpoint; it must be of this model, not only of the adapter's.
        run = load_state(run_dir, config, adapter, optimizer, data_sha256, model_fingerprint(model))
        if main:
            drop_metrics_after(run_dir / METRICS_FILE, run.step)
    elif run_dir is not None and main:
        run_dir.mkdir(parents=True, exist_ok=True)  # `run_lock` made it; a caller of `optimize` alone may not have
    accelerator.wait_for_everyone()  # every process has read the run directory before the main one writes to it

    per_step = config.batch_size * config.grad_accum
    started = time.perf_counter() - run.elapsed_s
    logged_at, logged_tokens = time.perf_counter(), 0
    bar = tqdm(total=config.steps, initial=run.step, desc="train", unit="step", disable=not main)
    # The plain transformers model where the adapter can run on it (`attached_to_run`); the bridge stays whole
    # around it, and `on_step`'s calls of the bridge run the plain model with the adapter.
    with attached_to_run(model, adapter) as runner, checkpointing(runner, config.gradient_checkpointing), bar:
        while run.step < config.steps:
            lr = learning_rate(run.step + 1, config)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.zero_grad(set_to_none=True)
            items = stream_order(n_items, config.seed, run.position, per_step)
            with accelerator.split_between_processes(items) as mine:
                metrics, n_tokens = gradients(Step(items, mine, accelerator.autocast, runner))
            metrics, n_tokens = _sum_over_processes(accelerator, adapter, metrics, n_tokens)
            loss = metrics["loss"]
            if not math.isfinite(loss):
                raise FloatingPointError(f"loss is {loss} at step {run.step + 1}; {stopped(run)}")
            optimizer.step()
            if not all(bool(torch.isfinite(p).all()) for p in adapter.parameters()):  # before any save could keep it
                raise FloatingPointError(
                    f"the trained parameters became NaN or inf in the update of step {run.step + 1} (its loss was "
                    f"finite: the gradients overflowed); {stopped(run)}"
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
                adapter.provenance["training"] = training_record(config, run, n_items, data_sha256)
                if main:
                    save_state(run_dir, adapter, optimizer, config, run, data_sha256)
                run.saved_step = run.step  # on every process: what a later stop says is kept
            if stop:
                break
    accelerator.wait_for_everyone()  # no process returns before the last checkpoint is written
    adapter.provenance["training"] = training_record(config, run, n_items, data_sha256)
    return adapter


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
    accelerator: Accelerator, adapter: Adapter, metrics: dict[str, float], n_tokens: int
) -> tuple[dict[str, float], int]:
    """The step's gradients (left in the adapter), metrics and token count: each process's shares summed over the
    processes, every process receiving the sums. One process holds the step's already."""
    if accelerator.num_processes == 1:
        return metrics, n_tokens
    params = list(adapter.parameters())
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
    hf = transformers_model(model)
    layers = [module for module in hf.modules() if isinstance(module, GradientCheckpointingLayer)]
    if not layers:
        raise ValueError(f"{type(hf).__name__} has no layers that transformers can checkpoint")
    with warnings.catch_warnings():
        # transformers 5.23 renames it activation_checkpointing_enable; the older versions it supports know this name.
        warnings.simplefilter("ignore", FutureWarning)
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # transformers also makes the embeddings' output require gradients (for peft's reentrant checkpointing); the
    # aligner's gradient needs none from below its first layer, so the backward pass keeps stopping there.
    hf.disable_input_require_grads()
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
            hf.gradient_checkpointing_disable()


def learning_rate(step: int, config: TrainConfig) -> float:
    """The rate of optimizer step `step` (from 1): linear warm-up over `warmup_steps`, then constant."""
    return config.lr * min(1.0, step / config.warmup_steps) if config.warmup_steps else config.lr


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
