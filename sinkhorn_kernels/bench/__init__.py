"""The benchmark suite: `python -m sinkhorn_kernels.bench --help`."""
