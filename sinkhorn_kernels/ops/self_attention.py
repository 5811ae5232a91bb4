"""A whole Sinkhorn self-attention layer (projections, routing, block attention) as one autograd Function on the
reference backend, holding only what backward needs.

Through separate ops, autograd holds q, k, v, contiguous copies of k and v and the attention output, and backward
makes dq, dk, dv and the projections' input gradients as new tensors. Here:
- heads are processed in groups that share a frame: row t of a group's buffers is token (t + shift) mod T, so
  the causal half-head rotation is a shift of the rows the projections read and write, never a copy; a group's
  q, k, v live in one packed [B, T, 3, Hg, D] buffer, written by one GEMM;
- block attention reads each head's q, k, v in place in those buffers (no contiguous copies), one head at a time;
- each head's attention output goes through the output projection as it is made, and backward recomputes it
  (one more batched GEMM per chunk): no attention output of every head is kept;
- backward writes dq over q (a query bucket's q is dead once its gradient is written) and each head's dk, dv over
  its k and v (a head's keys are read by no other head), so the packed buffers end as the projections' output
  gradients: one GEMM gives dx, one the weights' gradient;
- the routes' gradient reaches q and k through the sort net's bucket summaries, which are linear in q and k: their
  vector-Jacobian product needs no values of q and k, so it is added last, in place, into the buffers; the top-k
  routing's gradient is taken by hand (see `_Routes`);
- the packed buffers and one head's scratch are one allocation, which goes back to the system whole.
"""
from types import SimpleNamespace

import torch

from .._checks import check_bucket_multiple, require
from .backends import resolve_backend
from .block_attention import dropout_seed, local_routes, with_own_bucket
from .block_attention import reference as blocks
from .outputs import carve
from .sinkhorn_attention import (add_sort_summaries_vjp, routes_per_query_bucket, sort_summaries, summary_scores,
                                 topk_routes, topk_routes_backward)


class Group:
    """Heads h0..h1, local or Sinkhorn, whose buffers hold token (t + shift) mod T at row t."""

    def __init__(self, h0, h1, shift, local):
        self.h0, self.h1, self.shift, self.local = h0, h1, shift, local

    def rows(self, frame, tokens):
        """Pairs of 2D row blocks (of `frame` in the group's frame, of `tokens` in token order) that hold the same
        tokens; both are [B, T, ...] and contiguous."""
        B, T = tokens.shape[:2]
        # reshape: views of the buffers written into (contiguous), a copy of an incoming gradient only if it must
        f, t = frame.reshape(B, T, -1), tokens.reshape(B, T, -1)
        s = self.shift
        if s == 0:
            return [(f.reshape(B * T, -1), t.reshape(B * T, -1))]
        return [pair for b in range(B) for pair in ((f[b, :T - s], t[b, s:]), (f[b, T - s:], t[b, :s]))]

    def mask(self, mask):
        return None if mask is None else mask.roll(-self.shift, dims=1)[:, None]


def _groups(heads, n_local, causal, bucket_size):
    """Local heads first, then the Sinkhorn heads; causal Sinkhorn heads from the middle on are rotated."""
    groups = [Group(0, n_local, 0, True)] if n_local else []
    if causal:
        first = n_local + (heads - n_local) // 2
        groups += [Group(n_local, first, 0, False), Group(first, heads, bucket_size - 1, False)]
    else:
        groups.append(Group(n_local, heads, 0, False))
    return [g for g in groups if g.h1 > g.h0]


class _Unit:
    """One head of a group: views of its q, k, v ([B, 1, T, D]) in the group's packed buffer."""

    def __init__(self, group, h, qkv, n_local):
        self.group, self.h0 = group, h
        self.sinkhorn_heads = slice(h - n_local, h - n_local + 1)
        self.q, self.k, self.v = (self.head_of(qkv[:, :, i]) for i in range(3))

    def head_of(self, buf):
        """The head's [B, 1, T, D] view of a group buffer [B, T, Hg, D]."""
        a = self.h0 - self.group.h0
        return buf[:, :, a:a + 1].transpose(1, 2)

    def cols(self, D):
        return slice(self.h0 * D, (self.h0 + 1) * D)


