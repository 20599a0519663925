"""The form-vs-knowledge suite: every method on the same frozen model, the same data and the same step budget,
scored by the tasks' checkers, with a tidy table and a figure.

    audit       which facts the base model knows (its greedy answer holds a gold answer), cached per weights;
                for a base model, after a few answered questions (`audit_shots`)
    run_cell    one method on one task with one seed: train (early stopping on held-out loss), answer, score
    sweep       methods x tasks x seeds; each cell is a JSON file under OUT/cells/MODEL, skipped when it exists
    summarise   the cells as OUT/sweep_runs.csv (one row per seed) and OUT/sweep.csv, .json (mean, std over
                seeds), OUT/sweep.md (a table per task) and OUT/sweep.html (metric against parameters, log x,
                per task family)

Methods are named: `base` (the base model in its own form), `prompting` (the task's behaviour told in the system
prompt), `steering` (contrastive mean difference, no training), `aligner-N`, `adapter-N` (LLaMA-Adapter: a
prefix per layer), `lora-R` (q and v), `prompt-N` (prompt tuning), `zbias` (a constant per layer and head). A
trained one may change its factors: `aligner-1:lr=0.05`, `aligner-1:steps=40:train=10`, `aligner-1:gate_scale=0.5`
(`method_spec`). Decoding is greedy, answers are batched with left padding and stop at the end of the turn;
training is seeded; base-model answers are cached per weights fingerprint.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import re
import statistics
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn
from tqdm import tqdm

from aligner.baselines import fit_steering
from aligner.chat import BASE_TEMPLATE
from aligner.config import AlignerConfig
from aligner.files import atomic_write_json, provenance, read_json
from aligner.generation import BATCH_SIZE, check_gate_scale, generate
from aligner.loading import DEFAULT_MODEL, cache_dir, mark_used, model_fingerprint
from aligner.methods import (
    LoRA,
    LoRAConfig,
    Method,
    PromptTuning,
    PromptTuningConfig,
    ZBias,
    ZBiasConfig,
    formatted_for,
    heldout_loss,
    prompts_for,
)
from aligner.model import Aligner
from aligner.tasks import (
    KNOWLEDGE_SETS,
    TASK_NAMES,
    Fact,
    Item,
    KnowledgeSet,
    Sizes,
    Task,
    TaskData,
    get_task,
)
from aligner.tasks.spec import shuffled
from aligner.train import TrainConfig, train_sft

AUDIT_TOKENS = 24  # new tokens of an audit answer: "The capital of X is Y." and more fit


# ---- methods ----


@dataclass(frozen=True)
class MethodSpec:
    name: str
    kind: str  # "zero" (no parameters: base, prompting), "steering" (computed), "trained"
    make: Callable[[nn.Module], Method] | None = None  # a fresh method for the model; reads torch's RNG
    lr: float = 0.0  # AdamW's rate after warm-up (trained methods)
    # The factors a method name may change (`aligner-1:steps=40:train=10`); None: the sweep's own.
    steps: int | None = None  # step budget
    train: int | None = None  # training items: the first this many of the task's training split
    gate_scale: float = 1.0  # every gate times this when answering (aligners): the aligner's strength


# Rates for a budget of tens of steps (the authors' 9e-3 is for thousands): one per family of method, the same for
# every task and size; early stopping on held-out loss keeps a rate that overshoots from costing the result.
ALIGNER_LR, LORA_LR, PROMPT_LR, ZBIAS_LR = 2e-2, 2e-3, 1e-2, 1e-2


@dataclass(frozen=True)
class Family:
    """Methods with a size, named FAMILY-SIZE in the suite; `aligner.runs.train_run` trains one of any size."""

    counts: str  # what the size counts
    make: Callable[[nn.Module, int], Method]  # a fresh one of a size for a model; reads torch's RNG
    lr: float  # the sweep's rate


SIZED: dict[str, Family] = {
    "aligner": Family(
        "prefix tokens", lambda model, n: Aligner.for_model(model, AlignerConfig(n_tokens=n, shared=True)), ALIGNER_LR
    ),
    "adapter": Family(
        "prefix tokens per layer",
        lambda model, n: Aligner.for_model(model, AlignerConfig(n_tokens=n, shared=False)),
        ALIGNER_LR,
    ),
    "lora": Family("rank", lambda model, r: LoRA.for_model(model, LoRAConfig(r, float(r))), LORA_LR),
    "prompt": Family(
        "virtual tokens", lambda model, n: PromptTuning.for_model(model, PromptTuningConfig(n)), PROMPT_LR
    ),
}


def sized(family: str, size: int) -> MethodSpec:
    return MethodSpec(f"{family}-{size}", "trained", lambda model: SIZED[family].make(model, size), SIZED[family].lr)


# The suite's grid: what `aligner sweep` runs by default. Any size of a SIZED family is a method too (`aligner-3`).
METHODS: dict[str, MethodSpec] = {
    "base": MethodSpec("base", "zero"),
    "prompting": MethodSpec("prompting", "zero"),
    "steering": MethodSpec("steering", "steering"),
    **{spec.name: spec for spec in (sized("aligner", n) for n in (1, 2, 4, 10))},
    **{spec.name: spec for spec in (sized("adapter", n) for n in (1, 10))},
    **{spec.name: spec for spec in (sized("lora", r) for r in (1, 8))},
    "prompt-10": sized("prompt", 10),
    "zbias": MethodSpec("zbias", "trained", lambda model: ZBias.for_model(model, ZBiasConfig()), ZBIAS_LR),
}


# The options a method name may carry: each sets the MethodSpec field of its name, read as this type. A variant
# is trained afresh with the same seed, so `aligner-1:gate_scale=0.5` answers with the gates of `aligner-1`, halved.
OPTIONS = {"lr": float, "steps": int, "train": int, "gate_scale": float}


def method_spec(name: str) -> MethodSpec:
    """The spec of `name`: "lora-8", or a trained method with factors changed, colon-separated:
    "aligner-1:lr=0.05", "aligner-1:steps=40:train=10", "aligner-1:gate_scale=0.5" (aligners only)."""
    base, *options = name.split(":")
    family, _, size = base.partition("-")
    if base in METHODS:
        spec = METHODS[base]
    elif family in SIZED and size.isdigit() and int(size) > 0:
        spec = sized(family, int(size))
    else:
        raise ValueError(f"no method {base!r}; choose from {', '.join(METHODS)}, or another size of {'-N, '.join(SIZED)}-N")
    if options and spec.kind != "trained":
        raise ValueError(f"{name!r}: only a trained method takes options, and {base!r} is not trained")
    changes: dict[str, Any] = {}
    for option in options:
        key, _, value = option.partition("=")
        if key not in OPTIONS:
            raise ValueError(f"{name!r}: no option {key!r}; the options are {', '.join(OPTIONS)}, as KEY=VALUE")
        if key in changes:
            raise ValueError(f"{name!r}: option {key!r} given twice")
        try:
            changes[key] = OPTIONS[key](value)
        except ValueError:
            raise ValueError(f"{name!r}: {key} must be {'an integer' if OPTIONS[key] is int else 'a number'}, got {value!r}") from None
        zero_ok = key == "gate_scale"  # a gate scale of 0 answers as the base model
        if not (math.isfinite(changes[key]) and (changes[key] > 0 or zero_ok and changes[key] == 0)):
            raise ValueError(f"{name!r}: {key} must be finite and {'>= 0' if zero_ok else '> 0'}, got {value}")
    if "gate_scale" in changes and not base.startswith(("aligner-", "adapter-")):
        raise ValueError(f"{name!r}: gate_scale scales an aligner's gates; {base!r} has none")
    return replace(spec, name=name, **changes)


# ---- configuration ----


@dataclass(frozen=True)
class SuiteConfig:
    model: str = DEFAULT_MODEL  # as `aligner.cli.open_model` reads it ("tiny": the random test model)
    tasks: tuple[str, ...] = TASK_NAMES
    methods: tuple[str, ...] = tuple(METHODS)
    seeds: tuple[int, ...] = (0, 1)  # trained methods run once per seed; the others, deterministic, once
    sizes: Sizes = field(default_factory=Sizes)
    steps: int = 20  # the step budget of every trained method
    batch_size: int = 8  # examples per step
    warmup_steps: int = 3
    eval_every: int = 5  # steps between held-out losses
    patience: int = 2  # held-out losses without improvement before training stops; the best step is kept
    known_only: bool = True  # form tasks on facts the audit found known (False: any fact, for a random model)
    audit_shots: int = 0  # answered questions before each audit question (`demonstrations`): for base models
    system: str | None = None  # the system prompt of every method but prompting; None: the model's default
    max_new_tokens: int | None = None  # None: each task's own
    generate_batch_size: int = 16
    steering_layers: tuple[float, ...] = (0.25, 0.4, 0.55)  # candidate layers, as fractions of the depth
    steering_multipliers: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0)
    checker: str | None = None  # the regular expression of a user's JSONL task among `tasks`

    def cell_key(self) -> dict[str, Any]:
        """What a cell's result depends on besides its task, method and seed: a cell whose key differs is rerun."""
        keys = ("model", "sizes", "steps", "batch_size", "warmup_steps", "eval_every", "patience", "known_only", "audit_shots")
        keys += ("system", "max_new_tokens", "steering_layers", "steering_multipliers", "checker")
        return {k: (asdict(v) if k == "sizes" else v) for k, v in ((k, getattr(self, k)) for k in keys)}


