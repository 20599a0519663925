"""One training step of the suite (a one-token aligner, a batch of a task's real training examples, forward and
backward) with the logits taken over every position, and from the first position that predicts a
response token on (`logits_to_keep`, what `aligner.train.response_logprobs` does), side by side in one run.
The real models, on the CPU:

    python -m benchmarks.suite_step --model smollm2-135m-instruct --task json
    python -m benchmarks.suite_step --model gemma-3-270m --task instruct
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import statistics
import sys
from unittest import mock

import torch

from aligner.config import AlignerConfig
from aligner.loading import open_model
from aligner.model import Aligner
from aligner.objective import make_batch, pad_token_id, response_loss, tokenize_examples
from aligner.tasks import Sizes, get_task
from aligner.train import TrainConfig
from benchmarks.common import Variant, ratio, run_interleaved, table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--task", default="json")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--iters", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = open_model(args.model).requires_grad_(False)
    task = get_task(args.task)
    items = task.build(None, Sizes(train=args.batch, valid=0, eval=0)).train  # any facts: the audit is no part of it
    config = TrainConfig(chat_template=not task.raw_prompts)
    sequences = tokenize_examples(model.tokenizer, [item.example() for item in items], config)
    input_ids, labels = make_batch(sequences, pad_token_id(model.tokenizer))
    al = Aligner.for_model(model, AlignerConfig(n_tokens=1))
    with torch.no_grad():
        al.gates.normal_(std=0.1)

    def step() -> None:
        response_loss(model, input_ids, labels).backward()
        al.zero_grad(set_to_none=True)

    def every_position() -> contextlib.AbstractContextManager:
        return mock.patch("aligner.train.reads_logits_to_keep", return_value=False)

    variants = [Variant("logits at every position", step, every_position), Variant("logits from the first response position", step)]
    with al.attached(model):
        run_interleaved(variants, args.rounds, args.iters, "cpu")
    prompt = min(n for _, n in sequences)
    print(f"command: python -m benchmarks.suite_step {' '.join(sys.argv[1:])}")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}")
    print(
        f"model: {args.model}, vocabulary {model.cfg.d_vocab:,}; task {task.name}: batch {len(sequences)} x {input_ids.shape[1]} tokens, "
        f"the shortest prompt {prompt}; {args.rounds} interleaved rounds x {args.iters} steps; "
        f"{datetime.datetime.now().isoformat(timespec='seconds')}\n"
    )
    reference = variants[0]
    rows = [[v.name, f"{statistics.median(v.seconds):.2f}", f"{ratio(v, reference):.2f}"] for v in variants]
    print(table(rows, ["one step (forward + backward)", "seconds (median)", "speed vs every position"]))


if __name__ == "__main__":
    main()
