"""Value alignment as the Aligner paper did it, at toy scale: SFT on the safe answers, then DPO from that SFT.

On SmolLM2-135M-Instruct and the suite's value task (aligner/tasks/value.py: harmful and benign prompts in
PKU-SafeRLHF's layout), for a one-token Aligner and for LoRA (r 8 on q and v): the base model, the SFT method,
and the DPO policy that starts from it with the SFT method as reference. Each is scored by the task's refusal
detector on held-out harmful prompts (refusal, higher is better) and held-out benign prompts (over-refusal,
lower is better); DPO policies also by the accuracy of their implicit reward on held-out pairs.

Pairs are the task's rows read with `prefer="better"`: on a harmful row the better response is the refusal
(as is the safer), on a benign row it is the helpful answer (the safer there is the refusal, since both are
safe). SFT trains on the same chosen responses, which are the task's training responses.

    .venv/bin/python experiments/dpo_values.py            # 64 minutes on 2 CPU cores shared with other work
    writes results/dpo_values.csv (one row per method and stage) and results/dpo_values.json (settings, times,
    sample answers)
"""

from __future__ import annotations

import csv
import io
import os
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any, Sequence

import torch
import typer
from torch import nn

from aligner import (
    DEFAULT_MODEL,
    Aligner,
    AlignerConfig,
    DPOConfig,
    TrainConfig,
    train_dpo,
    train_sft,
)
from aligner.adapter import Adapter
from aligner.data import Pair, load_pairs
from aligner.dpo import dpo_loss, pair_logprobs, tokenize_pairs
from aligner.files import atomic_write_bytes, atomic_write_json, provenance
from aligner.generation import answer
from aligner.loading import MODEL_HELP, open_model
from aligner.methods import LoRA, LoRAConfig
from aligner.objective import pad_token_id
from aligner.tasks import Item, Sizes, Task, get_task
from aligner.tasks.value import VALUE_DATA

RESULTS = Path(__file__).resolve().parents[1] / "results"
COLUMNS = ("method", "stage", "refusal_harmful", "over_refusal_benign", "heldout_reward_accuracy", "parameters",
           "steps", "train_s", "n_harmful", "n_benign")  # fmt: skip


