"""The command line: `aligner train`, `generate`, `info`, `cache`, `sweep`, `eval` (also `python -m aligner ...`).

Bad files, settings and model names end in one `Error: ...` line and exit code 1, not a traceback. Each command
imports torch and the training code itself, so that `aligner --help` answers at once.
"""

import json
import time
from dataclasses import replace
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from aligner.config import AlignerConfig
from aligner.errors import one_line_errors
from aligner.packaged import DEFAULT_MODEL, MODEL_HELP

app = typer.Typer(
    # Click's plain layout: options and their help wrap to the width given, where rich's table cuts long option
    # names and values short in 80 columns.
    rich_markup_mode=None,
    context_settings={"max_content_width": 100},
    help="Aligner (one global token, shared by every layer) on TransformerLens 4: train, generate, inspect.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# `aligner train`'s defaults, written out so that printing the help imports no torch: TrainConfig's and
# DPOConfig's (tests/test_cli.py checks that they agree), except a step budget that a CPU trains in minutes.
TRAIN_DEFAULTS = {
    "steps": 60,
    "warmup_steps": 10,
    "batch_size": 8,
    "grad_accum": 1,
    "weight_decay": 0.02,
    "max_length": 512,
    "seed": 0,
    "log_every": 10,
    "save_every": 100,
}
DPO_DEFAULTS = {"beta": 0.1, "label_smoothing": 0.0}
ALIGNER_LR = 9e-3  # the authors' rate: aligner.registry.default_lr("aligner"), checked by tests/test_cli.py

class Objective(str, Enum):
    sft = "sft"  # supervised fine-tuning on (prompt, response) examples
    dpo = "dpo"  # direct preference optimisation on (prompt, chosen, rejected) pairs


class Preference(str, Enum):  # which PKU-SafeRLHF judgement picks the chosen response
    safer = "safer"
    better = "better"


class Dtype(str, Enum):  # the base model's weights in training
    float32 = "float32"
    bfloat16 = "bfloat16"


@app.command()
def train(
    data: Annotated[str, typer.Option(help="JSONL or Alpaca JSON file, local dataset directory, or cached HF dataset")],
    out: Annotated[Path, typer.Option(help="run directory, e.g. runs/NAME; refused if it exists, unless --resume")],
    model: Annotated[str, typer.Option(help=MODEL_HELP)] = DEFAULT_MODEL,
    task: Annotated[
        Optional[str],
        typer.Option(
            help="the suite task whose form the data show (json, bracket@elements), recorded: what probe report "
            "scores the form by"
        ),
    ] = None,
    method: Annotated[
        str,
        typer.Option(
            help="aligner (shaped by --n-tokens, --start-layer, --shared), or a method named as `aligner sweep` "
            "names it: aligner-N, adapter-N (LLaMA-Adapter), lora-R (peft's LoRA of rank R on q and v), prompt-N "
            "(prompt tuning, N virtual tokens), zbias"
        ),
    ] = "aligner",
    n_tokens: Annotated[Optional[int], typer.Option(help=f"prefix tokens N (default {AlignerConfig.n_tokens})")] = None,
    start_layer: Annotated[
        Optional[int], typer.Option(help=f"first adapted layer (default {AlignerConfig.start_layer})")
    ] = None,
    shared: Annotated[
        Optional[bool],
        typer.Option(
            help="one prefix for every layer (Aligner, the default); --no-shared: one per layer (LLaMA-Adapter)"
        ),
    ] = None,
    steps: Annotated[
        int, typer.Option(help="optimizer steps in all (the default: a short run that a CPU can train)")
    ] = TRAIN_DEFAULTS["steps"],
    batch_size: Annotated[int, typer.Option(help="examples per forward pass")] = TRAIN_DEFAULTS["batch_size"],
    grad_accum: Annotated[int, typer.Option(help="forward passes per optimizer step")] = TRAIN_DEFAULTS["grad_accum"],
    lr: Annotated[
        Optional[float],
        typer.Option(
            help=f"learning rate after warm-up (default: the method family's, aligner/registry.py: the authors' "
            f"{ALIGNER_LR} for an aligner)"
        ),
    ] = None,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay")] = TRAIN_DEFAULTS["weight_decay"],
    warmup_steps: Annotated[int, typer.Option(help="steps of linear warm-up")] = TRAIN_DEFAULTS["warmup_steps"],
    max_length: Annotated[
        int, typer.Option(help="tokens per example; longer ones are cut")
    ] = TRAIN_DEFAULTS["max_length"],
    seed: Annotated[int, typer.Option(help="seeds the initial tokens and the data order")] = TRAIN_DEFAULTS["seed"],
    log_every: Annotated[int, typer.Option(help="steps between lines of metrics.jsonl")] = TRAIN_DEFAULTS["log_every"],
    save_every: Annotated[int, typer.Option(help="steps between checkpoints")] = TRAIN_DEFAULTS["save_every"],
    system: Annotated[Optional[str], typer.Option(help="system prompt (default: the model's own)")] = None,
    resume: Annotated[bool, typer.Option(help="continue the run in --out from its last checkpoint")] = False,
    prompt_field: Annotated[str, typer.Option(help="the prompt's field in each row")] = "prompt",
    response_field: Annotated[str, typer.Option(help="the response's field in each row")] = "response",
    objective: Annotated[
        Objective, typer.Option(help="sft: (prompt, response) rows; dpo: {prompt, chosen, rejected} or PKU-SafeRLHF rows")
    ] = Objective.sft,
    reference: Annotated[
        Optional[str], typer.Option(help="dpo: run directory of the reference aligner, where the policy starts")
    ] = None,
    beta: Annotated[Optional[float], typer.Option(help=f"dpo: β (default {DPO_DEFAULTS['beta']})")] = None,
    label_smoothing: Annotated[
        Optional[float], typer.Option(help=f"dpo: label smoothing ε (default {DPO_DEFAULTS['label_smoothing']})")
    ] = None,
    prefer: Annotated[
        Optional[Preference],
        typer.Option(
            help="PKU-SafeRLHF rows: chosen is the safer (default) or the better; with sft, train on the chosen "
            "response of each pair (the paper's SFT on the safe answers)"
        ),
    ] = None,
    dtype: Annotated[Dtype, typer.Option(help="the base model's weights (bfloat16: half the memory)")] = Dtype.float32,
    gradient_checkpointing: Annotated[
        bool, typer.Option(help="recompute the frozen layers' activations in backward: less memory, more compute")
    ] = False,
    shard_model: Annotated[
        bool,
        typer.Option(help="shard the frozen model among the launched processes (FSDP2), for a model too large for one GPU"),
    ] = False,
) -> None:
    """Train an aligner (or another method: --method), the base model frozen, by SFT on (prompt, response) examples or
    by DPO on preference pairs; writes the run directory. Under `accelerate launch -m aligner train ...` every
    process trains on its device its share of each step (docs/multi_gpu.md); the main
    process prints and writes."""
    import torch

    from aligner.data import Example, load_examples, load_pairs
    from aligner.distributed import held_share, launched_accelerator
    from aligner.dpo import DPOConfig, train_dpo
    from aligner.loading import open_model
    from aligner.model import Aligner
    from aligner.registry import trained_spec
    from aligner.train import TrainConfig, train_sft

    dpo_options = {"beta": beta, "label_smoothing": label_smoothing, "reference": reference}
    with one_line_errors():
        accelerator = launched_accelerator()  # under accelerate launch: this process's rank, device, mixed precision
        say = typer.echo if accelerator.is_main_process else lambda message: None
        if objective is Objective.sft and any(v is not None for v in dpo_options.values()):
            raise ValueError("--reference, --beta and --label-smoothing need --objective dpo")
        shape = {name: value for name, value in (("n_tokens", n_tokens), ("start_layer", start_layer), ("shared", shared)) if value is not None}
        spec = None if method == "aligner" else trained_spec(method)
        if spec is not None and shape:
            raise ValueError(f"--n-tokens, --start-layer and --shared shape --method aligner; {method} has its own shape")
        if method != "aligner" and reference is not None:
            raise ValueError(f"--method {method} with --reference: the policy starts from the reference's own method")
        settings = dict(
            steps=steps,
            batch_size=batch_size,
            grad_accum=grad_accum,
            lr=lr,
            weight_decay=weight_decay,
            warmup_steps=warmup_steps,
            max_length=max_length,
            seed=seed,
            log_every=log_every,
            save_every=save_every,
            system=system,
            data=data,
            task=task,
            gradient_checkpointing=gradient_checkpointing,
            shard_model=shard_model,
        )
        if objective is Objective.dpo:
            items = load_pairs(data, prefer=(prefer or Preference.safer).value)
            config = DPOConfig(**settings, **{name: v for name, v in dpo_options.items() if v is not None})
            trainer, noun = train_dpo, "pairs"
        else:
            if prefer is not None:  # SFT on the preferred response of each pair
                pairs = load_pairs(data, prefer=prefer.value)
                items = [Example(pair.prompt, pair.chosen, pair.row) for pair in pairs]
            else:
                items = load_examples(data, prompt_field=prompt_field, response_field=response_field)
            config = TrainConfig(**settings)
            trainer, noun = train_sft, "examples"
        # A model to shard may not fit this process's device whole: it is loaded on the CPU, and each block's shard
        # moves to the device as it is sharded.
        device = "cpu" if shard_model else accelerator.device
        base = open_model(model, device=device, dtype=getattr(torch, dtype.value))
        fresh = {}
        if (spec is not None or shape or not resume) and reference is None:  # else the run's or the reference's
            torch.manual_seed(seed)  # on resume, the checkpoint's tensors replace these
            fresh["adapter"] = spec.make(base) if spec is not None else Aligner.for_model(base, AlignerConfig(**shape))
        processes = f"; {accelerator.num_processes} processes" if accelerator.num_processes > 1 else ""
        say(f"{len(items)} {noun} from {data}; base model {model} on {accelerator.device}{processes}")
        started = time.perf_counter()
        al = trainer(base, items, config, run_dir=out, resume=resume, accelerator=accelerator, **fresh)
        took = time.perf_counter() - started  # this run's: a resumed run's record adds the earlier runs' time
        if shard_model:
            say(f"the frozen model sharded (FSDP2): this process held {held_share(base):.0%} of its weights")
    record = al.provenance["training"]
    say(f"{al.num_parameters():,} trainable parameters ({al.describe()})")
    trained = f"trained to step {record['step']}" if resume else f"trained {record['step']} steps"
    say(f"{trained} in {took:.1f} s; final loss {record['loss']:.4f}")
    say(f"saved to {out}")


@app.command()
def generate(
    prompts: Annotated[list[str], typer.Argument(help="one or more prompts")],
    run: Annotated[
        Optional[Path],
        typer.Option(help="run directory of an aligner or another method (LoRA, ...); without it, the base model"),
    ] = None,
    model: Annotated[Optional[str], typer.Option(help=MODEL_HELP + "; default: the run's base model")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="tokens to generate at most")] = 32,
    gate_scale: Annotated[float, typer.Option(help="an aligner's gates times this (0: base, 1: as trained)")] = 1.0,
    sample: Annotated[bool, typer.Option(help="sample instead of greedy decoding")] = False,
    temperature: Annotated[float, typer.Option(help="sampling temperature")] = 1.0,
    top_p: Annotated[float, typer.Option(help="nucleus sampling threshold")] = 1.0,
    seed: Annotated[Optional[int], typer.Option(help="seed for sampling")] = None,
    system: Annotated[Optional[str], typer.Option(help="system prompt (default: the model's own)")] = None,
    device_map: Annotated[
        Optional[str], typer.Option(help='place the model as transformers does: "auto" spreads it over the GPUs, then CPU memory, then --offload-folder')
    ] = None,
    offload_folder: Annotated[Optional[Path], typer.Option(help="where --device-map puts the layers that fit nowhere else")] = None,
) -> None:
    """Answer each prompt with the base model and, given --run, with the run's aligner (or other method) attached."""
    from aligner.adapter import load_adapter
    from aligner.generation import answer, check_gate_scale
    from aligner.loading import open_model

    with one_line_errors():
        method = load_adapter(run) if run is not None else None
        check_gate_scale(method, gate_scale)
        if model is None:
            model = (method.base_model.get("name") if method is not None else None) or DEFAULT_MODEL
        placement = {} if device_map is None else {"device_map": device_map, "offload_folder": offload_folder}
        base = open_model(model, **placement)
        sampling = dict(do_sample=sample, temperature=temperature, top_p=top_p, seed=seed)
        outputs = {"base": answer(base, None, prompts, system, max_new_tokens, **sampling)}
        if method is not None:
            aligned = answer(base, method, prompts, system, max_new_tokens, gate_scale=gate_scale, **sampling)
            outputs["aligned"] = aligned
    for i, prompt in enumerate(prompts):
        typer.echo(f"--- {prompt}")
        for label, texts in outputs.items():
            typer.echo(f"{label + ':':9}" + texts[i].replace("\n", "\n" + " " * 9))


