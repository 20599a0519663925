"""The form-vs-knowledge suite: every method on the same frozen model, the same data, and training to
convergence at a rate chosen on validation; scored per item by the tasks' checkers and by the gold answer's
log-probability under teacher forcing (aligner/recall.py), with intervals over items and seeds (aligner/stats.py).

    train_method  one method trained with one seed, early-stopped on the held-out loss, back at its best step
    choose_lr   a trained method's rate on one task: each of the family's rate times `lr_factors`, trained with
                the first seed, the one whose best held-out loss is lowest; kept as OUT/cells/.../lr.json, each
                candidate as it finishes
    Trainings   what one sweep has trained, for the cells that would train the same again
    run_cell    one method (aligner.registry's names) on one task with one seed: answer, score every item
    sweep       methods x tasks x seeds; each cell is a JSON file under OUT/cells/MODEL, skipped when it exists
                with the same settings, and the first seed's fitted method an adapter directory beside it; then
                the tables and the figure (aligner/tables.py)

Which facts each task may use comes from the base model's audit (aligner/audit.py). Decoding is greedy, answers
are batched with left padding and stop at the end of the turn; training is seeded; base-model answers are cached
per weights fingerprint. Nothing is chosen on the test splits: the rate, the step and the steering baseline's
layer and multiplier are read on `valid`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn
from tqdm import tqdm

from aligner.adapter import Adapter, load_adapter
from aligner.audit import Audit, cached_answers, task_data, write_audit
from aligner.baselines import fit_steering
from aligner.chat import BASE_TEMPLATE, ENDED
from aligner.dpo import DPOConfig, heldout_dpo_loss, pair_logprobs, tokenize_pairs, train_dpo
from aligner.files import atomic_write_json, provenance, read_json
from aligner.generation import answer
from aligner.loading import DEFAULT_MODEL, model_fingerprint
from aligner.objective import formatted_for, heldout_loss, pad_token_id
from aligner.recall import knowledge_scores
from aligner.registry import METHODS, MethodSpec, method_spec
from aligner.stats import MARGIN
from aligner.tables import model_folder, summarise
from aligner.tasks import (
    KNOWLEDGE_SETS,
    TASK_NAMES,
    Item,
    Sizes,
    Task,
    TaskData,
    get_task,
)
from aligner.train import TrainConfig, train_sft


@dataclass(frozen=True)
class SuiteConfig:
    model: str = DEFAULT_MODEL  # as `aligner.open_model` reads it ("tiny": the random test model)
    tasks: tuple[str, ...] = TASK_NAMES
    methods: tuple[str, ...] = tuple(METHODS)
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)  # trained methods run once per seed; the others, deterministic, once
    sizes: Sizes = field(default_factory=lambda: Sizes(train=32, valid=8, eval=40))
    # A trained method's step budget: early stopping ends it sooner, at convergence; one still improving there goes
    # on to convergence, up to `STEP_REACH` budgets (`EarlyStopping`).
    steps: int = 200
    batch_size: int = 8  # examples per step
    warmup_steps: int = 5
    eval_every: int = 10  # steps between held-out losses
    patience: int = 3  # held-out losses without improvement before training stops; the best step is kept
    lr_factors: tuple[float, ...] = (1 / 3, 1.0, 3.0)  # rates tried on validation, times the family's rate
    known_only: bool = True  # form tasks on facts the audit found known (False: any fact, for a random model)
    audit_shots: int = 0  # answered questions before each audit question (`demonstrations`): for base models
    system: str | None = None  # the system prompt of every method but prompting; None: the model's default
    max_new_tokens: int | None = None  # None: each task's own
    generate_batch_size: int = 16
    fewshot_shots: int = 3  # answered training items before each question: the few-shot baseline
    steering_layers: tuple[float, ...] = (0.25, 0.4, 0.55)  # candidate layers, as fractions of the depth
    # Candidate multipliers; where the best lies at an end of the grid, the grid goes on past it (`STEERING_REACH`).
    steering_multipliers: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0, 8.0)
    checker: str | None = None  # the regular expression of a user's JSONL task among `tasks`
    # Read by the tables alone, fixed before the run: every method's paired difference against `reference`, and
    # the margin within which a difference counts as none (`aligner.stats.compare`).
    reference: str = "lora-8"
    margin: float = MARGIN

    def cell_key(self) -> dict[str, Any]:
        """What a cell's result depends on besides its task, method and seed: a cell whose key differs is rerun."""
        keys = ("model", "sizes", "steps", "batch_size", "warmup_steps", "eval_every", "patience", "lr_factors")
        keys += ("known_only", "audit_shots", "system", "max_new_tokens", "fewshot_shots", "steering_layers")
        keys += ("steering_multipliers", "checker")
        return {k: (asdict(v) if k == "sizes" else v) for k, v in ((k, getattr(self, k)) for k in keys)}


