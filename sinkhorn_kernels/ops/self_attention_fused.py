"""The Sinkhorn self-attention layer op (`ops.sinkhorn_self_attention`) on the fused backends: projections, routing
and the block attention kernels in one autograd Function that keeps from forward to backward only the routes (x
is the caller's).

Through separate ops, autograd keeps q, k, v and the attention output (64 MB at 16k tokens, dim 512, in bf16), and
backward holds dq, dk, dv of every head at once (48 MB more) beside them. Here the heads run in chunks
(`chunk_heads`): forward projects a chunk's q, k, v into one packed buffer, attends, adds the chunk's part of the
output projection and lets them go; backward recomputes them a chunk at a time (one GEMM and the forward kernel,
FlashAttention's recomputation one level up), with the chunk's output gradient, runs the backward kernels and
folds the chunk's dq, dk, dv into dx and the weights' gradients before the next chunk. A group of heads run in
several chunks routes first, all its heads at once, from the sort net's summaries of x, and takes the routes'
gradient last (`_Routing`). The causal half-head rotation is a shift of the rows the projections read and write
(`self_attention.Group`), never a copy. torch.compile traces the composed ops instead: this Function manages its
buffers in eager code.
"""
import torch

from .block_attention import dropout_seed, fused, fused_operands, fused_routes
from .outputs import new_output
from .self_attention import (Group, head_columns, packed_weight_grads, packed_weights, project_out, routing_options,
                             summary_options, unpack_weight_grads, write_sum)
from .sinkhorn_attention import empty_key_buckets, summary_routes, summary_routes_backward
from .summaries import add_sort_summaries_vjp, sort_summaries
from .topk_attention import attend


# the least memory a chunk may take: below it the memory saved is small and each chunk's launches (some thirty)
# cost more, so shorter sequences run in fewer chunks
MIN_CHUNK_BYTES = 16 << 20


