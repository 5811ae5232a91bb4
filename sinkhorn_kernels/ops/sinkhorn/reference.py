"""Log-domain Sinkhorn normalization in plain PyTorch: ground truth for the fused kernels and the CPU path."""
import torch


def sinkhorn_normalize(log_alpha, n_iters):
    # fp32 at least: logsumexp over many iterations drifts in half precision
    r = log_alpha.float() if log_alpha.dtype in (torch.float16, torch.bfloat16) else log_alpha
    for _ in range(n_iters):
        r = r - torch.logsumexp(r, dim=-1, keepdim=True)
        r = r - torch.logsumexp(r, dim=-2, keepdim=True)
    return r.exp().to(log_alpha.dtype)