class _Buffers:
    """Everything that lives from forward to backward, in one allocation: each group's packed q, k, v
    ([B, T, 3, Hg, D], written by the projections, overwritten by their gradients in backward) and the scratch of
    one head at a time: its attention output in the group's frame (`out`, [B, T, 1, D]; in backward first that
    output's gradient, which the recomputed output overwrites chunk by chunk), contiguous key and value gradients
    (`dk`, `dv`, [B, 1, T, D]) and the chunk workspace (`work`, sized for backward)."""

    def __init__(self, x, cfg):
        B, T, _ = x.shape
        D, inner = cfg.dim_head, cfg.heads * cfg.dim_head
        kinds = {g.local for g in cfg.groups}
        n_work = max(blocks.Workspace.numel(_layout(cfg, local), D, backward=True, raw_blocks=True, device=x.device)
                     for local in kinds)
        head = [(B, T, 1, D), (B, 1, T, D), (B, 1, T, D)]
        *self.qkv, self.out, self.dk, self.dv, self.work = carve(
            x.new_empty(3 * B * T * inner + 3 * B * T * D + n_work),
            [(B, T, 3, g.h1 - g.h0, D) for g in cfg.groups] + head + [(n_work,)])


def _project(x, w_q, w_kv, cfg):
    """The buffers, with q, k, v projected, the projections' packed weights, the heads and the Sinkhorn heads'
    routes (None without Sinkhorn heads)."""
    D, inner = cfg.dim_head, cfg.heads * cfg.dim_head
    cols = lambda g: slice(g.h0 * D, g.h1 * D)
    packed = [torch.cat((w_q[cols(g)], w_kv[:inner][cols(g)], w_kv[inner:][cols(g)])) for g in cfg.groups]
    bufs = _Buffers(x, cfg)
    for g, w, buf in zip(cfg.groups, packed, bufs.qkv):
        for f, t in g.rows(buf, x):
            torch.mm(t, w.t(), out=f)
    units = [_Unit(g, h, buf, cfg.n_local) for g, buf in zip(cfg.groups, bufs.qkv) for h in range(g.h0, g.h1)]
    sinkhorn = [u for u in units if not u.group.local]
    return bufs, packed, units, _Routes(cfg, sinkhorn) if sinkhorn else None


class SelfAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w_q, w_kv, w_out, b_out, null_k, null_v, cfg):
        x = x.contiguous()
        seed = int(dropout_seed(cfg.dropout_p, x.device))
        bufs, packed, units, routes = _project(x, w_q, w_kv, cfg)
        y = x.new_empty(*x.shape[:2], w_out.shape[0])
        for i, u in enumerate(units):
            lay, idx, w, null_k_u, null_v_u = _unit_layout(cfg, routes, u, null_k, null_v, seed)
            mask = u.group.mask(cfg.mask)
            blocks.forward(lay, u.q, u.k, u.v, idx, w, null_k_u, null_v_u, mask, mask, bufs.out.transpose(1, 2),
                           blocks.Workspace(lay, u.q, flat=bufs.work))
            # each head's output goes through the output projection as it is made: no output of every head is
            # kept for backward, which recomputes it
            w_u = w_out[:, u.cols(cfg.dim_head)].t()
            if i == 0:  # the first group has no shift: one pair of row blocks covers every row
                (f, t), = u.group.rows(bufs.out, y)
                torch.addmm(b_out, f, w_u, out=t)
            else:
                for f, t in u.group.rows(bufs.out, y):
                    t.addmm_(f, w_u)
        ctx.save_for_backward(x, w_q, w_kv, w_out, null_k, null_v)
        ctx.cfg, ctx.seed, ctx.buffers = cfg, seed, (bufs, packed, units, routes)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w_q, w_kv, w_out, null_k, null_v = ctx.saved_tensors
        cfg = ctx.cfg
        # backward turns the buffers into gradients; a second backward through the same graph rebuilds them
        # (the same dropout seed gives the same masks)
        bufs, packed, units, routes = ctx.buffers or _project(x, w_q, w_kv, cfg)
        ctx.buffers = None
        D, inner = cfg.dim_head, cfg.heads * cfg.dim_head
        cols = lambda g: slice(g.h0 * D, g.h1 * D)
        # every head's GEMMs read dy: an expanded one (a sum's gradient) would be made dense by each of them
        dy = dy.contiguous()
        d_w_out, d_b = torch.zeros_like(w_out), dy.sum(dim=(0, 1))
        dw = torch.zeros_like(routes.weights) if routes is not None else None
        d_null = [torch.zeros_like(t) if t is not None else None for t in (null_k, null_v)]
        for u in units:
            w_u = w_out[:, u.cols(D)]
            for f, t in u.group.rows(bufs.out, dy):
                torch.mm(t, w_u, out=f)  # the head's attention output gradient, in its group's frame
            _unit_backward(cfg, routes, u, null_k, null_v, ctx.seed, bufs, dw, d_null)
            for f, t in u.group.rows(bufs.out, dy):
                d_w_out[:, u.cols(D)].addmm_(t.t(), f)
        del dy  # dead from here
        if routes is not None:
            routes.backward(dw)
        del units

        dx = x.new_empty(x.shape)
        d_q, d_kv = torch.zeros_like(w_q), torch.zeros_like(w_kv)
        for i, (g, buf, w) in enumerate(zip(cfg.groups, bufs.qkv, packed)):
            d_packed = torch.zeros_like(w)
            for f, t in g.rows(buf, x):
                d_packed.addmm_(f.t(), t)
            for f, t in g.rows(buf, dx):
                t.addmm_(f, w, beta=0 if i == 0 else 1)  # the first group's single pair covers every row of dx
            dq_g, dk_g, dv_g = d_packed.chunk(3)
            d_q[cols(g)], d_kv[:inner][cols(g)], d_kv[inner:][cols(g)] = dq_g, dk_g, dv_g
        return dx, d_q, d_kv, d_w_out, d_b, *d_null, None


def _unit_backward(cfg, routes, u, null_k, null_v, seed, bufs, dw, d_null):
    """Overwrites the head's q, k, v with their gradients and its output gradient in bufs.out with its recomputed
    attention output; fills its part of the route weights' and the null bucket's gradients."""
    lay, idx, w, null_k_u, null_v_u = _unit_layout(cfg, routes, u, null_k, null_v, seed)
    bufs.dk.zero_()
    bufs.dv.zero_()
    mask = u.group.mask(cfg.mask)
    need_w = not u.group.local
    ws = blocks.Workspace(lay, u.q, backward=True, raw_blocks=need_w, flat=bufs.work)
    dw_u, dn_k, dn_v = blocks.backward(lay, need_w, u.q, u.k, u.v, idx, w, null_k_u, null_v_u, mask, mask,
                                       bufs.out.transpose(1, 2), u.q, bufs.dk, bufs.dv, ws,
                                       out=bufs.out.transpose(1, 2))
    u.k.copy_(bufs.dk)
    u.v.copy_(bufs.dv)
    if need_w:
        dw[:, u.sinkhorn_heads] = dw_u
    if dn_k is not None:
        for d, dn in zip(d_null, (dn_k, dn_v)):
            d[u.sinkhorn_heads] += dn.view_as(d[u.sinkhorn_heads])


def _layout(cfg, local, seed=0, rotated=False):
    """The block-attention layout of a local or a Sinkhorn head."""
    if local:
        return blocks.Layout(cfg.Nq, cfg.bucket_size, cfg.Nq, cfg.bucket_size, cfg.local_idx.shape[-1], cfg.causal, 0,
                             False, True, True, cfg.scale, cfg.dropout_p, seed)
    return blocks.Layout(cfg.Nq, cfg.bucket_size, cfg.Nk, cfg.kv_bucket_size, cfg.n_routes, cfg.causal, int(rotated),
                         cfg.causal, False, False, cfg.scale, cfg.dropout_p, seed)