QUICK = SuiteConfig(
    model="tiny",
    tasks=("json", "value"),
    methods=("base", "prompting", "fewshot", "steering", "aligner-1", "aligner-1:tokens=random", "aligner-1:data=own", "lora-1"),
    seeds=(0, 1),
    sizes=Sizes(train=4, valid=2, eval=3),
    steps=2,
    batch_size=2,
    warmup_steps=0,
    eval_every=1,
    lr_factors=(0.5, 2.0),
    known_only=False,
    max_new_tokens=4,
    fewshot_shots=2,
    steering_multipliers=(1.0,),
    reference="lora-1",
)
STEERING_REACH = 4  # how many times the steering grid may go on past an end where its best lies
RATE_REACH = 2  # how many rates a rate search may try past an end of `lr_factors` where its best lies
STEP_REACH = 3  # how many step budgets a training still improving at its budget may run (`EarlyStopping`)
RANDOM_TOKENS_STREAM = 104_729  # added to a seed for the random-token control's draws (torch keeps 32 bits of a seed)


# ---- one cell ----


def score(task: Task, items: Sequence[Item], answers: Sequence[str]) -> dict[str, list[float]]:
    """metric -> for each of `items`, 1.0 where its answer passes the metric's check, else 0.0."""
    return {name: [float(check(i, a)) for i, a in zip(items, answers)] for name, check in task.metrics.items()}


class EarlyStopping:
    """A training loop's `on_step` (`train_sft`, `train_dpo`): every `every` steps, `heldout()`, the held-out loss
    with `method` attached as it is now; stops after `patience` of them without improvement, and `restore_best`
    puts back the parameters of the best one (step 0 included). At the first of them at or past `budget` it stops
    unless that one improved: a training still improving at its budget goes on until it converges (the loop's
    own step count, `STEP_REACH` budgets in the suite, is the most it runs)."""

    def __init__(self, method: Adapter, heldout: Callable[[], float], every: int, patience: int, budget: int):
        self.method, self.heldout = method, heldout
        self.every, self.patience, self.budget = every, patience, budget
        self.history: list[tuple[int, float]] = []
        self.best_step, self.best_loss, self.best_state = 0, math.inf, None

    def record(self, step: int) -> None:
        loss = self.heldout()
        self.history.append((step, loss))
        if loss < self.best_loss:
            self.best_step, self.best_loss = step, loss
            self.best_state = {k: v.detach().clone() for k, v in self.method.named_parameters()}

    def __call__(self, step: int, loss: float) -> bool:
        if step % self.every:
            return False
        self.record(step)
        if self.budget <= step < self.budget + self.every and self.best_step < step:
            return True
        return step - self.best_step >= self.patience * self.every

    def restore_best(self) -> None:
        with torch.no_grad():
            for name, param in self.method.named_parameters():
                param.copy_(self.best_state[name])


