#!/usr/bin/env bash
# A change to the aligner's hot path on the SmolLM2 shape, on a GPU, sized for one call: the throughput table of
# this tree and of an earlier tree's aligner package, alternated A B A B on the same warm machine (the host's speed
# moves the ratios by up to 0.1 between machines, so two trees compare only on one machine), then the profile of
# each at PROFILE_N tokens (10 by default). SMALL_THROUGHPUT="--tables forward --rounds 10" keeps the forward
# alone, which fits a call; training's tables take longer. On the device machine, after
# benchmarks/accelerate_wheels.sh and `git archive REV aligner | tar -x -C /tmp/old && cp -r /tmp/old/aligner
# .whl/before-aligner` here: `bash benchmarks/gpu_ab.sh` with carry [".whl/accelerate", ".whl/smollm2-tokenizer",
# ".whl/before-aligner"]. Every table is appended to $OUT/ab.txt under its label, as each step ends (one file, so
# that it comes back beside gpu_run.sh's in the same call).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_ab} BEFORE=${BEFORE:-.whl/before-aligner}
export WHEELS=${WHEELS:-.whl/accelerate}
mkdir -p "$OUT"
# The earlier tree: this one with its aligner package swapped (the benchmark scripts are the same in both).
before=$(mktemp -d)/tree
cp -r . "$before" && rm -rf "$before/aligner" && cp -r "$BEFORE" "$before/aligner"

run() {  # run LABEL TREE STEP [VARIABLE=VALUE ...]: one gpu_run.sh step, its table appended to $OUT/ab.txt
    local label=$1 tree=$2 name=$3
    shift 3
    local step
    step=$(mktemp -d)
    env "$@" ONLY="$name" OUT="$step" bash "$tree/benchmarks/gpu_run.sh"
    { echo "### $label"; cat "$step/$name.txt"; } >>"$OUT/ab.txt"
    cat "$step/errors.log" >>"$OUT/errors.log"
    rm -rf "$step"
}

# The first step installs the carried wheels into /tmp/site (unless SKIP_INSTALL); the others use them.
run after-1 . throughput-smollm2
[ -z "${SKIP_INSTALL:-}" ] && export PYTHONPATH=/tmp/site SKIP_INSTALL=1
run before-1 "$before" throughput-smollm2
run after-2 . throughput-smollm2
run before-2 "$before" throughput-smollm2
run profile-after . profile-smollm2 PROFILE_N="${PROFILE_N:-10}"
run profile-before "$before" profile-smollm2 PROFILE_N="${PROFILE_N:-10}"
echo "total $SECONDS s"
