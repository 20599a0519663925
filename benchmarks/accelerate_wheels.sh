#!/usr/bin/env bash
# Prepares, in .whl/ (ignored by git), what benchmarks/accelerate_gpu.sh carries to a device machine: in
# .whl/accelerate/ the wheels of the Python packages its image lacks (transformer-lens and what it imports at start:
# datasets, dill, multiprocess; peft at the anchors' version; plotly, which `probe` imports, for benchmarks/probe.py)
# for its Python 3.12, and SmolLM2's tokenizer files in .whl/smollm2-tokenizer/ (the device has no network, and the
# model's package is not there). The image has
# accelerate 1.15.0, psutil and pyarrow; pyarrow is not carried (55 MB: with it, the working tree would pass the
# 64 MiB a call carries), so accelerate_gpu.sh checks first that datasets imports with the image's pyarrow.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl/accelerate .whl/smollm2-tokenizer
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl/accelerate transformer-lens==4.3.0 peft==0.21.2 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 \
    plotly==7.1.0
tokenizer_dir=$(.venv/bin/python -c "from aligner.loading import DEFAULT_MODEL, packaged_model_dir; print(packaged_model_dir(DEFAULT_MODEL))")
cp "$tokenizer_dir"/tokenizer.json "$tokenizer_dir"/tokenizer_config.json "$tokenizer_dir"/chat_template.jinja .whl/smollm2-tokenizer/
du -sh .whl/accelerate .whl/smollm2-tokenizer
