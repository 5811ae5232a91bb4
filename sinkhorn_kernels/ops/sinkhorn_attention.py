"""Sparse Sinkhorn attention as one functional op on [batch, heads, seq, dim_head] tensors.

Steps: a sort net scores (query bucket, key bucket) pairs; routing turns the scores into sparse top-k routes
(or, in Gumbel-Sinkhorn mode, a soft permutation that mixes the key buckets); block attention lets every
query bucket attend to its routes and its own bucket in one softmax.
"""
import torch
import torch.nn.functional as F
from einops import rearrange

from .._checks import check_bucket_multiple, require
from .backends import resolve_backend
from .block_attention import block_attention, check_qkv, every_bucket_routes, head_mask
from .routing import topk_routing
from .routing.reference import topk_routing_backward
from .sinkhorn import gumbel_sinkhorn
from .summaries.reference import sort_summaries, zero_masked


# the reference's non-causal attention sort net routes at temperature 1 (kept for checkpoint parity)
SORT_NET_TEMPERATURE = 1.0


def _per_head(mask, B, H, T, name):
    """A checked mask as [B, H, T] (None stays None)."""
    mask = head_mask(mask, B, H, T, name)
    return None if mask is None else mask.expand(B, H, -1)


def _rotated(t, first_head, shift):
    """A copy of t whose heads first_head.. are rolled left by `shift` along the sequence (axis 2)."""
    T = t.shape[2]
    s = shift % T
    out = torch.empty_like(t)
    out[:, :first_head] = t[:, :first_head]
    out[:, first_head:, :T - s] = t[:, first_head:, s:]
    out[:, first_head:, T - s:] = t[:, first_head:, :s]
    return out


class _RotateHeads(torch.autograd.Function):
    """Its gradient is the opposite rotation: one pass over the gradient, where autograd through a roll and a
    cat makes two full-size zero-padded copies of its halves and adds them."""

    @staticmethod
    def forward(ctx, t, first_head, shift):
        ctx.first_head, ctx.shift = first_head, shift
        return _rotated(t, first_head, shift)

    @staticmethod
    def backward(ctx, grad):
        return _rotated(grad, ctx.first_head, -ctx.shift), None, None


def rotate_heads(t, first_head, shift):
    """Rolls the sequence axis (2) of heads first_head.. left by `shift` (negative: right)."""
    if t is None or shift == 0 or first_head >= t.shape[1]:
        return t
    return _RotateHeads.apply(t, first_head, shift)


def empty_key_buckets(kv_mask, kv_bucket_size):
    """bool [B, 1 or H, Nk]: the key buckets without a real token (None without a mask)."""
    return None if kv_mask is None else ~kv_mask.unflatten(-1, (-1, kv_bucket_size)).any(-1)


def summary_scores(sq, sk, n_null=0, empty=None):
    """Scaled dot products of query and key bucket summaries, with `n_null` leading zero columns. With null columns
    (causal), key buckets in `empty` (see `empty_key_buckets`) score -inf: their summary is zero, so they would tie
    with the null buckets, and the backends break ties differently."""
    scores = torch.einsum('bhid,bhjd->bhij', sq * sq.shape[-1] ** -0.5, sk)
    if n_null and empty is not None:
        scores = scores.masked_fill(empty[..., None, :], float('-inf'))
    return F.pad(scores, (n_null, 0)) if n_null else scores


def attention_sort_scores(q, k, *, bucket_size, kv_bucket_size, causal, n_sortcut=0, n_null=0, q_mask=None,
                          kv_mask=None):
    """The parameter-free attention sort net: scaled dot products of the bucket summaries of `sort_summaries`,
    [B, H, Nq or 1, Nk] (causal: with `n_null` leading zero-score columns for the null buckets)."""
    sq, sk = sort_summaries(q, k, bucket_size=bucket_size, kv_bucket_size=kv_bucket_size, causal=causal,
                            n_sortcut=n_sortcut, q_mask=q_mask, kv_mask=kv_mask)
    return summary_scores(sq, sk, n_null, empty_key_buckets(kv_mask, kv_bucket_size))


