"""A whole Sinkhorn self-attention layer (projections, routing, block attention) as one autograd Function on the
reference backend, holding only what backward needs.

Through separate ops, autograd holds q, k, v, contiguous copies of k and v and the attention output, and backward
makes dq, dk, dv and the projections' input gradients as new tensors. Here:
- heads are processed in groups that share a frame: row t of a group's buffers is token (t + shift) mod T, so
  the causal half-head rotation is a shift of the rows the projections read and write, never a copy; a group's
  q, k, v live in one packed [B, T, 3, Hg, D] buffer, written by one GEMM;
- backward writes the output projection's input gradient over the attention output, dq over q (a query bucket's
  q is dead once its gradient is written) and each head range's dk, dv over its k and v (a head's keys are read
  by no other head), so the packed buffers end as the projections' output gradients: one GEMM gives dx, one the
  weights' gradient;
- the routes' gradient reaches q and k through the sort net's bucket summaries, which are linear in q and k: their
  vector-Jacobian product needs no values of q and k, so it is added last, in place, into the buffers.
"""
from types import SimpleNamespace

import torch

from .._checks import check_bucket_multiple, require
from .backends import resolve_backend
from .block_attention import dropout_seed, local_routes, with_own_bucket
from .block_attention import reference as blocks
from .sinkhorn_attention import add_sort_summaries_vjp, sort_summaries, summary_scores, topk_routes

# bytes of one head range's contiguous k (and v, dk, dv): larger ranges mean fewer, larger batched GEMMs
UNIT_BYTES = 8 << 20


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
    """Heads h0..h1 of a group, few enough that their contiguous k, v, dk, dv copies stay within UNIT_BYTES each:
    views of their q, k, v and attention output ([B, h, T, D]) in the group's buffers."""

    def __init__(self, group, h0, h1, qkv, out, n_local):
        a, b = h0 - group.h0, h1 - group.h0
        self.group, self.h0, self.h1 = group, h0, h1
        self.sinkhorn_heads = slice(h0 - n_local, h1 - n_local)
        self.q, self.k, self.v = (qkv[:, :, i, a:b].transpose(1, 2) for i in range(3))
        self.out = out[:, :, a:b].transpose(1, 2)


