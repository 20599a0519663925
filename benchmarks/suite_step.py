"""What a suite cell spends its time on, on the TransformerBridge (the suite before the aligner ran on the plain
transformers model) and on the plain model under it (`aligner.adapter.attached_to_run`, what the suite runs), side
by side in one run: one training step of a one-token aligner on a batch of a task's real training examples
(forward and backward; on the bridge also with the logits over every position rather than from the first position
that predicts a response token, `logits_to_keep`), and the answers to a batch of its evaluation prompts (greedy,
the task's answer length). The real models, on the CPU:

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
from typing import Callable
from unittest import mock

import torch

from aligner.adapter import attached_to_run
from aligner.config import AlignerConfig
from aligner.generation import generate
from aligner.loading import open_model
from aligner.model import Aligner
from aligner.objective import make_batch, pad_token_id, response_loss, tokenize_examples
from aligner.suite import SuiteConfig
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
    answered = SuiteConfig().generate_batch_size  # the suite answers this many prompts at once
    data = task.build(None, Sizes(train=args.batch, valid=0, eval=answered))  # any facts: no audit is needed here
    config = TrainConfig(chat_template=not task.raw_prompts)
    sequences = tokenize_examples(model.tokenizer, [item.example() for item in data.train], config)
    input_ids, labels = make_batch(sequences, pad_token_id(model.tokenizer))
    prompts = [item.prompt for item in data.eval["test"]]
    al = Aligner.for_model(model, AlignerConfig(n_tokens=1))
    with torch.no_grad():
        al.gates.normal_(std=0.1)  # gates at zero would make the prefix a no-op that a kernel could skip
    runner: list[torch.nn.Module] = []  # the model a variant's context runs

    def on(plain: bool, every_position: bool = False) -> Callable[[], contextlib.AbstractContextManager]:
        @contextlib.contextmanager
        def context():
            with contextlib.ExitStack() as stack:
                runner[:] = [stack.enter_context(attached_to_run(model, al, plain=plain))]
                if every_position:
                    stack.enter_context(mock.patch("aligner.objective.reads_logits_to_keep", return_value=False))
                yield

        return context

    def step() -> None:
        response_loss(runner[0], input_ids, labels).backward()
        al.zero_grad(set_to_none=True)

    def answer() -> None:
        # `generate` runs the plain model, unless the aligner is attached to the bridge already (the bridge variant).
        generate(model, prompts, aligner=al, max_new_tokens=task.max_new_tokens, chat_template=not task.raw_prompts)

    steps = [
        Variant("training step, bridge, logits at every position", step, on(False, every_position=True)),
        Variant("training step, bridge", step, on(False)),
        Variant("training step, plain model", step, on(True)),
    ]
    answers = [Variant("answers, bridge", answer, lambda: al.attached(model)), Variant("answers, plain model", answer)]
    for variants in (steps, answers):
        run_interleaved(variants, args.rounds, args.iters, "cpu")
    prompt = min(n for _, n in sequences)
    print(f"command: python -m benchmarks.suite_step {' '.join(sys.argv[1:])}")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}")
    print(
        f"model: {args.model}, vocabulary {model.cfg.d_vocab:,}; task {task.name}: training batch {len(sequences)} x "
        f"{input_ids.shape[1]} tokens, the shortest prompt {prompt}; answers: {len(prompts)} prompts, at most "
        f"{task.max_new_tokens} new tokens; {args.rounds} interleaved rounds x {args.iters} calls; "
        f"{datetime.datetime.now().isoformat(timespec='seconds')}\n"
    )
    rows = [
        [v.name, f"{statistics.median(v.seconds):.2f}", f"{ratio(v, variants[1 if v in steps else 0]):.2f}"]
        for variants in (steps, answers)
        for v in variants
    ]
    print(table(rows, ["one call", "seconds (median)", "speed vs the bridge"]))

if __name__ == "__main__":
    main()
