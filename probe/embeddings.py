"""2-D maps (PCA, UMAP) of aligner tokens, per-layer prefix keys and values, and activations, as DataFrames: the
descriptive columns of each point (run, layer, slot; for activations the prompt and the answer) plus x and y,
so that a map can be re-coloured, filtered or checked without re-running it; `frame.attrs["axes"]` names x and y
(a principal component with the share of the variance it explains, or a UMAP axis). `probe.figures.scatter`
draws them.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import pandas as pd
from sklearn.decomposition import PCA
from torch import nn

from aligner import Aligner

METHODS = ("pca", "umap")


def embed(X: np.ndarray, method: str = "pca", seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """(n, 2) coordinates of the rows of X (n, d): PCA, or UMAP (cosine metric; neighbours capped by n); and the
    two axes' names, a principal component's with the share of the variance it explains."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    X = np.asarray(X, dtype=np.float64)
    if method == "pca" or len(X) < 4:  # UMAP needs a few neighbours; PCA is exact for a handful of points
        if len(X) < 2:
            return np.zeros((len(X), 2)), ["PC1", "PC2"]
        pca = PCA(n_components=2, random_state=seed)
        coordinates = pca.fit_transform(X)
        return coordinates, [f"PC{i + 1} ({share:.0%} of the variance)" for i, share in enumerate(pca.explained_variance_ratio_)]
    import umap  # imported here: it compiles with numba on first import, seconds that PCA-only users need not pay

    reducer = umap.UMAP(n_neighbors=min(15, len(X) - 1), metric="cosine", random_state=seed, n_jobs=1)
    return reducer.fit_transform(X), ["UMAP 1", "UMAP 2"]


def embedding_frame(X: np.ndarray, info: pd.DataFrame, method: str = "pca", seed: int = 0) -> pd.DataFrame:
    """`info` (one row per row of X) with the 2-D coordinates x, y added, their names in attrs["axes"]."""
    coordinates, axes = embed(X, method, seed)
    frame = info.reset_index(drop=True).assign(x=coordinates[:, 0], y=coordinates[:, 1])
    frame.attrs["axes"] = axes
    return frame


def token_frame(aligners: Mapping[str, Aligner], method: str = "pca", seed: int = 0) -> pd.DataFrame:
    """Every prefix token of every aligner (run, slot, n_tokens, norm), embedded together; the aligners must
    share d_model. An unshared aligner contributes each adapted layer's tokens (layer set; else None)."""
    vectors, rows = [], []
    for run, al in aligners.items():
        tokens = al.layer_tokens().detach().float().cpu().numpy()  # (n_active, N, d_model)
        for i, layer in enumerate(al.layer_indices if not al.config.shared else [None]):
            for slot, vector in enumerate(tokens[i]):
                vectors.append(vector)
                rows.append({"run": run, "layer": layer, "slot": slot, "n_tokens": al.config.n_tokens, "norm": float(np.linalg.norm(vector))})
    return embedding_frame(np.stack(vectors), pd.DataFrame(rows), method, seed)


def prefix_frame(model: nn.Module, aligners: Mapping[str, Aligner], method: str = "pca", seed: int = 0) -> pd.DataFrame:
    """Each adapted layer's prefix keys and values (its key/value heads concatenated, one point per layer, slot and
    kind), read at `blocks.{l}.aligner.hook_k/hook_v` with `run_with_cache`; keys and values are embedded apart
    (column kind), both runs and layers together; attrs["axes"] maps each kind to its axes' names."""
    vectors: dict[str, list[np.ndarray]] = {"k": [], "v": []}
    rows: dict[str, list[dict]] = {"k": [], "v": []}
    for run, al in aligners.items():
        with al.attached(model):  # the prefix does not depend on the input: any one token will do
            _, cache = model.run_with_cache(model.to_tokens("."), names_filter=lambda name: name.endswith(("aligner.hook_k", "aligner.hook_v")))
        for kind in vectors:
            for layer in al.layer_indices:
                for slot, vector in enumerate(cache[f"blocks.{layer}.aligner.hook_{kind}"].flatten(1).float().cpu().numpy()):
                    vectors[kind].append(vector)
                    rows[kind].append({"run": run, "layer": layer, "slot": slot, "kind": kind})
    frames = {kind: embedding_frame(np.stack(vectors[kind]), pd.DataFrame(rows[kind]), method, seed) for kind in vectors}
    frame = pd.concat(frames.values(), ignore_index=True)
    frame.attrs["axes"] = {kind: part.attrs["axes"] for kind, part in frames.items()}
    return frame
