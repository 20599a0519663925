"""probe's fits with BLAS on one thread (`probe.probes.BLAS_THREADS = 1`, the default) against BLAS as the libraries
start (None: a thread per core), side by side in one run, on SmolLM2's activations of a knowledge set under the base
model and committed runs (collected first, or read from probe's disk cache): the form probe (which condition
produced the activations) and a knowledge probe on one training fold, task and control, and the geometry of one
run's effect against the knowledge subspace, on a few layers. Then, with `--whole`, the app's first visit of the
Probes and Geometry tabs at the default: every layer, five folds, each label, timed once.

    python -m benchmarks.probe_fit --rounds 3
    python -m benchmarks.probe_fit --rounds 0 --whole
"""

from __future__ import annotations

import argparse
import datetime
import time
from unittest.mock import patch

import numpy as np
import torch
from threadpoolctl import threadpool_info

import aligner
import probe.probes
from benchmarks.common import (
    Variant,
    command_and_machine,
    ratio,
    run_interleaved,
    table,
)
from probe import collect, knowledge_dataset
from probe.analyses import geometry_table
from probe.geometry import knowledge_directions, layer_geometry
from probe.model_report import form_probe_curves, knowledge_probe_curves
from probe.probes import LayerwiseProbe, control_labels

SETTINGS = {"BLAS as loaded (a thread per core)": None, "BLAS on one thread (the default)": 1}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", nargs="+", default=["runs/probe-demo-bracket-1tok", "runs/probe-demo-caps-1tok"])
    parser.add_argument("--knowledge", default="capitals")
    parser.add_argument("--subjects", type=int, default=90, help="each asked with both question templates")
    parser.add_argument("--layers", default="2,10,20,29", help="the layers of the side-by-side fits")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (0: none)")
    parser.add_argument("--whole", action="store_true", help="also time the app's Probes and Geometry tabs once")
    args = parser.parse_args()
    torch.set_num_threads(1)  # the collection's; the fits' threads are what is measured
    model = aligner.load_model()
    activations = collect(model, knowledge_dataset(args.knowledge, args.subjects), [None, *args.runs])
    conditions = activations.conditions
    layers = [int(layer) for layer in args.layers.split(",")]
    n = len(activations.dataset)

    form_X = np.concatenate([np.asarray(activations.resid(c))[:, layers] for c in conditions])
    form_y = np.repeat(conditions, n)
    base = np.asarray(activations.resid("base"))
    region = activations.dataset.labels["region"]
    train = np.random.default_rng(0).permutation(len(form_y))[: len(form_y) * 4 // 5]  # one fold's training rows
    train_base = train[train < n]
    form_control = control_labels(form_y, np.tile(np.arange(n), len(conditions)))
    region_control = control_labels(region, activations.dataset.entities)
    directions = knowledge_directions(base, activations.dataset.labels)
    aligned = np.asarray(activations.resid(conditions[1]))

    def fits(X, task, control, rows):
        return lambda: [LayerwiseProbe().fit(X[rows], labels[rows]) for labels in (task, control)]

    calls = {
        f"form probe ({len(conditions)} conditions), {len(train)} rows, task + control": fits(
            form_X, form_y, form_control, train
        ),
        f"region probe, base, {len(train_base)} rows, task + control": fits(
            base[:, layers], region, region_control, train_base
        ),
        f"geometry of {conditions[1]}, 200 + 200 null draws a layer": lambda: layer_geometry(
            base, aligned, directions, layers
        ),
    }
    variants = {
        (call_name, setting): Variant(
            f"{call_name}; {setting}", call, lambda threads=threads: patch.object(probe.probes, "BLAS_THREADS", threads)
        )
        for call_name, call in calls.items()
        for setting, threads in SETTINGS.items()
    }
    blas = "; ".join(
        f"{info['internal_api']} {info['version']} ({info['num_threads']} threads)"
        for info in threadpool_info()
        if info["user_api"] == "blas"
    )
    print(command_and_machine("cpu", ("numpy", "scipy", "scikit-learn", "threadpoolctl")))
    print(f"BLAS: {blas}")
    print(
        f"data: {args.knowledge}, {n} prompts, conditions {', '.join(conditions)}; SmolLM2's hook_resid_post at the "
        f"last prompt token; layers {args.layers}; {args.rounds} interleaved rounds; "
        f"{datetime.datetime.now().isoformat(timespec='seconds')}\n"
    )
    if args.rounds:
        run_interleaved(list(variants.values()), args.rounds, 1, "cpu", settle=False)
        loaded, one = SETTINGS
        rows = [
            [
                name,
                f"{np.median(variants[name, loaded].seconds):.2f}",
                f"{np.median(variants[name, one].seconds):.2f}",
                f"{ratio(variants[name, one], variants[name, loaded]):.1f}",
            ]
            for name in calls
        ]
        print(table(rows, ["call", f"seconds, {loaded}", f"seconds, {one}", "speed-up"]))
    if args.whole:
        runs = conditions[1:]
        steps = {
            "Probes tab, label form": lambda: form_probe_curves(activations, conditions),
            **{
                f"Probes tab, label {label}": lambda label=label: knowledge_probe_curves(activations, label, runs)
                for label in activations.dataset.labels
            },
            f"Geometry tab ({conditions[1]}, every layer)": lambda: geometry_table(
                activations, conditions[1], range(model.cfg.n_layers)
            ),
        }
        rows = []
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            rows.append([name, f"{time.perf_counter() - start:.1f}"])
        print(f"\nOnce each, BLAS_THREADS = {probe.probes.BLAS_THREADS}:\n")
        print(table(rows, ["what the app computes at a first visit", "seconds"]))


if __name__ == "__main__":
    main()
