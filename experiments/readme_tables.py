"""The documentation's tables of results, as Markdown, rendered from the committed results: results/sweep.json
(what `aligner sweep` wrote) and the cells under results/cells/MODEL/ (provenance and cost). Nothing here runs a
model: the pages hold these tables as generated blocks, and docs/check.py fails when a page and this output
disagree.

    .venv/bin/python -m experiments.readme_tables TABLE [--model MODEL] [--results DIR]

TABLE is one of: provenance, rates, json, forms, instruct, inject, value, variants, questions, equal-size (one base
model's, --model), verdicts (both models), or all (every table of --model, each with a title). A cell is the mean with its 95%
interval over items and seeds where the cells kept per-item scores, else "± std" (sample std over seeds, as the
first grid recorded); zero-training methods are deterministic and ran once; "–": not run.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from aligner.loading import DEFAULT_MODEL
from aligner.suite import RATE_REACH
from aligner.tables import method_order, model_folder

FORMS = ("json", "caps", "terse", "frame", "bracket")
NEW = "test_template"  # the held-out question wording
WIDTH = 120  # the pages' line length, for the lines of prose printed here
MODELS = {"smollm2-135m-instruct": "SmolLM2-135M-Instruct", "gemma-3-270m": "Gemma-3-270M"}  # the verdicts table's columns

FORM_COLUMNS = [("test", "form"), ("test", "content"), (NEW, "form"), (NEW, "content")]
FORM_HEADER = ["form", "content", "form, new wording", "content, new wording"]


class Results:
    """One base model's summary rows (results/sweep.json) and cells (results/cells/MODEL/)."""

    def __init__(self, model: str, results: Path) -> None:
        self.model, self.results = model, results
        self.rows = [r for r in json.loads((results / "sweep.json").read_text()) if r["model"] == model]
        self.by_key = {(r["task"], r["method"], r["split"], r["metric"]): r for r in self.rows}
        self.params = {r["method"]: r["params"] for r in self.rows}
        self.tasks = {r["task"] for r in self.rows}
        folder = results / "cells" / model_folder(model)
        self.cells = [json.loads(path.read_text()) for path in sorted(folder.glob("*/*/seed*.json"))]
        self.searches = {(path.parts[-3], path.parts[-2].replace("+", ":")): json.loads(path.read_text()) for path in sorted(folder.glob("*/*/lr.json"))}
        paired = results / "sweep_paired.csv"
        with open(paired, newline="", encoding="utf-8") if paired.is_file() else contextlib.nullcontext([]) as f:
            self.paired = {(r["task"], r["method"], r["split"], r["metric"]): r for r in csv.DictReader(f) if r["model"] == model}

    def difference(self, task: str, method: str, split: str, metric: str) -> tuple[str, str]:
        """`method` minus the sweep's reference (lora-8, trained alike: `aligner.tables.reference_for`) on the same
        items and seeds: "mean [95% interval]", and the verdict against the margin fixed before the run; "–" where
        not run."""
        r = self.paired.get((task, method, split, metric))
        if r is None:
            return "–", "–"
        return f"{float(r['difference']):+.2f} [{float(r['ci_low']):+.2f}, {float(r['ci_high']):+.2f}]", r["verdict"]

    def value(self, task: str, method: str, split: str, metric: str) -> str:
        r = self.by_key.get((task, method, split, metric))
        if r is None:
            return "–"
        if r.get("ci_low") is not None:  # the sweep's 95% interval over items and seeds
            return f"{r['mean']:.2f} [{r['ci_low']:.2f}, {r['ci_high']:.2f}]"
        return f"{r['mean']:.2f}" + ("" if r.get("std") is None else f" ± {r['std']:.2f}")

    def methods(self, task: str, variants: bool = False) -> list[str]:
        names = {r["method"] for r in self.rows if r["task"] == task}
        return sorted((m for m in names if variants or ":" not in m), key=method_order)


def table(header: list[str], lines: list[list[str]]) -> list[str]:
    """A Markdown table; no lines: nothing (a task the sweep did not run)."""
    if not lines:
        return []
    rows = [header, *lines]
    return ["| " + " | ".join(rows[0]) + " |", "|" + " --- |" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows[1:]]


