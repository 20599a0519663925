"""Cells rerun into another folder against the committed ones: each cell's seconds (training and answering) in
both, and whether its metrics came out the same. What a clean rerun of part of the grid says about the rest:

    aligner sweep --out /tmp/sample --tasks json --methods aligner-1,lora-8,adapter-10,zbias --seeds 0 &
    aligner sweep --out /tmp/sample --tasks inject,value --methods aligner-1,lora-8 --seeds 0 &
    wait; python experiments/compare_cells.py /tmp/sample [results]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def seconds(cell: dict) -> float:
    return (cell.get("train_s") or 0) + cell["eval_s"]


def main(rerun: Path, committed: Path) -> None:
    pairs = []
    for path in sorted(rerun.glob("cells/*/*/*/seed*.json")):
        old = committed / path.relative_to(rerun)
        if old.is_file():
            pairs.append((path.relative_to(rerun / "cells"), json.loads(path.read_text()), json.loads(old.read_text())))
    print("| cell | seconds, rerun | seconds, committed | metrics |\n| --- | --- | --- | --- |")
    for name, new, old in pairs:
        same = "the same" if new["metrics"] == old["metrics"] else "differ"
        print(f"| {name.parent} seed {new['seed']} | {seconds(new):.0f} | {seconds(old):.0f} | {same} |")
    trained = [new for _, new, _ in pairs if new["kind"] == "trained"]
    total = sum(seconds(new) for _, new, _ in pairs)
    print(f"\n{len(pairs)} cells: {total:.0f} s rerun, {sum(seconds(old) for *_, old in pairs):.0f} s committed; "
          f"{sum(map(seconds, trained)) / max(len(trained), 1):.0f} s per trained cell rerun")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2] if len(sys.argv) > 2 else "results"))
