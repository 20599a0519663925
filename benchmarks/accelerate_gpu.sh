#!/usr/bin/env bash
# Aligner training under accelerate on one GPU (benchmarks/accelerate_train.py): a random-weight LLaMA-2-7B-shaped
# model in bf16, batch 8 x 512, the workbench's training loop under Accelerator(mixed_precision="bf16") with and
# without gradient checkpointing, beside plain PyTorch steps without accelerate, interleaved in one run; tokens/s,
# ratios and peak memory. On the device machine, after benchmarks/accelerate_wheels.sh here: run
# `bash benchmarks/accelerate_gpu.sh` with carry [".whl/accelerate", ".whl/smollm2-tokenizer"] (its step has
# 210 s). The table goes to $OUT/accelerate_train.txt, error messages to $OUT/errors.log.
# A dry run on this machine's CPU (a minute or two):
#   SKIP_INSTALL=1 DEVICE=cpu SHAPE=tiny TOKENIZER= SIZES="--batch 2 --seq 32 --rounds 1 --iters 1 --threads 1" \
#   PYTHON=.venv/bin/python OUT=/tmp/accelerate_gpu bash benchmarks/accelerate_gpu.sh
set -u
cd "$(dirname "$0")/.."
if [ -z "${SKIP_INSTALL:-}" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/accelerate/*.whl || exit 1
    echo "installed the carried wheels in $SECONDS s"
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD TQDM_DISABLE=1 PYTHONUNBUFFERED=1
PYTHON=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda} SHAPE=${SHAPE:-llama2-7b} SIZES=${SIZES:-} OUT=${OUT:-/tmp/accelerate_gpu}
TOKENIZER=${TOKENIZER---tokenizer .whl/smollm2-tokenizer}  # set it empty to use the packaged SmolLM2's
mkdir -p "$OUT"
# The image's own pyarrow serves the carried datasets (see accelerate_wheels.sh): if it does not, say so and stop.
if ! "$PYTHON" -c "import aligner, benchmarks.accelerate_train" 2>>"$OUT/errors.log"; then
    tail -5 "$OUT/errors.log"
    "$PYTHON" -m pip list 2>/dev/null | grep -i -E "^(pyarrow|datasets|accelerate|transformers|torch) "
    echo "the workbench does not import here; nothing was measured"
    exit 1
fi
[ "$DEVICE" = cuda ] && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
start=$SECONDS
timeout 210 "$PYTHON" -m benchmarks.accelerate_train --device "$DEVICE" --shape "$SHAPE" $TOKENIZER $SIZES \
    2>>"$OUT/errors.log" | tee "$OUT/accelerate_train.txt"
echo "(accelerate_train: exit ${PIPESTATUS[0]}, $((SECONDS - start)) s; total $SECONDS s)"
