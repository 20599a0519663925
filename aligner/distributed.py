"""Which processes there are: the one place that asks Hugging Face accelerate.

Training (`aligner.train.optimize`) and activation collection (`probe.collect`) run on one process or on many
launched together (`accelerate launch ...`, see the README's multi-GPU section); each asks `launched_accelerator()`
which process it is, on which device, in which mixed precision.
"""

from __future__ import annotations

import os

from accelerate import Accelerator


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