def train_method(
    model: nn.Module,
    spec: MethodSpec,
    data: TaskData,
    config: SuiteConfig,
    seed: int,
    raw_prompts: bool = False,
    lr: float | None = None,
    task: str | None = None,
    first: tuple[Adapter, dict[str, Any]] | None = None,
) -> tuple[Adapter, dict[str, Any]]:
    """A fresh method of `spec` (seeded) trained on `data.train` at rate `lr` (None: the spec's, else its family's)
    for its step budget (`steps`), stopped early on the held-out loss of `data.valid`; returned at its best step,
    with a record of the training. `raw_prompts`: the prompts carry their own format (`Task.raw_prompts`);
    `task`, the suite task's name, is recorded in the method's provenance (what `probe report` reads).
    A `then=dpo` method is its first stage so trained (at `spec.first_lr`; or `first`, that stage trained with
    this seed already, and its record), then `preference_stage`'s at `lr`."""
    if spec.then == "dpo":
        first = first or train_method(model, spec.first_stage(), data, config, seed, raw_prompts, spec.first_lr, task)
        return preference_stage(model, spec, *first, data, config, seed, raw_prompts, lr, task)
    lr = lr or spec.lr or spec.family_lr
    torch.manual_seed(seed)
    method = spec.make(model)
    if spec.train and spec.train > len(data.train):
        raise ValueError(f"{spec.name}: train={spec.train}, but the task's training split has {len(data.train)} items")
    budget, most = step_budget(spec, config)
    train = data.train[: spec.train] if spec.train else data.train
    train_config = TrainConfig(**stage_settings(config, most, lr, seed, raw_prompts, task))

    # each prompt as the method reads it, as train_sft trains it (prompt tuning's placeholders in front)
    valid = formatted_for(method, [item.example() for item in data.valid])
    heldout = functools.partial(heldout_loss, model, valid, config.system, chat_template=not raw_prompts)
    stopping = EarlyStopping(method, heldout, config.eval_every, config.patience, budget)
    started = time.perf_counter()
    model.requires_grad_(False)
    with method.attached(model):  # the held-out loss before any step
        stopping.record(0)
    train_sft(model, [item.example() for item in train], train_config, adapter=method, on_step=stopping)
    stopping.restore_best()
    return method, stage_record(method, stopping, time.perf_counter() - started, (budget, most), lr, len(train))


def step_budget(spec: MethodSpec, config: SuiteConfig) -> tuple[int, int]:
    """A training stage's step budget and the most steps it may run: the config's budget, and `STEP_REACH` of
    them for a training still improving there (`EarlyStopping`); a method that names its steps (`:steps=20`)
    runs that many at most."""
    if spec.steps:
        return spec.steps, spec.steps
    return config.steps, config.steps * STEP_REACH


def stage_settings(config: SuiteConfig, steps: int, lr: float, seed: int, raw_prompts: bool, task: str | None) -> dict[str, Any]:
    """The training settings every stage of a suite method reads (`TrainConfig`'s, which `DPOConfig` extends)."""
    return dict(
        steps=steps,
        batch_size=config.batch_size,
        lr=lr,
        warmup_steps=config.warmup_steps,
        seed=seed,
        log_every=config.eval_every,
        save_every=steps,
        system=config.system,
        chat_template=not raw_prompts,
        task=task,
    )


def stage_record(
    method: Adapter, stopping: EarlyStopping, train_s: float, budget: tuple[int, int], lr: float, n_items: int
) -> dict[str, Any]:
    """What a cell records of a trained stage, early-stopped by `stopping` and put back at its best step; `budget`:
    its step budget and the most steps it could run (`step_budget`)."""
    return {
        "train_s": train_s,
        "steps": method.provenance["training"]["step"],
        "budget": budget[0],
        "most_steps": budget[1],
        "best_step": stopping.best_step,
        "valid_loss": stopping.history,
        "lr": lr,
        "train_items": n_items,
    }


