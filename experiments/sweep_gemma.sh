#!/usr/bin/env bash
# The suite on Gemma-3-270M, a base model (issue 10), beside SmolLM2's in results/ (cells under
# results/cells/gemma-3-270m), in two processes like sweep_smollm2.sh, and resumable like it. A base model has no
# chat template: its prompts are "Question: ...\nAnswer:" and its answers end at the newline (aligner/chat.py),
# except in `instruct`, whose prompts carry the Alpaca format and whose answers end at end of sequence.
# Which facts are known: a bare question finds 80 of the 250 capitals, three answered ones before it 161
# (--audit-shots 3); `json` and `frame` train on the first, `instruct` and `inject` on the second.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1
sweep() { .venv/bin/aligner sweep --model gemma-3-270m --out results "$@"; }

# Instruction following, the paper's first task: 60 steps for every trained method (20 do not reach JSON).
instruct() { sweep --tasks instruct --audit-shots 3 --steps 60 "$@"; }
(
  # The JSON form: zero training, one token and LoRA r = 8; in 20 steps at the learning rate chosen for SmolLM2
  # the one token does not reach it, so the same with a 4x learning rate, and with 3x the steps.
  sweep --tasks json --methods base,prompting,aligner-1,lora-8 --seeds 0,1
  sweep --tasks json --methods aligner-1:lr=0.08,aligner-1:steps=60 --seeds 0,1
  instruct --methods base,prompting,aligner-1,aligner-10 --seeds 0,1
  # Knowledge injection on the capitals that the 3-shot audit finds unknown.
  sweep --tasks inject --audit-shots 3 --methods base,aligner-1,lora-8 --seeds 0,1
) &
(
  instruct --methods adapter-10,lora-8 --seeds 0,1
  sweep --tasks value --methods base,prompting,aligner-1,lora-8 --seeds 0,1
  # The form that keeps the base model's sentence (`>>> The capital of X is Y. <<<`), which kept the most content
  # on SmolLM2; the one token with the 60 steps it needs for JSON here.
  sweep --tasks frame --methods base,prompting,aligner-1:steps=60,lora-8 --seeds 0,1
) &
wait
sweep --tables-only
