#!/usr/bin/env bash
# Downloads into .whl/ (ignored by git) the pure-Python wheels a lent GPU machine lacks (it has no internet):
# the runtime dependencies, the reference for parity and benchmarks, and tqdm for the benchmark's progress bar.
set -eu
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: -d .whl \
  local-attention==1.11.2 hyper-connections==0.4.11 torch-einops-utils==0.2.0 product-key-memory==0.3.0 \
  colt5-attention==0.11.2 axial-positional-embedding==0.3.12 sinkhorn-transformer==0.11.4 einops==0.8.2 \
  tqdm==4.67.1
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
echo "staged: $(ls .whl | tr '\n' ' ')"