@app.command()
def info(run: Annotated[Path, typer.Argument(help="run directory of an aligner or another method (LoRA...)")]) -> None:
    """Print a saved aligner's (or other method's) config, parameter count, base model, training and provenance."""
    from aligner.adapter import load_adapter

    with one_line_errors():
        method = load_adapter(run)
    provenance = dict(method.provenance)
    training = provenance.pop("training", None)
    lines = [
        f"run          {run}",
        f"{'adapter':13}{method.describe()}",
        f"parameters   {method.num_parameters():,}",
        f"base model   {method.base_model.get('name')} (weights sha256 {method.base_model.get('fingerprint')})",
        *(describe_training(training) if training is not None else []),
        "provenance   " + json.dumps(provenance, indent=2, sort_keys=True).replace("\n", "\n             "),
    ]
    for line in lines:
        typer.echo(printable(line))


def printable(text: str) -> str:
    """`text` with every control character but the newline escaped (`\\x1b`): a file's strings printed as they are
    could move the cursor, recolour or retitle the terminal."""
    return "".join(c if c.isprintable() or c == "\n" else c.encode("unicode_escape").decode() for c in text)


@app.command()
def cache(
    unused_days: Annotated[
        Optional[float], typer.Option(min=0, help="remove the entries not used for this many days (0: all of them)")
    ] = None,
    dry_run: Annotated[bool, typer.Option(help="with --unused-days: mark what would go, remove nothing")] = False,
) -> None:
    """List what is kept in the cache ($ALIGNER_CACHE, else ~/.cache/aligner-workbench): de-quantised models,
    probe activations, the base model's answers; each with its size and last use. Every entry is rebuilt when
    next needed, so removing one costs only that time. Only a folder that the cache made is pruned: one holding
    its marker, CACHEDIR.TAG."""
    from aligner.loading import cache_entries, cache_location, check_cache_root, remove_cache_entry

    now = time.time()
    root = cache_location()
    if unused_days is not None:
        with one_line_errors():
            check_cache_root(root)
    entries = cache_entries(root)
    removed = [] if unused_days is None else [e for e in entries if now - e.last_used >= unused_days * 86400]
    typer.echo(f"cache {root}: {len(entries)} entries, {sum(e.size for e in entries) / 1e6:,.1f} MB")
    for entry in entries:
        mark = "-" if entry in removed else " "
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(entry.last_used))
        typer.echo(f"{mark} {entry.kind:8} {entry.path.name:40} {entry.size / 1e6:10,.1f} MB  used {when}")
    if removed:
        freed = f"{len(removed)} entries, {sum(e.size for e in removed) / 1e6:,.1f} MB"
        if dry_run:
            typer.echo(f"would remove the {freed} marked -")
        else:
            for entry in removed:
                remove_cache_entry(entry)
            typer.echo(f"removed the {freed} marked -")


