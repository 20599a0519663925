#!/usr/bin/env bash
# A shorter GPU run than gpu_run.sh, for what is left of a session's device time: the SmolLM2-shape throughput
# table, aligner training under accelerate on the LLaMA-2-7B shape (accelerate_gpu.sh), and the bank of 1,024
# aligners with three rounds. On the device
# machine, after benchmarks/accelerate_wheels.sh here: `bash benchmarks/gpu_check.sh` with carry
# [".whl/accelerate", ".whl/smollm2-tokenizer"] (no pyarrow: the image's own serves datasets).
set -u
cd "$(dirname "$0")/.."
export OUT=${OUT:-/tmp/gpu_run}
# The first step installs the wheels into /tmp/site (unless SKIP_INSTALL); the others use them from there.
WHEELS=.whl/accelerate ONLY=throughput-smollm2 bash benchmarks/gpu_run.sh || exit 1
[ -z "${SKIP_INSTALL:-}" ] && export PYTHONPATH=/tmp/site SKIP_INSTALL=1
bash benchmarks/accelerate_gpu.sh
ONLY=bank-smollm2 BANK="${BANK:---rounds 3}" bash benchmarks/gpu_run.sh
