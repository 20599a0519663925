"""The workbench's training loop under accelerate beside a plain PyTorch training step, measured side by side in
one run: tokens/s, ratios and peak memory of aligner training (N = 1) on a random-weight model.

    python -m benchmarks.accelerate_train --device cuda --shape llama2-7b --tokenizer .whl/smollm2-tokenizer
    python -m benchmarks.accelerate_train --device cpu --shape tiny --batch 2 --seq 32 --rounds 1 --iters 1

Every variant trains the same aligner on the same bridge and batch (`--batch` examples cut to `--seq` tokens,
the loss on all but a short prompt), `--steps` optimizer steps a call:
- plain steps: forward, backward and AdamW on the aligner, no accelerate: the floor;
- plain steps inside torch.autocast(bf16): what accelerate's bf16 mixed precision puts around each forward;
- aligner.train_sft, the workbench's loop (`aligner.train.optimize`), under Accelerator(mixed_precision="bf16")
  (each call also tokenizes the examples and makes its optimizer, as a run does once);
- the same with gradient checkpointing of the frozen layers (TrainConfig.gradient_checkpointing).
On a GPU the weights are bf16 (benchmarks.common): mixed precision then adds only what autocast keeps in
float32 (softmax, norms). One process: what several processes add is one all-reduce of the aligner's gradients
a step (docs/multi_gpu.md).
"""

from __future__ import annotations

import importlib.metadata
import random
import warnings
from dataclasses import replace

import torch
from accelerate import Accelerator

from aligner import TrainConfig, train_sft
from aligner.data import Example
from aligner.objective import (
    count_targets,
    make_batch,
    pad_token_id,
    response_loss,
    tokenize_examples,
)
from benchmarks.common import (
    Variant,
    arguments,
    bridge_of,
    finish,
    header,
    hf_model,
    peak_gib,
    random_aligner,
    rate,
    ratio,
    run_interleaved,
    table,
)

# Words and a system prompt whose SmolLM2 token ids all lie below LLaMA-2's vocabulary size (32,000), so that the
# SmolLM2 tokenizer can feed the LLaMA-2-7B shape.
WORDS = (
    "the a of and to in is was for on with as by at from that this it be are or an not but have one two three "
    "four five six seven eight nine ten red blue green day night water light house tree river city"
).split()
SYSTEM = "You tell stories."


def stories(n: int, seq: int) -> list[Example]:
    """n examples with a short prompt and a response longer than `seq` tokens (cut to `seq` by max_length)."""
    rng = random.Random(0)
    return [
        Example(f"Tell me story number {k}.", " ".join(rng.choice(WORDS) for _ in range(seq + 16))) for k in range(n)
    ]


def main() -> None:
    parser = arguments(__doc__, batch=8, seq=512, rounds=3, iters=2)
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps per call of each variant")
    args = finish(parser.parse_args())
    hf, tokenizer = hf_model(args)
    bridge = bridge_of(hf, tokenizer, name=args.shape)
    al = random_aligner(bridge, n_tokens=1)
    examples = stories(args.batch, args.seq)
    config = TrainConfig(
        steps=args.steps, batch_size=args.batch, max_length=args.seq, warmup_steps=0, system=SYSTEM,
        log_every=args.steps, save_every=args.steps,
    )  # fmt: skip
    # Every example is cut to --seq tokens on purpose: the warning that says so would print at every call.
    warnings.filterwarnings("ignore", message=r".* examples are longer than max_length")
    sequences = tokenize_examples(tokenizer, examples, config)  # what train_sft reads at each step
    vocab = hf.config.vocab_size
    if max(max(ids) for ids, _ in sequences) >= vocab or any(len(ids) != args.seq for ids, _ in sequences):
        raise SystemExit(f"the examples must be {args.seq} tokens, each id below the model's vocabulary ({vocab})")
    n = args.batch * args.seq * args.steps  # tokens a call
    input_ids, labels = (t.to(args.device) for t in make_batch(sequences, pad_token_id(tokenizer)))
    n_targets = count_targets(sequences)
    optimizer = torch.optim.AdamW(al.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    accelerator = Accelerator(mixed_precision="bf16")

    def plain_steps(autocast: bool):
        def steps():
            for _ in range(args.steps):
                with torch.autocast(args.device, dtype=torch.bfloat16, enabled=autocast):
                    loss = response_loss(bridge, input_ids, labels) / n_targets
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

        return steps

    def loop(gradient_checkpointing: bool):
        run = replace(config, gradient_checkpointing=gradient_checkpointing)
        return lambda: train_sft(bridge, examples, run, aligner=al, accelerator=accelerator)

    variants = [
        Variant("plain steps, no accelerate", plain_steps(False), lambda: al.attached(bridge), n),
        Variant("plain steps, torch.autocast bf16", plain_steps(True), lambda: al.attached(bridge), n),
        Variant("train_sft under accelerate, bf16", loop(False), tokens=n),
        Variant("train_sft under accelerate, bf16, gradient checkpointing", loop(True), tokens=n),
    ]

    print(header(args))
    print(
        f"accelerate {importlib.metadata.version('accelerate')}: {accelerator.distributed_type.value}, "
        f"{accelerator.num_processes} process, mixed precision {accelerator.mixed_precision}; aligner N=1, "
        f"{al.num_parameters():,} parameters; {args.steps} optimizer steps a call"
    )
    run_interleaved(variants, args.rounds, args.iters, args.device, settle=False)
    rows = [[v.name, f"{rate(v):,.0f}", f"{ratio(v, variants[0]):.3f}"] for v in variants]
    print("\nTraining (forward + backward + AdamW), tokens/s and ratio to the plain steps:\n")
    print(table(rows, ["variant", "tokens/s", "/ plain steps"]))

    if args.device == "cuda":
        print("\nPeak GPU memory of a call (weights included):\n")
        print(table([[v.name, f"{peak_gib(v):.2f}"] for v in variants], ["variant", "peak GiB"]))


if __name__ == "__main__":
    main()
