"""What the app reads beyond the analyses it shares with the model report (`probe.analyses`): the authors'
released checkpoints in a directory, and the suite's summary of its sweep, checked.

    paper_checkpoints       the authors' released aligners in a directory, each bad file with its reason
    efficiency_summary      the suite's summary rows (results/sweep.json), checked
    efficiency_frame        those rows as the points of `probe.figures.efficiency_figure`
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from aligner import Aligner, import_paper_checkpoint
from aligner.files import read_json
from aligner.registry import method_order
from aligner.tables import PANELS, SUMMARY_COLUMNS


def paper_checkpoints(directory: str | Path) -> tuple[dict[str, Aligner], list[tuple[str, str]]]:
    """Every `*.pth` in `directory` read with `aligner.import_paper_checkpoint`, by file stem; a file that cannot
    be read is listed as (file, reason) instead and hides none of the others."""
    aligners, failed = {}, []
    for path in sorted(Path(directory).glob("*.pth")):
        try:
            aligners[path.stem] = import_paper_checkpoint(path)
        except (OSError, ValueError, RuntimeError, KeyError) as err:  # torch raises RuntimeError on a damaged zip
            failed.append((str(path), str(err)))
    return aligners, failed


def efficiency_summary(results: str | Path) -> list[dict[str, Any]]:
    """The suite's summary rows from RESULTS/sweep.json (what `aligner.tables.figure` draws), each checked for the
    summary's columns; the error names the file, the row and what is missing."""
    path = Path(results) / "sweep.json"
    rows = read_json(path)
    if not isinstance(rows, list):
        raise ValueError(f"{path}: expected a list of summary rows, found {type(rows).__name__}")
    for number, row in enumerate(rows):
        missing = [column for column in SUMMARY_COLUMNS if not isinstance(row, dict) or column not in row]
        if missing:
            raise ValueError(
                f"{path}: row {number} lacks {', '.join(missing)}; `aligner sweep --tables-only --out {path.parent}` "
                "rewrites it from the cells in the current format"
            )
    return rows


def efficiency_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """One point per summary row that a panel of the suite's figure shows (`aligner.tables.PANELS`: a task family,
    split and metric), variants (`aligner-1:lr=...`) left out: its panel's title, task (and base model where there
    are several), method and method family (aligner, lora, ...: the name before the size), trainable parameters
    (none: 1, for a log axis), mean, and the error bar above and below it: the suite's 95% interval where the rows
    give one, else one standard deviation over seeds, else none."""
    several_models = len({row["model"] for row in rows}) > 1
    points = []
    for family, split, metric, title in PANELS:
        for row in rows:
            if (row["family"], row["split"], row["metric"]) != (family, split, metric) or ":" in row["method"]:
                continue
            low, high, std = row.get("ci_low"), row.get("ci_high"), row.get("std") or 0.0
            points.append(
                {
                    "panel": title, "task": f"{row['task']} on {row['model']}" if several_models else row["task"],
                    "model": row["model"], "method": row["method"], "method family": row["method"].partition("-")[0],
                    "order": method_order(row["method"]), "params": max(row["params"], 1), "mean": row["mean"],
                    "above": std if high is None else high - row["mean"], "below": std if low is None else row["mean"] - low,
                    "n_seeds": row["n_seeds"],
                }
            )
    columns = ["panel", "task", "model", "method", "method family", "params", "mean", "above", "below", "n_seeds"]
    if not points:
        return pd.DataFrame(columns=columns)
    return pd.DataFrame(points).sort_values("order", kind="stable")[columns].reset_index(drop=True)