QUICK = SuiteConfig(
    model="tiny",
    tasks=("json", "value"),
    methods=("base", "prompting", "steering", "aligner-1", "lora-1"),
    seeds=(0, 1),
    sizes=Sizes(train=4, valid=2, eval=3),
    steps=2,
    batch_size=2,
    warmup_steps=0,
    eval_every=1,
    known_only=False,
    max_new_tokens=4,
    steering_multipliers=(1.0,),
)


# ---- base-model answers, cached ----


def cached_answers(
    model: nn.Module,
    fingerprint: str,
    prompts: Sequence[str],
    system: str | None,
    max_new_tokens: int,
    batch_size: int = 16,
    raw_prompts: bool = False,
) -> list[str]:
    """Greedy answers of the base model alone, read from the cache of its weights `fingerprint` where present;
    the missing ones are generated (batched) and added. `raw_prompts`: as `answer`'s."""
    settings = [system, max_new_tokens] + (["raw"] if raw_prompts else [])  # raw apart: older caches stay valid
    key = hashlib.sha256(json.dumps(settings).encode()).hexdigest()[:16]
    path = cache_dir() / "answers" / f"{fingerprint[:16]}-{key}.json"
    cache = read_json(path) if path.is_file() else {}
    if cache:
        mark_used(path)
    missing = sorted({p for p in prompts if p not in cache})
    if missing:
        answers = answer(model, None, missing, system, max_new_tokens, batch_size, raw_prompts=raw_prompts)
        cache.update(zip(missing, answers))
        atomic_write_json(path, cache)
    return [cache[p] for p in prompts]


