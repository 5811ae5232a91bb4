"""A whole Sinkhorn self-attention layer (projections, routing, block attention) as one autograd Function on the
reference backend, holding only what backward needs.

Through separate ops, autograd holds q, k, v, contiguous copies of k and v and the attention output, and backward
makes dq, dk, dv and the projections' input gradients as new tensors. Here:
- heads are processed in groups that share a frame: row t of a group's buffers is token (t + shift) mod T, so
  the causal half-head rotation is a shift of the rows the projections read and write, never a copy; a group's
  q, k, v live in one packed [B, T, 3, Hg, D] buffer, written by one GEMM;
- block attention reads each head's q, k, v in place in those buffers (no contiguous copies): on CPU in fp32 the
  fused C++ kernel (`block_attention.cpu`) does, all heads of a kind in one call (in backward, those of a
  chunk), and the PyTorch reference otherwise, one head at a time;
- the attention output is written over the queries (a query bucket's queries are read by it alone, before its
  output is written; the routes are made first), so from forward to backward the layer holds q, k, v and nothing
  else; the output projection reads it there, one GEMM per group;
- backward overwrites the output with its own gradient, made from a few rows of the incoming gradient at a time
  (a sum's gradient is an expanded tensor, which would otherwise be made dense whole), then recomputes the
  queries a chunk of heads at a time (`backward_chunk_heads`) into its scratch, and writes dq over the output's
  gradient (a query bucket's is read by it alone, before its dq is written) and each head's dk, dv over its k and
  v (a head's keys are read by no other head), so the packed buffers end as the projections' output gradients:
  one GEMM gives dx, one the weights' gradient;
- the routes' gradient reaches q and k through the sort net's bucket summaries, which are linear in q and k: their
  vector-Jacobian product needs no values of q and k, so it is added last, in place, into the buffers; the top-k
  routing's gradient is taken by hand (see `_Routes`);
- forward's chunk workspace lives in y's memory until y is written; backward's scratch is one allocation of at
  least 32 MiB (see `UNMAPPED_ON_FREE`); on CPU the large buffers (q, k, v, y, the scratch, dx; those of 32 MiB
  or more) ask for huge pages (`cpu_extension.on_huge_pages`).
"""
from types import SimpleNamespace

import torch

from .._checks import check_bucket_multiple, require
from .backends import FUSED_DTYPES, resolve_backend
from .block_attention import cpu as cpu_kernel
from .block_attention import dropout_seed, local_routes, with_own_bucket
from .block_attention import reference as blocks
from .cpu_extension import on_huge_pages
from .outputs import carve, new_output
from .sinkhorn_attention import (SORT_NET_TEMPERATURE, empty_key_buckets, routes_per_query_bucket, summary_routes,
                                 summary_routes_backward)
from .summaries import add_sort_summaries_vjp, sort_summaries


# rows of the output's gradient made dense at a time: the gradient of a sum is an expanded tensor, which the
# output projection's GEMMs cannot read, and a dense copy of all of it would take 32 MB at 16k tokens
DY_ROWS = 2048


# glibc maps a block of more than 32 MiB (its largest mmap threshold) on its own and unmaps it when freed; freeing a
# smaller mapped block raises the threshold to its size, and the heap then keeps every later buffer below it
UNMAPPED_ON_FREE = (32 << 20) + 1


class Group:
    """Heads h0..h1, local or Sinkhorn, whose buffers hold token (t + shift) mod T at row t."""

    def __init__(self, h0, h1, shift, local):
        self.h0, self.h1, self.shift, self.local = h0, h1, shift, local

    def rows(self, frame, tokens):
        """Pairs of 2D row blocks (of `frame` in the group's frame, of `tokens` in token order) that hold the same
        tokens; both are [B, T, ...] with each row's elements contiguous (`frame` may be the queries' place in a
        packed buffer)."""
        B, T = tokens.shape[:2]
        # reshape: views of the buffers written into, a copy of an incoming gradient only if it must
        f, t = frame.reshape(B, T, -1), tokens.reshape(B, T, -1)
        s = self.shift
        if s == 0:
            return [(f.reshape(B * T, -1), t.reshape(B * T, -1))]
        return [pair for b in range(B) for pair in ((f[b, :T - s], t[b, s:]), (f[b, T - s:], t[b, :s]))]

    def mask(self, mask):
        return None if mask is None else mask.roll(-self.shift, dims=1)[:, None]


