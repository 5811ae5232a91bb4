"""Fused Sinkhorn normalization as torch.library custom ops (fake implementations for torch.compile, autograd),
for every fused backend: `backend` names the module that launches the kernels ('triton' or 'cuda')."""
import torch

from ..backends import kernel_module


def kernels(backend):
    return kernel_module(__package__, backend)


@torch.library.custom_op('sinkhorn_kernels::sinkhorn_fwd', mutates_args=())
def sinkhorn_fwd(x: torch.Tensor, n_iters: int, backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return kernels(backend).forward(x.contiguous(), n_iters)


@sinkhorn_fwd.register_fake
def _(x, n_iters, backend):
    G, n, m = x.shape
    return (x.new_empty(G, n, m, dtype=torch.float32), x.new_empty(G, n_iters, n, dtype=torch.float32),
            x.new_empty(G, n_iters + 1, m, dtype=torch.float32))


@torch.library.custom_op('sinkhorn_kernels::sinkhorn_bwd', mutates_args=())
def sinkhorn_bwd(dp: torch.Tensor, x: torch.Tensor, p: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                 backend: str) -> torch.Tensor:
    return kernels(backend).backward(dp, x.contiguous(), p, a, b).to(x.dtype)


@sinkhorn_bwd.register_fake
def _(dp, x, p, a, b, backend):
    return torch.empty_like(x)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[0], *output)
    ctx.backend = inputs[2]


def _backward(ctx, dp, da, db):
    x, p, a, b = ctx.saved_tensors
    return sinkhorn_bwd(dp, x, p, a, b, ctx.backend), None, None


sinkhorn_fwd.register_autograd(_backward, setup_context=_setup_context)


def sinkhorn_normalize(log_alpha, n_iters, backend):
    """[..., n, m] -> the exponent of the normalized matrix, in log_alpha's dtype (computed in fp32)."""
    x = log_alpha.reshape(-1, *log_alpha.shape[-2:])
    return sinkhorn_fwd(x, n_iters, backend)[0].to(log_alpha.dtype).view(log_alpha.shape)