def describe_training(training: Any) -> list[str]:
    """`info`'s lines about a training record; the record as JSON if it is not laid out as train.py writes it
    (provenance is free-form, and a hand-edited one must not end `info` in a traceback)."""
    try:
        config = training["config"]
        return [
            f"training     step {training['step']} of {config['steps']}, loss {training['loss']:.4f}, "
            f"{training['elapsed_s']:.1f} s, {training['examples']} examples from {config['data']}",
            "config       " + " ".join(f"{key}={value}" for key, value in config.items()),
        ]
    except (KeyError, TypeError, ValueError, AttributeError):
        return ["training     " + json.dumps(training, sort_keys=True)]


def _names(values: list[str]) -> tuple[str, ...]:
    """Repeated or comma-separated option values as one tuple."""
    return tuple(name.strip() for value in values for name in value.split(",") if name.strip())


@app.command()
def sweep(
    out: Annotated[Path, typer.Option(help="results directory: cells/, sweep.csv, sweep.json, sweep.html")] = Path("results"),
    quick: Annotated[bool, typer.Option(help="the quick suite: tiny random model, two tasks, a few steps (tests)")] = False,
    model: Annotated[Optional[str], typer.Option(help=MODEL_HELP)] = None,
    tasks: Annotated[Optional[list[str]], typer.Option(help="tasks (names or a .jsonl with --checker), comma-separated")] = None,
    methods: Annotated[Optional[list[str]], typer.Option(help="methods, comma-separated, e.g. base,aligner-1,lora-8")] = None,
    seeds: Annotated[Optional[str], typer.Option(help="training seeds, comma-separated")] = None,
    steps: Annotated[Optional[int], typer.Option(help="step budget of every trained method")] = None,
    checker: Annotated[Optional[str], typer.Option(help="regex a good answer of a user's .jsonl task matches")] = None,
    audit_shots: Annotated[Optional[int], typer.Option(help="answered questions before each audit question (base models)")] = None,
    threads: Annotated[int, typer.Option(help="torch threads; 1 is fastest on a shared 2-core machine")] = 1,
    reference: Annotated[
        Optional[str], typer.Option(help="the method every other is compared with, item by item (default lora-8)")
    ] = None,
    margin: Annotated[
        Optional[float], typer.Option(help="a paired difference within +-margin counts as none (default 0.05)")
    ] = None,
    tables_only: Annotated[bool, typer.Option(help="only rebuild the tables and figure from OUT/cells")] = False,
) -> None:
    """Run methods x tasks x seeds on one frozen model (cells already in OUT are skipped) and write the tables
    and the figure, each mean with its 95% interval over items and seeds, and each method against --reference."""
    import torch

    from aligner.loading import open_model
    from aligner.suite import QUICK, SuiteConfig
    from aligner.suite import sweep as run_sweep
    from aligner.tables import summarise

    if tables_only:
        with one_line_errors():
            rows = summarise(out, reference or SuiteConfig.reference, SuiteConfig.margin if margin is None else margin)
            typer.echo(f"{len(rows)} summary rows in {out / 'sweep.csv'}")
        return
    torch.set_num_threads(threads)
    config = QUICK if quick else SuiteConfig()
    changes = dict(model=model, tasks=_names(tasks or []) or None, methods=_names(methods or []) or None, steps=steps)
    changes.update(seeds=tuple(int(s) for s in seeds.split(",")) if seeds else None, checker=checker, audit_shots=audit_shots)
    changes.update(reference=reference, margin=margin)
    with one_line_errors():
        config = replace(config, **{k: v for k, v in changes.items() if v is not None})
        rows = run_sweep(open_model(config.model), config, out)
    last = json.loads((out / "sweep_log.jsonl").read_text().splitlines()[-1])
    typer.echo(f"{last['cells_run']} cells run in {last['wall_s']:.0f} s; {len(rows)} summary rows in {out / 'sweep.csv'}")


