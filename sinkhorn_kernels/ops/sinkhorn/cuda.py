"""Sinkhorn normalization through the CUDA extension (csrc/sinkhorn.cu): the same scheme as the Triton kernel."""
import torch

from ..cuda_extension import dtype_code, load, stream
from ..outputs import new_output


def forward(x, n_iters):
    """x [G, n, m] contiguous, n_iters >= 1 -> (P in x's dtype, row offsets [G, T, n], column offsets
    [G, T + 1, m], both fp32)."""
    G, n, m = x.shape
    p = new_output(torch.empty_like(x))
    a = new_output(torch.empty(G, n_iters, n, device=x.device, dtype=torch.float32))
    b = new_output(torch.empty(G, n_iters + 1, m, device=x.device, dtype=torch.float32))
    load().sinkhorn_forward(x.data_ptr(), p.data_ptr(), a.data_ptr(), b.data_ptr(), G, n, m, n_iters, dtype_code(x),
                            stream(x))
    return p, a, b


def backward(dp, x, a, b):
    """dp [G, n, m] -> dx in x's dtype (the kernel reads dp in x's dtype)."""
    G, n, m = x.shape
    dp = dp.to(x.dtype).contiguous()
    dx = new_output(torch.empty_like(x))
    ga, gb = torch.empty_like(a), torch.empty_like(b)
    load().sinkhorn_backward(x.data_ptr(), dp.data_ptr(), dx.data_ptr(), a.data_ptr(), b.data_ptr(), ga.data_ptr(),
                             gb.data_ptr(), G, n, m, a.shape[1], dtype_code(x), stream(x))
    return dx