def route_scores(scores, causal, n_null):
    """The scores as top-k sees them: causal, only the null buckets and the strictly earlier key buckets."""
    if not causal:
        return scores
    i = torch.arange(scores.shape[-2], device=scores.device)
    future = i[None, :] >= i[:, None]  # key bucket j is not strictly before query bucket i
    return scores.masked_fill(F.pad(future, (n_null, 0)), float('-inf'))


def routes_per_query_bucket(causal, n_top_buckets, n_sortcut, n_key_buckets):
    return n_top_buckets if causal else min(n_sortcut or n_top_buckets, n_key_buckets)


def topk_routes(scores, *, causal, n_top_buckets, n_sortcut, temperature, n_null=0):
    """Sparse routes from sort-net scores: (indices, weights), [B, H, Nq or 1, K]; causal null routes are index
    Nk."""
    k = routes_per_query_bucket(causal, n_top_buckets, n_sortcut, scores.shape[-1])
    idx, w = topk_routing(route_scores(scores, causal, n_null), k, temperature)
    if causal:
        return torch.where(idx < n_null, scores.shape[-1] - n_null, idx - n_null), w
    if n_sortcut:  # every query bucket takes the first n_sortcut picks
        idx, w = (t.flatten(2)[..., None, :n_sortcut] for t in (idx, w))
    return idx, w


def summary_routes(sq, sk, *, causal, n_top_buckets, n_sortcut, temperature, n_query_buckets, own_bucket,
                   empty=None, backend='reference'):
    """The attention sort net's routes from its summaries, as block attention runs them: (scores, indices,
    weights), the routes [B, H, n_query_buckets, K] for every query bucket, the own bucket appended last when
    `own_bucket`; causal routes have `n_top_buckets` null buckets (index Nk). backend='triton' routes in one
    kernel (int32 indices, fp32 weights); the other backends with PyTorch ops. `empty`: see `summary_scores`."""
    n_null = n_top_buckets if causal else 0
    scores = summary_scores(sq, sk, n_null, empty)
    if backend == 'triton':
        from .routing import fused as routing_kernels
        k = routes_per_query_bucket(causal, n_top_buckets, n_sortcut, scores.shape[-1])
        return (scores, *routing_kernels.topk_routes_fwd(scores, k, temperature, causal, n_null, n_query_buckets,
                                                         own_bucket))
    idx, w = topk_routes(scores, causal=causal, n_top_buckets=n_top_buckets, n_sortcut=n_sortcut,
                         temperature=temperature, n_null=n_null)
    return (scores, *every_bucket_routes(idx, w, n_query_buckets, own_bucket))


def summary_routes_backward(scores, sq, sk, d_weights, *, causal, n_top_buckets, n_sortcut, temperature, own_bucket,
                            backend='reference'):
    """The gradients of the summaries (d_sq, d_sk) from that of `summary_routes`' weights, by hand: no autograd
    graph is kept from forward."""
    n_null = n_top_buckets if causal else 0
    scale = sq.shape[-1] ** -0.5  # summary_scores: scaled dot products
    if backend == 'triton':
        from .routing import fused as routing_kernels
        k = routes_per_query_bucket(causal, n_top_buckets, n_sortcut, scores.shape[-1])
        d_scores = routing_kernels.topk_routes_bwd(scores, d_weights, k, temperature, causal, n_null, scale)
    else:
        if own_bucket:
            d_weights = d_weights[..., :-1]  # the own bucket's weight is the constant 1
        if sq.shape[2] == 1 and d_weights.shape[2] > 1:  # SortCut: one set of routes, read by every query bucket
            d_weights = d_weights.sum(dim=2, keepdim=True)
        d_scores = topk_routes_backward(scores, d_weights.to(scores.dtype), causal=causal,
                                        n_top_buckets=n_top_buckets, n_sortcut=n_sortcut, temperature=temperature,
                                        n_null=n_null).mul_(scale)
    d_scores = d_scores[..., n_null:]
    return torch.einsum('bhij,bhjd->bhid', d_scores, sk), torch.einsum('bhij,bhid->bhjd', d_scores, sq)


