"""Linear probes, one per layer: standardised logistic regression (scikit-learn), cross-validated, with a control
task for selectivity (Hewitt & Liang 2019, arXiv 1909.03368) and transfer across conditions.

`LayerwiseProbe` is a scikit-learn estimator over activations shaped (n, n_layers, d): `fit`, `predict` and
`score` work on every layer at once. `evaluate_probe` cross-validates it: the accuracy of its out-of-fold
predictions per layer with a Wilson interval and a p-value against chance corrected for testing every layer
(Holm), the same for a control task (each entity's label replaced by a random one of the same label set and
balance), and, given activations of the same prompts under other conditions, the accuracy there of the very
probes trained on the first (a probe trained on the base model, scored on aligned activations: if the aligner
leaves the knowledge alone, the accuracy holds). Folds are grouped by entity: a country asked in two wordings
is never on both sides, or its twin row would carry its label (and the control task's) into training.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import pandas as pd
from scipy.stats import binomtest
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedGroupKFold
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from probe.progress import steps

# A probe fits on a few hundred rows of d_model numbers, and the geometry's null draws are as small: on products this
# small, BLAS threads spend longer waiting on each other than computing, so every thread beyond one slows the fits
# and draws down (benchmarks/probe_fit.py measures by how much). So probe's fits and draws run on BLAS_THREADS
# threads; None leaves the libraries' own setting (a thread per core).
BLAS_THREADS: int | None = 1


def few_blas_threads() -> threadpool_limits:
    """Within it, BLAS (numpy's, scipy's) runs on BLAS_THREADS threads; the setting is restored on exit."""
    return threadpool_limits(limits=BLAS_THREADS, user_api="blas")


class LayerwiseProbe(ClassifierMixin, BaseEstimator):
    """One standardised logistic-regression probe per layer of X (n, n_layers, d)."""

    def __init__(self, C: float = 1.0, max_iter: int = 1000) -> None:
        self.C = C  # inverse L2 strength, on standardised features
        self.max_iter = max_iter

    def _pipeline(self) -> Pipeline:
        return make_pipeline(StandardScaler(), LogisticRegression(C=self.C, max_iter=self.max_iter))

    def fit(self, X: np.ndarray, y: np.ndarray) -> "LayerwiseProbe":
        with few_blas_threads():
            self.probes_ = [self._pipeline().fit(X[:, layer], y) for layer in range(X.shape[1])]
        self.classes_ = self.probes_[0].classes_
        return self

    def predict(self, X: np.ndarray) -> np.ndarray:
        """(n, n_layers): each layer's probe's prediction."""
        return np.stack([probe.predict(X[:, layer]) for layer, probe in enumerate(self.probes_)], axis=1)

    def score(self, X: np.ndarray, y: np.ndarray) -> np.ndarray:
        """(n_layers,): each layer's accuracy (an array, not sklearn's one number: a probe per layer)."""
        return (self.predict(X) == np.asarray(y)[:, None]).mean(axis=0)

    def directions(self) -> list[np.ndarray]:
        """Per layer, the probe's weight vectors in the raw activation space, (n_classes or 1, d): the
        directions it reads. Standardising divides feature j by its scale, so w_raw = w / scale. A softmax over
        K > 2 classes reads only the differences of their weight vectors, so the K vectors are centred: they then
        span the K - 1 dimensions the probe reads. Uncentred, fitted on float32 activations, they also carry the
        rounding of a shift common to all K (the penalised fit has none), which a subspace spanned by them would keep
        as one more direction: rounding noise that the geometry's per-layer numbers would then depend on."""
        weights = [p[-1].coef_ / p[0].scale_ for p in self.probes_]
        return [w - w.mean(axis=0) if len(w) > 1 else w for w in weights]


def control_labels(labels: np.ndarray, entities: np.ndarray, seed: int = 0) -> np.ndarray:
    """Hewitt & Liang's control task: each entity gets one random label, kept wherever it appears, drawn from the
    rows' labels without replacement (so the label set and, in expectation, the balance are those of `labels`)."""
    unique, index = np.unique(entities, return_inverse=True)
    drawn = np.random.default_rng(seed).permutation(np.asarray(labels))[: len(unique)]
    return drawn[index]


