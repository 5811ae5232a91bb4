"""Fused Sinkhorn normalization as torch.library custom ops (fake implementations for torch.compile) for every
fused backend (`backend` names the module that launches the kernels, 'triton' or 'cuda'), and the autograd
Function around them."""
import torch

from ..backends import kernel_module
from ..library import kernel_op


def kernels(backend):
    return kernel_module(__package__, backend)


@kernel_op('sinkhorn_fwd')
def sinkhorn_fwd(x: torch.Tensor, n_iters: int, backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (P in x's dtype, row offsets [G, T, n], column offsets [G, T + 1, m] in fp32)."""
    return kernels(backend).forward(x.contiguous(), n_iters)


@sinkhorn_fwd.register_fake
def _(x, n_iters, backend):
    G, n, m = x.shape
    return (x.new_empty(G, n, m), x.new_empty(G, n_iters, n, dtype=torch.float32),
            x.new_empty(G, n_iters + 1, m, dtype=torch.float32))


@kernel_op('sinkhorn_bwd')
def sinkhorn_bwd(dp: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, backend: str) -> torch.Tensor:
    """P's gradient -> x's, in x's dtype; P is rebuilt from x and the offsets."""
    return kernels(backend).backward(dp, x.contiguous(), a, b)


@sinkhorn_bwd.register_fake
def _(dp, x, a, b, backend):
    return x.new_empty(x.shape)  # contiguous whatever x's strides, as the kernels write it


class SinkhornNormalize(torch.autograd.Function):
    """x [G, n, m] -> P in x's dtype (computed in fp32), differentiable in x. Backward keeps x and the offset
    vectors, not P."""

    @staticmethod
    def forward(ctx, x, n_iters, backend):
        p, a, b = sinkhorn_fwd(x, n_iters, backend)
        ctx.save_for_backward(x, a, b)
        ctx.backend = backend
        return p

    @staticmethod
    def backward(ctx, dp):
        return sinkhorn_bwd(dp, *ctx.saved_tensors, ctx.backend), None, None


def sinkhorn_normalize(log_alpha, n_iters, backend):
    """[..., n, m] -> the exponent of the normalized matrix, in log_alpha's dtype (computed in fp32)."""
    x = log_alpha.reshape(-1, *log_alpha.shape[-2:])
    return SinkhornNormalize.apply(x, n_iters, backend).view(log_alpha.shape)
