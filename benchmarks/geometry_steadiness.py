"""How far the geometry's numbers move when the activations move by a few float32 roundings, with the
knowledge subspace spanned as `LayerwiseProbe.directions` gives it (a multiclass probe's class weights centred)
and uncentred (each class's raw weight vector), side by side on SmolLM2's activations of a knowledge set
under the base model and committed runs (collected first, or read from probe's disk cache). Per run and way: the
knowledge subspace's dimension at the first layer, the geometry's means over the adapted layers, and the largest
change of each per-layer number under the perturbation. Every condition's activations move by the same noise, so
Δ = aligned - base stays as it was up to rounding (and zero before the aligner's first layer), and what moves is
what is fitted or drawn on the base activations: the knowledge probes and the covariance null.

    python -m benchmarks.geometry_steadiness
"""

from __future__ import annotations

import argparse
import datetime
from unittest.mock import patch

import numpy as np
from tqdm import tqdm

import aligner
from benchmarks.common import command_and_machine, table
from probe import collect, knowledge_dataset
from probe.geometry import knowledge_directions, layer_geometry
from probe.probes import LayerwiseProbe

MOVED = ("overlap", "min_angle", "covariance_q50", "covariance_q95", "random_q50")  # the per-layer numbers


def uncentred(probe: LayerwiseProbe) -> list[np.ndarray]:
    """The directions without centring: each class's own weight vector, the way to set the centred one against."""
    return [p[-1].coef_ / p[0].scale_ for p in probe.probes_]


WAYS = {"centred (probe.probes)": LayerwiseProbe.directions, "uncentred (raw class weights)": uncentred}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", nargs="+", default=["runs/probe-demo-json-1tok", "runs/probe-demo-inject-10tok"])
    parser.add_argument("--knowledge", default="capitals")
    parser.add_argument("--subjects", type=int, default=90, help="each asked with both question templates")
    parser.add_argument(
        "--noise", type=float, default=1e-6, help="the perturbation, relative to each activation's mean magnitude"
    )
    args = parser.parse_args()
    model = aligner.load_model()
    activations = collect(model, knowledge_dataset(args.knowledge, args.subjects), [None, *args.runs])
    base = np.asarray(activations.resid("base"))
    scale = np.abs(base).mean(axis=-1, keepdims=True)
    noise = (np.random.default_rng(0).standard_normal(base.shape) * args.noise * scale).astype(base.dtype)
    layers = range(base.shape[1])  # layer_geometry skips those the aligner leaves as they were

    rows = []
    with tqdm(total=len(WAYS) * (2 + 2 * len(args.runs)), desc="geometry", unit="step") as progress:
        for way, directions in WAYS.items():
            knowledge = []
            for activations_of in (base, base + noise):
                with patch.object(LayerwiseProbe, "directions", directions):
                    knowledge.append(knowledge_directions(activations_of, activations.dataset.labels))
                progress.update()
            for condition in activations.conditions[1:]:
                aligned = np.asarray(activations.resid(condition))
                tables = []
                for moved_by, subspace in zip((0, noise), knowledge):
                    geometry = layer_geometry(base + moved_by, aligned + moved_by, subspace, layers)
                    tables.append(geometry.set_index("layer"))
                    progress.update()
                as_is, moved = tables[0], (tables[1][list(MOVED)] - tables[0][list(MOVED)]).abs().max()
                rows.append(
                    [
                        condition,
                        way,
                        str(as_is.knowledge_dim.iloc[0]),
                        f"{as_is.overlap.mean():.3f}",
                        f"{as_is.covariance_q50.mean():.3f}",
                        *(f"{moved[column]:.4f}" for column in MOVED),
                    ]
                )
    print(command_and_machine("cpu", ("numpy", "scipy", "scikit-learn")))
    print(
        f"data: {args.knowledge}, {len(activations.dataset)} prompts; SmolLM2's hook_resid_post at the last prompt "
        f"token; activations moved by noise of {args.noise:g} of each one's mean magnitude; "
        f"{datetime.datetime.now().isoformat(timespec='seconds')}\n"
    )
    print(
        table(
            rows,
            [
                "run",
                "knowledge directions",
                "dimensions",
                "mean overlap",
                "mean covariance-null median",
                *(f"largest change: {column}" for column in MOVED),
            ],
        )
    )


if __name__ == "__main__":
    main()
