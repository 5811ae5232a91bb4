"""Inputs shared by the CPU and GPU suites."""
import torch
import torch.nn.functional as F

# the GPU suite's configurations: bucket sizes, head dims, bucket counts that are not powers of two
GRID = [dict(bucket=b, dim_head=d, n_buckets=n, causal=c, n_top=t)
        for b, d, n, c, t in [(32, 32, 7, False, 1), (64, 64, 12, True, 2), (128, 128, 5, False, 4),
                              (64, 128, 9, True, 3), (32, 64, 6, True, 1), (128, 32, 3, False, 2)]]


def separated_qk(B, H, T, D, bucket, causal, mask=None, device='cpu', gap=0.5):
    """q, k [B, H, T, D] (fp32) whose sort-net scores lie apart, so that every precision routes alike.

    Routing is a choice, not a continuous function: two key buckets whose scores are within rounding of each
    other send bf16 and fp64 to different buckets, and then no error bound between them holds. Here each token
    is noise with zero mean over its bucket's real tokens (`mask`: bool [B, T]) plus a multiple of one direction
    u: the queries' summaries are u, key bucket j's (c_j + 1) u with c a random permutation of 0.., so that the
    scores step by `gap` and none is near another or the null buckets' 0. Causal: c_j = j, whose running means
    grow by about half a bucket's worth per bucket, and steps of 8 x `gap`, clear of the noise of the first
    tokens' running means."""
    n = T // bucket
    noise = torch.randn(2, B, H, n, bucket, D, device=device)
    # zero mean over each bucket's real tokens, the ones summaries read
    real = (torch.ones(B, T, device=device) if mask is None else mask.float()).view(1, B, 1, n, bucket, 1)
    mean = (noise * real).sum(dim=4, keepdim=True) / real.sum(dim=4, keepdim=True).clamp(min=1)
    q, k = (noise - mean * real).flatten(3, 4)
    u = F.normalize(torch.randn(D, device=device), dim=0)
    # summary_scores divides by sqrt(D); causal key summaries sum a bucket's running means
    r2 = gap * D ** 0.5 * (16 / bucket if causal else 1)
    c = torch.arange(n, device=device) if causal else torch.randperm(n, device=device)
    offsets = (c + 1).repeat_interleave(bucket).view(T, 1).float()
    return q + r2 ** 0.5 * u, k + r2 ** 0.5 * offsets * u
