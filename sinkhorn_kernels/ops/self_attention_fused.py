"""The Sinkhorn self-attention layer op (`ops.sinkhorn_self_attention`) on the fused backends: projections, routing
and the block attention kernels in one autograd Function that keeps from forward to backward only the attention
output, its log-sum-exp and the routes (x is the caller's).

Through separate ops, autograd keeps q, k, v and the attention output (64 MB at 16k tokens, dim 512, in bf16), and
backward holds dq, dk, dv of every head at once (48 MB more) beside them. Here the heads run in chunks
(`chunk_heads`): forward projects a chunk's q, k, v into one packed buffer, routes, attends and lets them go;
backward recomputes them a chunk at a time (one GEMM), with the chunk's output gradient, runs the backward kernels
(`topk_attention.attend_backward`) and folds the chunk's dq, dk, dv into dx and the weights' gradients before the
next chunk. The causal half-head rotation is a shift of the rows the projections read and write
(`self_attention.Group`), never a copy. torch.compile traces the composed ops instead: this Function manages its
buffers in eager code.
"""
import torch

from .block_attention import fused, fused_operands, fused_routes
from .self_attention import Group, head_columns, packed_weights, project_out
from .topk_attention import attend_backward, route_and_attend, topk_options


def chunk_heads(dim, dim_head):
    """Heads per chunk: backward's chunk buffers (q, k, v, the output's gradient and dq, dk, dv: seven vectors of
    dim_head per token and head) take at most twice the memory of x, so its peak is about that of six copies of x
    (x, dx, the incoming gradient, the attention output and the chunk). Smaller chunks save little more and each
    costs some thirty more launches (2 heads of 64 at dim 512: 4 chunks)."""
    return max(1, 2 * dim // (7 * dim_head))


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
            self.kernel = (cfg.bucket_size, cfg.bucket_size, cfg.causal, 0, cfg.scale, cfg.dropout_p)
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

    def project(self, cfg, x, w):
        """The chunk's q, k, v ([B, n, T, D] views of one packed [B, T, 3, n, D] buffer, in its frame) from x and
        its packed weight w."""
        B, T, _ = x.shape
        qkv = x.new_empty(B, T, 3, self.n, cfg.dim_head)
        for f, t in self.part.rows(qkv, x):
            torch.mm(t, w.t(), out=f)
        return [qkv[:, :, i].transpose(1, 2) for i in range(3)]

    def operands(self, cfg, q, k, v):
        """(null_k, null_v, mask) as the kernels take them, checked."""
        kb = cfg.bucket_size if self.part.local else cfg.kv_bucket_size
        null_k, null_v, mask, _ = fused_operands(cfg.backend, q, k, v, self.null, self.mask, None, cfg.bucket_size, kb)
        return null_k, null_v, mask

    def attend(self, cfg, q, k, v):
        """-> (out [B, n, T, D] stored as [B, T, n, D], lse, routes)."""
        null_k, null_v, mask = self.operands(cfg, q, k, v)
        if not self.part.local:
            return route_and_attend(q, k, v, null_k, null_v, mask, mask, self.seed, self.opts)
        idx = self.local_routes.expand(q.shape[0], self.n, -1, -1)
        routes = fused_routes(idx, torch.ones(idx.shape, device=idx.device))
        out, lse = fused.block_attention_fwd(q, k, v, *routes, None, None, mask, mask, *self.kernel, self.seed,
                                             cfg.backend)
        return out, lse, routes

    def backward(self, cfg, dout, q, k, v, out, lse, routes):
        """-> (dq, dk, dv, d_null_k, d_null_v)."""
        null_k, null_v, mask = self.operands(cfg, q, k, v)
        if not self.part.local:
            return attend_backward(dout, q, k, v, out, lse, routes, null_k, null_v, mask, mask, self.seed, self.opts)
        dq, dk, dv, _, _ = fused.block_attention_bwd(dout, q, k, v, out, lse, *routes, None, None, mask, mask,
                                                     *self.kernel, self.seed, cfg.backend)
        return dq, dk, dv, None, None


class FusedSelfAttention(torch.autograd.Function):
    """x [B, T, dim] and the layer's weights (see `sinkhorn_self_attention`); `cfg` its settings and chunks."""

    @staticmethod
    def forward(ctx, x, w_q, w_kv, w_out, b_out, null_k, null_v, cfg):
        x = x.contiguous()
        seeds = dropout_seeds(cfg.dropout_p, len(cfg.chunks), x.device)
        parts = [_Chunk(cfg, part, seeds[i:i + 1], null_k, null_v) for i, part in enumerate(cfg.chunks)]
        outs, kept = [], []
        for c, w in zip(parts, packed_weights(cfg, w_q, w_kv, cfg.chunks)):
            out, lse, routes = c.attend(cfg, *c.project(cfg, x, w))
            outs.append(out)
            kept += [out, lse, *routes]
        y = x.new_empty(*x.shape[:2], w_out.shape[0])
        project_out(cfg, cfg.chunks, [o.transpose(1, 2) for o in outs], w_out, b_out, y)
        ctx.save_for_backward(x, w_q, w_kv, w_out, null_k, null_v, *kept)
        ctx.cfg, ctx.parts = cfg, parts
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w_q, w_kv, w_out, null_k, null_v, *kept = ctx.saved_tensors
        cfg, parts = ctx.cfg, ctx.parts
        dy = dy.contiguous()  # a copy only of an expanded gradient (a sum's), which the GEMMs cannot read by rows
        B, T, _ = x.shape
        dx = torch.empty_like(x)
        d_w = [torch.zeros_like(w) for w in (w_q, w_kv, w_out)]
        d_null = [None if t is None else torch.zeros_like(t) for t in (null_k, null_v)]
        inner = cfg.heads * cfg.dim_head
        at = 0
        for i, (c, w) in enumerate(zip(parts, packed_weights(cfg, w_q, w_kv, cfg.chunks))):
            n_routes = 2 if c.part.local else 5
            out, lse, *routes = kept[at:at + 2 + n_routes]
            at += 2 + n_routes
            cols = head_columns(cfg, c.part)
            dout = x.new_empty(B, T, c.n, cfg.dim_head)
            for f, t in c.part.rows(out.transpose(1, 2), dy):
                d_w[2][:, cols].addmm_(t.t(), f)
            for f, t in c.part.rows(dout, dy):
                torch.mm(t, w_out[:, cols], out=f)
            q, k, v = c.project(cfg, x, w)
            dq, dk, dv, d_nk, d_nv = c.backward(cfg, dout.transpose(1, 2), q, k, v, out, lse, routes)
            del q, k, v, dout
            for j, (g, w_j, d_wj) in enumerate(zip((dq, dk, dv), w.chunk(3),
                                                  (d_w[0][cols], d_w[1][:inner][cols], d_w[1][inner:][cols]))):
                for f, t in c.part.rows(g.transpose(1, 2), x):
                    d_wj.addmm_(f.t(), t)
                # the first chunk has no shift: its one pair of row blocks writes every row of dx
                for f, t in c.part.rows(g.transpose(1, 2), dx):
                    t.addmm_(f, w_j, beta=0 if i == j == 0 else 1)
            if d_nk is not None:
                for d, d_c in zip(d_null, (d_nk, d_nv)):
                    d[c.sinkhorn(cfg)] = d_c.view_as(d[c.sinkhorn(cfg)])
        return dx, *d_w, dy.sum(dim=(0, 1)), *d_null, None


def dropout_seeds(dropout_p, n, device):
    """One dropout seed per chunk (int32 [n]): chunks number their heads from 0, so one seed would give every
    chunk the same masks."""
    if dropout_p == 0:
        return torch.zeros(n, dtype=torch.int32, device=device)
    return torch.randint(0, 2 ** 30, (n,), dtype=torch.int32, device=device)
