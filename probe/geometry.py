"""Is the aligner's effect orthogonal to knowledge? Subspaces of activation space, compared against a null.

Per layer, Δ = aligned − base activations of the same prompts. Its principal directions are the right singular
vectors of Δ itself, not centred: the mean shift, a constant vector added to every prompt, is the aligner's
main effect and centring would discard it. The knowledge subspace is spanned by the weight vectors of the
knowledge probes (in raw activation space). Their principal angles (scipy's `subspace_angles`) summarise as an
overlap, the mean squared cosine: 1 for one subspace inside the other, 0 for orthogonal ones.

An overlap means little alone: two random k- and r-dimensional subspaces of R^d overlap by about
max(k, r) / d, and activations are far from isotropic. So each observed overlap is set against two nulls, both
replacing Δ's subspace by one of the same dimension: (1) uniformly random subspaces, (2) directions drawn from
the base activations' own covariance (the directions activations actually vary along). An overlap inside the
covariance band says that the aligner's effect is no more aligned with the knowledge read-out than the
activations' own variation is.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import pandas as pd
from scipy.linalg import orth, subspace_angles

from probe.probes import LayerwiseProbe, few_blas_threads
from probe.progress import steps

NULL_QUANTILES = (0.05, 0.5, 0.95)  # the band's low edge, middle and high edge


def principal_angles(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """Principal angles in degrees, ascending, between the column spaces of A (d, k) and B (d, r)."""
    return np.sort(np.degrees(subspace_angles(A, B)))


def overlap(A: np.ndarray, B: np.ndarray) -> float:
    """Mean squared cosine of the principal angles between the column spaces of A and B, in [0, 1]."""
    return float(np.mean(np.cos(subspace_angles(A, B)) ** 2))


def top_directions(delta: np.ndarray, energy: float = 0.9, max_dim: int = 8) -> np.ndarray:
    """(d, k): the fewest right singular vectors of `delta` (n, d), uncentred, that hold `energy` of its squared
    norm, at most `max_dim`."""
    _, singular, vt = np.linalg.svd(delta, full_matrices=False)
    cumulative = np.cumsum(singular**2) / np.sum(singular**2)
    k = min(int(np.searchsorted(cumulative, energy)) + 1, max_dim)
    return vt[:k].T


def null_overlaps(
    reference: np.ndarray,
    dim: int,
    n_draws: int,
    rng: np.random.Generator,
    activations: np.ndarray | None = None,
) -> np.ndarray:
    """Overlaps of `n_draws` random `dim`-dimensional subspaces with `reference` (d, r): uniformly random
    (Gaussian directions), or, given `activations` (n, d), spanned by directions drawn from their covariance."""
    d = reference.shape[0]
    centred = None if activations is None else activations - activations.mean(axis=0)
    draws = []
    for _ in range(n_draws):
        if centred is None:
            directions = rng.standard_normal((d, dim))
        else:  # X^T z with z ~ N(0, I_n) is distributed as N(0, X^T X): the covariance, up to scale
            directions = centred.T @ rng.standard_normal((centred.shape[0], dim))
        draws.append(overlap(directions, reference))
    return np.array(draws)


def knowledge_directions(base: np.ndarray, labels: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """Per layer, the weight vectors (`LayerwiseProbe.directions`) of a probe for each of `labels` fitted on
    `base` (n, n_layers, d), stacked (c, d): the knowledge subspace that `layer_geometry` compares against."""
    probes = {label: LayerwiseProbe().fit(base, values).directions() for label, values in labels.items()}
    return [np.concatenate([probes[label][layer] for label in probes]) for layer in range(base.shape[1])]


def layer_geometry(
    base: np.ndarray,
    aligned: np.ndarray,
    knowledge: Sequence[np.ndarray],
    layers: Sequence[int],
    n_draws: int = 200,
    seed: int = 0,
) -> pd.DataFrame:
    """Per layer in `layers`: Δ's dimension and relative size, the overlap of its subspace with the knowledge
    subspace (spanned by `knowledge[layer]`, (c, d) probe weights), the smallest principal angle, and the
    5/50/95% quantiles of both nulls. `base` and `aligned` are (n, n_layers, d), the same prompts."""
    rng = np.random.default_rng(seed)
    rows = []
    with few_blas_threads():
        for layer in steps(layers, "geometry against the nulls", unit="layer"):
            delta = aligned[:, layer] - base[:, layer]
            if not np.any(delta):
                continue  # a layer before the aligner's first: nothing changed
            directions = top_directions(delta)
            reference = orth(knowledge[layer].T)
            row = {
                "layer": layer,
                "delta_dim": directions.shape[1],
                "knowledge_dim": reference.shape[1],
                "relative_delta": float(
                    np.linalg.norm(delta, axis=1).mean() / np.linalg.norm(base[:, layer], axis=1).mean()
                ),
                "overlap": overlap(directions, reference),
                "min_angle": float(principal_angles(directions, reference)[0]),
            }
            for null, activations in (("random", None), ("covariance", base[:, layer])):
                draws = null_overlaps(reference, directions.shape[1], n_draws, rng, activations)
                for q in NULL_QUANTILES:
                    row[f"{null}_q{round(q * 100):02d}"] = float(np.quantile(draws, q))
            rows.append(row)
    return pd.DataFrame(rows)
