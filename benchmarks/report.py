"""Markdown tables of the benchmark results kept as data in benchmarks/results/, for benchmarks/RESULTS.md.

    python -m benchmarks.report targets          # each target against every device's numbers
    python -m benchmarks.report device cpu       # one device's table: every shape it ran, one column each
    python -m benchmarks.report compare OLD.json NEW.json   # two runs of one benchmark, row by row

A result file is `benchmarks/results/DEVICE-BENCHMARK-SHAPE.json`, written by a benchmark's `--json PATH`
(`benchmarks.common.write_json`): the command, the commit, the device and machine, and each table's rows. This
module reads those files and nothing else (no torch), so that `docs/check.py` can rerun every table of RESULTS.md
on each call and a table cannot drift from its data.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

RESULTS = Path(__file__).resolve().parent / "results"
SHAPES = {"smollm2": "SmolLM2-135M", "llama2-7b": "LLaMA-2-7B"}  # the columns, in this order
# The devices' columns in the targets table, GPUs first: the targets are set on a GPU's bf16 batches of 8 x 512.
DEVICES = {"h200": "H200", "h100": "H100", "cpu": "CPU"}
GPUS = ("h200", "h100")


@dataclass(frozen=True)
class Cell:
    """Where one number sits in a result file: its benchmark, table, the row whose variant matches, the field."""

    benchmark: str
    table: str
    variant: str  # a regular expression that must match the whole variant name
    field: str

    def row(self, results: list[dict], shape: str) -> Optional[dict]:
        """The first row that holds this number."""
        for result in results:
            if result["benchmark"] != self.benchmark or result["shape"] != shape:
                continue
            for row in result["tables"].get(self.table, []):
                if re.fullmatch(self.variant, row.get("variant", "")) and row.get(self.field) is not None:
                    return row
        return None

    def value(self, results: list[dict], shape: str) -> Optional[float]:
        row = self.row(results, shape)
        return None if row is None else row[self.field]


def throughput(table: str, variant: str, field: str = "vs_bridge") -> Cell:
    return Cell("throughput", table, re.escape(variant), field)


ALIGNER = ("bridge + aligner N=1", "bridge + aligner N=10")
PLAIN = ("raw HF + aligner N=1", "raw HF + aligner N=10")  # through transformers' attention interface
BRIDGE_LORA = "bridge + peft LoRA r=8 q,v"
RAW_LORA, RAW_PROMPT = "raw HF + peft LoRA r=8 q,v", "raw HF + peft AdaptionPrompt len 10"

# A device table's rows, by key: label, the cell, how to print it. Tokens/s are the floors' alone; every other
# number is a ratio to the floor of the model the variant runs on ("raw peft": peft on the raw model, to its floor).
RATE, RATIO = "{:,.0f}".format, "{:.3f}".format
FORWARD_KEPT = "bridge + aligner N={}, attached, prefix kept (fixed_prefix)"
TRAIN_RAW, TRAIN_BRIDGE = "raw HF, frozen, input gradients", "bridge, frozen, input gradients"
MERGED = "bridge + aligner N=1, merged into the biases"


def ratio_text(row: dict, field: str) -> str:
    """Ratio `field` of a result row as the tables print it, with its interval where the run measured one
    (`benchmarks.common.ratio_interval`): "0.937 [0.902, 0.981]"."""
    interval = row.get(f"{field}_interval")
    return RATIO(row[field]) + ("" if interval is None else f" [{RATIO(interval[0])}, {RATIO(interval[1])}]")


def bank(variant: str) -> Cell:
    return Cell("bank", "bank", variant, "vs_one")


def probe(variant: str) -> Cell:
    return Cell("probe", "collection", variant, "vs_reference")


ROWS: dict[str, tuple[str, Cell, Callable[[float], str]]] = {
    "train_raw": ("training, raw HF: tokens/s", throughput("training", TRAIN_RAW, "tokens_per_s"), RATE),
    "train_bridge": ("training, bridge: tokens/s", throughput("training", TRAIN_BRIDGE, "tokens_per_s"), RATE),
    "train_1": ("training: aligner N=1", throughput("training", ALIGNER[0]), RATIO),
    "train_10": ("training: aligner N=10", throughput("training", ALIGNER[1]), RATIO),
    "train_plain_1": ("training: aligner N=1 on the raw model", throughput("training", PLAIN[0], "vs_raw"), RATIO),
    "train_plain_10": ("training: aligner N=10 on the raw model", throughput("training", PLAIN[1], "vs_raw"), RATIO),
    "train_lora": ("training: peft LoRA in the bridge", throughput("training", BRIDGE_LORA), RATIO),
    "train_raw_lora": ("training: raw peft LoRA", throughput("training", RAW_LORA, "vs_raw"), RATIO),
    "train_raw_prompt": ("training: raw peft AdaptionPrompt", throughput("training", RAW_PROMPT, "vs_raw"), RATIO),
    "fwd_raw": ("forward, raw HF: tokens/s", throughput("forward", "raw HF", "tokens_per_s"), RATE),
    "fwd_bridge": ("forward, bridge: tokens/s", throughput("forward", "bridge", "tokens_per_s"), RATE),
    "fwd_1": ("forward: aligner N=1, attached", throughput("forward", "bridge + aligner N=1, attached"), RATIO),
    "fwd_10": ("forward: aligner N=10, attached", throughput("forward", "bridge + aligner N=10, attached"), RATIO),
    "fwd_plain_1": ("forward: aligner N=1 on the raw model", throughput("forward", f"{PLAIN[0]}, attached", "vs_raw"), RATIO),
    "fwd_plain_10": ("forward: aligner N=10 on the raw model", throughput("forward", f"{PLAIN[1]}, attached", "vs_raw"), RATIO),
    "fwd_kept_1": ("forward: aligner N=1, prefix kept", throughput("forward", FORWARD_KEPT.format(1)), RATIO),
    "fwd_kept_10": ("forward: aligner N=10, prefix kept", throughput("forward", FORWARD_KEPT.format(10)), RATIO),
    "fwd_merged": ("forward: aligner N=1, merged", throughput("forward", MERGED), RATIO),
    "fwd_lora": ("forward: peft LoRA in the bridge", throughput("forward", BRIDGE_LORA), RATIO),
    "fwd_raw_lora": ("forward: raw peft LoRA", throughput("forward", RAW_LORA, "vs_raw"), RATIO),
    "fwd_raw_prompt": ("forward: raw peft AdaptionPrompt", throughput("forward", RAW_PROMPT, "vs_raw"), RATIO),
    "bank_fwd_1": ("bank / one aligner: forward, N=1", bank(r"forward, bank of \d+, N=1"), RATIO),
    "bank_fwd_10": ("bank / one aligner: forward, N=10", bank(r"forward, bank of \d+, N=10"), RATIO),
    "bank_gen_1": ("bank / one aligner: generation, N=1", bank(r"generate, \d+ aligners N=1"), RATIO),
    "bank_gen_10": ("bank / one aligner: generation, N=10", bank(r"generate, \d+ aligners N=10"), RATIO),
    "collect": ("probe.collect / plain forward", probe(r"probe\.collect, hook_resid_post of every layer"), RATIO),
    "cache": ("run_with_cache / plain forward", probe(r"run_with_cache, hook_resid_post of every layer"), RATIO),
    "collect_aligner": (
        "probe.collect + aligner's arrays / aligned forward",
        probe(r"probe\.collect with the aligner.*"),
        RATIO,
    ),
}  # fmt: skip


@dataclass(frozen=True)
class Target:
    label: str
    shape: str
    at_least: float
    rows: tuple[str, ...]  # ROWS keys, each of which must reach `at_least`


TARGETS = [
    Target("training, N=1, 7B: >= 0.99", "llama2-7b", 0.99, ("train_1",)),
    Target("training, N=10, 7B: >= 0.97", "llama2-7b", 0.97, ("train_10",)),
    Target("training, N=1, SmolLM2: >= 0.95", "smollm2", 0.95, ("train_1",)),
    Target("training, N=10, SmolLM2: >= 0.90", "smollm2", 0.90, ("train_10",)),
    Target("training on the raw model, N=1 and 10, 7B: >= 0.97", "llama2-7b", 0.97, ("train_plain_1", "train_plain_10")),
    Target("training on the raw model, N=1 and 10, SmolLM2: >= 0.97", "smollm2", 0.97, ("train_plain_1", "train_plain_10")),
    Target("forward on the raw model, N=1 and 10, 7B: >= 0.97", "llama2-7b", 0.97, ("fwd_plain_1", "fwd_plain_10")),
    Target("forward on the raw model, N=1 and 10, SmolLM2: >= 0.97", "smollm2", 0.97, ("fwd_plain_1", "fwd_plain_10")),
    Target("forward, N=1 merged, 7B: >= 0.99", "llama2-7b", 0.99, ("fwd_merged",)),
    Target("forward, N=1 merged, SmolLM2: >= 0.99", "smollm2", 0.99, ("fwd_merged",)),
    Target("forward, N=10 attached, 7B: >= 0.97", "llama2-7b", 0.97, ("fwd_10",)),
    Target("forward, N=10 attached, SmolLM2: >= 0.9", "smollm2", 0.9, ("fwd_10",)),
    Target("bank of K / one aligner, forward, N=1 and 10: >= 0.9", "smollm2", 0.9, ("bank_fwd_1", "bank_fwd_10")),
    Target("bank of K / one aligner, generation, N=1 and 10: >= 0.9", "smollm2", 0.9, ("bank_gen_1", "bank_gen_10")),
    Target("probe.collect / plain forward, SmolLM2: >= 0.9", "smollm2", 0.9, ("collect",)),
    Target("probe.collect / plain forward, 7B: >= 0.9", "llama2-7b", 0.9, ("collect",)),
]
# Training ahead of peft: the aligner's lower ratio to its floor over the best of peft's to theirs.
AHEAD = (("train_1", "train_10"), ("train_lora", "train_raw_lora", "train_raw_prompt"))


def load(device: str, folder: Path = RESULTS) -> list[dict]:
    """Every result file of `device` (its name's prefix), in name order."""
    return [json.loads(path.read_text(encoding="utf-8")) for path in sorted(folder.glob(f"{device}-*.json"))]


def markdown(rows: list[list[str]], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def provenance(results: list[dict]) -> str:
    """Where a device's numbers come from: the commit, the machine, each file's command, and any note on them."""
    commits = ", ".join(dict.fromkeys(r["commit"] for r in results))
    machines = "; ".join(dict.fromkeys(r["machine"] for r in results))
    notes = "".join(f" {note}" for note in dict.fromkeys(r["note"] for r in results if r.get("note")))
    lines = [f"Commit {commits}.{notes}", "", f"- {machines}"]
    lines += [f"- `{r['command']}`" for r in results]
    return "\n".join(lines)


def cell_text(row: Optional[dict], field: str, show: Callable[[float], str]) -> str:
    """A device table's cell: blank where the device has no such number, a ratio with its interval."""
    if row is None:
        return ""
    return ratio_text(row, field) if show is RATIO else show(row[field])


def device_table(device: str, folder: Path = RESULTS) -> str:
    results = load(device, folder)
    if not results:
        raise SystemExit(f"no results for {device!r} in {folder}")
    found = dict.fromkeys(r["shape"] for r in results)
    shapes = [shape for shape in SHAPES if shape in found] + [shape for shape in found if shape not in SHAPES]
    rows = []
    for label, cell, show in ROWS.values():
        found = [cell.row(results, shape) for shape in shapes]
        if any(row is not None for row in found):
            rows.append([label, *(cell_text(row, cell.field, show) for row in found)])
    return provenance(results) + "\n\n" + markdown(rows, ["/ floor", *(SHAPES.get(s, s) for s in shapes)])


def target_cell(target: Target, results: list[dict], gpu: bool) -> str:
    """The target's numbers on one device, and on a GPU whether it is met: by every number, or, where the run
    measured intervals, by their low ends ("no" where a high end falls short; else "cannot tell")."""
    cells = [ROWS[key][1] for key in target.rows]
    found = [cell.row(results, target.shape) for cell in cells]
    if any(row is None for row in found):
        return ""
    text = ", ".join(ratio_text(row, cell.field) for row, cell in zip(found, cells))
    if not gpu:
        return text
    intervals = [row.get(f"{cell.field}_interval") or [row[cell.field]] * 2 for row, cell in zip(found, cells)]
    met = "yes" if min(low for low, _ in intervals) >= target.at_least else (
        "no" if any(high < target.at_least for _, high in intervals) else "cannot tell"
    )
    return f"{text} {met}"


def ahead_cell(results: list[dict], shape: str, gpu: bool) -> str:
    ours = [ROWS[key][1].value(results, shape) for key in AHEAD[0]]
    theirs = [v for v in (ROWS[key][1].value(results, shape) for key in AHEAD[1]) if v is not None]
    if any(v is None for v in ours) or not theirs:
        return ""
    text = f"{RATIO(min(ours))} vs {RATIO(max(theirs))}"
    return f"{text} {'yes' if min(ours) > max(theirs) else 'no'}" if gpu else text


def targets_table(folder: Path = RESULTS) -> str:
    results = {device: load(device, folder) for device in DEVICES}
    devices = [d for d in DEVICES if results[d]]
    rows = [
        [t.label, *(target_cell(t, results[d], d in GPUS) for d in devices)] for t in TARGETS
    ]  # fmt: skip
    for shape in SHAPES:
        rows.append(
            [
                f"training ahead of peft, {SHAPES[shape]}: lower aligner vs best peft",
                *(ahead_cell(results[d], shape, d in GPUS) for d in devices),
            ]
        )
    return markdown(rows, ["target", *(DEVICES[d] for d in devices)])


def compare(old_path: Path, new_path: Path, tolerance: float = 0.05) -> str:
    """Every ratio of two runs of one benchmark, side by side, and the new one's change relative to the old."""
    old, new = (json.loads(Path(p).read_text(encoding="utf-8")) for p in (old_path, new_path))
    rows = []
    for name, table in old["tables"].items():
        new_rows = {row.get("variant"): row for row in new["tables"].get(name, [])}
        for row in table:
            other = new_rows.get(row.get("variant"), {})
            for field in ("vs_raw", "vs_bridge", "vs_one", "vs_reference"):
                if row.get(field) is None or other.get(field) is None:
                    continue
                change = other[field] / row[field] - 1
                flag = "" if abs(change) <= tolerance else "outside"
                rows.append(
                    [name, row["variant"], field, RATIO(row[field]), RATIO(other[field]), f"{change:+.1%}", flag]
                )
    head = f"old: {old['commit']}, `{old['command']}`\nnew: {new['commit']}, `{new['command']}`\n\n"
    return head + markdown(
        rows, ["table", "variant", "ratio", "old", "new", "change", f"beyond {tolerance:.0%}"]
    )


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="table", required=True)
    sub.add_parser("targets", help="each target against every device's numbers")
    device = sub.add_parser("device", help="one device's table")
    device.add_argument("device", choices=sorted(DEVICES))
    pair = sub.add_parser("compare", help="two result files of one benchmark, ratio by ratio")
    pair.add_argument("old", type=Path)
    pair.add_argument("new", type=Path)
    pair.add_argument("--tolerance", type=float, default=0.05, help="relative change flagged beyond it")
    args = parser.parse_args(argv)
    if args.table == "targets":
        print(targets_table())
    elif args.table == "device":
        print(device_table(args.device))
    else:
        print(compare(args.old, args.new, args.tolerance))


if __name__ == "__main__":
    main(sys.argv[1:])