def provenance(res: Results) -> list[str]:
    """What produced one model's tables, once: the cells, their command's commits, budget, items and seeds."""
    cells = res.cells
    trained = [c for c in cells if c["kind"] == "trained"]
    commits = sorted({c["provenance"]["git_commit"][:7] for c in cells})
    torches = sorted({c["provenance"]["versions"]["torch"] for c in cells})
    budgets = sorted({c["config"]["steps"] for c in trained} | {c["steps"] for c in trained if ":steps=" in c["method"]})
    items = sorted({n for c in cells for n in c["n"].values()})
    seeds = sorted({c["seed"] for c in trained})
    hours = sum((c.get("train_s") or 0) + c["eval_s"] for c in cells) / 3600
    rates: dict[str, set[float]] = {}  # each family's learning rate, variants that set their own left out
    for c in trained:
        if ":lr=" not in c["method"]:
            rates.setdefault(c["method"].split(":")[0].partition("-")[0], set()).add(c["lr"])
    families = sorted(rates, key=method_order)
    lrs = ", ".join(f"{family} {'/'.join(f'{lr:g}' for lr in sorted(rates[family]))}" for family in families)
    return textwrap.wrap(
        f"{len(cells)} cells ({len(trained)} trained) in `{res.results.as_posix()}/cells/{model_folder(res.model)}/`, written by "
        f"`aligner sweep` at commit {', '.join(commits)} (torch {', '.join(torches)}); step budgets "
        f"{', '.join(map(str, budgets))}; {', '.join(map(str, items))} held-out items per split; training seeds "
        f"{', '.join(map(str, seeds))}; learning rates {lrs}; {hours:.1f} h of cell time (training and answering).",
        WIDTH,
    )


def rates_table(res: Results) -> list[str]:
    """Each rate search: every rate tried with its best held-out loss and step, the rate chosen, and whether it lies
    at an end of the rates tried (where a rate beyond them might have done better)."""
    lines = []
    for (task, method), search in sorted(res.searches.items(), key=lambda item: (item[0][0], method_order(item[0][1]))):
        candidates = search["candidates"]
        tried = "; ".join(f"{c['lr']:.2g}: {c['valid_loss']:.3f} (step {c['best_step']} of {c['steps']})" for c in candidates)
        rates = sorted(c["lr"] for c in candidates)
        chosen = search["lr"]
        if chosen is None:
            grid = len(search["config"]["lr_factors"])
            where = f"searching ({len(candidates)} tried of {grid} to {grid + RATE_REACH})"
        else:
            where = "lowest tried" if chosen == rates[0] else "highest tried" if chosen == rates[-1] else "inside"
        lines.append([f"`{task}`", f"`{method}`", tried, "–" if chosen is None else f"{chosen:.2g}", where])
    return table(["task", "method", "rate: best held-out loss (its step of the steps run)", "chosen", "where"], lines)


def json_table(res: Results) -> list[str]:
    """Every method on the JSON form."""
    return table(
        ["method", "parameters", *FORM_HEADER],
        [[f"`{m}`", f"{res.params[m]:,}", *(res.value("json", m, s, k) for s, k in FORM_COLUMNS)] for m in res.methods("json")],
    )


def forms_table(res: Results) -> list[str]:
    """Each form task: zero training, the one token and LoRA r = 8."""
    lines = []
    for task in (t for t in FORMS if t in res.tasks):
        for m in ("base", "prompting", "steering", "aligner-1", "lora-8"):
            if m in res.methods(task):
                lines.append([f"`{task}`", f"`{m}`", *(res.value(task, m, s, k) for s, k in FORM_COLUMNS)])
    return table(["form task", "method", *FORM_HEADER], lines)


def instruct_table(res: Results) -> list[str]:
    """Instruction following in the Alpaca format."""
    columns = [("test", "stops"), ("test", "format"), ("test", "content"), ("test", "all"), (NEW, "all")]
    return table(
        ["method", "parameters", "stops", "one-line reply", "content", "all three", "all three, new wording"],
        [[f"`{m}`", f"{res.params[m]:,}", *(res.value("instruct", m, s, k) for s, k in columns)] for m in res.methods("instruct", variants=True)],
    )


