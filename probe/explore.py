"""What the app reads beyond the analyses it shares with the model report (`probe.analyses`): the authors'
released checkpoints in a directory, and the suite's summary of its sweep, checked.

    paper_checkpoints       the authors' released aligners in a directory, each bad file with its reason
    efficiency_summary      the suite's summary rows (results/sweep.json), checked
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from aligner import Aligner, import_paper_checkpoint
from aligner.files import read_json
from aligner.tables import SUMMARY_COLUMNS


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