def _unit_layout(cfg, routes, u, null_k, null_v, seed):
    """The block-attention layout and routes of a head."""
    # dropout draws one mask per (batch, chunk) of a head: at most B * Nq draws from each head's seed
    lay = _layout(cfg, u.group.local, seed + u.h0 * cfg.batch * cfg.Nq, rotated=bool(u.group.shift))
    if u.group.local:
        idx = cfg.local_idx.expand(cfg.batch, 1, -1, -1)
        return lay, idx, torch.ones(idx.shape, dtype=cfg.dtype, device=idx.device), None, None
    idx, w = routes.indices[:, u.sinkhorn_heads], routes.weights[:, u.sinkhorn_heads]
    null = [None if t is None else t[u.sinkhorn_heads].reshape(1, -1) for t in (null_k, null_v)]
    return lay, idx, w, *null


class _Routes:
    """The Sinkhorn heads' routes (own bucket appended) from the sort net's summaries of q and k. Backward takes
    the route weights' gradient back to the summaries by hand: autograd run inside this Function's backward
    raised the 16k-token layer's peak memory by ~40 MB."""

    def __init__(self, cfg, units):
        self.cfg, self.units = cfg, units
        self.sq, self.sk = (torch.cat(s, dim=1) for s in zip(*(self.summaries(u) for u in units)))
        self.n_null = cfg.n_top if cfg.causal else 0
        self.scores = summary_scores(self.sq, self.sk, self.n_null)
        idx, w = topk_routes(self.scores, **self.routing())
        self.rows = w.shape[2]  # 1 with SortCut: the same routes for every query bucket
        idx, w = idx.expand(cfg.batch, -1, cfg.Nq, -1), w.expand(cfg.batch, -1, cfg.Nq, -1)
        if cfg.own_bucket:
            idx, w = with_own_bucket(idx, w)
        self.indices, self.weights = idx.contiguous(), w.contiguous()

    def routing(self):
        cfg = self.cfg
        return dict(causal=cfg.causal, n_top_buckets=cfg.n_top, n_sortcut=cfg.n_sortcut,
                    temperature=cfg.topk_temperature, n_null=self.n_null)

    def options(self, u):
        cfg = self.cfg
        return dict(bucket_size=cfg.bucket_size, kv_bucket_size=cfg.kv_bucket_size, causal=cfg.causal,
                    n_sortcut=cfg.n_sortcut, q_mask=u.group.mask(cfg.mask), kv_mask=u.group.mask(cfg.mask))

    def summaries(self, u):
        return sort_summaries(u.q, u.k, **self.options(u))

    def backward(self, dw):
        """Adds the routes' gradient `dw` to the Sinkhorn heads' q and k buffers (which hold dq and dk by now)."""
        if self.cfg.own_bucket:
            dw = dw[..., :-1]  # the own bucket's weight is the constant 1
        if self.rows == 1:
            dw = dw.sum(dim=2, keepdim=True)
        d_scores = topk_routes_backward(self.scores, dw, **self.routing())[..., self.n_null:]
        d_scores = d_scores * self.sq.shape[-1] ** -0.5  # summary_scores: scaled dot products
        d_sq = torch.einsum('bhij,bhjd->bhid', d_scores, self.sk)
        d_sk = torch.einsum('bhij,bhid->bhjd', d_scores, self.sq)
        for u in self.units:
            heads = u.sinkhorn_heads
            add_sort_summaries_vjp(d_sq[:, heads], d_sk[:, heads], u.q, u.k, **self.options(u))