def inject_table(res: Results) -> list[str]:
    """Knowledge injection: taught facts, and held-out unknown and known ones."""
    splits = ["taught", "taught_template", "unknown_heldout", "known_heldout"]
    return table(
        ["method", "parameters", "taught facts", "taught, new wording", "held-out unknown", "held-out known"],
        [[f"`{m}`", f"{res.params[m]:,}", *(res.value("inject", m, s, "content") for s in splits)] for m in res.methods("inject")],
    )


def value_table(res: Results) -> list[str]:
    """Refusal of held-out harmful prompts and over-refusal of held-out benign ones."""
    return table(
        ["method", "parameters", "refusal of held-out harmful", "over-refusal of held-out benign"],
        [
            [f"`{m}`", f"{res.params[m]:,}", res.value("value", m, "harmful", "refusal"), res.value("value", m, "benign", "refusal")]
            for m in res.methods("value")
        ],
    )


def variants_table(res: Results) -> list[str]:
    """The one token and its variants (learning rate, steps, data, gate scale), on the form tasks that have them."""

    def one_token(task: str) -> list[str]:
        names = [m for m in res.methods(task, variants=True) if m.split(":")[0] == "aligner-1"]
        return names if any(":" in m for m in names) else []

    return table(
        ["task", "one token", *FORM_HEADER],
        [[f"`{t}`", f"`{m}`", *(res.value(t, m, s, k) for s, k in FORM_COLUMNS)] for t in FORMS for m in one_token(t)],
    )


# The questions of the results pages, each a measure (task, split, metric) on which the one-token aligner and
# LoRA r = 8 are compared, trained alike (`options`: ":then=dpo", SFT then DPO); their controls beside them.
# `headline`: the measure the README's verdicts give for its question, one per question.
@dataclass(frozen=True)
class Question:
    question: str
    task: str
    split: str
    metric: str
    options: str = ""
    headline: bool = False


QUESTIONS = [
    Question("form, trained wording", "json", "test", "form", headline=True),
    Question("form, trained wording", "frame", "test", "form"),
    *(Question("form, trained wording", form, "test", "form") for form in ("caps", "terse", "bracket")),
    Question("form, new wording", "json", "test_template", "form", headline=True),
    Question("form, new wording", "json", "test_template2", "form"),
    Question("form, new wording", "frame", "test_template", "form"),
    Question("form, new wording", "frame", "test_template2", "form"),
    Question("form, question kind never trained", "json", "test_elements", "form", headline=True),
    Question("form, question kind never trained", "json", "test_cities", "form"),
    Question("form, question kind never trained", "frame", "test_elements", "form"),
    Question("form, question kind never trained", "frame", "test_cities", "form"),
    Question("knowledge kept: answered right in the form", "json", "test", "content", headline=True),
    Question("knowledge kept: answered right in the form", "frame", "test", "content"),
    Question("knowledge kept: gold answer top-1 in the form's frame", "json", "test", "answer_rank1", headline=True),
    Question("knowledge kept: gold answer top-1 in the form's frame", "frame", "test", "answer_rank1"),
    Question("knowledge kept, kind never trained", "json", "test_elements", "content"),
    Question("knowledge kept, kind never trained", "frame", "test_elements", "content"),
    Question("instruction following: all three", "instruct", "test", "all", headline=True),
    Question("injection: taught facts", "inject", "taught", "content", headline=True),
    Question("injection: held-out invented facts (chance: 0)", "inject", "unknown_heldout", "content"),
    Question("injection: held-out known facts (collateral)", "inject", "known_heldout", "content", headline=True),
    Question("values: refuses harmful", "value", "harmful", "refusal", headline=True),
    Question("values: refuses benign (over-refusal)", "value", "benign", "refusal", headline=True),
    Question("values, SFT then DPO: refuses harmful", "value", "harmful", "refusal", ":then=dpo", headline=True),
    Question("values, SFT then DPO: refuses benign (over-refusal)", "value", "benign", "refusal", ":then=dpo"),
]
CONTROLS = ("base", "aligner-1:tokens=random", "aligner-1:data=own")