def preference_stage(
    model: nn.Module,
    spec: MethodSpec,
    first: Adapter,
    first_record: dict[str, Any],
    data: TaskData,
    config: SuiteConfig,
    seed: int,
    raw_prompts: bool,
    lr: float | None,
    task: str | None,
) -> tuple[Adapter, dict[str, Any]]:
    """DPO from `first` (the trained first stage, reference and starting point) on the preference pairs of
    `data.train` (`Item.pair`) at rate `lr` (None: the spec's, else its family's DPO rate) for at most the step
    budget, stopped early on the mean DPO loss of `data.valid`'s pairs (log 2 at step 0); returned at its best
    step, with a record of both stages (the first's under "first")."""
    lr = lr or spec.lr or spec.family_lr
    budget, most = step_budget(spec, config)
    train, valid = ([item.pair() for item in items] for items in (data.train, data.valid))
    with tempfile.TemporaryDirectory() as saved:
        reference = first.save(Path(saved) / "first")
        dpo_config = DPOConfig(**stage_settings(config, most, lr, seed, raw_prompts, task), reference=str(reference))
        pad = pad_token_id(model.tokenizer)
        held_out = tokenize_pairs(model.tokenizer, formatted_for(first, valid), dpo_config)
        reference_logps = pair_logprobs(model, first, held_out, config.batch_size, pad)
        policy = load_adapter(reference)
        stopping = EarlyStopping(
            policy,
            functools.partial(heldout_dpo_loss, model, held_out, reference_logps, dpo_config, pad),
            config.eval_every,
            config.patience,
            budget,
        )
        started = time.perf_counter()
        with policy.attached(model):  # the held-out loss before any step
            stopping.record(0)
        train_dpo(model, train, dpo_config, adapter=policy, on_step=stopping)
    stopping.restore_best()
    # The reference was a file of this call's alone: the provenance names the stage it was instead.
    first_stage = f"{spec.first_stage().name}, seed {seed}, the suite's first stage of {spec.name}"
    policy.provenance["initialised_from"] = first_stage
    policy.provenance["training"]["config"]["reference"] = first_stage
    train_s = first_record["train_s"] + time.perf_counter() - started
    return policy, {**stage_record(policy, stopping, train_s, (budget, most), lr, len(train)), "first": first_record}


def training_name(spec: MethodSpec) -> str:
    """The name of what `spec` trains: its name without the options that change only how it answers."""
    base, *options = spec.name.split(":")
    return ":".join([base, *(o for o in options if o.partition("=")[0] not in ("gate_scale", "tokens"))])


def choose_lr(
    spec: MethodSpec, config: SuiteConfig, path: Path, train: Callable[[float], dict[str, Any]], key: dict[str, Any] | None = None
) -> float:
    """The rate `spec` trains at on this task: the one given in its name, else, of the family's rate times each
    of `config.lr_factors` and on past an end of them where the best lies (`rate_past_an_end`), the one whose best
    held-out loss is lowest; `train(lr)` trains it with the first seed and returns its record. The search is kept
    in `path` (JSON), and read from there while its settings, `key` (default: the config's), are the same."""
    if spec.lr is not None:
        return spec.lr
    key = json.loads(json.dumps(key or config.cell_key()))
    saved = read_json(path) if path.is_file() else {}
    if saved.get("config") != key:
        saved = {}
    # Each candidate is written as it finishes (with "lr": null until the last), so that a search interrupted
    # between two trainings resumes at the next rate rather than from the first.
    candidates = saved.get("candidates", [])
    entry = {"method": training_name(spec), "lr": None, "candidates": candidates, "config": key}

    def trial(lr: float) -> None:
        record = train(lr)
        best = min(loss for _, loss in record["valid_loss"])
        candidates.append({"lr": record["lr"], "valid_loss": best, "best_step": record["best_step"], "steps": record["steps"]})
        atomic_write_json(path, {**entry, "provenance": provenance()})

    for factor in config.lr_factors[len(candidates) :]:
        trial(spec.family_lr * factor)
    while (rate := rate_past_an_end(candidates, len(config.lr_factors) + RATE_REACH)) is not None:
        trial(rate)
    entry["lr"] = min(candidates, key=lambda c: c["valid_loss"])["lr"]
    if saved.get("lr") != entry["lr"]:
        atomic_write_json(path, {**entry, "provenance": provenance()})
    return entry["lr"]