def chunk_heads(x, dim_head):
    """Heads per chunk: backward's chunk buffers (q, k, v, the attention output and its gradient, dq, dk, dv: eight
    vectors of dim_head per token and head) take at most as much memory as x, or MIN_CHUNK_BYTES if that is more;
    backward's peak is then that of about four copies of x (x, dx, the incoming gradient and the chunk;
    `benchmarks/layer_memory.py` measures it). At dim 512 with 8 heads of 64 in bf16: one chunk up to 2k tokens,
    one head a chunk from 16k."""
    per_head = 8 * x.shape[0] * x.shape[1] * dim_head * x.element_size()
    return max(1, max(x.numel() * x.element_size(), MIN_CHUNK_BYTES) // per_head)


def saves_memory(x, heads, dim_head, groups):
    """Whether backward's peak here (x, dx, the incoming gradient and a chunk's eight vectors per head) is below
    that of the composed ops (about nine copies of x: x, q, k, v, the output, its gradient, dq, dk, dv): short
    sequences run in whole groups of heads, which hold more."""
    largest = min(chunk_heads(x, dim_head), max(g.h1 - g.h0 for g in groups))
    return 3 + 8 * largest / heads < 9


def chunks(groups, n):
    """The groups cut into chunks of up to n heads, each in its group's frame."""
    return [Group(h, min(h + n, g.h1), g.shift, g.local) for g in groups for h in range(g.h0, g.h1, n)]


class _Routing:
    """The routes of one group of Sinkhorn heads, all its heads at once. A group run in several chunks routes from
    the sort net's summaries of x: they are linear in q and k, so theirs are x's projected by the group's rows of
    the q and k weights (two small GEMMs where each chunk would summarize its q and k and route), and backward
    takes the routes' gradient to dx and to those weights' gradients from the summaries alone, after the group's
    last chunk. A group run in one chunk routes from that chunk's q and k, and adds the gradient into its dq and
    dk: there routing from x would save nothing and cost some fifteen small ops (the merged summaries, the
    projections, the rolled frame)."""

    def __init__(self, group, mask, tensors):
        """mask: the group's (see `Group.mask`); tensors: x's query and key summaries [B, N, dim] (None when
        routed from q and k), q's and k's [B, Hg, N, D], the scores, the routes' indices and weights, as `route` or
        `route_heads` makes them (and forward keeps them for backward)."""
        self.group, self.mask, self.tensors = group, mask, tuple(tensors)
        self.sx_q, self.sx_k, self.sq, self.sk, self.scores, self.idx, self.w = self.tensors
        self.from_x = self.sx_q is not None

    @classmethod
    def route(cls, cfg, group, x, w_q, w_k):
        """Routes the group from x and its rows of the q and k weights."""
        mask = group.mask(cfg.mask)
        frame = _as_heads(x.roll(-group.shift, dims=1) if group.shift else x)  # token (t + shift) mod T at row t
        sx = [_merge_heads(s) for s in sort_summaries(frame, frame, **cls.summary_options(cfg, mask, frame))]
        return cls.routed(cfg, group, mask, sx, *(cls.by_head(cfg, s, w) for s, w in zip(sx, (w_q, w_k))))

    @classmethod
    def route_heads(cls, cfg, group, q, k):
        """Routes the group from its q and k ([B, Hg, T, D], in its frame)."""
        mask = group.mask(cfg.mask)
        return cls.routed(cfg, group, mask, (None, None), *sort_summaries(q, k, **cls.summary_options(cfg, mask, q)))

    @classmethod
    def routed(cls, cfg, group, mask, sx, sq, sk):
        scores, idx, w = summary_routes(sq, sk, **routing_options(cfg), n_query_buckets=cfg.Nq,
                                        empty=empty_key_buckets(mask, cfg.kv_bucket_size), backend=cfg.backend)
        return cls(group, mask, (*sx, sq, sk, scores, *fused_routes(idx, w)))

    @staticmethod
    def summary_options(cfg, mask, t):
        """The summaries' settings for t [B, H, T, D] on the layer's backend: the group's mask for each of its H
        heads."""
        return dict(summary_options(cfg, None if mask is None else mask.expand(-1, t.shape[1], -1)),
                    backend=cfg.backend)

    @staticmethod
    def by_head(cfg, s, w):
        """Summaries of x [B, N, dim] projected by weight rows w [Hg * D, dim] -> [B, Hg, N, D]."""
        B, N, _ = s.shape
        return (s.reshape(B * N, -1) @ w.t()).view(B, N, -1, cfg.dim_head).transpose(1, 2).contiguous()

    def routes(self, part):
        """The chunk `part`'s (idx, w)."""
        heads = slice(part.h0 - self.group.h0, part.h1 - self.group.h0)
        return fused_routes(self.idx[:, heads], self.w[:, heads])

    def summaries_backward(self, cfg, dw):
        """(d_sq, d_sk) from the route weights' gradient dw [B, Hg, Nq, R]."""
        return summary_routes_backward(self.scores, self.sq, self.sk, dw, **routing_options(cfg),
                                       backend=cfg.backend)

    def backward_heads(self, cfg, dw, dq, dk):
        """Adds the routes' share into dq and dk ([B, Hg, T, D]) of a group routed from its q and k."""
        add_sort_summaries_vjp(*self.summaries_backward(cfg, dw), dq, dk,
                               **self.summary_options(cfg, self.mask, dq))

    def backward(self, cfg, dw, dx, d_w_q, d_w_k, w_q, w_k):
        """Adds the routes' share into dx and into d_w_q, d_w_k (the group's rows of the weights' gradients; w_q,
        w_k: of the weights) for a group routed from x."""
        d_sx = []
        for d, s, w, d_w in zip(self.summaries_backward(cfg, dw), (self.sx_q, self.sx_k), (w_q, w_k),
                                (d_w_q, d_w_k)):
            B, _, N, _ = d.shape
            d = d.transpose(1, 2).reshape(B * N, -1)  # [B * N, Hg * D], as the projection's output
            d_w.addmm_(d.t(), s.reshape(B * N, -1))
            d_sx.append(_as_heads((d @ w).view(B, N, -1)))
        frame = torch.zeros_like(dx) if self.group.shift else dx
        heads = _as_heads(frame)
        add_sort_summaries_vjp(*d_sx, heads, heads, **self.summary_options(cfg, self.mask, heads))
        if self.group.shift:
            for f, t in self.group.rows(frame, dx):
                t.add_(f)


class _Chunk:
    """One chunk's settings: its frame (`part`, a Group), null bucket, mask and kernel options."""

    def __init__(self, cfg, part, seed, null_k, null_v):
        self.part, self.seed = part, seed
        self.n = part.h1 - part.h0
        self.mask = part.mask(cfg.mask)
        self.null = None if null_k is None or part.local else (null_k[self.sinkhorn(cfg)], null_v[self.sinkhorn(cfg)])
        if part.local:
            kernel = (cfg.bucket_size, cfg.bucket_size, cfg.causal, 0, cfg.scale, cfg.dropout_p)
        else:
            kernel = (cfg.bucket_size, cfg.kv_bucket_size, cfg.causal, self.n if part.shift else 0, cfg.scale,
                      cfg.dropout_p)
        self.opts = dict(kernel=kernel, backend=cfg.backend)

    def sinkhorn(self, cfg):
        """The chunk's heads among the Sinkhorn heads (those of the null bucket's parameters)."""
        return slice(self.part.h0 - cfg.n_local, self.part.h1 - cfg.n_local)

    def packed(self, cfg, x):
        """A new [B, T, 3, n, D] buffer (laid out as the rows of the chunk's packed weight), and its three parts as
        [B, n, T, D] views: q, k, v (or their gradients) in the chunk's frame."""
        B, T, _ = x.shape
        buf = new_output(x.new_empty(B, T, 3, self.n, cfg.dim_head))
        return buf, [buf[:, :, i].transpose(1, 2) for i in range(3)]

    def project(self, cfg, x, w):
        """The chunk's q, k, v (see `packed`) from x and its packed weight w."""
        buf, qkv = self.packed(cfg, x)
        for f, t in self.part.rows(buf, x):
            torch.mm(t, w.t(), out=f)
        return qkv

    def operands(self, cfg, q, k, v):
        """(null_k, null_v, mask) as the kernels take them, checked."""
        kb = cfg.bucket_size if self.part.local else cfg.kv_bucket_size
        null_k, null_v, mask, _ = fused_operands(cfg.backend, q, k, v, self.null, self.mask, None, cfg.bucket_size, kb)
        return null_k, null_v, mask

    def routes(self, cfg, q, routing):
        """(idx, w): the chunk's heads' routes from `routing` (group id -> its `_Routing`), or the local heads'
        fixed ones."""
        if not self.part.local:
            return routing[id(_group_of(cfg, self.part))].routes(self.part)
        idx = cfg.local_idx.expand(q.shape[0], self.n, -1, -1)
        return fused_routes(idx, torch.ones(idx.shape, device=idx.device))

    def attend(self, q, k, v, operands, routes):
        """-> (out [B, n, T, D] stored as [B, T, n, D], lse); operands: those of `operands`."""
        null_k, null_v, mask = operands
        return attend(q, k, v, routes, null_k, null_v, mask, mask, self.seed, self.opts)

    def backward(self, cfg, dout, q, k, v, out, lse, operands, routes, grads):
        """Writes dq, dk, dv into `grads` (see `packed`) -> (dw, the route weights' gradient [B, n, Nq, R] fp32,
        and dnull [2, B, n, D] fp32, the null key's and value's gradients by batch; None for local heads). The
        launcher is called directly: a custom op could not return `grads`, which alias each other, and this
        Function runs only in eager mode."""
        null_k, null_v, mask = operands
        _, _, _, dw, dnull = fused.kernels(cfg.backend).backward(dout, q, k, v, out, lse, *routes, null_k, null_v,
                                                                 mask, mask, *self.opts['kernel'], self.seed,
                                                                 grads=grads)
        return (None, None) if self.part.local else (dw, dnull)


# the widest vectors the summary kernels take; x is summarized as heads of at most this many dims
SUMMARY_DIMS = 128


def x_heads(dim):
    """How many heads x [B, T, dim] is cut into for the summary kernels: the fewest that divide dim into at most
    SUMMARY_DIMS dims each (each dim's summaries are its own)."""
    return next(n for n in range(-(-dim // SUMMARY_DIMS), dim + 1) if dim % n == 0)


def _as_heads(t):
    """[B, T, dim] -> a [B, n, T, dim / n] view (n = x_heads(dim))."""
    B, T, dim = t.shape
    return t.view(B, T, x_heads(dim), -1).transpose(1, 2)


def _merge_heads(t):
    """[B, n, N, dim / n] -> [B, N, dim]."""
    B, _, N, _ = t.shape
    return t.transpose(1, 2).reshape(B, N, -1)


def _sinkhorn_groups(cfg):
    return [g for g in cfg.groups if not g.local]


def _n_chunks(cfg, group):
    return sum(_group_of(cfg, part) is group for part in cfg.chunks)


def _group_of(cfg, part):
    return next(g for g in cfg.groups if g.h0 <= part.h0 < g.h1)


def _group_weights(cfg, w, g):
    """Group g's rows of the q and k weights, or of their gradients (w: the q's and the kv's)."""
    cols = head_columns(cfg, g)
    return w[0][cols], w[1][:cfg.heads * cfg.dim_head][cols]


class FusedSelfAttention(torch.autograd.Function):
    """x [B, T, dim] and the layer's weights (see `sinkhorn_self_attention`); `cfg` its settings and chunks."""

    @staticmethod
    def forward(ctx, x, w_q, w_kv, w_out, b_out, null_k, null_v, cfg):
        x = x.contiguous()
        routing = {id(g): _Routing.route(cfg, g, x, *_group_weights(cfg, (w_q, w_kv), g))
                   for g in _sinkhorn_groups(cfg) if _n_chunks(cfg, g) > 1}
        # a seed per chunk: chunks number their heads from 0, so one seed would give every chunk the same masks
        seeds = dropout_seed(cfg.dropout_p, x.device, len(cfg.chunks))
        parts = [_Chunk(cfg, part, seeds[i:i + 1], null_k, null_v) for i, part in enumerate(cfg.chunks)]
        y = new_output(x.new_empty(*x.shape[:2], w_out.shape[0]))
        for i, (c, w) in enumerate(zip(parts, packed_weights(cfg, w_q, w_kv, cfg.chunks))):
            q, k, v = c.project(cfg, x, w)
            g = _group_of(cfg, c.part)
            if not g.local and id(g) not in routing:  # the group's one chunk
                routing[id(g)] = _Routing.route_heads(cfg, g, q, k)
            out, _ = c.attend(q, k, v, c.operands(cfg, q, k, v), c.routes(cfg, q, routing))
            project_out(cfg, c.part, out.transpose(1, 2), w_out, b_out, y, first=i == 0)
            del q, k, v, out  # before the next chunk's are made
        ctx.save_for_backward(x, w_q, w_kv, w_out, null_k, null_v,
                              *(t for g in _sinkhorn_groups(cfg) for t in routing[id(g)].tensors))
        ctx.cfg, ctx.parts = cfg, parts
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w_q, w_kv, w_out, null_k, null_v, *flat = ctx.saved_tensors
        cfg = ctx.cfg
        groups = _sinkhorn_groups(cfg)
        n = len(flat) // max(1, len(groups))
        routing = {id(g): _Routing(g, g.mask(cfg.mask), flat[i * n:(i + 1) * n]) for i, g in enumerate(groups)}
        dy = dy.contiguous()  # a copy only of an expanded gradient (a sum's), which the GEMMs cannot read by rows
        dx = new_output(torch.empty_like(x))
        # each chunk writes its own rows of the packed weights' gradient and its own columns of w_out's
        d_w_packed, d_w_out = packed_weight_grads(cfg, w_q, cfg.chunks), new_output(torch.empty_like(w_out))
        # the null key's and value's gradients, each chunk's summed over the batch into its heads' rows (every
        # Sinkhorn head is in some chunk), in fp32 until the end
        d_null = None if null_k is None else null_k.new_empty(2, null_k.shape[0], null_k.shape[-1],
                                                               dtype=torch.float32)
        dw = {id(g): [] for g in groups}  # each group's route weights' gradients, by chunk
        for i, (c, w) in enumerate(zip(ctx.parts, packed_weights(cfg, w_q, w_kv, cfg.chunks))):
            q, k, v = c.project(cfg, x, w)
            operands = c.operands(cfg, q, k, v)
            routes = c.routes(cfg, q, routing)
            out, lse = c.attend(q, k, v, operands, routes)
            cols = head_columns(cfg, c.part)
            dout = new_output(torch.empty_like(out.transpose(1, 2)))
            write_sum(d_w_out[:, cols], [(t.t(), f) for f, t in c.part.rows(out.transpose(1, 2), dy)])
            for f, t in c.part.rows(dout, dy):
                torch.mm(t, w_out[:, cols], out=f)
            d_qkv, grads = c.packed(cfg, x)
            dw_c, dnull = c.backward(cfg, dout.transpose(1, 2), q, k, v, out, lse, operands, routes, grads)
            del q, k, v, out, lse, dout
            if dw_c is not None:
                r = routing[id(_group_of(cfg, c.part))]
                if r.from_x:
                    dw[id(r.group)].append(dw_c)
                else:  # before the GEMMs take dq and dk to dx and the weights' gradients
                    r.backward_heads(cfg, dw_c, grads[0], grads[1])
            # dq, dk, dv lie in one buffer as the weight's rows do: one GEMM for the weight's gradient, one for dx;
            # the first chunk has no shift, so its one pair of row blocks writes every row of dx
            write_sum(d_w_packed[i], [(f.t(), t) for f, t in c.part.rows(d_qkv, x)])
            for f, t in c.part.rows(d_qkv, dx):
                t.addmm_(f, w, beta=0 if i == 0 else 1)
            if d_null is not None and dnull is not None:
                torch.sum(dnull, dim=1, out=d_null[:, c.sinkhorn(cfg)])
            del d_qkv, grads, dnull  # before the next chunk's buffers are made
        d_w_q, d_w_kv = unpack_weight_grads(cfg, d_w_packed)
        for g in groups:
            if routing[id(g)].from_x:
                routing[id(g)].backward(cfg, torch.cat(dw[id(g)], dim=1), dx,
                                        *_group_weights(cfg, (d_w_q, d_w_kv), g), *_group_weights(cfg, (w_q, w_kv), g))
        if d_null is not None:
            d_null = [d.view_as(t).to(t.dtype) for d, t in zip(d_null, (null_k, null_v))]
        return dx, d_w_q, d_w_kv, d_w_out, dy.sum(dim=(0, 1)), *(d_null or (None, None)), None
