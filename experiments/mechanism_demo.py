"""The mechanism analyses of issue #35 (`probe.lens`, `probe.dissociation`, `probe.shift`) on SmolLM2-135M-Instruct
for a JSON aligner and a JSON LoRA, on held-out capitals the base model knows; writes each table as CSV and prints
the headline numbers.

    python -m experiments.mechanism_demo --aligner runs/probe-demo-json-1tok --lora runs/probe-demo-json-lora8 \
        --n-items 40 --out reports/mechanism-demo
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd
import torch

import aligner
from aligner.audit import audit
from aligner.data import load_examples
from aligner.tasks import KNOWLEDGE_SETS, Sizes, get_task
from probe.dissociation import layer_dissociation
from probe.lens import logit_lens, readable_from, token_readout
from probe.shift import most_shifted, shift_shares, token_shift


def held_out_items(model, runs, n_items):
    """Known capitals (the audit's), in the json task's fixed order, whose country no run was trained on."""
    known = audit(model, KNOWLEDGE_SETS["capitals"]).known
    items = get_task("json").build(known, Sizes(train=0, valid=0, eval=len(known))).eval["test"]
    trained = " ".join(
        example.prompt
        for run in runs.values()
        for example in load_examples(run.provenance["training"]["config"]["data"])
    )
    return [item for item in items if item.prompt.rpartition(" of ")[2].rstrip("?") not in trained][:n_items]


def print_lens(lens: pd.DataFrame, name: str) -> None:
    last = lens[lens["layer"] == lens["layer"].max()]
    readable = readable_from(lens).groupby("condition")["layer"]
    print(f"\n== logit lens, {name}")
    print(pd.DataFrame({
        "rank-1 at the last layer": last.groupby("condition")["rank"].apply(lambda r: (r == 1).mean()),
        "top-3 at the last layer": last.groupby("condition")["rank"].apply(lambda r: (r <= 3).mean()),
        "rank-1 from layer (median)": readable.median(),
        "top-10 from layer (median)": readable_from(lens, 10).groupby("condition")["layer"].median(),
    }).to_string(float_format="%.3f"))
    print("median rank of the gold token per layer:")
    print(lens.groupby(["condition", "layer"])["rank"].median().unstack("layer").to_string(float_format="%.0f"))


def print_readout(readout: pd.DataFrame) -> None:
    print("\n== token readout, aligner: top 5 promoted / suppressed per layer; gold: mean logit and rank")
    for layer, group in readout[readout["layer"].notna()].groupby("layer"):
        promoted = group[(group["kind"] == "promoted") & (group["rank"] <= 5)]
        suppressed = group[(group["kind"] == "suppressed") & (group["rank"] <= 5)]
        gold = group[group["kind"] == "gold"].iloc[0]
        print(
            f"L{layer}: + {' '.join(f'{t}({v:.2f})' for t, v in zip(promoted['token'], promoted['value']))} | "
            f"- {' '.join(f'{t}({v:.2f})' for t, v in zip(suppressed['token'], suppressed['value']))} | "
            f"gold {gold['value']:.2f} (mean rank {gold['rank']:.0f})"
        )
    nearest = readout[readout["kind"] == "nearest"]
    print("nearest to P:", ", ".join(f"{t}({v:.3f})" for t, v in zip(nearest["token"], nearest["value"])))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--aligner", default="runs/probe-demo-json-1tok")
    parser.add_argument("--lora", default="runs/probe-demo-json-lora8")
    parser.add_argument("--n-items", type=int, default=40)
    parser.add_argument("--parts", default="lens,readout,dissociation,shift", help="the analyses run, comma-separated")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="reports/mechanism-demo")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    torch.set_num_threads(args.threads)
    pd.set_option("display.width", 250)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = aligner.open_model(args.model)
    runs = {"aligner": aligner.load_adapter(args.aligner), "lora": aligner.load_adapter(args.lora)}
    items = held_out_items(model, runs, args.n_items)
    print(f"{len(items)} held-out known capitals")
    if "lens" in parts:
        for name, run in runs.items():
            lens = logit_lens(model, run, items)
            lens.to_csv(out / f"lens-{name}.csv", index=False)
            print_lens(lens, name)
    if "readout" in parts:
        readout = token_readout(model, runs["aligner"], items)
        readout.to_csv(out / "readout-aligner.csv", index=False)
        print_readout(readout)
    if "dissociation" in parts:
        for name, run in runs.items():
            table = layer_dissociation(model, run, items)
            table.to_csv(out / f"dissociation-{name}.csv", index=False)
            print(f"\n== layer dissociation, {name}")
            print(table.drop(columns=[c for c in table if c.endswith("_se")]).to_string(float_format="%.3f"))
    if "shift" in parts:
        shift = token_shift(model, {"base": None, **runs}, [item.prompt for item in items])
        shift.to_csv(out / "shift.csv", index=False)
        print("\n== token shift")
        print(shift_shares(shift).to_string(float_format="%.3f"))
        print(most_shifted(shift, k=8).to_string(float_format="%.1f"))


if __name__ == "__main__":
    main()