@dataclass(frozen=True)
class Audit:
    knowledge: str
    answers: dict[str, str]  # subject -> the base model's answer to the audit question
    known: frozenset[str]  # subjects whose answer holds a gold answer


def audit(
    model: nn.Module,
    knowledge: KnowledgeSet,
    fingerprint: str | None = None,
    system: str | None = None,
    batch_size: int = 16,
    shots: int = 0,
) -> Audit:
    """Ask the base model every fact of `knowledge` with the trained question template, greedily; a fact is known
    when the answer contains a gold answer (whole words, accents and, unless case-sensitive, case ignored).
    With `shots`, the question follows that many answered ones (`demonstrations`), which are never known."""
    fingerprint = fingerprint or model_fingerprint(model)
    facts = knowledge.facts()
    shown = demonstrations(knowledge, shots)
    if shown:
        examples = "\n\n".join(f"{BASE_TEMPLATE.format(prompt=knowledge.question(f))} {knowledge.sentence(f)}" for f in shown)
        system = examples if system is None else f"{system}\n\n{examples}"
    questions = [knowledge.question(f) for f in facts]
    answers = cached_answers(model, fingerprint, questions, system, AUDIT_TOKENS, batch_size)
    shown_subjects = {f.subject for f in shown}
    known = frozenset(
        f.subject for f, a in zip(facts, answers) if f.subject not in shown_subjects and knowledge.contains_answer(a, f.answers)
    )
    return Audit(knowledge.name, {f.subject: a for f, a in zip(facts, answers)}, known)


