#!/usr/bin/env bash
# The Gemma-3-270M grid (a base model) under the suite's protocol, beside SmolLM2's in OUT (cells under
# OUT/cells/gemma-3-270m), in two processes and resumable like sweep_smollm2.sh; 3 seeds. A base model has no chat
# template: its prompts are "Question: ...\nAnswer:" and its answers end at the newline (aligner/chat.py), except
# in `instruct`, whose prompts carry the Alpaca format and whose answers end at end of sequence. A bare question
# finds fewer of the capitals it knows than three answered ones before it (--audit-shots 3): `json` trains on
# the first, `instruct` and `inject` on the second.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1
OUT=${OUT:-results/next}
sweep() { .venv/bin/aligner sweep --model gemma-3-270m --out "$OUT" --seeds 0,1,2 "$@"; }

(
  sweep --tasks json --methods base,prompting,fewshot,aligner-1,aligner-10,lora-8
  # Injection's step budget as SmolLM2's (sweep_smollm2.sh): invented facts take more passes than a form.
  sweep --tasks inject --audit-shots 3 --steps 600 --methods base,aligner-1,aligner-10,lora-8
) &
(
  # Instruction following, the paper's first task.
  sweep --tasks instruct --audit-shots 3 --methods base,prompting,fewshot,aligner-1,aligner-10,lora-8
) &
wait
sweep --tables-only