@app.command(name="eval")
def evaluate(
    task: Annotated[str, typer.Option(help="a suite task (json, caps, inject, value, ...) or a .jsonl file with --checker")],
    run: Annotated[Optional[Path], typer.Option(help="run directory of an aligner or method; without it, the base model")] = None,
    model: Annotated[Optional[str], typer.Option(help=MODEL_HELP + "; default: the run's base model")] = None,
    checker: Annotated[Optional[str], typer.Option(help="regex a good answer of a .jsonl task matches in full")] = None,
    system: Annotated[Optional[str], typer.Option(help="system prompt (default: the model's own)")] = None,
    show: Annotated[int, typer.Option(help="answers to print per split")] = 3,
    audit_shots: Annotated[int, typer.Option(help="answered questions before each audit question (as the sweep's)")] = 0,
) -> None:
    """Score the base model, or a trained aligner or method, on a task's evaluation splits (a .jsonl task: every
    row) with the task's checkers; greedy, batched."""
    from aligner.adapter import load_adapter
    from aligner.audit import task_data
    from aligner.loading import model_fingerprint, open_model
    from aligner.suite import evaluate as evaluate_splits, shares
    from aligner.tasks import Sizes, get_task

    with one_line_errors():
        method = load_adapter(run) if run is not None else None
        name = model or (method.base_model.get("name") if method is not None else None) or DEFAULT_MODEL
        base = open_model(name)
        spec = get_task(task, checker)
        sizes = Sizes(train=0, valid=0, eval=10**9) if spec.family == "custom" else Sizes()
        fingerprint = model_fingerprint(base)
        data = task_data(base, spec, sizes, system=system, audit_shots=audit_shots, fingerprint=fingerprint)
        scores, outputs = evaluate_splits(base, fingerprint, spec, data.eval, method, system, spec.max_new_tokens)
        metrics = shares(scores)
    typer.echo(f"task {spec.name} ({spec.description}); {'base model' if run is None else run} on {name}")
    for split, values in metrics.items():
        typer.echo(f"{split:16} n={len(outputs[split]):<4} " + "  ".join(f"{k}={v:.3f}" for k, v in values.items()))
        for row in outputs[split][:show]:
            typer.echo(f"    {row['prompt']!r} -> {row['answer']!r}")
