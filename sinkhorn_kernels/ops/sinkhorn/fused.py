"""Fused Sinkhorn normalization and Gumbel-Sinkhorn as torch.library custom ops (fake implementations for
torch.compile) for every fused backend (`backend` names the module that launches the kernels, 'triton' or
'cuda'), and the autograd Functions around them."""
from typing import Optional

import torch

from ..backends import kernel_module
from ..library import kernel_op
from ..outputs import new_output
from .reference import LOG_EPS


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


@kernel_op('gumbel_sinkhorn_fwd')
def gumbel_sinkhorn_fwd(scores: torch.Tensor, uniform: Optional[torch.Tensor], n_iters: int, temperature: float,
                        backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (P in the scores' dtype, the fp32 log-scores it normalized, row and column offsets as `sinkhorn_fwd`)."""
    scores = scores.contiguous()
    log_alpha = new_output(torch.empty(scores.shape, device=scores.device, dtype=torch.float32))
    p, a, b = kernels(backend).forward(log_alpha, n_iters, scores=scores,
                                       noise=None if uniform is None else uniform.contiguous(),
                                       temperature=temperature, eps=LOG_EPS)
    return p, log_alpha, a, b


@gumbel_sinkhorn_fwd.register_fake
def _(scores, uniform, n_iters, temperature, backend):
    G, n, m = scores.shape
    f32 = dict(dtype=torch.float32)
    return (scores.new_empty(G, n, m), scores.new_empty(G, n, m, **f32), scores.new_empty(G, n_iters, n, **f32),
            scores.new_empty(G, n_iters + 1, m, **f32))


@kernel_op('gumbel_sinkhorn_bwd')
def gumbel_sinkhorn_bwd(dp: torch.Tensor, scores: torch.Tensor, log_alpha: torch.Tensor, a: torch.Tensor,
                        b: torch.Tensor, temperature: float, backend: str) -> torch.Tensor:
    """P's gradient -> the scores', in their dtype."""
    return kernels(backend).backward(dp, log_alpha, a, b, scores=scores.contiguous(), temperature=temperature,
                                     eps=LOG_EPS)


@gumbel_sinkhorn_bwd.register_fake
def _(dp, scores, log_alpha, a, b, temperature, backend):
    return scores.new_empty(scores.shape)


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


class GumbelSinkhorn(torch.autograd.Function):
    """scores [G, n, m] (and uniform samples as them, or None) -> P in the scores' dtype, differentiable in the
    scores; backward keeps them, their fp32 log-scores and the offset vectors."""

    @staticmethod
    def forward(ctx, scores, uniform, n_iters, temperature, backend):
        p, log_alpha, a, b = gumbel_sinkhorn_fwd(scores, uniform, n_iters, temperature, backend)
        ctx.save_for_backward(scores, log_alpha, a, b)
        ctx.temperature, ctx.backend = temperature, backend
        return p

    @staticmethod
    def backward(ctx, dp):
        return gumbel_sinkhorn_bwd(dp, *ctx.saved_tensors, ctx.temperature, ctx.backend), None, None, None, None


def gumbel_sinkhorn(scores, uniform, n_iters, temperature, backend):
    """[..., n, m] non-negative scores (and as many uniform samples, or None) -> Gumbel-Sinkhorn's normalized
    matrix in their dtype, of the log-scores `reference.log_scores` gives, made in fp32."""
    flat = lambda t: t.reshape(-1, *scores.shape[-2:])
    noise = None if uniform is None else flat(uniform)
    return GumbelSinkhorn.apply(flat(scores), noise, n_iters, temperature, backend).view(scores.shape)
