"""Access to the compiled extension sinkhorn_kernels._C: dtype codes and the current CUDA stream of a tensor."""
import torch

from .backends import optional_module

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def load():
    """The extension module, or None when the package was installed without it."""
    return optional_module('sinkhorn_kernels._C')


def dtype_code(t):
    return DTYPE_CODES[t.dtype]


def stream(t):
    return torch.cuda.current_stream(t.device).cuda_stream