def head_groups(heads, n_local, causal, bucket_size):
    """Local heads first, then the Sinkhorn heads; causal Sinkhorn heads from the middle on are rotated."""
    groups = [Group(0, n_local, 0, True)] if n_local else []
    if causal:
        first = n_local + (heads - n_local) // 2
        groups += [Group(n_local, first, 0, False), Group(first, heads, bucket_size - 1, False)]
    else:
        groups.append(Group(n_local, heads, 0, False))
    return [g for g in groups if g.h1 > g.h0]


def _head_of(buf, a):
    """Head a's [B, 1, T, D] view of a buffer [B, T, heads, D]."""
    return buf[:, :, a:a + 1].transpose(1, 2)


class _Unit:
    """One head of a group: views of its q, k, v ([B, 1, T, D]) in the group's packed buffer; q holds the
    attention output after forward, and in backward the output's gradient, then dq."""

    def __init__(self, group, h, qkv, n_local):
        self.group, self.h = group, h
        self.sinkhorn_heads = slice(h - n_local, h - n_local + 1)
        self.q, self.k, self.v = (_head_of(qkv[:, :, i], h - group.h0) for i in range(3))


def _outputs(qkv):
    """Each group's attention output ([B, T, Hg, D]), in its queries' place."""
    return [buf[:, :, 0] for buf in qkv]


def _workspace_numel(cfg, x, backward):
    """Elements of the attention's workspace, which serves every head: the CPU kernel's scratch, or a chunk
    workspace of the PyTorch path."""
    if cfg.cpu_kernel:
        return _kernel_scratch_numel(cfg, backward)
    return max(blocks.Workspace.numel(_layout(cfg, local), cfg.dim_head, backward=backward, raw_blocks=backward,
                                      device=x.device) for local in {g.local for g in cfg.groups})