class Trainings:
    """The methods one sweep has trained, each kept (its files, in a temporary directory) for a cell that would
    train the same again: the rate search's trial with the first seed at the rate it chose is that seed's cell's
    training, the random-token control's is its method's, a `then=` method's first stage is that method's own.
    Training is seeded, so the copy is what training again would give. Each call returns a fresh copy, which the
    caller may change (the random-token control replaces its tokens)."""

    def __init__(self, model: nn.Module, config: SuiteConfig) -> None:
        self.model, self.config = model, config
        self._kept: dict[tuple[Any, ...], tuple[Path, dict[str, Any]]] = {}
        self._files = tempfile.TemporaryDirectory(prefix="aligner-sweep-")

    def __call__(self, task: Task, data: TaskData, spec: MethodSpec, seed: int, lr: float) -> tuple[Adapter, dict[str, Any]]:
        """`spec` trained on `data` (the items it trains on: `training_data`) with `seed` at rate `lr`."""
        key = (task.name, training_name(spec), spec.first_lr, seed, lr)
        if key in self._kept:
            path, record = self._kept[key]
            return load_adapter(path), json.loads(json.dumps(record))
        first = self(task, data, spec.first_stage(), seed, spec.first_lr) if spec.then is not None else None
        method, record = train_method(self.model, spec, data, self.config, seed, task.raw_prompts, lr, task.name, first)
        path = Path(self._files.name) / str(len(self._kept))
        method.save(path)
        self._kept[key] = (path, record)
        return method, record


def rate_past_an_end(candidates: Sequence[dict[str, Any]], most: int) -> float | None:
    """The next rate to try where the best of `candidates` lies at an end of the rates tried (where a rate beyond
    might do better): one step further, at the ratio of the two rates nearest that end; None where the best lies
    inside, or `most` rates have been tried."""
    if len(candidates) >= most or len(candidates) < 2:
        return None
    rates = sorted(c["lr"] for c in candidates)
    best = min(candidates, key=lambda c: c["valid_loss"])["lr"]
    if best == rates[-1]:
        return rates[-1] * rates[-1] / rates[-2]
    if best == rates[0]:
        return rates[0] * rates[0] / rates[1]
    return None


def training_data(model: nn.Module, fingerprint: str, task: Task, data: TaskData, spec: MethodSpec, config: SuiteConfig) -> TaskData:
    """The items `spec` trains and is validated on: the task's, or for the own-answers control (`data=own`) the
    same prompts answered by the base model itself (`own_answers`), its rate chosen on those too."""
    if spec.data != "own":
        return data
    return replace(data, **{name: own_answers(model, fingerprint, task, getattr(data, name), config) for name in ("train", "valid")})


def own_answers(model: nn.Module, fingerprint: str, task: Task, items: Sequence[Item], config: SuiteConfig) -> list[Item]:
    """`items` with the base model's own greedy answers as the responses to train on: the own-answers control,
    which learns no new form, so that what it costs is what training alone costs."""
    prompts = [item.prompt for item in items]
    max_new_tokens = config.max_new_tokens or task.max_new_tokens
    answers = cached_answers(model, fingerprint, prompts, config.system, max_new_tokens, config.generate_batch_size, task.raw_prompts)
    return [replace(item, response=text.removesuffix(ENDED)) for item, text in zip(items, answers)]


def fewshot_system(train: Sequence[Item], shots: int, system: str | None) -> str | None:
    """The few-shot baseline's system prompt: `shots` training items answered in the new form, in the base
    model's question format (the audit's), after `system`; None where the task has no training items."""
    shown = list(train[:shots])
    if not shown:
        return None
    examples = "\n\n".join(f"{BASE_TEMPLATE.format(prompt=item.prompt)} {item.response}" for item in shown)
    return examples if system is None else f"{system}\n\n{examples}"


def randomise_tokens(aligner: Adapter, seed: int) -> None:
    """Replace an aligner's tokens by random directions of the same norms (each token its own), its gates kept:
    the random-vector control. Seeded by `seed` in a stream of its own: the seed alone would draw the very
    directions that initialised the tokens (`train_method` seeds torch with it)."""
    generator = torch.Generator().manual_seed(RANDOM_TOKENS_STREAM + seed)
    with torch.no_grad():
        tokens = aligner.tokens
        noise = torch.randn(tokens.shape, generator=generator, dtype=torch.float32)
        noise = noise / noise.norm(dim=-1, keepdim=True) * tokens.float().norm(dim=-1, keepdim=True)
        tokens.copy_(noise.to(tokens))