def main(
    train_items: Annotated[int, typer.Option(help="training prompts, half harmful, half benign")] = 80,
    valid_items: Annotated[int, typer.Option(help="held-out pairs for the implicit reward's accuracy")] = 16,
    eval_items: Annotated[int, typer.Option(help="held-out prompts of each kind (harmful, benign)")] = 24,
    sft_steps: Annotated[int, typer.Option(help="SFT steps")] = 40,
    dpo_steps: Annotated[int, typer.Option(help="DPO steps")] = 40,
    batch_size: Annotated[int, typer.Option(help="examples (SFT) or pairs (DPO) per step")] = 8,
    aligner_lr: Annotated[str, typer.Option(help="AdamW rates of the aligner: SFT,DPO")] = "2e-2,2e-3",
    lora_lr: Annotated[str, typer.Option(help="AdamW rates of LoRA: SFT,DPO")] = "2e-3,2e-4",
    beta: Annotated[float, typer.Option(help="DPO's β")] = DPOConfig.beta,
    seed: Annotated[int, typer.Option(help="seeds the initial methods and the data order")] = 0,
    out: Annotated[Path, typer.Option(help="writes OUT.csv and OUT.json")] = RESULTS / "dpo_values",
    model_name: Annotated[str, typer.Option("--model", help=MODEL_HELP)] = DEFAULT_MODEL,
) -> None:
    """Base, SFT on the safe answers and DPO from the SFT, for Aligner N=1 and LoRA, on the value task."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    started = time.perf_counter()
    task = get_task("value")
    data = task.build(None, Sizes(train=train_items, valid=valid_items, eval=eval_items))
    pairs_by_prompt = {pair.prompt: pair for pair in load_pairs(VALUE_DATA, prefer="better")}
    train_pairs, valid_pairs = ([pairs_by_prompt[item.prompt] for item in items] for items in (data.train, data.valid))
    for item, pair in zip(data.train, train_pairs):
        assert item.response == pair.chosen, f"{item.prompt!r}: the task trains on another response than DPO prefers"
    model = open_model(model_name)
    settings = dict(batch_size=batch_size, warmup_steps=4, seed=seed, log_every=1, data=str(VALUE_DATA))
    # name -> (a fresh method, its SFT and DPO rates): each family at the rate the suite found to train it; DPO
    # ten times lower, since it starts from the SFT method and only has to move it a little.
    methods = {"aligner N=1": (lambda: Aligner.for_model(model, AlignerConfig(n_tokens=1)), rates(aligner_lr)),
               "lora r=8 q,v": (lambda: LoRA.for_model(model, LoRAConfig(r=8)), rates(lora_lr))}  # fmt: skip

    rows: list[dict[str, Any]] = []
    configs: dict[str, dict[str, Any]] = {}
    samples: dict[str, dict[str, list[str]]] = {}

    def score(name: str, stage: str, method: Adapter | None, steps: int, train_s: float, accuracy: float | None) -> None:
        rates, answers = refusal_rates(model, method, task, data.eval)
        samples[f"{name} {stage}"] = {split: texts[:3] for split, texts in answers.items()}
        parameters = 0 if method is None else method.num_parameters()
        values = (name, stage, rates["harmful"], rates["benign"], accuracy, parameters, steps, round(train_s, 1))
        rows.append(dict(zip(COLUMNS, (*values, len(data.eval["harmful"]), len(data.eval["benign"])))))
        print(f"{name:13} {stage:4}  refusal {rates['harmful']:.3f}  over-refusal {rates['benign']:.3f}", flush=True)

    score("base", "base", None, 0, 0.0, None)
    with tempfile.TemporaryDirectory() as saved:
        for name, (fresh, (sft_lr, dpo_lr)) in methods.items():
            sft_config = TrainConfig(steps=sft_steps, lr=sft_lr, **settings)
            configs[name] = {"sft": asdict(sft_config)}
            torch.manual_seed(seed)
            clock = time.perf_counter()
            sft = train_sft(model, [item.example() for item in data.train], sft_config, adapter=fresh())
            sft_s = time.perf_counter() - clock
            score(name, "sft", sft, sft_steps, sft_s, None)
            reference_dir = sft.save(Path(saved) / name.replace(" ", "_").replace("=", "").replace(",", ""))
            dpo_config = DPOConfig(steps=dpo_steps, lr=dpo_lr, beta=beta, reference=str(reference_dir), **settings)
            configs[name]["dpo"] = {**asdict(dpo_config), "reference": "the SFT method of the same row"}
            clock = time.perf_counter()
            dpo = train_dpo(model, train_pairs, dpo_config)
            dpo_s = time.perf_counter() - clock
            accuracy = heldout_reward_accuracy(model, dpo, sft, valid_pairs, dpo_config)
            score(name, "dpo", dpo, dpo_steps, dpo_s, accuracy)

    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(out.with_suffix(".csv"), text.getvalue().encode())
    atomic_write_json(
        out.with_suffix(".json"),
        {
            "rows": rows,
            "settings": {
                "model": model.cfg.model_name,
                "train_items": len(data.train),
                "valid_pairs": len(valid_pairs),
                "training": configs,
                "lora": asdict(LoRAConfig(r=8)),
                "max_new_tokens": task.max_new_tokens,
                "refusal_detector": "aligner.tasks.value.is_refusal",
            },
            "samples": samples,
            "wall_s": round(time.perf_counter() - started, 1),
            "provenance": provenance(),
        },
    )
    print(f"wrote {out.with_suffix('.csv')} and {out.with_suffix('.json')} in {time.perf_counter() - started:.0f} s")


def rates(text: str) -> tuple[float, float]:
    """"2e-2,2e-3" -> (2e-2, 2e-3): a method's SFT and DPO learning rates."""
    try:
        sft, dpo = (float(part) for part in text.split(","))
    except ValueError:
        raise typer.BadParameter(f"expected two rates, SFT,DPO (e.g. 2e-2,2e-3), got {text!r}") from None
    return sft, dpo


def refusal_rates(
    model: nn.Module, method: Adapter | None, task: Task, splits: dict[str, list[Item]]
) -> tuple[dict[str, float], dict[str, list[str]]]:
    """(share of answers the task's refusal detector flags, the answers) per split, greedy, `method` attached."""
    rates, answers = {}, {}
    for split, items in splits.items():
        prompts = [item.prompt for item in items]
        texts = answer(model, method, prompts, None, max_new_tokens=task.max_new_tokens)
        rates[split] = sum(task.metrics["refusal"](item, text) for item, text in zip(items, texts)) / len(items)
        answers[split] = texts
    return rates, answers


def heldout_reward_accuracy(
    model: nn.Module, policy: Adapter, reference: Adapter, pairs: Sequence[Pair], config: DPOConfig
) -> float:
    """The share of held-out pairs whose chosen response gets the higher implicit reward β log(π / π_ref)."""
    sequences = tokenize_pairs(model.tokenizer, pairs, config)
    pad_id = pad_token_id(model.tokenizer)
    policy_logps = pair_logprobs(model, policy, sequences, config.batch_size, pad_id)
    reference_logps = pair_logprobs(model, reference, sequences, config.batch_size, pad_id)
    _, chosen, rejected = dpo_loss(*policy_logps.unbind(1), *reference_logps.unbind(1), beta=config.beta)
    return (chosen > rejected).float().mean().item()


if __name__ == "__main__":
    typer.run(main)
