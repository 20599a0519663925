"""What the benchmark scripts share: the models, the timing, and the header that says where a table was measured.

Models: on the CPU, SmolLM2-135M-Instruct with its real weights (`--weights real`); on a GPU, random weights of
a real model's shape (`--weights random`), so that no weights need to travel. One set of weights serves every
variant: the raw transformers model, the TransformerBridge and each peft model are copies that share its
parameter tensors (the bridge and peft rewire the module they are given, so each gets its own module tree).

Timing: every round runs each variant in turn, so that a change in the machine's load (the CPUs here are shared
with other developers) falls on all of them alike; a ratio is the median over rounds of the ratio measured within
a round, and a rate the median over rounds. Within a round, a variant's timed calls follow an untimed one inside
its context (`run_interleaved`).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import importlib.metadata
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ContextManager, Sequence

import scipy.stats
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

import aligner
from aligner.adapter import shape_of
from aligner.loading import DEFAULT_MODEL, packaged_model_dir
from aligner.methods import LoRA, LoRAConfig

# Real models' shapes (their config.json on the Hugging Face Hub), for random-weight models.
SHAPES = {
    "smollm2": dict(  # HuggingFaceTB/SmolLM2-135M-Instruct
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        tie_word_embeddings=True,
        rope_theta=100000.0,
        max_position_embeddings=8192,
    ),
    "llama2-7b": dict(  # meta-llama/Llama-2-7b-hf
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
        tie_word_embeddings=False,
        rope_theta=10000.0,
        max_position_embeddings=4096,
    ),
    "tiny": dict(  # to try a script out in seconds
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=49152,
        tie_word_embeddings=True,
        rope_theta=10000.0,
        max_position_embeddings=512,
    ),
}
# SmolLM2's layers, heads and key/value heads with a width of 8 per head: each operator's compute is next to nothing,
# so a CPU run times the host's work per operator and hook, what bounds the SmolLM2 shape on a GPU.
SHAPES["smollm2-host"] = {**SHAPES["smollm2"], "hidden_size": 72, "intermediate_size": 192}


def arguments(description: str, **defaults) -> argparse.ArgumentParser:
    """The options every script takes; `defaults` sets the script's own (batch, seq, rounds, iters)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="smollm2")
    parser.add_argument("--weights", choices=["real", "random"], help="default: real on cpu with smollm2, else random")
    parser.add_argument("--tokenizer", help="a tokenizer directory (default: SmolLM2's, from its package)")
    parser.add_argument("--batch", type=int, default=defaults.get("batch", 8))
    parser.add_argument("--seq", type=int, default=defaults.get("seq", 512))
    parser.add_argument("--rounds", type=int, default=defaults.get("rounds", 5), help="interleaved rounds")
    parser.add_argument("--iters", type=int, default=defaults.get("iters", 3), help="timed calls per variant per round")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    return parser


