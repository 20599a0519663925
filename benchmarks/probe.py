"""Activation collection beside a plain forward, measured side by side in one run. There is no probe/ package
yet, so what is timed is what one would build on: `run_with_cache` with a names_filter of the residual stream
hooks, and plain forward hooks that keep a reference to the same activations.

    python -m benchmarks.probe --device cpu --shape smollm2 --batch 2 --seq 64
"""

from __future__ import annotations

import torch

from benchmarks.common import (
    Variant,
    arguments,
    bridge_of,
    finish,
    header,
    hf_model,
    no_grad,
    rate,
    ratio,
    run_interleaved,
    table,
)


def is_residual(name: str) -> bool:
    return name.endswith("hook_resid_post")


def main() -> None:
    args = finish(arguments(__doc__).parse_args())
    hf, tokenizer = hf_model(args)
    bridge = bridge_of(hf, tokenizer, name=args.shape)
    ids = torch.randint(0, hf.config.vocab_size, (args.batch, args.seq), device=args.device)
    kept: dict[str, torch.Tensor] = {}

    def keep(activation: torch.Tensor, hook) -> None:
        kept[hook.name] = activation

    forward = no_grad(lambda: bridge(ids))

    def cached():
        with torch.no_grad():
            bridge.run_with_cache(ids, names_filter=is_residual)

    def hooked():
        with torch.no_grad(), bridge.hooks(fwd_hooks=[(is_residual, keep)]):
            bridge(ids)

    variants = [
        Variant("plain forward", forward, tokens=ids.numel()),
        Variant("run_with_cache, hook_resid_post of every layer", cached, tokens=ids.numel()),
        Variant("forward hooks keeping hook_resid_post", hooked, tokens=ids.numel()),
    ]
    run_interleaved(variants, args.rounds, args.iters, args.device)
    print(header(args) + "\n")
    print(
        table(
            [[v.name, f"{rate(v):,.0f}", f"{ratio(v, variants[0]):.3f}"] for v in variants],
            ["variant", "tokens/s", "/ plain forward"],
        )
    )


if __name__ == "__main__":
    main()
