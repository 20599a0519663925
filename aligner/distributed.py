"""Which processes there are: the one place that asks Hugging Face accelerate.

Training (`aligner.train.optimize`) and activation collection (`probe.collect`) run on one process or on many
launched together (`accelerate launch ...`, docs/multi_gpu.md); each asks `launched_accelerator()`
which process it is, on which device, in which mixed precision. A frozen model too large to be held whole by every
process is sharded among them by torch's FSDP2 (`shard_frozen_model`).
"""

from __future__ import annotations

import os
from typing import Any

from accelerate import Accelerator
from accelerate.utils import FullyShardedDataParallelPlugin
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import (
    CPUOffload,
    CPUOffloadPolicy,
    FSDPModule,
    OffloadPolicy,
    ShardingStrategy,
    fully_shard,
)
from torch.distributed.tensor import DTensor

from aligner.loading import base_parameters


def launched_accelerator() -> Accelerator:
    """`Accelerator()`: under `accelerate launch`, this process's rank, device and mixed precision among the
    processes launched with it (their process group joined); otherwise the one process, on the GPU if there is
    one. Refused, by `check_joined`, where processes were launched together that accelerate did not join."""
    accelerator = Accelerator()
    check_joined(accelerator)
    return accelerator


def check_joined(accelerator: Accelerator) -> None:
    """Refuse processes launched together (WORLD_SIZE, set by accelerate launch and torchrun) that `accelerator`
    does not count: each would work alone, all of them on the same files. (accelerate joins CPU processes only
    when asked to: with no GPU, `accelerate launch --multi_gpu` starts processes that each see only itself.)"""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:
        raise ValueError(
            f"this is one of {launched} processes launched together (WORLD_SIZE={launched}), but accelerate set up "
            f"{accelerator.num_processes}: with no GPU, set ACCELERATE_USE_CPU=true to join them on the CPU (gloo)"
        )


def shard_frozen_model(model: nn.Module, accelerator: Accelerator) -> None:
    """Shard the frozen `model` (a TransformerBridge) among the launched processes with FSDP2: each keeps 1/P of
    every block's weights, and of the rest, gathered while a block runs (forward, and again in backward) and freed
    after, as the launch's FSDP settings say (`fully_shard_options`). Every process must then run the same number
    of forward passes, together. An aligner attached afterwards stays whole on every process (its few parameters
    are summed over the processes as without sharding). A model sharded before is left as it is."""
    if isinstance(model, FSDPModule):
        return
    options = fully_shard_options(getattr(accelerator.state, "fsdp_plugin", None))  # set by --use_fsdp launches alone
    mesh = init_device_mesh(accelerator.device.type, (accelerator.num_processes,))
    for block in model.blocks:  # the bridge's blocks: sharding the wrapped transformers layers trips on the bridge
        fully_shard(block, mesh=mesh, **options)
    fully_shard(model, mesh=mesh, **options)


def fully_shard_options(plugin: FullyShardedDataParallelPlugin | None) -> dict[str, Any]:
    """`fully_shard`'s options from an `accelerate launch --use_fsdp` configuration (accelerate's FSDP plugin, in
    its FSDP1 or FSDP2 spelling; None: FSDP2's defaults): whether a block's gathered weights are freed after its
    forward (`reshard_after_forward`; FSDP1's FULL_SHARD or SHARD_GRAD_OP), and whether the shards wait in CPU
    memory between uses (`offload_params`). A setting that would otherwise be ignored is refused by name. The unit
    of sharding is always a block, whatever the wrap policy, and the weights keep the dtype they were loaded in."""
    if plugin is None:
        return {}
    reshard = plugin.reshard_after_forward
    if reshard is None:  # FSDP1 configured by its older name
        reshard = plugin.sharding_strategy or ShardingStrategy.FULL_SHARD
    if isinstance(reshard, ShardingStrategy):
        if reshard not in (ShardingStrategy.FULL_SHARD, ShardingStrategy.SHARD_GRAD_OP):
            raise ValueError(
                f"fsdp_reshard_after_forward (sharding strategy) {reshard.name} is not supported: the frozen model is "
                "sharded over every process (FULL_SHARD, or SHARD_GRAD_OP to keep a block gathered after its forward)"
            )
        reshard = reshard == ShardingStrategy.FULL_SHARD
    if plugin.activation_checkpointing:
        raise ValueError(
            "fsdp_activation_checkpointing is not supported: the training loop checkpoints the bridge's blocks "
            "itself; launch without it and pass --gradient-checkpointing to aligner train"
        )
    offload = plugin.cpu_offload
    if isinstance(offload, CPUOffload):  # FSDP1's spelling
        offload = CPUOffloadPolicy() if offload.offload_params else OffloadPolicy()
    return {"reshard_after_forward": bool(reshard), "offload_policy": offload}


def held_share(model: nn.Module) -> float:
    """The fraction of the frozen model's weights that this process holds: 1 unsharded, about 1/P sharded."""
    params = [param for _, param in base_parameters(model)]
    held = sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in params)
    return held / sum(p.numel() for p in params)