def json_option(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """`--json PATH`, for the scripts whose tables RESULTS.md shows (`write_json`)."""
    parser.add_argument(
        "--json",
        type=Path,
        help="also write the tables as data, with the command, commit and device, to this file "
        "(benchmarks/results/DEVICE-BENCHMARK-SHAPE.json, which `python -m benchmarks.report` renders)",
    )
    parser.add_argument("--note", help="what else the numbers depend on, printed with them (the machine's load)")
    return parser


def finish(args: argparse.Namespace) -> argparse.Namespace:
    if args.weights is None:
        args.weights = "real" if (args.device, args.shape) == ("cpu", "smollm2") else "random"
    if args.weights == "real" and args.shape != "smollm2":
        raise SystemExit("--weights real exists for smollm2 alone (the packaged model); use --weights random")
    args.dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    return args


PACKAGES = ("torch", "transformers", "transformer-lens", "peft")


def machine(device: str, packages: Sequence[str] = PACKAGES) -> str:
    """The machine, Python and package versions a table was measured on."""
    if device == "cuda":
        where = f"{torch.cuda.get_device_name()} ({torch.version.cuda and 'CUDA ' + torch.version.cuda})"
    else:
        where = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"
    versions = ", ".join(f"{name} {importlib.metadata.version(name)}" for name in packages)
    return f"{where}; python {platform.python_version()}; {versions}"


def command_and_machine(device: str, packages: Sequence[str] = PACKAGES) -> str:
    """The command a table was printed by, and the machine, Python and package versions it ran on."""
    return (
        f"command: {' '.join([os.path.relpath(sys.argv[0]), *sys.argv[1:]])}\n"
        f"machine: {machine(device, packages)}"
    )


def model_line(args: argparse.Namespace) -> str:
    """The model, its batch and the rounds of timed calls."""
    return (
        f"{args.shape} ({args.weights} weights, {str(args.dtype).removeprefix('torch.')}); "
        f"batch {args.batch} x {args.seq} tokens; {args.rounds} interleaved rounds x {args.iters} timed calls"
    )


def header(args: argparse.Namespace) -> str:
    """Where and how the numbers below were measured, to paste above them."""
    return "\n".join(
        [
            command_and_machine(args.device),
            f"model: {model_line(args)}; {datetime.datetime.now().isoformat(timespec='seconds')}",
        ]
    )


ROOT = Path(__file__).resolve().parents[1]


def commit() -> str:
    """The commit the measured code is at: $BENCH_COMMIT where set (a device machine gets a copy of the tree without
    its .git), else git's HEAD, with "+changes" when the code a benchmark runs differs from it."""
    if os.environ.get("BENCH_COMMIT"):
        return os.environ["BENCH_COMMIT"]

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()

    try:
        head = git("rev-parse", "--short=7", "HEAD")
        changed = git("status", "--porcelain", "--", "aligner", "probe", "benchmarks/*.py")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+changes" if changed else "")


def _rounded(value):
    """`value` with its floats to 6 decimals: what any table prints, without float noise in the file."""
    if isinstance(value, float):
        return round(value, 6)
    if isinstance(value, dict):
        return {key: _rounded(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_rounded(item) for item in value]
    return value


def write_json(args: argparse.Namespace, benchmark: str, tables: dict[str, list[dict]]) -> None:
    """With `--json PATH`, the run's tables as data: one dict per row, keyed as benchmarks.report reads them."""
    if not args.json:
        return
    result = {
        "benchmark": benchmark,
        "shape": args.shape,
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "CPU",
        "commit": commit(),
        "command": f"python -m benchmarks.{Path(sys.argv[0]).stem} {shlex.join(sys.argv[1:])}",
        "machine": machine(args.device),
        "model": model_line(args),
        "measured": datetime.datetime.now().isoformat(timespec="seconds"),
        "tables": _rounded(tables),
    }
    if args.note:
        result["note"] = args.note
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(f"\nwrote {args.json}")


# ---- models ----


def hf_model(args: argparse.Namespace) -> tuple[nn.Module, object]:
    """The raw transformers model and a tokenizer for `args.shape`, on `args.device`, in eval mode, frozen."""
    tokenizer_dir = args.tokenizer or packaged_model_dir(DEFAULT_MODEL)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    if args.weights == "real":
        model = AutoModelForCausalLM.from_pretrained(packaged_model_dir(DEFAULT_MODEL), dtype=args.dtype)
    else:
        config = LlamaConfig(**SHAPES[args.shape], rms_norm_eps=1e-5)
        with torch.device(args.device):
            model = AutoModelForCausalLM.from_config(config, dtype=args.dtype)
    return model.to(args.device).eval().requires_grad_(False), tokenizer


def sharing_copy(model: nn.Module) -> nn.Module:
    """A copy of `model`'s modules that holds the very same parameter tensors (no extra weight memory)."""
    return copy.deepcopy(model, memo={id(p): p for p in model.parameters()})


def bridge_of(hf: nn.Module, tokenizer: object, name: str) -> nn.Module:
    return aligner.from_hf(sharing_copy(hf), tokenizer, name=name).requires_grad_(False)


def random_aligner(model: nn.Module, n_tokens: int) -> aligner.Aligner:
    """An aligner with random tokens and gates: a trained one costs the same, and the gates must not be zero for
    the comparisons to mean anything. Made without `Aligner.for_model`, whose fingerprint of the base model
    (a hash of every weight) takes a minute on a 7B model and is no part of what is measured."""
    al = aligner.Aligner(aligner.AlignerConfig(n_tokens=n_tokens), shape_of(model)).to(next(model.parameters()).device)
    with torch.no_grad():
        al.gates.normal_(std=0.1)
    return al


def random_bridge_lora(model: nn.Module, r: int = 8) -> LoRA:
    """The suite's LoRA (peft's `lora.Linear` swapped into the bridge's q and v projections) in the model's dtype,
    with random B (peft starts it at zero, which costs the same). Made without `LoRA.for_model`, for the reason
    `random_aligner` gives."""
    weight = next(model.parameters())
    lora = LoRA(LoRAConfig(r=r, alpha=2.0 * r), shape_of(model))
    lora.initialise(model)
    lora.to(device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        for linear in lora.lora_B.values():
            linear.weight.normal_(std=0.01)
    return lora


@contextlib.contextmanager
def input_gradients(hf_or_bridge: nn.Module):
    """Inside, the embedding output asks for gradients, so backward runs through every layer while the frozen
    weights take none: the floor that any prefix method pays."""

    def require_grad(module, args, output):
        return output.requires_grad_()

    embedding = (
        hf_or_bridge.original_model.get_input_embeddings()
        if hasattr(hf_or_bridge, "original_model")
        else hf_or_bridge.get_input_embeddings()
    )
    handle = embedding.register_forward_hook(require_grad)
    try:
        yield
    finally:
        handle.remove()


def no_grad(call: Callable[[], object]) -> Callable[[], None]:
    """`call` without gradients: a forward as inference runs it."""

    def forward() -> None:
        with torch.no_grad():
            call()

    return forward


@contextlib.contextmanager
def prefix_kept(al: aligner.Aligner, model: nn.Module):
    """`al` attached to `model` inside its `fixed_prefix()`: K_p and V_p computed at the first forward and kept for
    the next ones, as when serving many batches."""
    with al.attached(model), al.fixed_prefix():
        yield


def train_step(logits_of: Callable[[], torch.Tensor], ids: torch.Tensor, parameters: list) -> Callable[[], None]:
    """One training step: next-token cross-entropy of `logits_of()` on `ids`, backward, and an AdamW step over
    `parameters` (none: the frozen floor, whose backward only reaches the inputs that ask for gradients)."""
    optimizer = torch.optim.AdamW(parameters, lr=1e-4) if parameters else None

    def step() -> None:
        logits = logits_of()
        F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten()).backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    return step


# ---- timing ----


@dataclass
class Variant:
    name: str
    call: Callable[[], object]  # one call: a forward, a training step, a generation
    context: Callable[[], ContextManager] = contextlib.nullcontext  # entered around each round's calls
    tokens: int = 0  # tokens one call processes
    seconds: list[float] = field(default_factory=list)  # per call, one entry per round


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run_interleaved(variants: list[Variant], rounds: int, iters: int, device: str, settle: bool = True) -> None:
    """Fill each variant's `seconds`: `rounds` rounds of `iters` timed calls of each in turn.

    `settle`: in every round, each variant's timed calls follow one untimed call of it inside its context, so that
    what a context leaves to its first call (the prefix that `fixed_prefix` keeps, formed anew each time it is
    entered) is not timed, and every variant's timed calls start on a device that has just run it, not one that
    idled while an aligner was attached. Else one untimed call of each before the rounds: for calls long enough
    to be timed one at a time (a generation, a training loop), which would pay twice."""
    if not settle:
        for variant in variants:
            with variant.context():
                variant.call()
    for _ in range(rounds):
        for variant in variants:
            with variant.context():
                if settle:
                    variant.call()
                synchronize(device)
                start = time.perf_counter()
                for _ in range(iters):
                    variant.call()
                synchronize(device)
                variant.seconds.append((time.perf_counter() - start) / iters)


def peak_gib(variant: Variant) -> float:
    """Peak GPU memory of one call of `variant` inside its context, weights included, in GiB."""
    with variant.context():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        variant.call()
        torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**30


def rate(variant: Variant) -> float:
    """Median tokens per second over the rounds."""
    return variant.tokens / statistics.median(variant.seconds)


def round_ratios(variant: Variant, reference: Variant) -> list[float]:
    """Variant's rate / reference's rate in each round, the two measured in the same round."""
    return [ref / mine for mine, ref in zip(variant.seconds, reference.seconds)]


def ratio(variant: Variant, reference: Variant) -> float:
    """Median over rounds of `round_ratios`."""
    return statistics.median(round_ratios(variant, reference))


def ratio_interval(variant: Variant, reference: Variant, level: float = 0.95) -> list[float] | None:
    """A percentile bootstrap interval of `ratio` over the rounds, [low, high]; None with fewer than 3 rounds.
    A target is met where the interval's low end reaches it: on a shared machine the rounds scatter by more than
    the few per cent a target is about."""
    ratios = round_ratios(variant, reference)
    if len(ratios) < 3:
        return None
    found = scipy.stats.bootstrap(
        (ratios,), statistics.median, confidence_level=level, method="percentile", n_resamples=2000, rng=0,
        vectorized=False,
    ).confidence_interval
    return [float(found.low), float(found.high)]


def table(rows: list[list[str]], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])
