#!/usr/bin/env bash
# The SmolLM2-135M-Instruct sweep in results/: every cell of it, in two processes (one torch thread each, the
# fastest on 2 cores). The sweep is resumable: cells already in results/cells with the same settings are skipped,
# so a rerun runs only what is missing, and an interrupted one loses at most the cell it was in.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1
sweep() { .venv/bin/aligner sweep --out results "$@"; }

factors=aligner-1:gate_scale=0.5,aligner-1:gate_scale=1.5,aligner-1:steps=40,aligner-1:train=10,aligner-1:lr=0.005,aligner-1:lr=0.08
grid=aligner-2,aligner-4,aligner-10,adapter-1,adapter-10,lora-1,prompt-10,zbias
(
  sweep --tasks json,frame --methods base,prompting,steering,aligner-1,lora-8 --seeds 0,1
  sweep --tasks json --methods "$grid" --seeds 0,1
  sweep --tasks json --methods "$factors" --seeds 0,1
  sweep --tasks value --methods "$grid" --seeds 0,1
) &
(
  sweep --tasks inject,value --methods base,prompting,aligner-1,lora-8 --seeds 0,1
  sweep --tasks inject --methods "$grid" --seeds 0,1
  sweep --tasks caps,terse,bracket --methods base,aligner-1,lora-8 --seeds 0,1
  sweep --tasks caps,terse,bracket --methods prompting,steering --seeds 0
) &
wait
sweep --tables-only
