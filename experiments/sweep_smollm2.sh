#!/usr/bin/env bash
# The SmolLM2-135M-Instruct grid under the suite's protocol (docs/suite.md: rates chosen on validation, training
# to convergence, 5 seeds, intervals), in OUT (default results/next; results/ holds the first grid until this one
# is whole), in two processes of one torch thread each (the fastest on 2 cores). Resumable: cells already in
# OUT/cells with the same settings and items are skipped, so a rerun runs only what is missing and an interrupted
# one loses at most the cell it was in. Each lane goes from the comparisons the conclusions rest on to the rest.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1
OUT=${OUT:-results/next}
sweep() { .venv/bin/aligner sweep --out "$OUT" "$@"; }

core=base,prompting,fewshot,steering,aligner-1,lora-8,aligner-1:tokens=random,aligner-1:data=own
# Injection's step budget: at 200 steps its rate search's best rate was still improving at the last step.
inject_steps=600
(
  # First the first seed of the runs the probe report and the app read (`make suite-runs`).
  sweep --tasks json --methods lora-8 --seeds 0
  sweep --tasks frame --methods aligner-1 --seeds 0
  sweep --tasks json,frame --methods "$core"
  sweep --tasks json,frame --methods aligner-10,zbias,lora-8:data=own
  sweep --tasks caps,terse,bracket,lead --methods base,prompting,fewshot,aligner-1,lora-8
) &
(
  # Injection of invented facts; aligner-28 is as large as adapter-1 (one token per adapted layer), shared.
  sweep --tasks inject --methods aligner-1 --seeds 0 --steps "$inject_steps"
  sweep --tasks json --methods zbias --seeds 0
  sweep --tasks inject --methods base,aligner-1,aligner-10,aligner-28,adapter-1,zbias,lora-8 --steps "$inject_steps"
  # Values; then the paper's value alignment, SFT then DPO from it, for the one token and LoRA.
  sweep --tasks value --methods base,prompting,fewshot,aligner-1,aligner-10,adapter-1,lora-8,aligner-1:then=dpo,lora-8:then=dpo
) &
wait
sweep --tables-only
