#!/usr/bin/env bash
# The one prepared run for a lent GPU machine (H100/H200, no internet, its own torch and triton).
# Before: scripts/stage_wheels.sh here; the device call carries .whl and runs `bash scripts/gpu_check.sh`.
# Installs the project without touching torch (building _C for this GPU only), runs the GPU tests, then the
# benchmarks of the performance goals (each in its own process, so a crash loses one), then a wider sweep while
# time is left. Everything lands in ${1:-$OUT}, written as it goes so that a run cut short still reports, in seven
# files (the device tool returns eight at most): device.txt, steps.log, gpu_tests.log, bench.log,
# bench/results.csv + bench/summary.md (all benchmark runs together) and profile.txt (the 16k layer and
# the Sinkhorn goal's step).
set -uo pipefail
out=${1:-${OUT:?give an output folder or set OUT}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
step() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$out/steps.log"; }

{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
  python3 -c 'import torch, triton
print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)'
} > "$out/device.txt" 2>&1
step install
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
SINKHORN_KERNELS_CUDA_ARCHS=$(python3 -c 'import torch; print("%d%d" % torch.cuda.get_device_capability())') \
  python3 -m pip install --no-build-isolation --no-deps -e . > /tmp/install.log 2>&1 \
  || { tail -40 /tmp/install.log | tee -a "$out/steps.log"; exit 1; }
python3 -c 'import sinkhorn_kernels as sk; print(sk.available_backends())' >> "$out/device.txt" 2>&1
cat "$out/device.txt"

step tests
parallel=$(python3 -c 'import xdist' 2>/dev/null && echo '-n 8')
per_test=$(python3 -c 'import pytest_timeout' 2>/dev/null && echo '--timeout 150')
timeout 250 python3 -m pytest -q -m gpu tests $parallel $per_test --tb=short -rfE 2>&1 | tee "$out/gpu_tests.log" \
  | tail -40

bench() {  # bench NAME SECONDS ARGS...: one benchmark process, appending to the shared results
  local name=$1 seconds=$2; shift 2
  step "bench $name"
  timeout "$seconds" python3 -m sinkhorn_kernels.bench --device cuda --dtype bfloat16 --no-plots --out "$out/bench" \
    "$@" 2>&1 | grep -v '^benchmarks:' | tee -a "$out/bench.log" | tail -25
}
mkdir -p "$out/bench"
ours='sinkhorn_kernels[triton] sinkhorn_kernels[cuda]'
# the goals: layer at 16k vs the reference; block attention at 64k vs dense SDPA; Sinkhorn 512 x 128 x 128, 8 iters
# (and Gumbel-Sinkhorn of that size beside it)
bench layer16k 75 --ops layer --seq-lens 16384 --impls $ours reference --warmup 3 --repeats 10
# ours under torch.compile (launch overhead was most of the eager layer's time), against the eager reference
bench layer16k-compiled 120 --ops layer --seq-lens 16384 --impls reference 'sinkhorn_kernels[triton]+compile' \
  --warmup 3 --repeats 10
bench attention64k 75 --ops sinkhorn_attention --seq-lens 65536 --impls $ours sdpa reference --warmup 3 --repeats 10
bench sinkhorn128 60 --ops sinkhorn gumbel_sinkhorn --seq-lens 8192 --impls $ours 'sinkhorn_kernels[reference]' \
  reference
# where the time goes (kernels and launches) in the 16k layer and in the Sinkhorn goal's step, one file
step profile
timeout 60 python3 - > "$out/profile.txt" 2>&1 <<'PY'
import torch
from torch.profiler import ProfilerActivity, profile

import sinkhorn_kernels as sk


def profiled(name, step):
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
    print(f'== {name}, 5 steps')
    print(prof.key_averages().table(sort_by='cuda_time_total', row_limit=30))
    print(prof.key_averages().table(sort_by='cpu_time_total', row_limit=20))


layer = sk.SinkhornSelfAttention(512, 64, 16384, heads=8, n_top_buckets=2).cuda().bfloat16()
x = torch.randn(1, 16384, 512, device='cuda', dtype=torch.bfloat16, requires_grad=True)
profiled('layer, 16k tokens, forward + backward', lambda: layer(x).float().sum().backward())
scores = torch.randn(512, 128, 128, device='cuda', dtype=torch.bfloat16, requires_grad=True)
profiled('Sinkhorn normalization, 512 x 128 x 128, 8 iterations, forward + backward',
         lambda: sk.ops.sinkhorn_normalize(scores, 8).float().sum().backward())
PY
# the wider sweep, as far as time allows (FlexAttention with the same block pattern included)
bench sweep 90 --seq-lens 1024 4096 16384 --warmup 3 --repeats 10
step done
ls -R "$out"