def demonstrations(knowledge: KnowledgeSet, shots: int) -> list[Fact]:
    """The facts a few-shot audit shows answered, the same for every question: the last `shots` in the order the
    splits are cut from. A base model has no turns to answer in, and a bare question reads less of what it knows
    (Gemma-3-270M: 80 of 250 capitals); in its own format, "Question: ...\nAnswer: The capital of ... is ...", a few
    answered ones show it the form of an answer. For a chat model they come as its system prompt."""
    if shots < 0:
        raise ValueError(f"audit shots must be >= 0, got {shots}")
    facts = shuffled(knowledge.facts())
    if shots >= len(facts):
        raise ValueError(f"{knowledge.name}: {shots} audit shots leave none of its {len(facts)} facts to audit")
    return facts[len(facts) - shots :]


# ---- one cell ----


def score(task: Task, items: Sequence[Item], answers: Sequence[str]) -> dict[str, float]:
    """metric -> the share of `items` whose answer passes the metric's check."""
    return {name: sum(check(i, a) for i, a in zip(items, answers)) / len(items) for name, check in task.metrics.items()}


def answer(
    model: nn.Module,
    method: Method | None,
    prompts: Sequence[str],
    system: str | None,
    max_new_tokens: int,
    batch_size: int = BATCH_SIZE,
    gate_scale: float = 1.0,
    raw_prompts: bool = False,
    **sampling: Any,
) -> list[str]:
    """Answers with `method` attached (None: the base model; an aligner's gates times `gate_scale`), batched and
    left-padded; greedy unless `sampling` says otherwise (`generate`'s do_sample, temperature, top_p, seed).
    `raw_prompts`: the prompts carry their own format (`Task.raw_prompts`), and the answers that ended their turn
    are marked."""
    options = dict(max_new_tokens=max_new_tokens, system=system, batch_size=batch_size, **sampling)
    options |= dict(chat_template=not raw_prompts, mark_end=raw_prompts)
    check_gate_scale(method, gate_scale)
    if method is None or isinstance(method, Aligner):
        return generate(model, list(prompts), aligner=method, gate_scale=gate_scale, **options)
    with method.attached(model):
        return generate(model, prompts_for(method, prompts), **options)


class EarlyStopping:
    """`train_sft`'s `on_step`: every `every` steps, the held-out loss of `valid`; stops after `patience` of them
    without improvement, and `restore_best` puts back the parameters of the best one (step 0 included)."""

    def __init__(
        self, model: nn.Module, method: Method, valid: Sequence[Any], system: str | None, every: int, patience: int, chat_template: bool = True
    ):
        self.model, self.method, self.system, self.chat_template = model, method, system, chat_template
        # each prompt as the method reads it, as train_sft trains it (prompt tuning's placeholders in front)
        self.valid = formatted_for(method, valid)
        self.every, self.patience = every, patience
        self.history: list[tuple[int, float]] = []
        self.best_step, self.best_loss, self.best_state = 0, math.inf, None

    def record(self, step: int) -> None:
        loss = heldout_loss(self.model, self.valid, self.system, chat_template=self.chat_template)
        self.history.append((step, loss))
        if loss < self.best_loss:
            self.best_step, self.best_loss = step, loss
            self.best_state = {k: v.detach().clone() for k, v in self.method.named_parameters()}

    def __call__(self, step: int, loss: float) -> bool:
        if step % self.every:
            return False
        self.record(step)
        return step - self.best_step >= self.patience * self.every

    def restore_best(self) -> None:
        with torch.no_grad():
            for name, param in self.method.named_parameters():
                param.copy_(self.best_state[name])


