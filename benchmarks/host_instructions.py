"""The host's work, counted: instructions executed per forward and per training step of the bridge, with and
without an attached aligner, counted by valgrind's callgrind. Unlike a time, the count does not move with the
machine's load, so two versions of the code measured in separate runs compare to the instruction.

    python -m benchmarks.host_instructions --shape smollm2-host --n-tokens 1,10

On `--shape smollm2-host` (SmolLM2's layers and heads, 8 numbers per head) the arithmetic is next to nothing and
the count is the host's work per operator and hook: what bounds the SmolLM2 shape on a GPU. The count is not a
time: a cache miss costs more than an addition. The script runs itself again under valgrind (which it needs on
PATH), with counting switched on only around the measured calls (`callgrind_control`), so the minutes of setup
under valgrind count nothing. Each variant is `--iters` calls after two warm-up calls; one round. Python's
garbage collector is frozen after the setup (`gc.freeze`), so that a full collection walks only the objects the
calls make, not the model's: otherwise it lands in one variant or another by chance.

Two more forward variants say what the hooks cost by themselves: where an aligner of N > 1 hooks each adapted
layer (`attn.hook_rot_q`, read; `attn.hook_z`, returned), functions that do nothing else, added through
TransformerLens (`add_hook`: its wrapper and the bridge's layout conversions, as the aligner adds them) and as
plain torch forward hooks on the same hook points (torch's module-hook path alone).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from aligner.config import AlignerConfig
from benchmarks.common import (
    SHAPES,
    arguments,
    bridge_of,
    finish,
    header,
    hf_model,
    input_gradients,
    no_grad,
    prefix_kept,
    random_aligner,
    table,
    train_step,
)

CHILD = "HOST_INSTRUCTIONS_OUT"  # set in the run under valgrind: the folder its counts go to


def callgrind(*options: str) -> None:
    """Run `callgrind_control OPTIONS` on this process (`-i on`: start counting; `-d NAME`: write out the count
    so far under NAME and start again from zero) and wait for it. The wait sleeps, so that it adds next to nothing
    to what is counted."""
    process = subprocess.Popen(
        ["callgrind_control", *options, str(os.getpid())], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    while process.poll() is None:
        time.sleep(0.01)


@contextlib.contextmanager
def noop_hooks(bridge: torch.nn.Module, through_lens: bool):
    """Inside, each adapted layer's `attn.hook_rot_q` and `attn.hook_z` run a hook that does nothing but what a hook
    must: read its input, and return hook_z's (so that TransformerLens reverts its layout, as after the aligner's).
    `through_lens`: added through TransformerLens (`hooks`), as the aligner adds its own; else as torch hooks."""
    layers = range(AlignerConfig().start_layer, len(bridge.blocks))
    names = ("hook_rot_q", "hook_z")
    points = [(f"blocks.{layer}.attn.{name}", name == "hook_z") for layer in layers for name in names]
    if through_lens:
        with bridge.hooks(fwd_hooks=[(name, lambda x, hook, back=back: x if back else None) for name, back in points]):
            yield
        return
    hook_points = bridge.hook_dict
    handles = [
        hook_points[name].register_forward_hook(lambda module, inputs, x, back=back: x if back else None)
        for name, back in points
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def measure(args: argparse.Namespace) -> None:
    """Under valgrind: run each variant and have callgrind write its count, named after it."""
    hf, tokenizer = hf_model(args)
    bridge = bridge_of(hf, tokenizer, name=args.shape)
    ids = torch.randint(0, hf.config.vocab_size, (args.batch, args.seq), device=args.device)
    aligners = {int(n): random_aligner(bridge, int(n)) for n in args.n_tokens.split(",")}

    def logits():
        return bridge(ids)

    forward = no_grad(logits)
    variants = [
        ("forward: bridge", forward, contextlib.nullcontext),
        *((f"forward: aligner N={n}", forward, lambda al=al: al.attached(bridge)) for n, al in aligners.items()),
        *(
            (f"forward: aligner N={n}, prefix kept (fixed_prefix)", forward, lambda al=al: prefix_kept(al, bridge))
            for n, al in aligners.items()
        ),
        ("forward: no-op hooks where N > 1 hooks, through TransformerLens", forward, lambda: noop_hooks(bridge, True)),
        ("forward: no-op hooks where N > 1 hooks, as torch hooks", forward, lambda: noop_hooks(bridge, False)),
        ("training: bridge, frozen, input gradients", train_step(logits, ids, []), lambda: input_gradients(bridge)),
        *(
            (
                f"training: aligner N={n}",
                train_step(logits, ids, list(al.parameters())),
                lambda al=al: al.attached(bridge),
            )
            for n, al in aligners.items()
        ),
    ]
    Path(os.environ[CHILD], "variants.json").write_text(json.dumps([name for name, _, _ in variants]))
    # Python's collector walks every object at a full collection, the model's too: millions of instructions that
    # fall into whichever variant is running when the count of allocations crosses its threshold. Frozen, the
    # objects made so far are not walked, and a collection costs what the calls' own objects do.
    gc.collect()
    gc.freeze()
    callgrind("-i", "on")
    for i, (_, call, context) in enumerate(variants):
        with context():
            call(), call()  # warm-up: the first forward inside fixed_prefix() computes the prefix it keeps
            callgrind("-d", "discard")
            for _ in range(args.iters):
                call()
            callgrind("-d", f"variant{i}")


def counts(folder: Path) -> dict[str, int]:
    """Instructions counted in each variant's dump, by variant name, in the order measured."""
    names = json.loads((folder / "variants.json").read_text())
    found = {}
    for dump in folder.glob("callgrind.out.*"):
        text = dump.read_text(errors="replace")
        variant = re.search(r"^desc: Trigger: dump variant(\d+)$", text, re.MULTILINE)
        if variant:
            found[int(variant.group(1))] = int(re.search(r"^summary: (\d+)$", text, re.MULTILINE).group(1))
    return {name: found[i] for i, name in enumerate(names)}


