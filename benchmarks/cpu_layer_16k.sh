#!/usr/bin/env bash
# One SinkhornSelfAttention(512, 64, 16384, heads=8, n_top_buckets=2) forward+backward, causal and not, against
# the reference's layer, each measured in a fresh process (peak RSS), in three rounds that take turns (the round
# with the median time is reported: this VM's speed drifts). Writes into ${1:-benchmarks/results/cpu-layer-16k}.
set -euo pipefail
out=${1:-benchmarks/results/cpu-layer-16k}
python -m sinkhorn_kernels.bench --device cpu --ops layer --seq-lens 16384 --warmup 1 --repeats 5 --rounds 3 \
  --impls reference 'sinkhorn_kernels[reference]' --out "$out"