def sinkhorn_self_attention(x, q_weight, kv_weight, out_weight, out_bias, *, heads, bucket_size, dim_head=None,
                            kv_bucket_size=None, causal=False, n_top_buckets=1, n_sortcut=0, temperature=0.75,
                            n_local_heads=0, null_kv=None, input_mask=None, dropout_p=0.0, backend=None):
    """Sinkhorn self-attention with its projections, as `SinkhornSelfAttention` computes it with top-k routing
    and the attention sort net, like `F.multi_head_attention_forward` for dense attention.

    x: [B, T, dim]; q_weight [heads * dim_head, dim], kv_weight [2 * heads * dim_head, dim] (keys, then values),
    out_weight [dim, heads * dim_head], out_bias [dim]; returns [B, T, dim]. The first `n_local_heads` heads attend
    within sliding windows of `bucket_size`; the others run `sinkhorn_attention` (causal: `null_kv` = (null_k,
    null_v), each [heads - n_local_heads, 1, dim_head]). `input_mask`: bool [B, T], True = real token.
    Only the reference backend implements it (its point is the memory it saves in PyTorch); the fused kernels
    serve the same layer through `sinkhorn_attention`.
    """
    require(x.dim() == 3, f'x must be [batch, seq, dim], got {tuple(x.shape)}')
    name = resolve_backend(backend, x.device)
    require(name == 'reference', f'sinkhorn_self_attention runs on the reference backend only, got {name!r}; use '
                                 'sinkhorn_attention for the fused kernels')
    require(x.dtype in (torch.float32, torch.float64),
            f'sinkhorn_self_attention takes float32 or float64, got {x.dtype}; use sinkhorn_attention')
    B, T, _ = x.shape
    dim_head = dim_head or q_weight.shape[0] // heads
    kv_bucket_size = kv_bucket_size or bucket_size
    check_bucket_multiple(T, bucket_size, 'sequence')
    check_bucket_multiple(T, kv_bucket_size, 'key/value sequence')
    require(not (causal and n_sortcut), 'SortCut (n_sortcut > 0) only works without causal; set n_sortcut=0')
    require(not causal or kv_bucket_size == bucket_size, 'causal attention needs kv_bucket_size == bucket_size')
    require(0 <= n_local_heads <= heads, f'n_local_heads must be between 0 and heads ({heads}), got {n_local_heads}')
    require(not causal or n_local_heads == heads or null_kv is not None,
            'causal sinkhorn attention needs null_kv=(null_k, null_v), each [sinkhorn heads, 1, dim_head]')
    require(input_mask is None or (input_mask.dtype == torch.bool and tuple(input_mask.shape) == (B, T)),
            f'input_mask must be bool [{B}, {T}]')
    Nq, Nk = T // bucket_size, T // kv_bucket_size
    # the local heads' fixed routes: neighbouring windows (none ahead when causal), then their own
    local_idx = local_routes(Nq, 1, 0 if causal else 1, x.device).view(1, 1, Nq, -1)
    cfg = SimpleNamespace(heads=heads, dim_head=dim_head, n_local=n_local_heads, batch=B, Nq=Nq, Nk=Nk,
                  groups=_groups(heads, n_local_heads, causal, bucket_size),
                  bucket_size=bucket_size, kv_bucket_size=kv_bucket_size, causal=causal,
                  n_top=min(n_top_buckets, Nq) if causal else n_top_buckets, n_sortcut=n_sortcut,
                  topk_temperature=temperature if causal else 1.0, own_bucket=causal or Nq == Nk,
                  mask=input_mask, dropout_p=dropout_p, scale=dim_head ** -0.5, dtype=x.dtype,
                  local_idx=with_own_bucket(local_idx, torch.ones_like(local_idx, dtype=x.dtype))[0])
    # routes of a Sinkhorn head, its own bucket included: the layouts and the workspace are sized by it
    cfg.n_routes = routes_per_query_bucket(causal, cfg.n_top, n_sortcut, Nk) + cfg.own_bucket
    null_k, null_v = null_kv if null_kv is not None and n_local_heads < heads else (None, None)
    return SelfAttentionFunction.apply(x, q_weight, kv_weight, out_weight, out_bias, null_k, null_v, cfg)
