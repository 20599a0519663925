#!/usr/bin/env bash
# The whole GPU run of benchmarks/RESULTS.md in one command, sized to fit one call of the device machine (meant
# to finish within 5 minutes): the targets' benchmarks on random weights of SmolLM2-135M's and LLaMA-2-7B's shapes
# (bf16, batch 8 x 512). On the device machine, after benchmarks/accelerate_wheels.sh here: run
# `BENCH_COMMIT=<this tree's commit> WHEELS=.whl/accelerate bash benchmarks/gpu_run.sh` with carry
# [".whl/accelerate", ".whl/smollm2-tokenizer"] (the device's copy of the tree has no .git to read the commit from).
# Each table goes to $OUT/NAME.txt, its data to $OUT/results/KEY-NAME.json (KEY: h200, h100, from the GPU's name;
# copy them to benchmarks/results/, then `python docs/check.py --write`), every error message to $OUT/errors.log.
# ONLY="throughput-smollm2 bank-smollm2" runs a subset, and the diagnostics at the end run only when ONLY names
# them. A dry run on a CPU, in a few minutes:
#   SKIP_INSTALL=1 DEVICE=cpu BIG=tiny SMALL=tiny SIZES="--batch 2 --seq 16 --rounds 1 --iters 1" \
#   BANK="--bank 8 --prompts 4 --gen-batch 2 --new-tokens 2" OUT=/tmp/gpu_run bash benchmarks/gpu_run.sh
set -u
cd "$(dirname "$0")/.."
if [ -z "${SKIP_INSTALL:-}" ]; then
    # WHEELS: the folder of carried wheels (.whl by default; gpu_check.sh carries .whl/accelerate instead)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        "${WHEELS:-.whl}"/*.whl || exit 1
    echo "installed the carried wheels in $SECONDS s"
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD TQDM_DISABLE=1 PYTHONUNBUFFERED=1
PYTHON=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda} BIG=${BIG:-llama2-7b} SMALL=${SMALL:-smollm2} SIZES=${SIZES:-} BANK=${BANK:-}
OUT=${OUT:-/tmp/gpu_run}
mkdir -p "$OUT/results"
if [ "$DEVICE" = cuda ]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    KEY=${KEY:-$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | grep -o -i -E 'h[0-9]+' | head -1 | tr 'H' 'h')}
fi
KEY=${KEY:-$DEVICE}

step() {  # step NAME SECONDS MODULE ARGS...: one benchmark, its table printed and kept
    local name=$1 limit=$2 data=()
    shift 2
    # The benchmarks whose tables RESULTS.md renders write them as data too.
    case $1 in benchmarks.throughput | benchmarks.bank | benchmarks.probe) data=(--json "$OUT/results/$KEY-$name.json") ;; esac
    # ONLY="NAME NAME ...": run just these steps (a second call on a device whose time is short).
    if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]]; then return; fi
    echo "### $name"
    local start=$SECONDS
    timeout "$limit" "$PYTHON" -m "$@" --device "$DEVICE" --tokenizer .whl/smollm2-tokenizer $SIZES "${data[@]}" \
        2>>"$OUT/errors.log" | tee "$OUT/$name.txt"
    echo "($name: exit ${PIPESTATUS[0]}, $((SECONDS - start)) s)"
}

# Most wanted first: if the call's time runs out, what ran is already in $OUT. Each round times --iters calls of a
# variant after one untimed call (benchmarks/common.py's run_interleaved): 2 + 1 per round on the small model,
# whose host-bound ratios need the calls, and 1 + 1 on the 7B one, which the GPU bounds.
step throughput-llama2-7b 200 benchmarks.throughput --shape "$BIG" --rounds 3 --iters 1
# SMALL_THROUGHPUT: more options for it, which override these ("--tables forward --rounds 20": the forward alone,
# with the rounds its scatter needs on a host-bound model).
step throughput-smollm2 180 benchmarks.throughput --shape "$SMALL" --rounds 5 --iters 2 ${SMALL_THROUGHPUT:-}
# Generation in batches of 512 prompts: the bank's 1,024 answers in two batches, so that few decoding steps run (a
# step of the host-bound small model is mostly host time, whatever the batch).
step bank-smollm2 240 benchmarks.bank --shape "$SMALL" --rounds 2 --gen-batch 512 $BANK
step probe-smollm2 60 benchmarks.probe --shape "$SMALL" --iters 2
step probe-llama2-7b 90 benchmarks.probe --shape "$BIG" --rounds 3 --iters 1
# Diagnostics, run only when ONLY names them. One product for every layer's prefix against each layer's own
# projections (layer.py's project_stacked); the profile (PROFILE_N=1 profiles one token instead of ten).
diagnostic() { [[ " ${ONLY:-} " == *" $1 "* ]] && step "$@"; }
diagnostic stacked-smollm2 120 benchmarks.stacked_prefix --shape "$SMALL" --rounds 10 --iters 3
diagnostic profile-smollm2 90 benchmarks.profile_aligner --shape "$SMALL" --batch 8 --seq 512 --n-tokens "${PROFILE_N:-10}"
echo "total $SECONDS s"
