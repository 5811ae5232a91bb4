"""Top-k Sinkhorn attention with the attention sort net, on a fused backend, as one autograd node.

Through separate ops, autograd records the bucket summaries, the scores and every top-k round, and its backward
gives q and k their summaries' gradient as full-size tensors (a mean's gradient made dense, a copy to undo the
bucketing view) that it then adds to dq and dk: three writes of each of their size (96 MB at 16k tokens in
bf16), besides some thirty small kernels for the routing (`benchmarks/launch_census.py` counts them). Here
forward routes and runs the block attention kernel; backward runs its backward kernels, takes the route weights'
gradient back to the summaries by hand (`summary_routes_backward`), and adds the summaries' vector-Jacobian
product into dq and dk in place (`add_sort_summaries_vjp`). On triton the summaries are kernels too. The kernels
are the `torch.library` ops of `block_attention.fused`, `routing.fused` and `summaries.fused`, so torch.compile
traces this Function around them. The layer op on the fused backends (`self_attention_fused`) attends with
`attend` too, and routes from summaries of its input instead.
"""
import torch

from .block_attention import check_dropout, dropout_seed, fused, fused_operands, fused_routes
from .sinkhorn_attention import empty_key_buckets, summary_routes, summary_routes_backward
from .summaries import add_sort_summaries_vjp, sort_summaries


def route(q, k, q_mask, kv_mask, opts):
    """The routes (idx, w, sq, sk, scores): those block attention runs, and what their backward needs."""
    sq, sk = sort_summaries(q, k, q_mask=q_mask, kv_mask=kv_mask, **opts['summaries'], backend=opts['backend'])
    scores, idx, w = summary_routes(sq, sk, **opts['routing'], n_query_buckets=opts['n_query_buckets'],
                                    empty=empty_key_buckets(kv_mask, opts['summaries']['kv_bucket_size']),
                                    backend=opts['backend'])
    return (*fused_routes(idx, w), sq, sk, scores)


def attend(q, k, v, routes, null_k, null_v, q_mask, kv_mask, seed, opts):
    """Block attention along routes whose first two are the indices and weights -> (out, lse)."""
    return fused.block_attention_fwd(q, k, v, routes[0], routes[1], null_k, null_v, q_mask, kv_mask, *opts['kernel'],
                                     seed, opts['backend'])


def attend_backward(dout, q, k, v, out, lse, routes, null_k, null_v, q_mask, kv_mask, seed, opts):
    """-> (dq, dk, dv, dnull), the routes' gradient included in dq and dk; dnull: the null bucket's gradients by
    batch (see `block_attention.fused.null_grads`)."""
    idx, w, sq, sk, scores = routes
    dq, dk, dv, dw, dnull = fused.block_attention_bwd(dout, q, k, v, out, lse, idx, w, null_k, null_v, q_mask,
                                                      kv_mask, *opts['kernel'], seed, opts['backend'])
    d_sq, d_sk = summary_routes_backward(scores, sq, sk, dw, **opts['routing'], backend=opts['backend'])
    add_sort_summaries_vjp(d_sq, d_sk, dq, dk, q_mask=q_mask, kv_mask=kv_mask, **opts['summaries'],
                           backend=opts['backend'])
    return dq, dk, dv, dnull


class TopkAttention(torch.autograd.Function):
    """q, k, v [B, H, T, D] (any strides), null_k / null_v [H, D] or None, masks [B, H, T] or None, seed: the
    dropout seed tensor; `opts` holds the plain settings (see `topk_options`)."""

    @staticmethod
    def forward(ctx, q, k, v, null_k, null_v, q_mask, kv_mask, seed, opts):
        routes = route(q, k, q_mask, kv_mask, opts)
        out, lse = attend(q, k, v, routes, null_k, null_v, q_mask, kv_mask, seed, opts)
        ctx.save_for_backward(q, k, v, out, lse, null_k, null_v, q_mask, kv_mask, seed, *routes)
        ctx.opts = opts
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, null_k, null_v, q_mask, kv_mask, seed, *routes = ctx.saved_tensors
        dq, dk, dv, dnull = attend_backward(dout, q, k, v, out, lse, routes, null_k, null_v, q_mask, kv_mask, seed,
                                            ctx.opts)
        return dq, dk, dv, *fused.null_grads(dnull, null_k, null_v), None, None, None, None


def topk_options(backend, *, bucket_size, kv_bucket_size, causal, n_top_buckets, n_sortcut, temperature, own_bucket,
                 n_query_buckets, n_rotated_heads, scale, dropout_p):
    """The plain settings `route`, `attend` and `attend_backward` take."""
    return dict(
        summaries=dict(bucket_size=bucket_size, kv_bucket_size=kv_bucket_size, causal=causal, n_sortcut=n_sortcut),
        routing=dict(causal=causal, n_top_buckets=n_top_buckets, n_sortcut=n_sortcut, temperature=temperature,
                     own_bucket=own_bucket),
        n_query_buckets=n_query_buckets,
        kernel=(bucket_size, kv_bucket_size, causal, n_rotated_heads, scale, dropout_p),
        backend=backend)


def topk_attention(backend, q, k, v, null_kv, q_mask, kv_mask, *, bucket_size, kv_bucket_size, causal,
                   n_top_buckets, n_sortcut, temperature, own_bucket, n_rotated_heads, dropout_p):
    """`sinkhorn_attention`'s top-k routing with the attention sort net, then block attention, on the fused
    `backend`; masks [B, H, T] or None, the rest checked here as `block_attention` checks it -> [B, H, Tq, D]."""
    check_dropout(dropout_p)
    null_k, null_v, q_mask, kv_mask = fused_operands(backend, q, k, v, null_kv, q_mask, kv_mask, bucket_size,
                                                     kv_bucket_size)
    opts = topk_options(backend, bucket_size=bucket_size, kv_bucket_size=kv_bucket_size, causal=causal,
                        n_top_buckets=n_top_buckets, n_sortcut=n_sortcut, temperature=temperature,
                        own_bucket=own_bucket, n_query_buckets=q.shape[2] // bucket_size,
                        n_rotated_heads=n_rotated_heads, scale=q.shape[-1] ** -0.5, dropout_p=dropout_p)
    return TopkAttention.apply(q, k, v, null_k, null_v, q_mask, kv_mask, dropout_seed(dropout_p, q.device), opts)