def train_method(
    model: nn.Module, spec: MethodSpec, data: TaskData, config: SuiteConfig, seed: int, raw_prompts: bool = False
) -> tuple[Method, dict[str, Any]]:
    """A fresh method of `spec` (seeded) trained on `data.train` for at most `config.steps` steps, stopped early on
    the held-out loss of `data.valid`; returned at its best step, with a record of the training. `raw_prompts`:
    the prompts carry their own format (`Task.raw_prompts`)."""
    torch.manual_seed(seed)
    method = spec.make(model)
    if spec.train and spec.train > len(data.train):
        raise ValueError(f"{spec.name}: train={spec.train}, but the task's training split has {len(data.train)} items")
    steps = spec.steps or config.steps
    train = data.train[: spec.train] if spec.train else data.train
    aligner_fields = asdict(method.config) if isinstance(method, Aligner) else {}
    train_config = TrainConfig(
        **aligner_fields,
        steps=steps,
        batch_size=config.batch_size,
        lr=spec.lr,
        warmup_steps=config.warmup_steps,
        seed=seed,
        log_every=config.eval_every,
        save_every=steps,
        system=config.system,
        chat_template=not raw_prompts,
    )

    valid = [item.example() for item in data.valid]
    stopping = EarlyStopping(model, method, valid, config.system, config.eval_every, config.patience, not raw_prompts)
    started = time.perf_counter()
    model.requires_grad_(False)
    with method.attached(model):  # the held-out loss before any step
        stopping.record(0)
    train_sft(model, [item.example() for item in train], train_config, aligner=method, on_step=stopping)
    stopping.restore_best()
    record = {
        "train_s": time.perf_counter() - started,
        "steps": method.provenance["training"]["step"],
        "best_step": stopping.best_step,
        "valid_loss": stopping.history,
        "lr": spec.lr,
        "train_items": len(train),
    }
    return method, record


def run_cell(
    model: nn.Module, fingerprint: str, task: Task, data: TaskData, spec: MethodSpec, seed: int, config: SuiteConfig
) -> dict[str, Any] | None:
    """One method on one task with one seed: the record that `sweep` writes (None where the method does not
    apply: prompting without an instruction, steering without contrasts)."""
    max_new_tokens = config.max_new_tokens or task.max_new_tokens
    batch = config.generate_batch_size
    record: dict[str, Any] = {"task": task.name, "family": task.family, "method": spec.name, "kind": spec.kind, "seed": seed}
    method: Method | None = None
    system = config.system
    if spec.name == "prompting":
        if task.instruction is None:
            return None
        system = task.instruction
    if spec.kind == "steering":
        if not any(item.contrast is not None for item in data.train):
            return None
        layers = sorted({min(round(f * model.cfg.n_layers), model.cfg.n_layers - 1) for f in config.steering_layers})
        method, losses = fit_steering(model, data.train, data.valid, layers, config.steering_multipliers, system)
        record.update(params=0, steering={**asdict(method.config), "valid_loss": losses})
    elif spec.kind == "trained":
        method, training = train_method(model, spec, data, config, seed, task.raw_prompts)
        record.update(params=method.num_parameters(), **training)
    else:
        record.update(params=0)
    started = time.perf_counter()
    metrics, outputs = evaluate(model, fingerprint, task, data.eval, method, system, max_new_tokens, batch, spec.gate_scale)
    record.update(eval_s=time.perf_counter() - started, metrics=metrics, n={s: len(i) for s, i in data.eval.items()})
    record["outputs"] = outputs
    return record


def evaluate(
    model: nn.Module,
    fingerprint: str,
    task: Task,
    splits: dict[str, list[Item]],
    method: Method | None,
    system: str | None,
    max_new_tokens: int,
    batch_size: int = 16,
    gate_scale: float = 1.0,
) -> tuple[dict[str, dict[str, float]], dict[str, list[dict[str, str]]]]:
    """Each split answered greedily with `method` (None: the base model, whose answers are cached; an aligner's
    gates times `gate_scale`) and scored:
    ({split: {metric: share}}, {split: [{"prompt", "answer"}]})."""
    metrics, outputs = {}, {}
    for split, items in splits.items():
        prompts = [item.prompt for item in items]
        if method is None:
            answers = cached_answers(model, fingerprint, prompts, system, max_new_tokens, batch_size, task.raw_prompts)
        else:
            answers = answer(model, method, prompts, system, max_new_tokens, batch_size, gate_scale, task.raw_prompts)
        metrics[split] = score(task, items, answers)
        outputs[split] = [{"prompt": p, "answer": a} for p, a in zip(prompts, answers)]
    return metrics, outputs


# ---- the sweep ----


