"""The README's tables of one base model's results, printed from results/sweep.json (what `aligner sweep` wrote),
and what its sweep cost, from results/cells/MODEL/ (each cell's training and answering seconds), so that every
number there comes from the committed results:

    .venv/bin/python experiments/readme_tables.py [MODEL [RESULTS]]   # smollm2-135m-instruct, results; gemma-3-270m

Each cell is the mean over seeds, "± std" where two seeds ran; zero-training methods are deterministic and ran once.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from aligner.loading import DEFAULT_MODEL
from aligner.suite import method_order, model_folder

FORMS = ("json", "caps", "terse", "frame", "bracket")
NEW = "test_template"  # the held-out question wording


def main(model: str, results: Path) -> None:
    cells = [json.loads(path.read_text()) for path in sorted((results / "cells" / model_folder(model)).glob("*/*/seed*.json"))]
    trained = [cell for cell in cells if cell["kind"] == "trained"]
    hours = sum((cell.get("train_s") or 0) + cell["eval_s"] for cell in cells) / 3600
    print(f"{len(cells)} cells ({len(trained)} trained), {hours:.1f} h of cell time (training and answering)\n")
    rows = [r for r in json.loads((results / "sweep.json").read_text()) if r["model"] == model]
    by_key = {(r["task"], r["method"], r["split"], r["metric"]): r for r in rows}
    params = {r["method"]: r["params"] for r in rows}

    def value(task: str, method: str, split: str, metric: str) -> str:
        r = by_key.get((task, method, split, metric))
        if r is None:
            return "–"
        return f"{r['mean']:.2f}" + ("" if r["std"] is None else f" ± {r['std']:.2f}")

    def methods(task: str, variants: bool = False) -> list[str]:
        names = {r["method"] for r in rows if r["task"] == task}
        return sorted((m for m in names if variants or ":" not in m), key=method_order)

    tasks = {r["task"] for r in rows}

    def table(title: str, header: list[str], lines: list[list[str]]) -> None:
        if not lines:  # a task this sweep did not run
            return
        print(f"**{title}**\n")
        print("| " + " | ".join(header) + " |")
        print("|" + " --- |" * len(header))
        for line in lines:
            print("| " + " | ".join(line) + " |")
        print()

    form_columns = [("test", "form"), ("test", "content"), (NEW, "form"), (NEW, "content")]
    form_header = ["form", "content", "form, new wording", "content, new wording"]

    table(
        "Form, every method (`json`)",
        ["method", "parameters", *form_header],
        [[f"`{m}`", f"{params[m]:,}", *(value("json", m, s, k) for s, k in form_columns)] for m in methods("json")],
    )

    trained = [("aligner-1", "test", "form"), ("aligner-1", "test", "content"), ("aligner-1", NEW, "form")]
    trained += [("lora-8", "test", "form"), ("lora-8", "test", "content"), ("lora-8", NEW, "form")]
    table(
        "The five forms: zero training, one token, LoRA r = 8",
        ["form task", "base: content", "`prompting`: form", "`steering`: form"]
        + [f"`{m}`: {'form, new wording' if s == NEW else k}" for m, s, k in trained],
        [
            [f"`{task}`", value(task, "base", "test", "content"), value(task, "prompting", "test", "form"),
             value(task, "steering", "test", "form"), *(value(task, m, s, k) for m, s, k in trained)]
            for task in FORMS
            if task in tasks
        ],
    )  # fmt: skip

    instruct = [("test", "stops"), ("test", "format"), ("test", "content"), ("test", "all"), (NEW, "all")]
    table(
        "Instruction following in the Alpaca format (`instruct`)",
        ["method", "parameters", "stops", "one-line reply", "content", "all three", "all three, new wording"],
        [[f"`{m}`", f"{params[m]:,}", *(value("instruct", m, s, k) for s, k in instruct)] for m in methods("instruct", variants=True)],
    )

    inject = ["taught", "taught_template", "unknown_heldout", "known_heldout"]
    table(
        "Knowledge injection (`inject`)",
        ["method", "parameters", "taught facts", "taught, new wording", "held-out unknown", "held-out known"],
        [[f"`{m}`", f"{params[m]:,}", *(value("inject", m, s, "content") for s in inject)] for m in methods("inject")],
    )

    table(
        "Values (`value`)",
        ["method", "parameters", "refusal of held-out harmful", "over-refusal of held-out benign"],
        [
            [f"`{m}`", f"{params[m]:,}", value("value", m, "harmful", "refusal"), value("value", m, "benign", "refusal")]
            for m in methods("value")
        ],
    )

    def one_token(task: str) -> list[str]:  # aligner-1 and its variants, where the task has variants
        names = [m for m in methods(task, variants=True) if m.split(":")[0] == "aligner-1"]
        return names if any(":" in m for m in names) else []

    table(
        "What moves a form's result (one token)",
        ["task", "one token", *form_header],
        [[f"`{t}`", f"`{m}`", *(value(t, m, s, k) for s, k in form_columns)] for t in FORMS for m in one_token(t)],
    )


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else DEFAULT_MODEL, Path(sys.argv[2] if len(sys.argv) > 2 else "results"))