class _Scratch:
    """Backward's scratch, one allocation: the dense rows of the output's gradient, then a chunk's recomputed
    queries ([B, T, cfg.chunk_heads, D]), (the PyTorch path) one head's dk, dv ([B, 1, T, D]) and the workspace.
    On CPU it asks for at least UNMAPPED_ON_FREE bytes, of which only those used are ever touched (unless
    deterministic mode fills new memory): the memory goes back to the system, and the allocator's threshold stays
    where it was."""

    def __init__(self, x, cfg):
        B, T, dim = x.shape
        n_work = _workspace_numel(cfg, x, backward=True)
        queries = B * T * cfg.chunk_heads * cfg.dim_head
        head = (0,) if cfg.cpu_kernel else (B, 1, T, cfg.dim_head)  # the CPU kernel keeps dk, dv in its workspace
        n = max(DY_ROWS * dim, queries + 2 * torch.Size(head).numel() + n_work)
        self.flat = on_huge_pages(
            x.new_empty(max(n, -(-UNMAPPED_ON_FREE // x.element_size())) if x.is_cpu else n))
        self.queries, self.dk, self.dv, self.work = carve(self.flat, [(queries,), head, head, (n_work,)])


def packed_weights(cfg, w_q, w_kv, groups):
    """Each group's q, k and v projection weights, stacked: row blocks of one buffer made by one cat (rebuilt in
    backward rather than kept)."""
    inner = _inner(cfg)
    stacked = torch.cat([w[head_columns(cfg, g)] for g in groups for w in (w_q, w_kv[:inner], w_kv[inner:])])
    return list(stacked.split(_packed_rows(cfg, groups)))


def packed_weight_grads(cfg, w_q, groups):
    """Each group's packed weight's gradient (laid out as `packed_weights`), rows of one new buffer, to be written
    whole; `unpack_weight_grads` makes them the q and kv projections' gradients."""
    return list(new_output(w_q.new_empty(3 * _inner(cfg), w_q.shape[1])).split(_packed_rows(cfg, groups)))


def unpack_weight_grads(cfg, d_packed):
    """(d_w_q, d_w_kv) from the groups' `packed_weight_grads`: views of them when one group holds every head (its
    rows are q's, k's, v's in order), else one cat."""
    if len(d_packed) == 1:
        d = d_packed[0]
    else:
        parts = [d.view(3, -1, d.shape[-1]) for d in d_packed]
        d = torch.cat([p[i] for i in range(3) for p in parts])
    inner = _inner(cfg)
    return d[:inner], d[inner:]


def _packed_rows(cfg, groups):
    return [3 * (g.h1 - g.h0) * cfg.dim_head for g in groups]


def write_sum(dst, products):
    """dst = the sum of a @ b over the pairs (a, b); what dst held before, even NaN, is not read."""
    for j, (a, b) in enumerate(products):
        dst.addmm_(a, b, beta=0 if j == 0 else 1)


def _project(x, w_q, w_kv, cfg):
    """Each group's packed q, k, v ([B, T, 3, Hg, D], one allocation: what lives from forward to backward),
    projected; the heads, and the Sinkhorn heads' routes (None without Sinkhorn heads)."""
    B, T, _ = x.shape
    qkv = carve(on_huge_pages(x.new_empty(3 * B * T * _inner(cfg))),
                [(B, T, 3, g.h1 - g.h0, cfg.dim_head) for g in cfg.groups])
    for g, w, buf in zip(cfg.groups, packed_weights(cfg, w_q, w_kv, cfg.groups), qkv):
        for f, t in g.rows(buf, x):
            torch.mm(t, w.t(), out=f)
    units = [_Unit(g, h, buf, cfg.n_local) for g, buf in zip(cfg.groups, qkv) for h in range(g.h0, g.h1)]
    sinkhorn = [u for u in units if not u.group.local]
    return qkv, units, _Routes(cfg, sinkhorn) if sinkhorn else None


def _queries(cfg, x, w_q, chunk, flat):
    """The queries of a chunk of heads of one group, recomputed into `flat` in the group's frame; [B, 1, T, D]
    per head."""
    B, T, _ = x.shape
    g, h0, D = chunk[0].group, chunk[0].h, cfg.dim_head
    q = flat[:B * T * len(chunk) * D].view(B, T, len(chunk), D)
    w = w_q[h0 * D:(h0 + len(chunk)) * D]
    for f, t in g.rows(q, x):
        torch.mm(t, w.t(), out=f)
    return [_head_of(q, a) for a in range(len(chunk))]


def _chunks(cfg, units):
    """Backward's chunks of heads: up to cfg.chunk_heads consecutive heads of one group."""
    for g in cfg.groups:
        in_group = [u for u in units if u.group is g]
        for i in range(0, len(in_group), cfg.chunk_heads):
            yield in_group[i:i + cfg.chunk_heads]


def backward_chunk_heads(x, dim_head, groups):
    """Heads whose queries backward recomputes at a time. On CPU: a (batch, head) pair for every thread, or more,
    up to half as many query columns as x has (the larger chunk makes a faster GEMM, and backward's peak stays
    where dx is made: dx takes twice that memory); on a GPU a whole group."""
    largest = max(g.h1 - g.h0 for g in groups)
    if not x.is_cpu:
        return largest
    return max(1, min(largest, max(torch.get_num_threads() // x.shape[0], x.shape[-1] // (2 * dim_head))))


def _inner(cfg):
    return cfg.heads * cfg.dim_head


def head_columns(cfg, g):
    """The group's columns of the concatenated heads."""
    return slice(g.h0 * cfg.dim_head, g.h1 * cfg.dim_head)


def _kinds(cfg, units):
    """The units by kind of head (local, Sinkhorn), each kind with its block-attention layout."""
    for local in (True, False):
        kind = [u for u in units if u.group.local == local]
        if kind:
            yield _layout(cfg, local), kind


def _kernel_scratch_numel(cfg, backward):
    """The CPU kernel's scratch: enough for any of its calls (forward: all heads of a kind; backward: a chunk)."""
    heads = {}
    for g in cfg.groups:
        heads[g.local] = heads.get(g.local, 0) + g.h1 - g.h0
    return max(cpu_kernel.scratch_numel(_layout(cfg, local), cfg.dim_head,
                                        cfg.batch * (min(n, cfg.chunk_heads) if backward else n), backward)
               for local, n in heads.items())


def _kernel_calls(cfg, routes, units, null_k, null_v, tensors):
    """The CPU kernel's calls, one per kind of head among `units` with every (batch, head) of the kind;
    tensors(u, b): a pair's queries and outputs."""
    for lay, kind in _kinds(cfg, units):
        heads = cpu_kernel.Heads(lay, cfg.dim_head)
        for u in kind:
            idx, w, null_k_u, null_v_u = _unit_routes(cfg, routes, u, null_k, null_v)
            null = [None if t is None else t.view(-1) for t in (null_k_u, null_v_u)]
            mask = u.group.mask(cfg.mask)
            for b in range(cfg.batch):
                m = None if mask is None else mask[b, 0]
                heads.add(bool(u.group.shift), k=u.k[b, 0], v=u.v[b, 0], idx=idx[b, 0], w=w[b, 0], null_k=null[0],
                          null_v=null[1], q_mask=m, kv_mask=m, **tensors(u, b))
        yield heads


def _attend(x, w_q, w_kv, null_k, null_v, cfg, seed, work):
    """`_project`, then every head's attention output over its queries; `work`: memory for the workspace."""
    qkv, units, routes = _project(x, w_q, w_kv, cfg)
    if cfg.cpu_kernel:
        for heads in _kernel_calls(cfg, routes, units, null_k, null_v,
                                   lambda u, b: dict(q=u.q[b, 0], out=u.q[b, 0])):
            cpu_kernel.forward(heads, work)
        return qkv, units, routes
    for u in units:
        lay, (idx, w, null_k_u, null_v_u) = _unit_layout(cfg, u, seed), _unit_routes(cfg, routes, u, null_k, null_v)
        mask = u.group.mask(cfg.mask)
        blocks.forward(lay, u.q, u.k, u.v, idx, w, null_k_u, null_v_u, mask, mask, u.q,
                       blocks.Workspace(lay, u.q, flat=work))
    return qkv, units, routes


class SelfAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w_q, w_kv, w_out, b_out, null_k, null_v, cfg):
        x = x.contiguous()
        seed = int(dropout_seed(cfg.dropout_p, x.device))
        # the attention's workspace lives in y's memory until the output projection writes y
        y = on_huge_pages(x.new_empty(*x.shape[:2], w_out.shape[0]))
        n_work = _workspace_numel(cfg, x, backward=False)
        work = y.view(-1) if y.numel() >= n_work else x.new_empty(n_work)
        qkv, units, routes = _attend(x, w_q, w_kv, null_k, null_v, cfg, seed, work)
        del work
        for i, (g, out) in enumerate(zip(cfg.groups, _outputs(qkv))):
            project_out(cfg, g, out, w_out, b_out, y, first=i == 0)
        ctx.save_for_backward(x, w_q, w_kv, w_out, null_k, null_v)
        ctx.cfg, ctx.seed, ctx.buffers = cfg, seed, (qkv, units, routes)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w_q, w_kv, w_out, null_k, null_v = ctx.saved_tensors
        cfg = ctx.cfg
        # backward turns the buffers into gradients; a second backward through the same graph rebuilds them
        # (the same dropout seed gives the same masks)
        scratch = _Scratch(x, cfg)
        qkv, units, routes = ctx.buffers or _attend(x, w_q, w_kv, null_k, null_v, cfg, ctx.seed, scratch.work)
        ctx.buffers = None
        d_w_out, d_b = _output_backward(cfg, qkv, dy, w_out, scratch)
        del dy
        dw, d_null = _attention_backward(cfg, x, w_q, units, routes, null_k, null_v, ctx.seed, scratch)
        # the scratch goes back before the routes' temporaries and dx are made
        del units, scratch
        if routes is not None:
            routes.backward(dw)
        del routes
        dx, d_q, d_kv = _input_backward(cfg, qkv, x, w_q, w_kv)
        return dx, d_q, d_kv, d_w_out, d_b, *d_null, None


def project_out(cfg, g, out, w_out, b_out, y, first):
    """Adds to y the output projection of group g's attention output ([B, T, Hg, D] in its frame); the first
    group writes y, with the bias."""
    w_g = w_out[:, head_columns(cfg, g)].t()
    if first:  # the first group has no shift: one pair of row blocks covers every row
        (f, t), = g.rows(out, y)
        torch.addmm(b_out, f, w_g, out=t)
    else:
        for f, t in g.rows(out, y):
            t.addmm_(f, w_g)


def _attention_backward(cfg, x, w_q, units, routes, null_k, null_v, seed, scratch):
    """Overwrites the packed q, k, v with the gradients of the attention's inputs (the queries' place holds the
    output's gradient until then), a chunk of heads at a time with the chunk's queries recomputed; returns the
    route weights' gradient (None without Sinkhorn heads) and the null bucket's."""
    dw = torch.zeros_like(routes.weights) if routes is not None else None
    # a null-bucket gradient per (batch, head): the CPU kernel runs the pairs in parallel
    d_null = [None if t is None else t.new_zeros(cfg.batch, *t.shape) for t in (null_k, null_v)]
    for chunk in _chunks(cfg, units):
        queries = dict(zip(chunk, _queries(cfg, x, w_q, chunk, scratch.queries)))
        if cfg.cpu_kernel:
            _kernel_backward(cfg, routes, chunk, queries, null_k, null_v, scratch, dw, d_null)
        else:
            for u in chunk:
                _unit_backward(cfg, routes, u, queries[u], null_k, null_v, seed, scratch, dw, d_null)
    return dw, [None if d is None else d.sum(0) for d in d_null]


def _kernel_backward(cfg, routes, chunk, queries, null_k, null_v, scratch, dw, d_null):
    """`_attention_backward` of a chunk on the CPU kernel."""
    def tensors(u, b):
        out = dict(q=queries[u][b, 0], dout=u.q[b, 0], dq=u.q[b, 0], dk=u.k[b, 0], dv=u.v[b, 0])
        if not u.group.local:
            out['dw'] = dw[b, u.sinkhorn_heads][0]
            if null_k is not None:
                out['dnull_k'], out['dnull_v'] = (d[b, u.sinkhorn_heads].view(-1) for d in d_null)
        return out

    for heads in _kernel_calls(cfg, routes, chunk, null_k, null_v, tensors):
        cpu_kernel.backward(heads, scratch.work)


def _input_backward(cfg, qkv, x, w_q, w_kv):
    """dx and the q and kv projections' weight gradients from the packed gradients of their outputs."""
    dx = on_huge_pages(x.new_empty(x.shape))
    d_packed = packed_weight_grads(cfg, w_q, cfg.groups)
    for i, (g, buf, w, d) in enumerate(zip(cfg.groups, qkv, packed_weights(cfg, w_q, w_kv, cfg.groups), d_packed)):
        write_sum(d, [(f.t(), t) for f, t in g.rows(buf, x)])
        for f, t in g.rows(buf, dx):
            t.addmm_(f, w, beta=0 if i == 0 else 1)  # the first group's single pair covers every row of dx
    return dx, *unpack_weight_grads(cfg, d_packed)


def _output_backward(cfg, qkv, dy, w_out, scratch):
    """The output projection's weight and bias gradients; overwrites each group's attention output with its
    gradient."""
    d_w_out = torch.zeros_like(w_out)
    for g, out in zip(cfg.groups, _outputs(qkv)):
        cols = head_columns(cfg, g)
        for f, t in g.rows(out, dy):
            for r in range(0, f.shape[0], DY_ROWS):
                f_r, t_r = f[r:r + DY_ROWS], t[r:r + DY_ROWS]
                if not t_r.is_contiguous():
                    t_r = scratch.flat[:t_r.numel()].view(t_r.shape).copy_(t_r)
                d_w_out[:, cols].addmm_(t_r.t(), f_r)
                torch.mm(t_r, w_out[:, cols], out=f_r)  # the attention output's gradient takes its place
    return d_w_out, dy.sum(dim=(0, 1))


def _unit_backward(cfg, routes, u, q, null_k, null_v, seed, scratch, dw, d_null):
    """Overwrites the head's q, k, v with their gradients (its output's gradient is in u.q; q: its recomputed
    queries); fills its part of the route weights' and the null bucket's gradients."""
    dk, dv = scratch.dk, scratch.dv
    lay, (idx, w, null_k_u, null_v_u) = _unit_layout(cfg, u, seed), _unit_routes(cfg, routes, u, null_k, null_v)
    dk.zero_()
    dv.zero_()
    mask = u.group.mask(cfg.mask)
    need_w = not u.group.local
    ws = blocks.Workspace(lay, u.q, backward=True, raw_blocks=need_w, flat=scratch.work)
    dw_u, dn_k, dn_v = blocks.backward(lay, need_w, q, u.k, u.v, idx, w, null_k_u, null_v_u, mask, mask,
                                       u.q, u.q, dk, dv, ws)
    u.k.copy_(dk)
    u.v.copy_(dv)
    if need_w:
        dw[:, u.sinkhorn_heads] = dw_u
    if dn_k is not None:
        for d, dn in zip(d_null, (dn_k, dn_v)):
            d[0, u.sinkhorn_heads] += dn.view_as(d[0, u.sinkhorn_heads])


def _layout(cfg, local, seed=0, rotated=False):
    """The block-attention layout of a local or a Sinkhorn head."""
    if local:
        return blocks.Layout(cfg.Nq, cfg.bucket_size, cfg.Nq, cfg.bucket_size, cfg.local_idx.shape[-1], cfg.causal, 0,
                             False, True, True, cfg.scale, cfg.dropout_p, seed)
    return blocks.Layout(cfg.Nq, cfg.bucket_size, cfg.Nk, cfg.kv_bucket_size, cfg.n_routes, cfg.causal, int(rotated),
                         cfg.causal, False, False, cfg.scale, cfg.dropout_p, seed)


def _unit_layout(cfg, u, seed):
    """The block-attention layout of a head (for the PyTorch path: its dropout seed and rotation)."""
    # dropout draws one mask per (batch, chunk) of a head: at most B * Nq draws from each head's seed
    return _layout(cfg, u.group.local, seed + u.h * cfg.batch * cfg.Nq, rotated=bool(u.group.shift))


def _unit_routes(cfg, routes, u, null_k, null_v):
    """A head's routes (indices, weights) and null bucket (null_k, null_v: [1, D] each, or None)."""
    if u.group.local:
        idx = cfg.local_idx.expand(cfg.batch, 1, -1, -1)
        return idx, torch.ones(idx.shape, dtype=cfg.dtype, device=idx.device), None, None
    idx, w = routes.indices[:, u.sinkhorn_heads], routes.weights[:, u.sinkhorn_heads]
    null = [None if t is None else t[u.sinkhorn_heads].reshape(1, -1) for t in (null_k, null_v)]
    return idx, w, *null


def routing_options(cfg):
    """The sort net's top-k settings, as `summary_routes` and its backward take them."""
    return dict(causal=cfg.causal, n_top_buckets=cfg.n_top, n_sortcut=cfg.n_sortcut,
                temperature=cfg.topk_temperature, own_bucket=cfg.own_bucket)


def summary_options(cfg, mask):
    """The sort net's summary settings for heads whose queries and keys share `mask` (or None)."""
    return dict(bucket_size=cfg.bucket_size, kv_bucket_size=cfg.kv_bucket_size, causal=cfg.causal,
                n_sortcut=cfg.n_sortcut, q_mask=mask, kv_mask=mask)


class _Routes:
    """The Sinkhorn heads' routes (own bucket appended) from the sort net's summaries of q and k. Backward takes
    the route weights' gradient back to the summaries by hand: autograd run inside this Function's backward
    raised the 16k-token layer's peak memory by ~40 MB."""

    def __init__(self, cfg, units):
        self.cfg, self.units = cfg, units
        self.sq, self.sk = (torch.cat(s, dim=1) for s in zip(*(self.summaries(u) for u in units)))
        empty = None if cfg.mask is None else torch.cat(
            [empty_key_buckets(u.group.mask(cfg.mask), cfg.kv_bucket_size) for u in units], dim=1)
        self.scores, idx, w = summary_routes(self.sq, self.sk, **routing_options(cfg), n_query_buckets=cfg.Nq,
                                             empty=empty)
        self.indices, self.weights = idx.contiguous(), w.contiguous()

    def summaries(self, u):
        return sort_summaries(u.q, u.k, **summary_options(self.cfg, u.group.mask(self.cfg.mask)))

    def backward(self, dw):
        """Adds the routes' gradient `dw` to the Sinkhorn heads' q and k buffers (which hold dq and dk by now)."""
        d_sq, d_sk = summary_routes_backward(self.scores, self.sq, self.sk, dw, **routing_options(self.cfg))
        for u in self.units:
            heads = u.sinkhorn_heads
            add_sort_summaries_vjp(d_sq[:, heads], d_sk[:, heads], u.q, u.k,
                                   **summary_options(self.cfg, u.group.mask(self.cfg.mask)))


def sinkhorn_self_attention(x, q_weight, kv_weight, out_weight, out_bias, *, heads, bucket_size, dim_head=None,
                            kv_bucket_size=None, causal=False, n_top_buckets=1, n_sortcut=0, temperature=0.75,
                            n_local_heads=0, null_kv=None, input_mask=None, dropout_p=0.0, backend=None):
    """Sinkhorn self-attention with its projections, as `SinkhornSelfAttention` computes it with top-k routing
    and the attention sort net, like `F.multi_head_attention_forward` for dense attention.

    x: [B, T, dim]; q_weight [heads * dim_head, dim], kv_weight [2 * heads * dim_head, dim] (keys, then values),
    out_weight [dim, heads * dim_head], out_bias [dim]; returns [B, T, dim]. The first `n_local_heads` heads attend
    within sliding windows of `bucket_size`; the others run `sinkhorn_attention` (causal: `null_kv` = (null_k,
    null_v), each [heads - n_local_heads, 1, dim_head]). `input_mask`: bool [B, T], True = real token.
    Its point is the memory it saves: on the reference backend (float32 or float64) it keeps q, k, v from forward
    to backward and nothing else; on the fused backends (float16, bfloat16, float32; see `self_attention_fused`)
    only the attention output.
    """
    require(x.dim() == 3, f'x must be [batch, seq, dim], got {tuple(x.shape)}')
    name = resolve_backend(backend, x.device)
    if name == 'reference':
        require(x.dtype in (torch.float32, torch.float64),
                f'sinkhorn_self_attention on the reference backend takes float32 or float64, got {x.dtype}; use a '
                'fused backend, or sinkhorn_attention')
    else:
        require(x.dtype in FUSED_DTYPES, f'sinkhorn_self_attention on the {name} backend takes float16, bfloat16 or '
                                         f'float32, got {x.dtype}; use backend=\'reference\'')
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
                  groups=head_groups(heads, n_local_heads, causal, bucket_size),
                  bucket_size=bucket_size, kv_bucket_size=kv_bucket_size, causal=causal,
                  n_top=min(n_top_buckets, Nq) if causal else n_top_buckets, n_sortcut=n_sortcut,
                  topk_temperature=temperature if causal else SORT_NET_TEMPERATURE, own_bucket=causal or Nq == Nk,
                  mask=input_mask, dropout_p=dropout_p, scale=dim_head ** -0.5, dtype=x.dtype,
                  local_idx=with_own_bucket(local_idx, torch.ones_like(local_idx, dtype=x.dtype))[0])
    null_k, null_v = null_kv if null_kv is not None and n_local_heads < heads else (None, None)
    if name != 'reference':
        from . import self_attention_fused as fused_layer
        cfg.backend = name
        cfg.chunks = fused_layer.chunks(cfg.groups, fused_layer.chunk_heads(x, dim_head))
        return fused_layer.FusedSelfAttention.apply(x, q_weight, kv_weight, out_weight, out_bias, null_k, null_v, cfg)
    # routes of a Sinkhorn head, its own bucket included: the layouts and the workspace are sized by it
    cfg.n_routes = routes_per_query_bucket(causal, cfg.n_top, n_sortcut, Nk) + cfg.own_bucket
    cfg.cpu_kernel = cpu_kernel.applies(x, bucket_size, dim_head, dropout_p)
    cfg.chunk_heads = backward_chunk_heads(x, dim_head, cfg.groups)
    return SelfAttentionFunction.apply(x, q_weight, kv_weight, out_weight, out_bias, null_k, null_v, cfg)