def task_data(model: nn.Module, fingerprint: str, task: Task, config: SuiteConfig, audits: dict[str, Audit]) -> TaskData:
    """The splits of `task`, from the audit of its knowledge set (run once per set, cached) where it has one."""
    known = None
    if task.knowledge is not None and config.known_only:
        if task.knowledge not in audits:
            knowledge = KNOWLEDGE_SETS[task.knowledge]
            batch = config.generate_batch_size
            audits[task.knowledge] = audit(model, knowledge, fingerprint, config.system, batch, config.audit_shots)
        known = audits[task.knowledge].known
    return task.build(known, config.sizes)


def sweep(model: nn.Module, config: SuiteConfig, out: str | Path) -> list[dict[str, Any]]:
    """Run every cell of methods x tasks x seeds that `out/cells` does not hold yet (for this config), seed by
    seed so that an interrupted sweep has every task at its first seeds; then write the tables and the figure.
    Returns the summary rows."""
    out = Path(out)
    started = time.perf_counter()
    fingerprint = model_fingerprint(model)
    specs = [method_spec(name) for name in config.methods]
    tasks = [get_task(name, config.checker if name.endswith((".jsonl", ".json")) else None) for name in config.tasks]
    audits: dict[str, Audit] = {}
    datas: dict[str, TaskData] = {}
    cells = [(seed, task, spec) for seed in config.seeds for task in tasks for spec in specs]
    ran = 0
    for seed, task, spec in tqdm(cells, desc="sweep", unit="cell"):
        if spec.kind != "trained" and seed != config.seeds[0]:
            continue  # deterministic: once is enough
        path = cell_path(out, config.model, task.name, spec.name, seed)
        if path.is_file() and read_json(path).get("config") == json.loads(json.dumps(config.cell_key())):
            continue
        if task.name not in datas:
            datas[task.name] = task_data(model, fingerprint, task, config, audits)
        record = run_cell(model, fingerprint, task, datas[task.name], spec, seed, config)
        if record is not None:
            atomic_write_json(path, {**record, "config": config.cell_key(), "provenance": provenance()})
            ran += 1
    for name, result in audits.items():
        shots = f"-{config.audit_shots}shot" if config.audit_shots else ""
        write_audit(result, KNOWLEDGE_SETS[name], out / "audits" / f"{model_folder(config.model)}-{name}{shots}.csv")
    rows = summarise(out)
    entry = {
        "config": {**config.cell_key(), "tasks": config.tasks, "methods": config.methods, "seeds": config.seeds},
        "cells_run": ran,
        "wall_s": time.perf_counter() - started,
        "threads": torch.get_num_threads(),
        "base_fingerprint": fingerprint,
        "provenance": provenance(),
    }
    with open(out / "sweep_log.jsonl", "a", encoding="utf-8") as f:  # one line per invocation: what ran, how long
        f.write(json.dumps(entry) + "\n")
    return rows


def cell_path(out: Path, model: str, task: str, method: str, seed: int) -> Path:
    """OUT/cells/MODEL/TASK/METHOD/seedS.json: the results of several base models side by side in one folder."""
    return out / "cells" / model_folder(model) / task / method.replace(":", "+") / f"seed{seed}.json"  # no ":" on Windows


def model_folder(model: str) -> str:
    """A base model's name (a Hub id, a path) as one file or folder name."""
    return re.sub(r"[^\w.+-]+", "_", model).strip("_")


def write_audit(result: Audit, knowledge: KnowledgeSet, path: Path) -> None:
    """One row per fact: subject, gold answers, its labels, the base model's answer, known."""
    facts = knowledge.facts()
    label_names = sorted({name for f in facts for name in f.labels})
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["subject", "answers", *label_names, "base_answer", "known"])
        for fact in facts:
            labels = [fact.labels.get(name, "") for name in label_names]
            known = fact.subject in result.known
            writer.writerow([fact.subject, " | ".join(fact.answers), *labels, result.answers[fact.subject], int(known)])


# ---- tables and figure ----

RUN_COLUMNS = ("model", "method", "kind", "params", "task", "family", "split", "metric", "seed", "value", "n", "steps", "best_step", "train_s", "eval_s")
SUMMARY_COLUMNS = ("model", "method", "kind", "params", "task", "family", "split", "metric", "n_seeds", "mean", "std", "train_s")
GROUP = ("model", "method", "kind", "params", "task", "family", "split", "metric")  # a summary row: these, over seeds


