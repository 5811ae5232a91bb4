import torch

from ..backends import FUSED_DTYPES, resolve_backend
from . import reference


def sinkhorn_normalize(log_alpha, n_iters, backend=None):
    """Sinkhorn operator on `[..., n, m]` log-scores: `n_iters` rounds of row then column normalization in
    the log domain, returning the exponent (a doubly stochastic matrix when square)."""
    _check_shape(log_alpha, n_iters)
    name = resolve_backend(backend, log_alpha.device)
    if name != 'reference' and n_iters > 0:
        from . import fused
        return fused.sinkhorn_normalize(_fused_dtype(log_alpha, name), n_iters, name)
    return reference.sinkhorn_normalize(log_alpha, n_iters)


def gumbel_sinkhorn(scores, n_iters, temperature, noise=True, backend=None):
    """Gumbel-Sinkhorn (Mena et al. 2018) on non-negative scores: log, optional Gumbel noise, / temperature,
    then `sinkhorn_normalize`; on a fused backend all in its two kernels. The noise comes from one `torch.rand`
    of the scores' shape and dtype, as the reference package draws it, so a seed gives every backend the same
    samples. Pass noise=False for deterministic evaluation."""
    if temperature <= 0:
        raise ValueError(f'temperature must be > 0, got {temperature}')
    _check_shape(scores, n_iters)
    uniform = torch.rand(scores.shape, device=scores.device, dtype=scores.dtype) if noise else None
    name = resolve_backend(backend, scores.device)
    if name != 'reference' and n_iters > 0:
        from . import fused
        return fused.gumbel_sinkhorn(_fused_dtype(scores, name), uniform, n_iters, temperature, name)
    return sinkhorn_normalize(reference.log_scores(scores, uniform, temperature), n_iters, backend=name)


def _check_shape(x, n_iters):
    if x.dim() < 2:
        raise ValueError(f'Sinkhorn normalization expects [..., n, m] scores, got shape {tuple(x.shape)}')
    if n_iters < 0:
        raise ValueError(f'n_iters must be >= 0, got {n_iters}')


def _fused_dtype(x, backend):
    if x.dtype not in FUSED_DTYPES:
        raise ValueError(f'the {backend} backend takes float16, bfloat16 or float32 scores, got {x.dtype}; '
                         "use backend='reference'")
    return x
