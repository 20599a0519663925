"""Where the aligner's time goes: torch.profiler over a forward and a training step of the bridge (or, with
`--raw`, the raw transformers model, as training and generation run it) with and without an attached aligner
(the operators whose call count the aligner changes, with the host time those calls take, and on a GPU their
device time), and on the bridge the wall time spent inside the aligner's two hooks (its Python and its forward
operators, launched or run). On a host-bound model the host time per operator, not the device's, says what to
cut.

    python -m benchmarks.profile_aligner --device cpu --shape smollm2 --batch 2 --seq 64 --n-tokens 10
    python -m benchmarks.profile_aligner --device cpu --shape smollm2 --batch 2 --seq 64 --n-tokens 1 --raw

The training step of the model alone asks for input gradients (benchmarks/throughput.py's floor).
"""

from __future__ import annotations

import functools
import statistics
import time

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from benchmarks.common import (
    arguments,
    bridge_of,
    finish,
    header,
    hf_model,
    input_gradients,
    no_grad,
    random_aligner,
    synchronize,
    table,
    train_step,
)

HOOKS = ("_keep_queries", "_add_prefix_attention")  # what the aligner runs at each adapted layer


def main() -> None:
    parser = arguments(__doc__, batch=2, seq=64, rounds=3, iters=2)
    parser.add_argument("--n-tokens", type=int, default=10)
    parser.add_argument("--raw", action="store_true", help="the raw transformers model instead of the bridge")
    args = finish(parser.parse_args())
    hf, tokenizer = hf_model(args)
    model = hf if args.raw else bridge_of(hf, tokenizer, name=args.shape)
    al = random_aligner(model, args.n_tokens)
    in_hooks = [0.0]
    for name in HOOKS:  # patched on the class before attaching, which binds them

        def timed(*a, fn=getattr(type(al), name), **k):
            start = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                in_hooks[0] += time.perf_counter() - start

        setattr(type(al), name, functools.wraps(getattr(type(al), name))(timed))
    ids = torch.randint(0, hf.config.vocab_size, (args.batch, args.seq), device=args.device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])

    def logits() -> torch.Tensor:
        return model(ids).logits if args.raw else model(ids)

    forward = no_grad(logits)

    def timed_calls(call) -> float:
        synchronize(args.device)
        start = time.perf_counter()
        for _ in range(args.iters):
            call()
        synchronize(args.device)
        return (time.perf_counter() - start) / args.iters * 1e3

    def operators(call) -> dict[str, tuple[int, float, float]]:
        """Each operator's calls, self host time and (on a GPU) self device time in ms, in one call. The host time
        includes the profiler's own work per call, alike for every operator."""
        with profile(activities=activities) as prof:
            call()
            synchronize(args.device)
        return {
            e.key: (e.count, e.self_cpu_time_total / 1e3, e.self_device_time_total / 1e3) for e in prof.key_averages()
        }

    def attribute_lookups(call) -> int:
        """Calls of nn.Module.__getattr__ in one call: a submodule's or a parameter's name read from Python,
        host work that no operator count shows."""
        lookup, count = nn.Module.__getattr__, [0]

        def counted(module: nn.Module, name: str):
            count[0] += 1
            return lookup(module, name)

        nn.Module.__getattr__ = counted
        try:
            call()
        finally:
            nn.Module.__getattr__ = lookup
        return count[0]

    print(header(args))
    where = "the raw model" if args.raw else "the bridge"
    print(f"aligner: N={args.n_tokens}, start layer {al.config.start_layer}, on {where}; times per call, in ms\n")
    for name, call in (("forward", forward), ("training step", train_step(logits, ids, []))):
        walls, hook_ms = {"base": [], "aligned": []}, []
        with input_gradients(model):
            call()
            base, base_lookups = operators(call), attribute_lookups(call)
        with al.attached(model):
            call()
            aligned, aligned_lookups = operators(call), attribute_lookups(call)
        for _ in range(args.rounds):  # interleaved, medians
            with input_gradients(model):
                walls["base"].append(timed_calls(call))
            with al.attached(model):
                in_hooks[0] = 0.0
                walls["aligned"].append(timed_calls(call))
                hook_ms.append(in_hooks[0] / args.iters * 1e3)
        # The operators whose calls the aligner adds (or removes), by what those calls cost the host: their number
        # times the operator's mean self time per call, less noisy than a difference of two totals. On a host-bound
        # model that time, not the device's, is what the aligner costs.
        # An operator that only the base calls is counted too, at its mean time there.
        added_by_op = {}
        for op in aligned.keys() | base.keys():
            calls_added = aligned.get(op, (0,))[0] - base.get(op, (0,))[0]
            if calls_added:
                count, host, device = aligned.get(op) or base[op]  # the mean per call, where the op is called
                added_by_op[op] = (calls_added, host / count, device / count)
        rows = [
            [op, str(calls), f"{calls * host_per_call:+.3f}"]
            + ([f"{calls * device_per_call:+.3f}"] if args.device == "cuda" else [])
            for op, (calls, host_per_call, device_per_call) in sorted(
                added_by_op.items(), key=lambda item: -item[1][0] * item[1][1]
            )
        ][:12]
        base_ms, aligned_ms = statistics.median(walls["base"]), statistics.median(walls["aligned"])
        # Every operator call counts, views too: on a host-bound model each costs its dispatch.
        added = sum(calls for op, (calls, _, _) in added_by_op.items() if op.startswith("aten::"))
        host_ms = sum(calls * host_per_call for calls, host_per_call, _ in added_by_op.values())
        hooks = "" if args.raw else f"{statistics.median(hook_ms):.2f} ms inside the aligner's hooks ({len(al.layers)} layers); "
        print(
            f"{name}: {base_ms:.1f} ms base, {aligned_ms:.1f} ms aligned; {hooks}{added / len(al.layers):.1f} aten "
            f"operator calls added per adapted layer; nn.Module.__getattr__ called {base_lookups:,} times base, "
            f"{aligned_lookups:,} aligned"
        )
        print(f"the calls added, net of those removed, cost the host {host_ms:.2f} ms in the operators themselves "
              "(their self time under the profiler)")
        columns = ["operator", "calls added", "host ms of those calls"]
        print(table(rows, columns + (["GPU ms of those calls"] if args.device == "cuda" else [])) + "\n")


if __name__ == "__main__":
    main()