def _units(cfg, qkv, outs):
    B, T, _, _, D = qkv[0].shape
    per = max(1, UNIT_BYTES // (B * T * D * qkv[0].element_size()))
    return [_Unit(g, h, min(g.h1, h + per), buf, out, cfg.n_local)
            for g, buf, out in zip(cfg.groups, qkv, outs) for h in range(g.h0, g.h1, per)]


def _carve(flat, shapes):
    """Contiguous tensors of the given shapes, one after the other in `flat`."""
    views, at = [], 0
    for shape in shapes:
        n = torch.Size(shape).numel()
        views.append(flat[at:at + n].view(shape))
        at += n
    return views


def _attend(x, w_q, w_kv, null_k, null_v, cfg, seed):
    """Projections, routes and block attention: the packed q, k, v and attention output buffers of every group."""
    B, T, _ = x.shape
    D, inner, G = cfg.dim_head, cfg.heads * cfg.dim_head, len(cfg.groups)
    cols = lambda g: slice(g.h0 * D, g.h1 * D)
    packed = [torch.cat((w_q[cols(g)], w_kv[:inner][cols(g)], w_kv[inner:][cols(g)])) for g in cfg.groups]
    # one allocation for every buffer that lives until backward, so that it goes back to the system whole
    views = _carve(x.new_empty(4 * B * T * inner), [(B, T, 3, g.h1 - g.h0, D) for g in cfg.groups]
                   + [(B, T, g.h1 - g.h0, D) for g in cfg.groups])
    qkv, outs = views[:G], views[G:]
    for g, w, buf in zip(cfg.groups, packed, qkv):
        for f, t in g.rows(buf, x):
            torch.mm(t, w.t(), out=f)
    units = _units(cfg, qkv, outs)
    sinkhorn = [u for u in units if not u.group.local]
    routes = _Routes(cfg, sinkhorn) if sinkhorn else None
    work = _Workspace(units, 2)
    for u in units:
        lay, idx, w, null_k_u, null_v_u = _unit_layout(cfg, routes, u, null_k, null_v, seed)
        k, v = work.copies(u.k, u.v)
        mask = u.group.mask(cfg.mask)
        blocks.forward(lay, u.q, k, v, idx, w, null_k_u, null_v_u, mask, mask, u.out)
    return qkv, outs, packed, routes


class SelfAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w_q, w_kv, w_out, b_out, null_k, null_v, cfg):
        x = x.contiguous()
        seed = int(dropout_seed(cfg.dropout_p, x.device))
        qkv, outs, packed, routes = _attend(x, w_q, w_kv, null_k, null_v, cfg, seed)
        y = x.new_empty(*x.shape[:2], w_out.shape[0])
        y.copy_(b_out)
        for g, o in zip(cfg.groups, outs):
            for f, t in g.rows(o, y):
                t.addmm_(f, w_out[:, g.h0 * cfg.dim_head:g.h1 * cfg.dim_head].t())
        ctx.save_for_backward(x, w_q, w_kv, w_out, null_k, null_v)
        ctx.cfg, ctx.seed, ctx.buffers = cfg, seed, (qkv, outs, packed, routes)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w_q, w_kv, w_out, null_k, null_v = ctx.saved_tensors
        cfg = ctx.cfg
        # backward turns the buffers into gradients; a second backward through the same graph rebuilds them
        # (the same dropout seed gives the same masks)
        qkv, outs, packed, routes = ctx.buffers or _attend(x, w_q, w_kv, null_k, null_v, cfg, ctx.seed)
        ctx.buffers = None
        D, inner = cfg.dim_head, cfg.heads * cfg.dim_head
        cols = lambda g: slice(g.h0 * D, g.h1 * D)

        d_out = torch.zeros_like(w_out)
        for g, o in zip(cfg.groups, outs):
            for f, t in g.rows(o, dy):
                d_out[:, cols(g)].addmm_(t.t(), f)
            for f, t in g.rows(o, dy):
                torch.mm(t, w_out[:, cols(g)], out=f)  # over o: d(attention output)
        d_b = dy.sum(dim=(0, 1))

        units = _units(cfg, qkv, outs)
        dw = torch.zeros_like(routes.weights) if routes is not None else None
        d_null = [torch.zeros_like(t) if t is not None else None for t in (null_k, null_v)]
        work = _Workspace(units, 4)
        for u in units:
            _unit_backward(cfg, routes, u, null_k, null_v, ctx.seed, work, dw, d_null)
        del work
        if routes is not None:
            routes.backward(dw, [u for u in units if not u.group.local])
        del units, outs

        dx = torch.zeros_like(x)
        d_q, d_kv = torch.zeros_like(w_q), torch.zeros_like(w_kv)
        for g, buf, w in zip(cfg.groups, qkv, packed):
            d_packed = torch.zeros_like(w)
            for f, t in g.rows(buf, x):
                d_packed.addmm_(f.t(), t)
            for f, t in g.rows(buf, dx):
                t.addmm_(f, w)
            dq_g, dk_g, dv_g = d_packed.chunk(3)
            d_q[cols(g)], d_kv[:inner][cols(g)], d_kv[inner:][cols(g)] = dq_g, dk_g, dv_g
        return dx, d_q, d_kv, d_out, d_b, *d_null, None


def _unit_backward(cfg, routes, u, null_k, null_v, seed, work, dw, d_null):
    """Overwrites the unit's q, k, v with their gradients (u.out holds the output gradient); fills its part of the
    route weights' and the null bucket's gradients."""
    lay, idx, w, null_k_u, null_v_u = _unit_layout(cfg, routes, u, null_k, null_v, seed)
    k, v, dk, dv = work.copies(u.k, u.v, None, None)
    mask = u.group.mask(cfg.mask)
    dw_u, dn_k, dn_v = blocks.backward(lay, not u.group.local, u.q, k, v, idx, w, null_k_u, null_v_u, mask, mask,
                                       u.out, u.q, dk, dv)
    u.k.copy_(dk)
    u.v.copy_(dv)
    if not u.group.local:
        dw[:, u.sinkhorn_heads] = dw_u
    if dn_k is not None:
        for d, dn in zip(d_null, (dn_k, dn_v)):
            d[u.sinkhorn_heads] += dn.view_as(d[u.sinkhorn_heads])