def topk_routes_backward(scores, d_weights, *, causal, n_top_buckets, n_sortcut, temperature, n_null=0):
    """The gradient of `topk_routes`' weights [B, H, Nq or 1, K] with respect to the scores, without autograd."""
    k = routes_per_query_bucket(causal, n_top_buckets, n_sortcut, scores.shape[-1])
    if n_sortcut and not causal:
        picks = d_weights.new_zeros(*scores.shape[:-1], k)
        picks.view(*picks.shape[:2], -1)[..., :d_weights.shape[-1]] = d_weights.flatten(2)
        d_weights = picks
    return topk_routing_backward(route_scores(scores, causal, n_null), k, temperature, d_weights)


def sinkhorn_attention(q, k, v, *, bucket_size, n_top_buckets=1, causal=False, n_sortcut=0, kv_bucket_size=None,
                       non_permutative=True, sinkhorn_iter=5, temperature=0.75, gumbel_noise=False, q_mask=None,
                       kv_mask=None, null_kv=None, dropout_p=0.0, backend=None, sort_net=None):
    """Sparse Sinkhorn attention (Tay et al. 2020), the drop-in for `F.scaled_dot_product_attention`.

    q: [B, H, Tq, D]; k, v: [B, H, Tk, D]; returns [B, H, Tq, D]. Each query bucket attends to its own bucket
    and to `n_top_buckets` key buckets chosen by the parameter-free attention sort net (differentiable top-k,
    `non_permutative=True`), or to a Gumbel-Sinkhorn soft permutation of the key buckets
    (`non_permutative=False`, `sinkhorn_iter` iterations at `temperature`, Gumbel noise when `gumbel_noise`).
    `n_sortcut` > 0: every query bucket attends to the same top `n_sortcut` buckets (no own bucket unless the
    bucket counts match). `causal`: routes only to earlier buckets or to the learned null bucket
    (`null_kv = (null_k, null_v)`, each [H, D], required), causal mask inside the own bucket, and the second
    half of the heads works on the sequence rotated by bucket_size - 1. Masks: bool [B, T] or [B, H, T]
    (True = real token); the key mask defaults to all-real, never to the query mask. `sort_net(q, k, q_mask,
    kv_mask)` replaces the attention sort net (its scores then go through top-k at `temperature`).
    """
    check_qkv(q, k, v)
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    kv_bucket_size = kv_bucket_size or bucket_size
    check_bucket_multiple(Tq, bucket_size, 'query sequence')
    check_bucket_multiple(Tk, kv_bucket_size, 'key/value sequence')
    require(n_top_buckets >= 1, f'n_top_buckets must be >= 1, got {n_top_buckets}')
    require(n_sortcut >= 0, f'n_sortcut must be >= 0, got {n_sortcut}')
    nq, nk = Tq // bucket_size, Tk // kv_bucket_size
    q_mask, kv_mask = _per_head(q_mask, B, H, Tq, 'q_mask'), _per_head(kv_mask, B, H, Tk, 'kv_mask')
    sizes = dict(bucket_size=bucket_size, kv_bucket_size=kv_bucket_size, dropout_p=dropout_p)
    common = dict(sizes, backend=backend)
    name = resolve_backend(backend, q.device)
    # the attention sort net's top-k routes on a fused backend: one autograd node (see topk_attention)
    fused_topk = sort_net is None and name != 'reference'
    if fused_topk:
        from .topk_attention import topk_attention

    if causal:
        require(n_sortcut == 0, 'SortCut (n_sortcut > 0) only works without causal; set n_sortcut=0 or causal=False')
        require(non_permutative, 'causal attention routes by differentiable top-k only; pass non_permutative=True')
        require(null_kv is not None, 'causal sinkhorn attention needs null_kv=(null_k, null_v), each [heads, dim_head]')
        require(kv_bucket_size == bucket_size and Tk == Tq,
                'causal attention needs keys as long as the queries and kv_bucket_size == bucket_size')
        n_top = min(n_top_buckets, nq)
        first, shift = H // 2, bucket_size - 1
        q, k, v, q_mask, kv_mask = (rotate_heads(t, first, shift) for t in (q, k, v, q_mask, kv_mask))
        if fused_topk:
            out = topk_attention(name, q, k, v, null_kv, q_mask, kv_mask, causal=True, n_top_buckets=n_top, n_sortcut=0,
                                 temperature=temperature, own_bucket=True, n_rotated_heads=H - first, **sizes)
            return rotate_heads(out, first, -shift)
        scores = (sort_net(zero_masked(q, q_mask), zero_masked(k, kv_mask), q_mask, kv_mask)
                  if sort_net is not None else
                  attention_sort_scores(q, k, causal=True, n_null=n_top, q_mask=q_mask, kv_mask=kv_mask,
                                        bucket_size=bucket_size, kv_bucket_size=kv_bucket_size))
        idx, w = topk_routes(scores, causal=True, n_top_buckets=n_top, n_sortcut=0, temperature=temperature,
                             n_null=scores.shape[-1] - nq)
        out = block_attention(q, k, v, idx, w.to(q.dtype), causal=True, n_rotated_heads=H - first, null_kv=null_kv,
                              q_mask=q_mask, kv_mask=kv_mask, **common)
        return rotate_heads(out, first, -shift)

    own_bucket = nq == nk
    if fused_topk and non_permutative:
        return topk_attention(name, q, k, v, None, q_mask, kv_mask, causal=False, n_top_buckets=n_top_buckets,
                              n_sortcut=n_sortcut, temperature=SORT_NET_TEMPERATURE, own_bucket=own_bucket,
                              n_rotated_heads=0, **sizes)
    sq, sk = zero_masked(q, q_mask), zero_masked(k, kv_mask)
    if sort_net is not None:
        scores, topk_temperature = sort_net(sq, sk, q_mask, kv_mask), temperature
    else:
        scores = attention_sort_scores(sq, sk, n_sortcut=n_sortcut, q_mask=q_mask, kv_mask=kv_mask,
                                       bucket_size=bucket_size, kv_bucket_size=kv_bucket_size, causal=False)
        topk_temperature = SORT_NET_TEMPERATURE
    if non_permutative:
        idx, w = topk_routes(scores, causal=False, n_top_buckets=n_top_buckets, n_sortcut=n_sortcut,
                             temperature=topk_temperature)
        return block_attention(q, k, v, idx, w.to(q.dtype), own_bucket=own_bucket, q_mask=q_mask, kv_mask=kv_mask,
                               **common)

    # Gumbel-Sinkhorn: a soft permutation mixes whole key buckets; padded keys are zeroed so they mix in nothing
    perm = gumbel_sinkhorn(F.relu(scores), sinkhorn_iter, temperature, noise=gumbel_noise, backend=backend).to(q.dtype)
    n_mixed = perm.shape[-2]
    require(n_sortcut or n_mixed == nq,
            f'the sort net gave {n_mixed} rows of routing scores for {nq} query buckets; they must match')
    mix = lambda t: rearrange(torch.einsum('bhuv,bhvsd->bhusd', perm,
                                           rearrange(t, 'b h (n s) d -> b h n s d', n=nk)), 'b h u s d -> b h (u s) d')
    k_all = torch.cat((k, mix(sk)), dim=2)
    v_all = torch.cat((v, mix(zero_masked(v, kv_mask))), dim=2)
    if kv_mask is not None:
        # a mixed bucket takes the key mask of the bucket with the largest weight in its row (as the reference)
        blocks = rearrange(kv_mask, 'b h (n s) -> b h n s', n=nk)
        chosen = perm.argmax(dim=-1)[..., None].expand(-1, -1, -1, kv_bucket_size)
        kv_mask = torch.cat((kv_mask, torch.gather(blocks, 2, chosen).flatten(2)), dim=2)
    rows = torch.arange(min(n_sortcut, n_mixed) if n_sortcut else nq, device=q.device)
    idx = (nk + rows).view(1, 1, -1, 1) if not n_sortcut else (nk + rows).view(1, 1, 1, -1)
    idx = idx.expand(B, H, -1, -1)
    w = torch.ones(idx.shape, dtype=q.dtype, device=q.device)
    return block_attention(q, k_all, v_all, idx, w, own_bucket=own_bucket, q_mask=q_mask, kv_mask=kv_mask, **common)
