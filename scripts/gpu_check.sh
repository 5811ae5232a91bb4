#!/usr/bin/env bash
# The one prepared run for a lent GPU machine (H100/H200, no internet, its own torch and triton).
# Before: scripts/stage_wheels.sh here; the device call carries .whl and runs `bash scripts/gpu_check.sh`.
# Installs the project without touching torch, runs the GPU tests and the bf16 benchmark sweep (1k to 64k
# tokens) within 8 minutes, and writes everything into ${1:-$OUT}.
set -uo pipefail
out=${1:-${OUT:?give an output folder or set OUT}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)'
} > "$out/device.txt" 2>&1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
python3 -m pip install -q --no-build-isolation --no-deps -e . || exit 1
python3 -c 'import sinkhorn_kernels as sk; print(sk.available_backends())' >> "$out/device.txt" 2>&1

timeout 200 python3 -m pytest -q -m gpu tests 2>&1 | tee "$out/gpu_tests.log"
timeout 260 python3 -m sinkhorn_kernels.bench --device cuda --dtype bfloat16 --out "$out/bench" --no-plots \
  --seq-lens 1024 4096 16384 65536 2>&1 | tee "$out/bench.log"
cp "$out/bench/results.csv" "$out/bench/summary.md" "$out/" 2>/dev/null
echo "done: $(ls "$out")"
