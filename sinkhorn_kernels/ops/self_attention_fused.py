"""The Sinkhorn self-attention layer op (`ops.sinkhorn_self_attention`) on the fused backends: projections, routing
and the block attention kernels in one autograd Function that keeps from forward to backward only the routes (x
is the caller's).

Through separate ops, autograd keeps q, k, v and the attention output (64 MB at 16k tokens, dim 512, in bf16), and
backward holds dq, dk, dv of every head at once (48 MB more) beside them. Here the heads run in chunks
(`chunk_heads`): forward projects a chunk's q, k, v into one packed buffer, routes, attends, adds the chunk's part of
the output projection and lets them go; backward recomputes them a chunk at a time (one GEMM and the forward
kernel, FlashAttention's recomputation one level up), with the chunk's output gradient, runs the backward kernels
(`topk_attention.attend_backward`) and folds the chunk's dq, dk, dv into dx and the weights' gradients before the
next chunk. The causal half-head rotation is a shift of the rows the projections read and write
(`self_attention.Group`), never a copy. torch.compile traces the composed ops instead: this Function manages its
buffers in eager code.
"""
import torch

from .block_attention import dropout_seed, fused, fused_operands, fused_routes
from .outputs import new_output
from .self_attention import (Group, head_columns, packed_weight_grads, packed_weights, project_out,
                             unpack_weight_grads, write_sum)
from .topk_attention import attend, attend_backward, route, topk_options


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


class _Chunk:
    """One chunk's settings: its frame (`part`, a Group), null bucket, mask and kernel options."""

    def __init__(self, cfg, part, seed, null_k, null_v):
        self.part, self.seed = part, seed
        self.n = part.h1 - part.h0
        self.mask = part.mask(cfg.mask)
        self.null = None if null_k is None or part.local else (null_k[self.sinkhorn(cfg)], null_v[self.sinkhorn(cfg)])
        if part.local:
            self.opts = dict(kernel=(cfg.bucket_size, cfg.bucket_size, cfg.causal, 0, cfg.scale, cfg.dropout_p),
                             backend=cfg.backend)
            self.local_routes = cfg.local_idx
        else:
            self.opts = topk_options(cfg.backend, bucket_size=cfg.bucket_size, kv_bucket_size=cfg.kv_bucket_size,
                                     causal=cfg.causal, n_top_buckets=cfg.n_top, n_sortcut=cfg.n_sortcut,
                                     temperature=cfg.topk_temperature, own_bucket=cfg.own_bucket,
                                     n_query_buckets=cfg.Nq, n_rotated_heads=self.n if part.shift else 0,
                                     scale=cfg.scale, dropout_p=cfg.dropout_p)

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

    def routes(self, cfg, q, k, mask):
        """The sort net's routes (see `topk_attention.route`), or the local heads' fixed ones (idx, w)."""
        if not self.part.local:
            return route(q, k, mask, mask, self.opts)
        idx = self.local_routes.expand(q.shape[0], self.n, -1, -1)
        return fused_routes(idx, torch.ones(idx.shape, device=idx.device))

    def attend(self, q, k, v, operands, routes):
        """-> (out [B, n, T, D] stored as [B, T, n, D], lse); operands: those of `operands`."""
        null_k, null_v, mask = operands
        return attend(q, k, v, routes, null_k, null_v, mask, mask, self.seed, self.opts)

    def backward(self, cfg, dout, q, k, v, out, lse, operands, routes, grads):
        """Writes dq, dk, dv into `grads` (see `packed`) -> dnull [2, B, n, D] fp32, the null key's and value's
        gradients by batch (None for local heads)."""
        null_k, null_v, mask = operands
        if not self.part.local:
            return attend_backward(dout, q, k, v, out, lse, routes, null_k, null_v, mask, mask, self.seed, self.opts,
                                   grads)[3]
        fused.kernels(cfg.backend).backward(dout, q, k, v, out, lse, *routes, None, None, mask, mask,
                                            *self.opts['kernel'], self.seed, grads=grads)
        return None