def run_rows(out: str | Path) -> list[dict[str, Any]]:
    """One row per cell, split and metric, from every cell file under `out/cells`."""
    old = sorted(Path(out).glob("cells/*/*/seed*.json"))
    if old:
        raise ValueError(
            f"{old[0]} and {len(old) - 1} more cells are in the layout before cells were kept per base model: "
            f"move {Path(out) / 'cells' / 'TASK'} to {Path(out) / 'cells' / 'MODEL' / 'TASK'} (MODEL: --model's name)"
        )
    rows = []
    for path in sorted(Path(out).glob("cells/*/*/*/seed*.json")):
        cell = read_json(path)
        for split, metrics in cell["metrics"].items():
            for metric, value in metrics.items():
                row = {key: cell.get(key) for key in ("method", "kind", "params", "task", "family", "seed", "steps", "best_step", "train_s", "eval_s")}
                row["model"] = cell["config"]["model"]
                rows.append({**row, "split": split, "metric": metric, "value": value, "n": cell["n"][split]})
    return rows


def summarise(out: str | Path) -> list[dict[str, Any]]:
    """Write OUT/sweep_runs.csv, OUT/sweep.csv and OUT/sweep.json (mean and sample std over seeds; std empty for
    one seed; a row per base model, method, task, split and metric), OUT/sweep.md, and the figure as OUT/sweep.html
    and OUT/sweep.png; return the summary rows."""
    out = Path(out)
    runs = run_rows(out)
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in runs:
        groups.setdefault(tuple(row[k] for k in GROUP), []).append(row)
    summary = []
    for key, rows in groups.items():
        values = [r["value"] for r in rows]
        times = [r["train_s"] for r in rows if r["train_s"] is not None]
        summary.append(
            {
                **dict(zip(GROUP, key)),
                "n_seeds": len(values),
                "mean": statistics.fmean(values),
                "std": statistics.stdev(values) if len(values) > 1 else None,
                "train_s": statistics.fmean(times) if times else None,
            }
        )
    summary.sort(key=lambda r: (r["model"], r["family"], r["task"], r["split"], r["metric"], method_order(r["method"])))
    _write_csv(out / "sweep_runs.csv", RUN_COLUMNS, runs)
    _write_csv(out / "sweep.csv", SUMMARY_COLUMNS, summary)
    atomic_write_json(out / "sweep.json", summary)
    (out / "sweep.md").write_text(markdown_tables(summary), encoding="utf-8")
    if summary:
        fig = figure(summary)
        fig.write_html(out / "sweep.html", include_plotlyjs=True)  # readable offline
        write_png(fig, out / "sweep.png")
    return summary


def write_png(fig: Any, path: Path) -> None:
    """`fig` as a PNG through kaleido, which drives a Chrome or Chromium of this machine (`plotly_get_chrome`
    would download one; nothing here does); without one, a warning that says so, and no PNG."""
    try:
        fig.write_image(path, scale=1.5)
    except RuntimeError as error:  # plotly's "Kaleido requires Google Chrome to be installed"
        warnings.warn(f"{path} not written: {str(error).strip()}")


def method_order(name: str) -> tuple[int, int, str]:
    """Where `name` goes in a table: by family in METHODS' order, then size, variants after their method."""
    family, _, size = name.split(":")[0].partition("-")
    families = list(dict.fromkeys(m.partition("-")[0] for m in METHODS))
    return (families.index(family) if family in families else len(families), int(size) if size.isdigit() else 0, name)


