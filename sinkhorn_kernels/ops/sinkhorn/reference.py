"""Log-domain Sinkhorn normalization and Gumbel-Sinkhorn's log-scores in plain PyTorch: ground truth for the fused
kernels and the CPU path."""
import torch

LOG_EPS = 1e-6


def sinkhorn_normalize(log_alpha, n_iters):
    # fp32 at least: logsumexp over many iterations drifts in half precision
    r = log_alpha.float() if log_alpha.dtype in (torch.float16, torch.bfloat16) else log_alpha
    for _ in range(n_iters):
        r = r - torch.logsumexp(r, dim=-1, keepdim=True)
        r = r - torch.logsumexp(r, dim=-2, keepdim=True)
    return r.exp().to(log_alpha.dtype)


def log_scores(scores, uniform, temperature, eps=LOG_EPS):
    """(log(scores + eps) + Gumbel noise of the uniform samples, if any) / temperature, in the scores' dtype."""
    log_alpha = torch.log(scores + eps)
    if uniform is not None:
        log_alpha = log_alpha - torch.log(-torch.log(uniform + eps) + eps)
    return log_alpha / temperature
