"""Many aligners in one batch: a forward and a generation in which each row reads its own aligner out of a bank
of K, against the same batches with one shared aligner, measured side by side in one run.

    python -m benchmarks.bank --device cpu --shape smollm2 --weights random --bank 64 --prompts 64 --batch 4 --seq 64
    python -m benchmarks.bank --device cuda --shape smollm2 --bank 1024 --prompts 1024

Generation runs on random weights, so that no answer ends before --new-tokens (an end-of-turn token has a
chance of about 1 in the vocabulary size per step): both variants then decode the same number of tokens.
"""

from __future__ import annotations

import contextlib

import torch

import aligner
from aligner.bank import AlignerBank
from benchmarks.common import (
    Variant,
    arguments,
    bridge_of,
    finish,
    header,
    hf_model,
    json_option,
    no_grad,
    random_aligner,
    rate,
    ratio,
    run_interleaved,
    table,
    write_json,
)


def main() -> None:
    parser = json_option(arguments(__doc__, rounds=3, iters=3))
    parser.add_argument("--bank", type=int, default=1024, help="K, the aligners in the bank")
    parser.add_argument("--n-tokens", default="1,10", help="the aligner sizes N to measure")
    parser.add_argument("--prompts", type=int, default=1024, help="prompts to answer, each with its own aligner (<= K)")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--gen-batch", type=int, default=128, help="prompts per generation batch")
    args = finish(parser.parse_args())
    if args.prompts > args.bank:
        raise SystemExit("--prompts must not exceed --bank: each prompt reads a different aligner")
    hf, tokenizer = hf_model(args)
    bridge = bridge_of(hf, tokenizer, name=args.shape)
    ids = torch.randint(0, hf.config.vocab_size, (args.batch, args.seq), device=args.device)
    prompts = [f"Question {i}: what is {i} plus {i}, and why?" for i in range(args.prompts)]
    print(header(args))
    print(
        f"bank: K = {args.bank} aligners; generation: {args.prompts} prompts, {args.new_tokens} new tokens each, "
        f"batches of {args.gen_batch}\n"
    )

    rows, data = [], []
    for n_tokens in [int(n) for n in args.n_tokens.split(",")]:
        aligners = [random_aligner(bridge, n_tokens) for _ in range(args.bank)]
        bank = AlignerBank(aligners)
        picked = torch.randint(0, args.bank, (args.batch,)).tolist()

        forward = no_grad(lambda: bridge(ids))

        @contextlib.contextmanager
        def bank_context(bank=bank, picked=picked):
            with bank.attached(bridge), bank.selected(picked):
                yield

        forwards = [
            Variant(
                f"forward, one aligner N={n_tokens}", forward, lambda al=aligners[0]: al.attached(bridge), ids.numel()
            ),
            Variant(f"forward, bank of {args.bank}, N={n_tokens}", forward, bank_context, ids.numel()),
        ]
        decode = dict(max_new_tokens=args.new_tokens, batch_size=args.gen_batch)
        answers = args.prompts * args.new_tokens
        generations = [
            Variant(
                f"generate, one aligner N={n_tokens}",
                lambda al=aligners[0], decode=decode: aligner.generate(bridge, prompts, al, **decode),
                tokens=answers,
            ),
            Variant(
                f"generate, {args.prompts} aligners N={n_tokens}",
                lambda als=aligners[: args.prompts], decode=decode: aligner.generate(
                    bridge, prompts, aligners=als, **decode
                ),
                tokens=answers,
            ),
        ]
        run_interleaved(forwards, args.rounds, args.iters, args.device)
        run_interleaved(generations, args.rounds, 1, args.device, settle=False)
        for one, many in (forwards, generations):
            rows += [[v.name, f"{rate(v):,.0f}", f"{ratio(v, one):.3f}"] for v in (one, many)]
            data += [{"variant": v.name, "tokens_per_s": rate(v), "vs_one": ratio(v, one)} for v in (one, many)]
    print(table(rows, ["variant", "tokens/s", "/ one aligner"]))
    write_json(args, "bank", {"bank": data})


if __name__ == "__main__":
    main()
