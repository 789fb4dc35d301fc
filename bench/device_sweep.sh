#!/usr/bin/env bash
# The single call for a lent GPU machine (one H100/H200, 16 cores): the throughput sweep
# (bench/gpu.py --sweep), then the data benchmark on the machine's cores (bench/data.py --workers
# 1 8 16) and the per-worker profile of prepare (bench/prepare_profile.py: perf stat where perf
# exists, /proc otherwise), then the MoE row (bench/moe.py --cuda). Everything lands in $OUT (at
# most 8 files come back from a call).
#
# Here, once: PY=<project python> bash bench/device_wheels.sh   (fills the git-ignored .whl/)
# Then one device call, with carry [".whl"] and timeout_s 580:
#   bash bench/device_sweep.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/device}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
unset DS_ACCELERATOR
started=$(date +%s)
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
# zeroforge from this tree, without a build: its packages are the repo's folders.
mkdir -p /tmp/zf/zeroforge
for d in launcher trainer data conf slurm; do ln -sfn "$PWD/$d" "/tmp/zf/zeroforge/$d"; done
export PYTHONPATH=/tmp/zf:/tmp/site${PYTHONPATH:+:$PYTHONPATH}
{
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    nproc; python3 -c "import torch, deepspeed, transformers; print(torch.__version__, torch.version.cuda, deepspeed.__version__, transformers.__version__)"
    python3 -c "import importlib.util as u; print({m: u.find_spec(m) is not None for m in ('flash_attn', 'liger_kernel', 'triton', 'torchao')})"
} > "$OUT/env.txt" 2>&1
echo "setup: $(( $(date +%s) - started )) s"; cat "$OUT/env.txt"

# 1. The sweep: no run starts after --budget-s; the slowest run (llama-1b, compiling) takes < 60 s.
timeout 300 python3 bench/gpu.py --sweep --budget-s 220 --out "$OUT/gpu_sweep.json" 2>&1 | tee "$OUT/sweep.log" \
    | grep -v -E "Warning|warn\(|^\s*$"
echo "sweep done at $(( $(date +%s) - started )) s"

# 2. Prepare scaling on 16 cores (the question left open in bench/RESULTS.md).
timeout 120 python3 bench/data.py --workers 1 8 16 --loader-steps 50 --stream-steps 20 > "$OUT/data.log" 2>&1
tail -n 20 "$OUT/data.log"; cp bench/results/data.json "$OUT/data.json" 2>/dev/null
timeout 60 python3 bench/prepare_profile.py --workers 1 16 --out "$OUT/prepare_profile.json" 2>&1 | tail -n 6

# 3. A small Qwen3-MoE shape in bf16: tokens/s and MFU (active parameters) at parallel.expert=1, and
#    against parallel.expert=2 where the machine has 2 GPUs (NCCL takes one rank a GPU).
timeout 100 python3 bench/moe.py --cuda --steps 10 --warmup 3 --repeats 1 --out "$OUT/moe.json" 2>&1 \
    | grep -v -E "Warning|warn\(|^\s*$" | tail -n 8
echo "all done at $(( $(date +%s) - started )) s"
