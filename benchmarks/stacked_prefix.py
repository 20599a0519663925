"""Every adapted layer's prefix projected in one product (the key/value weights stacked, layer.py's
`project_stacked`) against each layer projecting its own, side by side in one run: forward and training step,
as ratios to the bridge's floor and to each other. Both ways run whatever the model's size; the default picks
the stacked one when the stacked weights fit in `aligner.model.STACKED_PREFIX_BYTES`.

    python -m benchmarks.stacked_prefix --device cpu --shape smollm2-host --batch 1 --seq 8 --rounds 40 --iters 3
    python -m benchmarks.stacked_prefix --device cuda --shape smollm2

`--shape smollm2-host` has SmolLM2's layers and heads with 8 numbers per head, so that a CPU run times the host's
work per operator and hook, the cost that bounds the SmolLM2 shape on a GPU.
"""

from __future__ import annotations

import contextlib
import math
from unittest.mock import patch

import torch

import aligner.model
from aligner.model import projection
from benchmarks.common import (
    Variant,
    arguments,
    bridge_of,
    finish,
    header,
    hf_model,
    input_gradients,
    no_grad,
    random_aligner,
    rate,
    ratio,
    run_interleaved,
    table,
)


def main() -> None:
    parser = arguments(__doc__, batch=8, seq=512, rounds=20, iters=3)
    parser.add_argument("--n-tokens", default="1,10", help="the aligner sizes N to measure")
    args = finish(parser.parse_args())
    hf, tokenizer = hf_model(args)
    bridge = bridge_of(hf, tokenizer, name=args.shape)
    ids = torch.randint(0, hf.config.vocab_size, (args.batch, args.seq), device=args.device)
    n = args.batch * args.seq
    aligners = {k: random_aligner(bridge, k) for k in (int(k) for k in args.n_tokens.split(","))}
    ways = {"each layer projects its own": 0, "one product, weights stacked": math.inf}

    @contextlib.contextmanager
    def attached(al, limit):
        with patch.object(aligner.model, "STACKED_PREFIX_BYTES", limit), al.attached(bridge):
            assert al._stacked == (limit > 0)
            yield

    forward = no_grad(lambda: bridge(ids))

    def train_step():  # the floor's input gradients or the aligner's: backward through every adapted layer
        bridge(ids).float().logsumexp(-1).mean().backward()

    print(header(args))
    al = next(iter(aligners.values()))
    with al.attached(bridge):
        default = al._stacked
    projections = [
        projection(component)
        for layer in al.layer_indices
        for component in (bridge.blocks[layer].attn.k, bridge.blocks[layer].attn.v)
    ]
    print(
        f"stacked key/value weights of the {len(al.layers)} adapted layers: "
        f"{aligner.model.stacked_bytes(projections) / 2**20:.1f} MiB, copied once per forward; the default "
        f"({aligner.model.STACKED_PREFIX_BYTES / 2**20:.0f} MiB at most) "
        f"{'stacks them' if default else 'projects layer by layer'}"
    )
    runs = (
        ("Forward (no gradients)", forward, contextlib.nullcontext),
        ("Training step", train_step, lambda: input_gradients(bridge)),
    )
    for title, call, floor in runs:
        variants = [Variant("bridge", call, floor, n)] + [
            Variant(f"aligner N={k}, {way}", call, lambda al=al, limit=limit: attached(al, limit), n)
            for k, al in aligners.items()
            for way, limit in ways.items()
        ]
        run_interleaved(variants, args.rounds, args.iters, args.device)
        rows = [[v.name, f"{rate(v):,.0f}", f"{ratio(v, variants[0]):.3f}", ""] for v in variants]
        for i in range(1, len(variants), 2):  # each N's stacked way against its per-layer one, round by round
            rows[i + 1][3] = f"{ratio(variants[i + 1], variants[i]):.3f}"
        print(f"\n{title}, tokens/s and ratios:\n")
        print(table(rows, ["variant", "tokens/s", "/ bridge", "stacked / per layer"]))


if __name__ == "__main__":
    main()