def run_cell(
    model: nn.Module,
    fingerprint: str,
    task: Task,
    data: TaskData,
    spec: MethodSpec,
    seed: int,
    config: SuiteConfig,
    trained: tuple[Adapter, dict[str, Any]] | None = None,
    adapter_dir: Path | None = None,
) -> dict[str, Any] | None:
    """One method on one task with one seed: the record that `sweep` writes, with every item's score (None where
    the method does not apply: prompting without an instruction, few-shot without training items, steering
    without contrasts). A trained method comes in `trained` (`Trainings`: the method and its training's record).
    A fitted method is saved in `adapter_dir` where given."""
    max_new_tokens = config.max_new_tokens or task.max_new_tokens
    batch = config.generate_batch_size
    record: dict[str, Any] = {"task": task.name, "family": task.family, "method": spec.name, "kind": spec.kind, "seed": seed}
    method: Adapter | None = None
    system = config.system
    if spec.name == "prompting":
        if task.instruction is None:
            return None
        system = task.instruction
    if spec.name == "fewshot":
        system = fewshot_system(data.train, config.fewshot_shots, config.system)
        if system is None:
            return None
    if spec.kind == "steering":
        if not any(item.contrast is not None for item in data.train):
            return None
        layers = sorted({min(round(f * model.cfg.n_layers), model.cfg.n_layers - 1) for f in config.steering_layers})
        method, losses = fit_steering(model, data.train, data.valid, layers, config.steering_multipliers, system, STEERING_REACH)
        record.update(params=0, steering={**asdict(method.config), "valid_loss": losses})
    elif spec.kind == "trained":
        method, training = trained
        if spec.tokens == "random":
            randomise_tokens(method, seed)
        record.update(params=method.num_parameters(), **training)
    else:
        record.update(params=0)
    if method is not None and adapter_dir is not None:
        method.save(adapter_dir, suite={"task": task.name, "method": spec.name, "seed": seed})
        record["adapter"] = adapter_dir.name
    started = time.perf_counter()
    scores, outputs = evaluate(model, fingerprint, task, data.eval, method, system, max_new_tokens, batch, spec.gate_scale)
    if task.family in ("form", "knowledge"):
        for split, items in data.eval.items():
            scores[split].update(knowledge_scores(model, method, items, system, task.raw_prompts, spec.gate_scale))
    metrics = shares(scores)
    record.update(eval_s=time.perf_counter() - started, metrics=metrics, scores=scores, n={s: len(i) for s, i in data.eval.items()})
    record["outputs"] = outputs
    return record


def shares(scores: dict[str, dict[str, list]]) -> dict[str, dict[str, float]]:
    """{split: {metric: mean over the items}} of `evaluate`'s item scores."""
    return {split: {metric: sum(values) / len(values) for metric, values in by_metric.items()} for split, by_metric in scores.items()}


def evaluate(
    model: nn.Module,
    fingerprint: str,
    task: Task,
    splits: dict[str, list[Item]],
    method: Adapter | None,
    system: str | None,
    max_new_tokens: int,
    batch_size: int = 16,
    gate_scale: float = 1.0,
) -> tuple[dict[str, dict[str, list]], dict[str, list[dict[str, str]]]]:
    """Each split answered greedily with `method` (None: the base model, whose answers are cached; an aligner's
    gates times `gate_scale`) and scored item by item:
    ({split: {metric: [score per item]}}, {split: [{"prompt", "answer"}]})."""
    scores, outputs = {}, {}
    for split, items in splits.items():
        prompts = [item.prompt for item in items]
        if method is None:
            answers = cached_answers(model, fingerprint, prompts, system, max_new_tokens, batch_size, task.raw_prompts)
        else:
            answers = answer(model, method, prompts, system, max_new_tokens, batch_size, gate_scale, task.raw_prompts)
        scores[split] = score(task, items, answers)
        outputs[split] = [{"prompt": p, "answer": a} for p, a in zip(prompts, answers)]
    return scores, outputs


