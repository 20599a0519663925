"""Activation collection beside a plain forward, measured side by side in one run: what `probe.collect` does a
batch at a time (`probe.collect.pooling`: every layer's hook_resid_post pooled at the last position as its hook
makes it, no logits but the last position's), TransformerLens's own `run_with_cache` of the same hook points, the
plain forward that skips the logits as the collection does (what is left is the hooks' cost), and with an aligner
attached, the collection that also reads its pattern, norm and share, against that aligned forward. Each
variant's aten operator calls per call (torch.profiler, views included) are its host work, whatever the device:
on a model bound by the host's time per operator, what sets its pace.

    python -m benchmarks.probe --device cpu --shape smollm2 --batch 2 --seq 64
"""

from __future__ import annotations

import contextlib

import torch
from torch.profiler import profile

from benchmarks.common import (
    Variant,
    arguments,
    bridge_of,
    finish,
    header,
    hf_model,
    json_option,
    no_grad,
    peak_gib,
    random_aligner,
    rate,
    ratio,
    run_interleaved,
    table,
    write_json,
)
from probe.collect import DEFAULT_HOOKS, pooling


def is_residual(name: str) -> bool:
    return name.endswith(DEFAULT_HOOKS[0])


def operator_calls(variant: Variant) -> int:
    """aten operator calls of one call of `variant` inside its context (the context's own not counted)."""
    with variant.context():
        with profile() as prof:
            variant.call()
    return sum(event.count for event in prof.key_averages() if event.key.startswith("aten::"))


def main() -> None:
    parser = json_option(arguments(__doc__))
    parser.add_argument("--n-tokens", type=int, default=10, help="the aligner's prefix slots")
    args = finish(parser.parse_args())
    hf, tokenizer = hf_model(args)
    bridge = bridge_of(hf, tokenizer, name=args.shape)
    al = random_aligner(bridge, args.n_tokens)
    ids = torch.randint(0, hf.config.vocab_size, (args.batch, args.seq), device=args.device)
    weights = torch.zeros(args.batch, args.seq, device=args.device)
    weights[:, -1] = 1.0  # the "last_prompt" pooling
    pools = {}

    def collecting(attached: bool):
        @contextlib.contextmanager
        def context():
            with al.attached(bridge) if attached else contextlib.nullcontext():
                with pooling(bridge, DEFAULT_HOOKS, al.layer_indices if attached else ()) as pool:
                    pools[attached] = pool
                    yield

        return context

    def cached():
        with torch.no_grad():
            bridge.run_with_cache(ids, names_filter=is_residual)

    forward = no_grad(lambda: bridge(ids))
    last_logits = no_grad(lambda: bridge(ids, logits_to_keep=1))
    n = ids.numel()
    variants = [
        Variant("plain forward", forward, tokens=n),
        Variant("plain forward, the last position's logits alone", last_logits, tokens=n),
        Variant("run_with_cache, hook_resid_post of every layer", cached, tokens=n),
        Variant("probe.collect, hook_resid_post of every layer", lambda: pools[False](ids, weights), collecting(False), n),
        Variant(f"aligner N={args.n_tokens} attached, forward", forward, lambda: al.attached(bridge), n),
        Variant(
            "probe.collect with the aligner: + its pattern, norm, share",
            lambda: pools[True](ids, weights),
            collecting(True),
            n,
        ),
    ]
    references = [variants[0]] * 4 + [variants[4]] * 2
    run_interleaved(variants, args.rounds, args.iters, args.device)
    calls = [operator_calls(v) for v in variants]
    print(header(args) + "\n")
    print(
        table(
            [
                [v.name, f"{rate(v):,.0f}", f"{ratio(v, ref):.3f}", ref.name, f"{n_calls:,}"]
                for v, ref, n_calls in zip(variants, references, calls)
            ],
            ["variant", "tokens/s", "/ reference", "reference", "aten calls"],
        )
    )
    data = {
        "collection": [
            {
                "variant": v.name,
                "tokens_per_s": rate(v),
                "vs_reference": ratio(v, ref),
                "reference": ref.name,
                "aten_calls": n_calls,
            }
            for v, ref, n_calls in zip(variants, references, calls)
        ]
    }
    if args.device == "cuda":
        data["peak_gib"] = [{"variant": v.name, "peak_gib": peak_gib(v)} for v in variants]
        print("\nPeak GPU memory of a call (weights included):\n")
        print(table([[r["variant"], f"{r['peak_gib']:.2f}"] for r in data["peak_gib"]], ["variant", "peak GiB"]))
    write_json(args, "probe", data)


if __name__ == "__main__":
    main()