def main() -> None:
    parser = arguments(__doc__, batch=1, seq=8, rounds=1, iters=4)  # one round: a count needs no more
    parser.add_argument("--n-tokens", default="1,10", help="the aligner sizes N to measure")
    parser.set_defaults(shape="smollm2-host", threads=1)
    args = finish(parser.parse_args())
    if args.device != "cpu":
        raise SystemExit("valgrind counts the host's instructions: run with --device cpu")
    if os.environ.get(CHILD):
        measure(args)
        return
    for tool in ("valgrind", "callgrind_control"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} not found on PATH: install valgrind (Debian: apt-get install valgrind)")
    with tempfile.TemporaryDirectory() as folder:
        valgrind = [
            "valgrind",
            "--tool=callgrind",
            "--instr-atstart=no",
            f"--callgrind-out-file={folder}/callgrind.out.%p",
        ]
        command = [*valgrind, sys.executable, "-m", "benchmarks.host_instructions", *sys.argv[1:]]
        environment = {**os.environ, CHILD: folder, "OMP_NUM_THREADS": str(args.threads)}
        run = subprocess.run(command, env=environment, capture_output=True, text=True, check=False)
        if run.returncode != 0:
            raise SystemExit(f"the run under valgrind failed ({run.returncode}):\n{run.stderr[-4000:]}")
        found = counts(Path(folder))
    adapted = SHAPES[args.shape]["num_hidden_layers"] - AlignerConfig().start_layer
    rows = []
    for name, count in found.items():
        kind = name.split(":")[0]  # forward or training: the first of its kind is the floor
        floor = next(found[other] for other in found if other.split(":")[0] == kind)
        added = "" if count == floor else f"{(count - floor) / args.iters / adapted / 1e3:,.1f}"
        rows.append([name, f"{count / args.iters / 1e6:,.2f}", added, f"{floor / count:.3f}"])
    print(header(args))
    calls = f"{args.iters} calls after 2 warm-up calls"
    print(f"instructions counted by valgrind's callgrind over {calls}; {adapted} adapted layers\n")
    print(
        table(rows, ["variant", "million instructions per call", "thousand added per adapted layer", "floor / variant"])
    )


if __name__ == "__main__":
    main()
