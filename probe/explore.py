"""The analyses behind the app's views (app.py only presents them): each takes runs, activations or a results
directory and returns tables or figures, built from the same pieces as the model report (`probe report`), so
that the app and the report agree.

    paper_checkpoints       the authors' released aligners in a directory, each bad file with its reason
    evaluation_set          held-out prompts (subjects no run was trained on) for behaviour, ablations, hovers
    (the probes, form_probe_curves and knowledge_probe_curves, are the report's own, in probe.model_report)
    geometry_table          overlap of the aligner's effect with the knowledge probes' subspace against nulls
    activation_frame        a 2-D map of activations at one layer, with prompt, labels, form and answer
    efficiency_summary      the suite's summary rows (results/sweep.json), checked
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from aligner import Aligner, import_paper_checkpoint
from aligner.files import read_json
from aligner.suite import SUMMARY_COLUMNS
from probe.collect import Activations
from probe.dataset import ProbeDataset
from probe.embeddings import embedding_frame
from probe.geometry import knowledge_directions, layer_geometry
from probe.model_report import evaluation_rows


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


def evaluation_set(dataset: ProbeDataset, aligners: Mapping[str, Aligner], n_eval: int = 12) -> ProbeDataset:
    """`n_eval` prompts of `dataset` (first question template) about subjects that no run was trained on."""
    return dataset.subset(evaluation_rows(dataset, dict(aligners), n_eval))


def geometry_table(activations: Activations, condition: str, layers: Sequence[int], seed: int = 0) -> pd.DataFrame:
    """`probe.geometry.layer_geometry` of one aligned condition against the knowledge subspace, per layer."""
    base = np.asarray(activations.resid("base"))
    aligned = np.asarray(activations.resid(condition))
    knowledge = knowledge_directions(base, activations.dataset.labels)
    return layer_geometry(base, aligned, knowledge, list(layers), seed=seed)


def activation_frame(
    activations: Activations,
    layer: int,
    conditions: Sequence[str],
    forms: Mapping[str, str | None],
    outputs: Mapping[str, Mapping[str, str]],
    method: str = "pca",
    seed: int = 0,
) -> pd.DataFrame:
    """The residual stream after block `layer` (last prompt token) of every prompt under every condition, embedded
    together (`method`: pca or umap): one row per (condition, prompt) with the prompt, its subject and knowledge
    labels, the condition's trained form (`forms`, "none" for base and form-less runs) and its answer where
    `outputs[condition]` (prompt -> answer) holds one, else ""."""
    dataset = activations.dataset
    info = pd.concat(
        [
            pd.DataFrame(
                {
                    "condition": condition, "form": forms.get(condition) or "none", "prompt": dataset.prompts,
                    "entity": dataset.entities, **dataset.labels,
                    "output": [outputs.get(condition, {}).get(prompt, "") for prompt in dataset.prompts],
                }
            )
            for condition in conditions
        ],
        ignore_index=True,
    )
    X = np.concatenate([np.asarray(activations.resid(condition))[:, layer] for condition in conditions])
    return embedding_frame(X, info, method, seed)


def efficiency_summary(results: str | Path) -> list[dict[str, Any]]:
    """The suite's summary rows from RESULTS/sweep.json (what `aligner.suite.figure` draws), each checked for the
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
