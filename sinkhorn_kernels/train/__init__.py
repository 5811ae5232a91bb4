"""Training the built-in tasks: `python -m sinkhorn_kernels.train --help`."""