def markdown_tables(summary: Sequence[dict[str, Any]]) -> str:
    """One table per task: a row per method (trainable parameters, mean training seconds), a column per split
    and metric, each cell "mean ± std" over seeds (the seed count in brackets when it is not 2)."""
    lines = []
    models = list(dict.fromkeys(r["model"] for r in summary))
    for model, task in dict.fromkeys((r["model"], r["task"]) for r in summary):
        rows = [r for r in summary if (r["model"], r["task"]) == (model, task)]
        columns = list(dict.fromkeys((r["split"], r["metric"]) for r in rows))
        lines += [f"### {task}" + (f" on {model}" if len(models) > 1 else ""), "", "| method | params | train s | " + " | ".join(f"{s} {m}" for s, m in columns) + " |"]
        lines.append("|" + " --- |" * (3 + len(columns)))
        for method in dict.fromkeys(r["method"] for r in rows):
            cells = {(r["split"], r["metric"]): r for r in rows if r["method"] == method}
            first = next(iter(cells.values()))
            values = []
            for column in columns:
                r = cells.get(column)
                if r is None:
                    values.append("")
                    continue
                text = f"{r['mean']:.2f}" + (f" ± {r['std']:.2f}" if r["std"] is not None else "")
                values.append(text + (f" ({r['n_seeds']})" if r["n_seeds"] != 2 else ""))
            train_s = "" if first["train_s"] is None else f"{first['train_s']:.0f}"
            lines.append(f"| {method} | {first['params']:,} | {train_s} | " + " | ".join(values) + " |")
        lines.append("")
    return "\n".join(lines)


def _write_csv(path: Path, columns: Sequence[str], rows: Sequence[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows({k: ("" if v is None else round(v, 4) if isinstance(v, float) else v) for k, v in row.items()} for row in rows)


# The panels of the figure: (family, split, metric, title).
PANELS = (
    ("form", "test", "form", "form tasks: form compliance (held-out facts)"),
    ("form", "test", "content", "form tasks: content kept (held-out facts)"),
    ("instruct", "test", "stops", "instruct: the answer ends its turn"),
    ("instruct", "test", "all", "instruct: ends its turn, one line, right (held-out known)"),
    ("knowledge", "taught", "content", "injection: taught facts answered"),
    ("knowledge", "unknown_heldout", "content", "injection: held-out unknown facts"),
    ("value", "harmful", "refusal", "value: refusal of held-out harmful"),
    ("value", "benign", "refusal", "value: over-refusal of held-out benign"),
)


def figure(summary: Sequence[dict[str, Any]]) -> Any:
    """Metric against trainable parameters (log x; methods with none drawn at 1) per task family and split,
    one colour per task (and base model), error bars one std over seeds; variants (`aligner-1:lr=...`) left out."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    summary = [r for r in summary if ":" not in r["method"]]  # variants (aligner-1:lr=...) share their method's x
    several_models = len({r["model"] for r in summary}) > 1

    def series(row: dict[str, Any]) -> str:  # a colour each: the task, on its base model where there are several
        return f"{row['task']} on {row['model']}" if several_models else row["task"]

    panels = [p for p in PANELS if any(r["family"] == p[0] and r["split"] == p[1] and r["metric"] == p[2] for r in summary)]
    columns = 2
    rows = max(1, math.ceil(len(panels) / columns))
    fig = make_subplots(rows=rows, cols=columns, subplot_titles=[p[3] for p in panels], horizontal_spacing=0.08)
    colours = {}
    for index, (family, split, metric, _) in enumerate(panels):
        row, col = index // columns + 1, index % columns + 1
        selected = [r for r in summary if r["family"] == family and r["split"] == split and r["metric"] == metric]
        for task in sorted({series(r) for r in selected}):
            points = sorted((r for r in selected if series(r) == task), key=lambda r: r["params"])
            colour = colours.setdefault(task, len(colours))
            fig.add_trace(
                go.Scatter(
                    x=[max(r["params"], 1) for r in points],
                    y=[r["mean"] for r in points],
                    error_y=dict(type="data", array=[r["std"] or 0 for r in points]),
                    mode="markers+text",
                    text=[r["method"] for r in points],
                    textposition="top center",
                    textfont=dict(size=9),
                    name=task,
                    legendgroup=task,
                    showlegend=task not in {t.name for t in fig.data},
                    marker=dict(size=8, color=f"hsl({colour * 67 % 360}, 65%, 45%)"),
                    hovertemplate="%{text}<br>params %{x:,}<br>%{y:.2f}<extra>" + task + "</extra>",
                ),
                row=row,
                col=col,
            )
        fig.update_xaxes(type="log", title_text="trainable parameters (none: drawn at 1)", row=row, col=col)
        fig.update_yaxes(range=[-0.06, 1.14], row=row, col=col)  # room for the labels above 1
    fig.update_layout(height=360 * rows, width=1200, title="Form vs knowledge: methods on the same frozen model")
    return fig
