import torch

from ..._checks import require
from ..backends import FUSED_DTYPES, resolve_backend
from . import reference


def sinkhorn_normalize(log_alpha, n_iters, backend=None):
    """Sinkhorn operator on `[..., n, m]` log-scores: `n_iters` rounds of row then column normalization in
    the log domain, returning the exponent (a doubly stochastic matrix when square)."""
    name = _fused_backend(log_alpha, n_iters, backend)
    if name is None:
        return reference.sinkhorn_normalize(log_alpha, n_iters)
    from . import fused
    return fused.sinkhorn_normalize(log_alpha, n_iters, name)


def gumbel_sinkhorn(scores, n_iters, temperature, noise=True, backend=None):
    """Gumbel-Sinkhorn (Mena et al. 2018) on non-negative scores: log, optional Gumbel noise, / temperature,
    then `sinkhorn_normalize`; on a fused backend all in its two kernels. The noise comes from one `torch.rand`
    of the scores' shape and dtype, as the reference package draws it, so a seed gives every backend the same
    samples. Pass noise=False for deterministic evaluation."""
    require(temperature > 0, f'temperature must be > 0, got {temperature}')
    name = _fused_backend(scores, n_iters, backend)
    uniform = torch.rand(scores.shape, device=scores.device, dtype=scores.dtype) if noise else None
    if name is None:
        return reference.sinkhorn_normalize(reference.log_scores(scores, uniform, temperature), n_iters)
    from . import fused
    return fused.gumbel_sinkhorn(scores, uniform, n_iters, temperature, name)


def _fused_backend(x, n_iters, backend):
    """The fused backend that normalizes x (whose dtype it then checks), or None where the reference does (its
    backend, or no iterations)."""
    require(x.dim() >= 2, f'Sinkhorn normalization expects [..., n, m] scores, got shape {tuple(x.shape)}')
    require(n_iters >= 0, f'n_iters must be >= 0, got {n_iters}')
    name = resolve_backend(backend, x.device)
    if name == 'reference' or n_iters == 0:
        return None
    require(x.dtype in FUSED_DTYPES, f'the {name} backend takes float16, bfloat16 or float32 scores, got {x.dtype}; '
                                     "use backend='reference'")
    return name
