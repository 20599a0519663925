"""Intervals and paired comparisons for the suite's scores: a bootstrap over items and seeds.

A method's score on a split is a matrix S (seeds x items) of per-item values (1/0 for a check passed, or a number
such as a log-probability); its estimate is the mean of S. One bootstrap replicate draws the items with
replacement and, independently, the seeds with replacement, and takes the mean of the resampled matrix: both
sources of variation (which facts were asked, which seed trained the method) are in the interval. The 95%
interval is the 2.5th and 97.5th percentiles of the replicates.

Two methods answer the same items, so their difference is paired: a replicate draws one set of items for both
(and each method's seeds on its own), and the interval is of mean(S_a) - mean(S_b). `compare` reads it against
a margin fixed before the run: "equivalent" when the whole interval lies within +-margin, "better" or "worse"
when it excludes 0 (and is not equivalent), "inconclusive" otherwise: the data cannot tell.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

RESAMPLES = 4000
CONFIDENCE = 0.95
MARGIN = 0.05  # the suite's equivalence margin: 5 points of a share
BOOTSTRAP_SEED = 0  # the intervals are reproducible: the same scores give the same interval


@dataclass(frozen=True)
class Estimate:
    mean: float
    low: float
    high: float

    def __str__(self) -> str:
        return f"{self.mean:.2f} [{self.low:.2f}, {self.high:.2f}]"


def as_matrix(scores: np.ndarray | list) -> np.ndarray:
    """(seeds, items) float array; refuses an empty one or rows of unequal length."""
    matrix = np.asarray(scores, dtype=float)
    if matrix.ndim == 1:
        matrix = matrix[None, :]
    if matrix.ndim != 2 or matrix.size == 0:
        raise ValueError(f"scores must be a non-empty (seeds, items) matrix, got shape {matrix.shape}")
    return matrix


def _seed_means(matrix: np.ndarray, items: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(resamples,): each replicate's mean over the resampled items, then over the resampled seeds."""
    per_seed = matrix[:, items].mean(axis=2)  # (seeds, resamples): each seed's mean over the drawn items
    seeds = rng.integers(0, matrix.shape[0], size=(items.shape[0], matrix.shape[0]))  # (resamples, seeds)
    return np.take_along_axis(per_seed.T, seeds, axis=1).mean(axis=1)


def _interval(mean: float, replicates: np.ndarray, confidence: float) -> Estimate:
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(replicates, [tail, 100 - tail])
    return Estimate(float(mean), float(low), float(high))


def bootstrap(
    scores: np.ndarray | list, resamples: int = RESAMPLES, confidence: float = CONFIDENCE, seed: int = BOOTSTRAP_SEED
) -> Estimate:
    """The mean of `scores` (seeds x items) and its percentile interval, resampling items and seeds."""
    matrix = as_matrix(scores)
    rng = np.random.default_rng(seed)
    items = rng.integers(0, matrix.shape[1], size=(resamples, matrix.shape[1]))
    return _interval(matrix.mean(), _seed_means(matrix, items, rng), confidence)


def paired_difference(
    a: np.ndarray | list,
    b: np.ndarray | list,
    resamples: int = RESAMPLES,
    confidence: float = CONFIDENCE,
    seed: int = BOOTSTRAP_SEED,
) -> Estimate:
    """mean(a) - mean(b) for two methods' scores on the same items (columns in the same order; any number of
    seeds each), with its interval: the items are drawn once per replicate for both."""
    a, b = as_matrix(a), as_matrix(b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"a paired difference needs the same items: {a.shape[1]} against {b.shape[1]}")
    rng = np.random.default_rng(seed)
    items = rng.integers(0, a.shape[1], size=(resamples, a.shape[1]))
    difference = _seed_means(a, items, rng) - _seed_means(b, items, rng)
    return _interval(a.mean() - b.mean(), difference, confidence)


def compare(difference: Estimate, margin: float = MARGIN) -> str:
    """What a paired difference's interval says against the equivalence `margin`."""
    if -margin <= difference.low and difference.high <= margin:
        return "equivalent"
    if difference.low > 0:
        return "better"
    if difference.high < 0:
        return "worse"
    return "inconclusive"
