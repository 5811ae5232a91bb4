import torch

from ..backends import FUSED_DTYPES, resolve_backend
from . import reference

LOG_EPS = 1e-6


def sinkhorn_normalize(log_alpha, n_iters, backend=None):
    """Sinkhorn operator on `[..., n, m]` log-scores: `n_iters` rounds of row then column normalization in
    the log domain, returning the exponent (a doubly stochastic matrix when square)."""
    if log_alpha.dim() < 2:
        raise ValueError(f'sinkhorn_normalize expects [..., n, m] scores, got shape {tuple(log_alpha.shape)}')
    if n_iters < 0:
        raise ValueError(f'n_iters must be >= 0, got {n_iters}')
    name = resolve_backend(backend, log_alpha.device)
    if name != 'reference' and n_iters > 0:
        if log_alpha.dtype not in FUSED_DTYPES:
            raise ValueError(f'the {name} backend takes float16, bfloat16 or float32 scores, got {log_alpha.dtype}; '
                             "use backend='reference'")
        from . import fused
        return fused.sinkhorn_normalize(log_alpha, n_iters, name)
    return reference.sinkhorn_normalize(log_alpha, n_iters)


def sample_gumbel(shape, device, dtype, generator=None):
    u = torch.rand(shape, device=device, dtype=dtype, generator=generator)
    return -torch.log(-torch.log(u + LOG_EPS) + LOG_EPS)


def gumbel_sinkhorn(scores, n_iters, temperature, noise=True, backend=None):
    """Gumbel-Sinkhorn (Mena et al. 2018) on non-negative scores: log, optional Gumbel noise, / temperature,
    then `sinkhorn_normalize`. Pass noise=False for deterministic evaluation."""
    if temperature <= 0:
        raise ValueError(f'temperature must be > 0, got {temperature}')
    log_alpha = torch.log(scores + LOG_EPS)
    if noise:
        log_alpha = log_alpha + sample_gumbel(scores.shape, scores.device, scores.dtype)
    return sinkhorn_normalize(log_alpha / temperature, n_iters, backend=backend)