class _Workspace:
    """`n` contiguous [B, h, T, D] tensors for the largest unit, allocated once and reused by every unit (k and v
    copies; in backward also zeroed dk and dv)."""

    def __init__(self, units, n):
        self.flat = units[0].q.new_empty(n, max(u.q.numel() for u in units))

    def copies(self, *sources):
        """Contiguous copies of the [B, h, T, D] sources (None: zeros shaped like the first source)."""
        shape = sources[0].shape
        n = shape.numel()
        return [self.flat[i, :n].view(shape).copy_(t) if t is not None else self.flat[i, :n].view(shape).zero_()
                for i, t in enumerate(sources)]


def _unit_layout(cfg, routes, u, null_k, null_v, seed):
    """The block-attention layout and routes of a unit."""
    n = u.h1 - u.h0
    # dropout draws per unit and chunk; units are numbered by their first head
    unit_seed = seed + u.h0 * (cfg.Nq + 1)
    if u.group.local:
        idx = cfg.local_idx.expand(cfg.batch, n, -1, -1)
        w = torch.ones(idx.shape, dtype=cfg.dtype, device=idx.device)
        lay = blocks.Layout(cfg.Nq, cfg.bucket_size, cfg.Nq, cfg.bucket_size, idx.shape[-1], cfg.causal, 0, False,
                            True, True, cfg.scale, cfg.dropout_p, unit_seed)
        return lay, idx, w, None, None
    idx, w = routes.indices[:, u.sinkhorn_heads], routes.weights[:, u.sinkhorn_heads]
    null = [None if t is None else t[u.sinkhorn_heads].reshape(n, -1) for t in (null_k, null_v)]
    lay = blocks.Layout(cfg.Nq, cfg.bucket_size, cfg.Nk, cfg.kv_bucket_size, idx.shape[-1], cfg.causal,
                        n if u.group.shift else 0, cfg.causal, False, False, cfg.scale, cfg.dropout_p, unit_seed)
    return lay, idx, w, *null


class _Routes:
    """The Sinkhorn heads' routes (own bucket appended) and the small graph from the sort net's summaries of q
    and k to their weights, kept for backward."""

    def __init__(self, cfg, units):
        self.cfg = cfg
        with torch.no_grad():
            summaries = [self.summaries(u) for u in units]
        with torch.enable_grad():
            self.sq, self.sk = (torch.cat(s, dim=1).requires_grad_() for s in zip(*summaries))
            n_null = cfg.n_top if cfg.causal else 0
            idx, w = topk_routes(summary_scores(self.sq, self.sk, n_null), causal=cfg.causal,
                                 n_top_buckets=cfg.n_top, n_sortcut=cfg.n_sortcut, temperature=cfg.topk_temperature,
                                 n_null=n_null)
            idx, w = idx.expand(cfg.batch, -1, cfg.Nq, -1), w.to(cfg.dtype).expand(cfg.batch, -1, cfg.Nq, -1)
            if cfg.own_bucket:
                idx, w = with_own_bucket(idx, w)
        self.indices, self.graph = idx.contiguous(), w
        self.weights = w.detach().contiguous()

    def options(self, u):
        cfg = self.cfg
        return dict(bucket_size=cfg.bucket_size, kv_bucket_size=cfg.kv_bucket_size, causal=cfg.causal,
                    n_sortcut=cfg.n_sortcut, q_mask=u.group.mask(cfg.mask), kv_mask=u.group.mask(cfg.mask))

    def summaries(self, u):
        return sort_summaries(u.q, u.k, **self.options(u))

    def backward(self, dw, units):
        """Adds the routes' gradient `dw` to the units' q and k buffers (which hold dq and dk by now)."""
        if not self.sq.requires_grad:
            return
        d_sq, d_sk = torch.autograd.grad(self.graph, (self.sq, self.sk), dw)
        for u in units:
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
    null_k, null_v = null_kv if null_kv is not None and n_local_heads < heads else (None, None)
    return SelfAttentionFunction.apply(x, q_weight, kv_weight, out_weight, out_bias, null_k, null_v, cfg)