def questions_table(res: Results, method: str = "aligner-1", reference: str = "lora-8") -> list[str]:
    """Per question: `method` and `reference` with their intervals, the paired difference with its interval and
    verdict against the margin, and the controls (base, random token, own answers); only measures the sweep ran."""
    lines = []
    for q in QUESTIONS:
        mine, theirs = method + q.options, reference + q.options
        if (q.task, mine, q.split, q.metric) not in res.by_key and (q.task, theirs, q.split, q.metric) not in res.by_key:
            continue
        difference, verdict = res.difference(q.task, mine, q.split, q.metric)
        controls = [res.value(q.task, c, q.split, q.metric) for c in CONTROLS]
        lines.append([q.question, f"`{q.task}` {q.split} {q.metric}", res.value(q.task, mine, q.split, q.metric),
                      res.value(q.task, theirs, q.split, q.metric), difference, verdict, *controls])  # fmt: skip
    header = ["question", "measure", f"`{method}`", f"`{reference}`", f"`{method}` − `{reference}`", "verdict",
              *(f"`{c}`" for c in CONTROLS)]  # fmt: skip
    return table(header, lines)


def equal_size_table(res: Results) -> list[str]:
    """Injection at equal size: the shared aligner as large as LLaMA-Adapter with one token per layer, beside it,
    each against LoRA r = 8."""
    lines = []
    for split in ("taught", "unknown_heldout", "known_heldout"):
        for m in ("aligner-1", "aligner-10", "aligner-28", "adapter-1", "zbias"):
            if ("inject", m, split, "content") in res.by_key:
                difference, verdict = res.difference("inject", m, split, "content")
                lines.append([split, f"`{m}`", f"{res.params[m]:,}", res.value("inject", m, split, "content"), difference, verdict])
    return table(["split", "method", "parameters", "content", "− `lora-8`", "verdict"], lines)


def verdicts(results: Path, models: dict[str, str] = MODELS) -> list[str]:
    """Per question, each base model's paired difference aligner-1 − lora-8 (trained alike) with its interval and
    verdict against the margin; "–" where not run."""
    by_model = {name: Results(model, results) for model, name in models.items()}
    lines = []
    for q in (q for q in QUESTIONS if q.headline):
        cells = [" ".join(res.difference(q.task, "aligner-1" + q.options, q.split, q.metric)) for res in by_model.values()]
        if any(cell != "– –" for cell in cells):
            lines.append([q.question, f"`{q.task}` {q.split} {q.metric}", *(("–" if c == "– –" else c) for c in cells)])
    return table(["question", "measure", *(f"{name}: `aligner-1` − `lora-8`" for name in by_model)], lines)


TABLES: dict[str, tuple[str, Callable[[Results], list[str]]]] = {
    "provenance": ("What produced these tables", provenance),
    "rates": ("The rate searches (on validation)", rates_table),
    "json": ("Form, every method (`json`)", json_table),
    "forms": ("The forms: zero training, one token, LoRA r = 8", forms_table),
    "instruct": ("Instruction following in the Alpaca format (`instruct`)", instruct_table),
    "inject": ("Knowledge injection (`inject`)", inject_table),
    "value": ("Values (`value`)", value_table),
    "variants": ("What moves a form's result (one token)", variants_table),
    "questions": ("The questions: one token against LoRA r = 8, with the controls", questions_table),
    "equal-size": ("Injection at equal size", equal_size_table),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("table", choices=[*TABLES, "verdicts", "all"])
    parser.add_argument("--model", default=DEFAULT_MODEL, help="base model of the one-model tables")
    parser.add_argument("--results", type=Path, default=Path("results"), help="the results directory")
    args = parser.parse_args()
    if args.table == "verdicts":
        lines = verdicts(args.results)
    elif args.table == "all":
        res = Results(args.model, args.results)
        lines = []
        for title, render in TABLES.values():
            body = render(res)
            lines += [f"**{title}**", "", *body, ""] if body else []
    else:
        lines = TABLES[args.table][1](Results(args.model, args.results))
    print("\n".join(lines).rstrip("\n"))


if __name__ == "__main__":
    main()
