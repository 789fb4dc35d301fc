#!/usr/bin/env bash
# Fill .whl/ (git-ignored) with the wheels bench/device_sweep.sh installs on a lent GPU machine,
# whose image has torch, triton, tokenizers, safetensors, numpy, pandas, pyarrow, psutil and
# huggingface-hub but not DeepSpeed, Hydra, datasets, Liger, torchao or this transformers. Run it here,
# where PyPI is reachable, with the project's Python (its versions are the ones pinned); then
# name .whl in the device call's carry. About 20 MiB.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
exclude=$(git rev-parse --git-path info/exclude)
grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
rm -rf .whl && mkdir .whl
version() { "$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"; }
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
for name in hydra-core omegaconf datasets dill multiprocess pydantic pydantic-core annotated-types \
            typing-inspection hjson transformers; do
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${platforms[@]}" -d .whl "$name==$(version "$name")"
done
# Liger's Triton kernels (pure Python): the sweep runs its variant only where it is installed.
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 -d .whl liger-kernel
# torchao's float8 training, for the sweep's fp8 runs (its kernels are built for CUDA: cp310-abi3).
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d .whl "torchao==$(version torchao)"
# Published as source only: built here into pure-Python wheels (DeepSpeed without its C++ ops,
# which the trainer does not use: torch's AdamW steps, NCCL communicates).
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w .whl \
    "deepspeed==$(version deepspeed)" "antlr4-python3-runtime==$(version antlr4-python3-runtime)"
ls -la .whl && du -sh .whl
