#!/usr/bin/env bash
# The suite on Gemma-3-270M, a base model (issue 10), in results/gemma/: a first look, two seeds, the JSON form and
# knowledge injection with zero training, one token and LoRA r = 8. Resumable like sweep_smollm2.sh. A base model
# has no chat template: its prompts are "Question: ...\nAnswer:" and its answers end at the newline (aligner/chat.py).
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1
.venv/bin/aligner sweep --model gemma-3-270m --out results/gemma --tasks json,inject \
    --methods base,prompting,aligner-1,lora-8 --seeds 0,1
# In 20 steps at the learning rate chosen for SmolLM2 the one token does not reach the JSON form on Gemma: the same
# with a 4x learning rate, and with 3x the steps.
.venv/bin/aligner sweep --model gemma-3-270m --out results/gemma --tasks json \
    --methods aligner-1:lr=0.08,aligner-1:steps=60 --seeds 0,1
