"""The attention sort net's summaries of q and k in PyTorch (the ground truth, and every backend's path but
Triton's), and their vector-Jacobian product."""
import torch
from einops import rearrange


def zero_masked(t, mask):
    return t if mask is None else t.masked_fill(~mask[..., None], 0)


def masked_bucket_mean(x, mask, n_buckets):
    """Mean over each bucket's real tokens; padding never shifts the routing of real tokens."""
    xb = rearrange(x, 'b h (n s) d -> b h n s d', n=n_buckets)
    if mask is None:
        # not mean(): its backward divides the expanded gradient, whose layout eager CPU and fake tensors pick
        # differently; torch.compile(backend='aot_eager') then fails on a view of it (a fake/eager stride
        # mismatch of the kind in pytorch/pytorch#120035)
        return xb.sum(dim=3) / xb.shape[3]
    m = rearrange(mask, 'b h (n s) -> b h n s 1', n=n_buckets).to(x.dtype)
    return (xb * m).sum(dim=3) / m.sum(dim=3).clamp(min=1)


def running_mean_weights(mask, T, bucket_size, like):
    """1 / (number of real tokens up to t), by bucket: [B or 1, 1 or H, N, bs]."""
    if mask is None:
        count = torch.arange(1, T + 1, device=like.device, dtype=like.dtype).view(1, 1, T)
    else:
        count = mask.to(like.dtype).cumsum(dim=-1).clamp(min=1)
    return rearrange(1 / count, '... (n s) -> ... n s', s=bucket_size)


def _suffix_sums(t, dim):
    """t's sums from each position to the end of axis `dim`."""
    return t.flip(dim).cumsum(dim=dim).flip(dim)


def _earlier_sums(x, mask, bucket_size):
    """(1 / count by bucket (see `running_mean_weights`), x by bucket, the sum of x over all earlier buckets)."""
    inv = running_mean_weights(mask, x.shape[2], bucket_size, x)
    xb = rearrange(x, 'b h (n s) d -> b h n s d', s=bucket_size)
    totals = xb.sum(dim=3)
    return inv, xb, totals.cumsum(dim=2) - totals


def causal_first_means(x, mask, bucket_size):
    """The running mean over real tokens, cumavg[t] = sum_{s<=t} x_s / count_t, at each bucket's first token:
    [B, H, N, D]."""
    inv, xb, before = _earlier_sums(x, mask, bucket_size)
    return (before + xb[:, :, :, 0]) * inv[..., 0, None]


def causal_summed_means(x, mask, bucket_size):
    """The running mean's sum over each bucket, [B, H, N, D]: from bucket sums and suffix weights (sum_t cumavg[t]
    = prefix * sum_t 1/count_t + sum_s x_s * sum_{t>=s} 1/count_t) with no pass along the sequence, so its cost is
    that of two bucket reductions."""
    inv, xb, before = _earlier_sums(x, mask, bucket_size)
    suffix = _suffix_sums(inv, -1)
    return before * inv.sum(dim=-1, keepdim=True) + torch.einsum('bhnsd,bhns->bhnd', xb, suffix.expand(*xb.shape[:4]))


def sort_summaries(q, k, *, bucket_size, kv_bucket_size, causal, n_sortcut=0, q_mask=None, kv_mask=None):
    """What the attention sort net reads of q and k, masked positions excluded: [B, H, Nq or 1, D] and
    [B, H, Nk, D]. Non-causal: bucket means (one mean of the whole query with SortCut). Causal: the running mean
    of q at each bucket's first token, and the running means of k summed over each bucket. Both are linear in q
    and k, which the fused layer relies on to take their gradient after q and k are gone."""
    q, k = zero_masked(q, q_mask), zero_masked(k, kv_mask)
    if causal:
        return causal_first_means(q, q_mask, bucket_size), causal_summed_means(k, kv_mask, kv_bucket_size)
    n_query = 1 if n_sortcut else q.shape[2] // bucket_size
    return masked_bucket_mean(q, q_mask, n_query), masked_bucket_mean(k, kv_mask, k.shape[2] // kv_bucket_size)


def _bucketed(t, n):
    return t.unflatten(2, (n, -1))


def _real(mask, t, n):
    """The real tokens as [B, 1 or H, n, s, 1] in t's dtype, None when all are."""
    return None if mask is None else _bucketed(mask.to(t.dtype), n)[..., None]


def _add(out, x, m):
    """out += x * m (m None: all ones)."""
    return out.add_(x) if m is None else out.addcmul_(x, m)


def add_bucket_mean_vjp(d, out, mask, n):
    """Adds the vector-Jacobian product of `masked_bucket_mean` over n buckets for output gradient d into out."""
    m = _real(mask, out, n)
    count = m.sum(dim=3).clamp(min=1) if m is not None else out.shape[2] // n
    _add(_bucketed(out, n), (d / count)[:, :, :, None], m)


def add_sort_summaries_vjp(d_sq, d_sk, dq, dk, *, bucket_size, kv_bucket_size, causal, n_sortcut=0, q_mask=None,
                           kv_mask=None):
    """Adds the vector-Jacobian product of `sort_summaries` for output gradients d_sq, d_sk into dq, dk
    ([B, H, T, D] of any strides), in place and without a temporary of their size. The summaries are linear, so
    this needs no values of q and k."""
    if not causal:
        add_bucket_mean_vjp(d_sq, dq, q_mask, 1 if n_sortcut else dq.shape[2] // bucket_size)
        add_bucket_mean_vjp(d_sk, dk, kv_mask, dk.shape[2] // kv_bucket_size)
        return
    later = lambda t: _suffix_sums(t, 2) - t  # sum over the later buckets
    # queries: first[c] = (sum of real q before bucket c's first token, and it) * inv at that token
    n = dq.shape[2] // bucket_size
    m = _real(q_mask, dq, n)
    g = d_sq * running_mean_weights(q_mask, dq.shape[2], bucket_size, dq)[..., 0, None]
    _add(_bucketed(dq, n), later(g)[:, :, :, None], m)
    _add(_bucketed(dq, n)[:, :, :, 0], g, None if m is None else m[:, :, :, 0])
    # keys: summed[c] = (sum of real k before bucket c) * sum_c inv + sum_{s in c} k_s * (sum_{t >= s in c} inv_t)
    n = dk.shape[2] // kv_bucket_size
    m = _real(kv_mask, dk, n)
    inv = running_mean_weights(kv_mask, dk.shape[2], kv_bucket_size, dk)
    suffix = _suffix_sums(inv, -1)[..., None]
    _add(_bucketed(dk, n), later(d_sk * inv.sum(dim=-1, keepdim=True))[:, :, :, None], m)
    _bucketed(dk, n).addcmul_(d_sk[:, :, :, None], suffix if m is None else m * suffix)
