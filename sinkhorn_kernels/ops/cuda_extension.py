"""Access to the compiled extension sinkhorn_kernels._C: dtype codes and the current CUDA stream of a tensor."""
import importlib

import torch

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def load():
    """The extension module, or None when the package was installed without it."""
    try:
        return importlib.import_module('sinkhorn_kernels._C')
    except ImportError:
        return None


def dtype_code(t):
    return DTYPE_CODES[t.dtype]


def stream(t):
    return torch.cuda.current_stream(t.device).cuda_stream