def wilson_interval(correct: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    ci = binomtest(correct, n).proportion_ci(confidence_level=confidence, method="wilson")
    return float(ci.low), float(ci.high)


def evaluate_probe(
    X: np.ndarray,
    y: np.ndarray,
    entities: np.ndarray,
    transfer: Mapping[str, np.ndarray] | None = None,
    folds: int = 5,
    seed: int = 0,
    C: float = 1.0,
    desc: str = "probe",
    groups: np.ndarray | None = None,
) -> pd.DataFrame:
    """Cross-validated accuracy per layer of probes for `y` on X (n, n_layers, d), as a long table with columns
    layer, target ("task" or "control"), scored_on ("self" or a key of `transfer`), accuracy, ci_low, ci_high,
    n, chance (the majority class's share), p (one-sided binomial test of the accuracy against chance), p_holm
    (Holm's correction over the layers of one target and condition) and above_chance (p_holm < 0.05). Each
    `transfer[name]` holds the same prompts' activations under another condition: the probes trained on X's
    training folds are scored on its test folds. Classes with fewer rows than `folds` are left out (stratified
    folds need one per fold); n says how many rows remain. Rows of one `groups` value share a fold; by default
    the entity's (a country asked in two wordings; one prompt under several conditions, where the caller says
    so): a probe is then never tested on a row whose twin it saw in training."""
    y = np.asarray(y)
    values, counts = np.unique(y, return_counts=True)
    keep = np.isin(y, values[counts >= folds])
    groups = np.asarray(entities if groups is None else groups)[keep]
    X, y, entities = X[keep], y[keep], np.asarray(entities)[keep]
    transfer = {name: other[keep] for name, other in (transfer or {}).items()}
    targets = {"task": y, "control": control_labels(y, entities, seed)}
    rows = []
    for target, labels in targets.items():
        scored_on = {"self": X, **(transfer if target == "task" else {})}  # the control is not transferred
        predicted = {name: np.empty((len(y), X.shape[1]), dtype=object) for name in scored_on}
        splits = StratifiedGroupKFold(folds, shuffle=True, random_state=seed).split(X[:, 0], labels, groups)
        for train, test in steps(list(splits), f"{desc} ({target})", unit="fold", leave=False):
            probe = LayerwiseProbe(C=C).fit(X[train], labels[train])
            for name, activations in scored_on.items():
                predicted[name][test] = probe.predict(activations[test])
        chance = float(np.unique(labels, return_counts=True)[1].max() / len(labels))
        for name, predictions in predicted.items():
            correct = (predictions == labels[:, None]).sum(axis=0)
            p = [binomtest(int(k), len(labels), chance, alternative="greater").pvalue for k in correct]
            for layer, (k, p_layer, p_holm) in enumerate(zip(correct, p, holm(p))):
                low, high = wilson_interval(int(k), len(labels))
                rows.append((layer, target, name, k / len(labels), low, high, len(labels), chance, p_layer, p_holm))
    columns = ["layer", "target", "scored_on", "accuracy", "ci_low", "ci_high", "n", "chance", "p", "p_holm"]
    results = pd.DataFrame(rows, columns=columns)
    results["above_chance"] = results["p_holm"] < 0.05
    return results


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjustment of `p_values` for testing them all (every layer): the family-wise error rate
    of rejecting those below 0.05 is at most 0.05."""
    order = np.argsort(p_values)
    adjusted = np.empty(len(p_values))
    running = 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[index]))
        adjusted[index] = running
    return adjusted.tolist()


def selectivity(results: pd.DataFrame, scored_on: str = "self") -> pd.DataFrame:
    """Per layer: task accuracy minus control accuracy of the probes scored on their own condition (`scored_on`:
    its name in `results`)."""
    own = results[results.scored_on == scored_on].pivot(index="layer", columns="target", values="accuracy")
    return (own["task"] - own["control"]).rename("selectivity").reset_index()