# ---- the sweep ----


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
    trainings = Trainings(model, config)
    cells = [(seed, task, spec) for seed in config.seeds for task in tasks for spec in specs]
    ran = 0
    for seed, task, spec in tqdm(cells, desc="sweep", unit="cell"):
        if spec.kind != "trained" and seed != config.seeds[0]:
            continue  # deterministic: once is enough
        if task.name not in datas:
            datas[task.name] = suite_task_data(model, fingerprint, task, config, audits)
        key = {**config.cell_key(), "data_sha256": data_sha256(datas[task.name])}  # other items: another cell
        path = cell_path(out, config.model, task.name, spec.name, seed)
        done = read_json(path) if path.is_file() else {}
        if done.get("config") != json.loads(json.dumps(key)):
            done = {}
        if done and spec.kind != "trained":
            continue
        trained = None
        if spec.kind == "trained":
            data = training_data(model, fingerprint, task, datas[task.name], spec, config)
            # The search reads the training and validation items alone: other evaluation splits keep its rate.
            searched = {**config.cell_key(), "data_sha256": data_sha256(replace(data, eval={}))}

            def rate(spec: MethodSpec, key: dict[str, Any]) -> float:
                lr_path = cell_path(out, config.model, task.name, training_name(spec), seed).with_name("lr.json")
                return choose_lr(spec, config, lr_path, lambda lr: trainings(task, data, spec, config.seeds[0], lr)[1], key)

            if spec.then is not None:  # the first stage's rate, from its own search, before the second stage's
                spec = replace(spec, first_lr=rate(spec.first_stage(), searched))
                searched = {**searched, "first_lr": spec.first_lr}
            lr = rate(spec, searched)
            if done and done.get("lr") == lr:  # trained at the rate its search chose: a search gone on has another
                continue
            trained = trainings(task, data, spec, seed, lr)
        # The first seed's method is kept beside its cell (OUT/cells/.../seedS/), for the analyses that read an
        # adapter (probe report, the app); the other seeds' results are their records alone.
        adapter_dir = path.with_suffix("") if seed == config.seeds[0] else None
        record = run_cell(model, fingerprint, task, datas[task.name], spec, seed, config, trained, adapter_dir)
        if record is not None:
            atomic_write_json(path, {**record, "config": key, "provenance": provenance()})
            ran += 1
    for name, result in audits.items():
        shots = f"-{config.audit_shots}shot" if config.audit_shots else ""
        write_audit(result, KNOWLEDGE_SETS[name], out / "audits" / f"{model_folder(config.model)}-{name}{shots}.csv")
    rows = summarise(out, config.reference, config.margin)
    entry = {
        "config": {
            **config.cell_key(),
            "tasks": config.tasks,
            "methods": config.methods,
            "seeds": config.seeds,
            "reference": config.reference,
            "margin": config.margin,
        },
        "cells_run": ran,
        "wall_s": time.perf_counter() - started,
        "threads": torch.get_num_threads(),
        "base_fingerprint": fingerprint,
        "provenance": provenance(),
    }
    with open(out / "sweep_log.jsonl", "a", encoding="utf-8") as f:  # one line per invocation: what ran, how long
        f.write(json.dumps(entry) + "\n")
    return rows


def suite_task_data(
    model: nn.Module, fingerprint: str, task: Task, config: SuiteConfig, audits: dict[str, Audit]
) -> TaskData:
    """The splits of `task` as the sweep cuts them (`aligner.audit.task_data` with the sweep's settings)."""
    return task_data(
        model,
        task,
        config.sizes,
        config.known_only,
        config.system,
        config.generate_batch_size,
        config.audit_shots,
        fingerprint,
        audits,
    )


def data_sha256(data: TaskData) -> str:
    """A digest of a task's items as the sweep cut them: a cell of other items is not the same cell."""
    splits = {"train": data.train, "valid": data.valid, **{f"eval:{name}": items for name, items in data.eval.items()}}
    # An item's rejected response where it has one, so that the digest of items without one reads only their fields.
    rows = {
        name: [[i.prompt, i.response, list(i.answers), i.contrast] + ([i.rejected] if i.rejected is not None else []) for i in items]
        for name, items in splits.items()
    }
    return hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()


def cell_path(out: Path, model: str, task: str, method: str, seed: int) -> Path:
    """OUT/cells/MODEL/TASK/METHOD/seedS.json: the results of several base models side by side in one folder."""
    return out / "cells" / model_folder(model) / task / method.replace(":", "+") / f"seed{seed}.json"  # no ":" on Windows
