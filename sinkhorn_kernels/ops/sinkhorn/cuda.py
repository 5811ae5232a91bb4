"""Sinkhorn normalization through the CUDA extension (csrc/sinkhorn.cu): the same scheme as the Triton kernel.
Gumbel-Sinkhorn's log-scores and their chain rule are PyTorch ops around the kernels here."""
import torch

from ..cuda_extension import dtype_code, load, stream
from ..outputs import new_output
from .reference import log_scores


def forward(x, n_iters, scores=None, noise=None, temperature=1.0, eps=0.0):
    """As the Triton launcher's `forward`. The kernel takes x and writes P in one element type, so with scores
    (x then in fp32) P is cast to their dtype afterwards."""
    G, n, m = x.shape
    if scores is not None:
        x.copy_(log_scores(scores.float(), None if noise is None else noise.float(), temperature, eps))
    p = new_output(torch.empty_like(x))
    a = new_output(torch.empty(G, n_iters, n, device=x.device, dtype=torch.float32))
    b = new_output(torch.empty(G, n_iters + 1, m, device=x.device, dtype=torch.float32))
    load().sinkhorn_forward(x.data_ptr(), p.data_ptr(), a.data_ptr(), b.data_ptr(), G, n, m, n_iters, dtype_code(x),
                            stream(x))
    return (p if scores is None else p.to(scores.dtype)), a, b


def backward(dp, x, a, b, scores=None, temperature=1.0, eps=0.0):
    """As the Triton launcher's `backward` (the kernel reads dp in x's dtype)."""
    G, n, m = x.shape
    dp = dp.to(x.dtype).contiguous()
    dx = new_output(torch.empty_like(x))
    ga, gb = torch.empty_like(a), torch.empty_like(b)
    load().sinkhorn_backward(x.data_ptr(), dp.data_ptr(), dx.data_ptr(), a.data_ptr(), b.data_ptr(), ga.data_ptr(),
                             gb.data_ptr(), G, n, m, a.shape[1], dtype_code(x), stream(x))
    if scores is None:
        return dx
    return (dx / (temperature * (scores.float() + eps))).to(scores.dtype)
