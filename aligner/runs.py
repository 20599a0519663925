"""Finding saved aligners under a runs directory, each with a one-line summary or the reason it cannot be read."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from aligner.model import CONFIG_FILE, Aligner


@dataclass(frozen=True)
class RunInfo:
    name: str  # the directory's path relative to the runs directory
    path: Path
    summary: str  # config, parameter count and base model, for a caption
    error: str | None  # why the run cannot be loaded; None when it can


def list_runs(root: str | Path) -> list[RunInfo]:
    """Every directory under `root` holding an aligner, sorted by name; one bad run never hides the others."""
    root = Path(root)
    if not root.is_dir():
        return []
    runs = []
    for config_path in sorted(root.rglob(CONFIG_FILE)):
        path = config_path.parent
        name = str(path.relative_to(root))
        try:
            al = Aligner.load(path)
        except (OSError, ValueError) as err:
            runs.append(RunInfo(name, path, "", str(err)))
            continue
        kind = "Aligner" if al.config.shared else "LLaMA-Adapter"
        summary = (
            f"{kind}, N={al.config.n_tokens}, layers {al.config.start_layer}-{al.shape.n_layers - 1}, "
            f"{al.num_parameters():,} parameters, base {al.base_model.get('name')}"
        )
        runs.append(RunInfo(name, path, summary, None))
    return runs
