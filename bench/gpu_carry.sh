#!/usr/bin/env bash
# Fills .gpu/ (git-ignored) with what bench/gpu_check.py needs on a GPU machine that has no network
# and lacks this project's packages (docs/scale.md, "On a GPU"): pure-Python wheels at this
# project's versions, bitsandbytes with its CUDA 13.0 library alone, SmolLM2's tokenizer from the
# cache, and a copy of the shared datasets. Run from the repository root with the .venv set up
# and the built-in model converted once (any surgery command on it does that).
set -euo pipefail
py=${PYTHON:-.venv/bin/python}
data=${SURGERY_DATA_DIR:-../shared/datasets}
site=$($py -c "import bitsandbytes, pathlib; print(pathlib.Path(bitsandbytes.__file__).parent.parent)")
tokenizer=$(ls -d "${SURGERY_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/surgery}"/models/SmolLM2-135M-Instruct* | head -1)
rm -rf .gpu && mkdir -p .gpu/whl .gpu/site .gpu/tok .gpu/data
version() { $py -c "import importlib.metadata as m; print(m.version('$1'))"; }
for name in transformers peft trl datasets lm_eval gguf dill multiprocess; do
  $py -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform any -d .gpu/whl "$name==$(version "$name")"
done
cp -r "$site/bitsandbytes" "$site"/bitsandbytes-*.dist-info .gpu/site/
find .gpu/site/bitsandbytes -name '*.so' ! -name libbitsandbytes_cuda130.so ! -name libbitsandbytes_cpu.so -delete
find .gpu/site -name __pycache__ -prune -exec rm -rf {} +
cp "$tokenizer"/{tokenizer.json,tokenizer_config.json,config.json} .gpu/tok/
cp "$data"/*.jsonl.gz .gpu/data/
du -sh .gpu