class FusedSelfAttention(torch.autograd.Function):
    """x [B, T, dim] and the layer's weights (see `sinkhorn_self_attention`); `cfg` its settings and chunks."""

    @staticmethod
    def forward(ctx, x, w_q, w_kv, w_out, b_out, null_k, null_v, cfg):
        x = x.contiguous()
        # a seed per chunk: chunks number their heads from 0, so one seed would give every chunk the same masks
        seeds = dropout_seed(cfg.dropout_p, x.device, len(cfg.chunks))
        parts = [_Chunk(cfg, part, seeds[i:i + 1], null_k, null_v) for i, part in enumerate(cfg.chunks)]
        y = new_output(x.new_empty(*x.shape[:2], w_out.shape[0]))
        routes = []
        for i, (c, w) in enumerate(zip(parts, packed_weights(cfg, w_q, w_kv, cfg.chunks))):
            q, k, v = c.project(cfg, x, w)
            operands = c.operands(cfg, q, k, v)
            r = c.routes(cfg, q, k, operands[2])
            out, _ = c.attend(q, k, v, operands, r)
            project_out(cfg, c.part, out.transpose(1, 2), w_out, b_out, y, first=i == 0)
            routes.append(r)
            del q, k, v, out  # before the next chunk's are made
        ctx.save_for_backward(x, w_q, w_kv, w_out, null_k, null_v, *(t for r in routes for t in r))
        ctx.cfg, ctx.parts, ctx.n_routes = cfg, parts, [len(r) for r in routes]
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w_q, w_kv, w_out, null_k, null_v, *flat = ctx.saved_tensors
        cfg = ctx.cfg
        at = [sum(ctx.n_routes[:i]) for i in range(len(ctx.n_routes) + 1)]
        routes = [flat[a:b] for a, b in zip(at, at[1:])]
        dy = dy.contiguous()  # a copy only of an expanded gradient (a sum's), which the GEMMs cannot read by rows
        dx = new_output(torch.empty_like(x))
        # each chunk writes its own rows of the packed weights' gradient and its own columns of w_out's
        d_w_packed, d_w_out = packed_weight_grads(cfg, w_q, cfg.chunks), new_output(torch.empty_like(w_out))
        # the null key's and value's gradients, each chunk's summed over the batch into its heads' rows (every
        # Sinkhorn head is in some chunk), in fp32 until the end
        d_null = None if null_k is None else null_k.new_empty(2, null_k.shape[0], null_k.shape[-1],
                                                               dtype=torch.float32)
        for i, (c, r, w) in enumerate(zip(ctx.parts, routes, packed_weights(cfg, w_q, w_kv, cfg.chunks))):
            q, k, v = c.project(cfg, x, w)
            operands = c.operands(cfg, q, k, v)
            out, lse = c.attend(q, k, v, operands, r)
            cols = head_columns(cfg, c.part)
            dout = new_output(torch.empty_like(out.transpose(1, 2)))
            write_sum(d_w_out[:, cols], [(t.t(), f) for f, t in c.part.rows(out.transpose(1, 2), dy)])
            for f, t in c.part.rows(dout, dy):
                torch.mm(t, w_out[:, cols], out=f)
            d_qkv, grads = c.packed(cfg, x)
            dnull = c.backward(cfg, dout.transpose(1, 2), q, k, v, out, lse, operands, r, grads)
            del q, k, v, out, lse, dout
            # dq, dk, dv lie in one buffer as the weight's rows do: one GEMM for the weight's gradient, one for dx;
            # the first chunk has no shift, so its one pair of row blocks writes every row of dx
            write_sum(d_w_packed[i], [(f.t(), t) for f, t in c.part.rows(d_qkv, x)])
            for f, t in c.part.rows(d_qkv, dx):
                t.addmm_(f, w, beta=0 if i == 0 else 1)
            if d_null is not None and dnull is not None:
                torch.sum(dnull, dim=1, out=d_null[:, c.sinkhorn(cfg)])
            del d_qkv, grads, dnull  # before the next chunk's buffers are made
        if d_null is not None:
            d_null = [d.view_as(t).to(t.dtype) for d, t in zip(d_null, (null_k, null_v))]
        return (dx, *unpack_weight_grads(cfg, d_w_packed), d_w_out, dy.sum(dim=(0, 1)), *(d_null or (None, None)),
                None)

