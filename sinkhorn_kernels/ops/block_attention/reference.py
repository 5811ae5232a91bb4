"""Block attention in plain PyTorch, with a FlashAttention-style backward.

Layout (batch and heads merged into one leading axis of size BH):
  q [BH, Nq, bs, D]; k, v [BH, Nk, kbs, D]; idx, w [BH, Nq, K]: query bucket u attends, in one softmax, to the
  key buckets idx[u] (keys and values scaled by w[u]) and, with `own_bucket`, to key bucket u.
  idx == Nk names the learned null bucket (null_k / null_v [BH, D] repeated over the block); idx == -1 no block.

Forward and backward walk the query buckets in chunks, so the gathered blocks and the score tensor exist
for one chunk at a time. Only the inputs, the output and the row log-sum-exp are saved; backward recomputes
the probabilities and scatters the key/value gradients back through the routing indices.
"""
import math

import torch

# score-tensor elements per chunk: small enough to stay in cache-sized pieces, large enough for big GEMMs
CHUNK_ELEMENTS = 1 << 21


def chunk_size(BH, bs, L):
    return max(1, CHUNK_ELEMENTS // max(1, BH * bs * L))


def gather_blocks(xb, null, idx):
    """xb [BH, Nk, kbs, D] gathered at idx [BH, c, K] -> [BH, c, K, kbs, D] (null where idx == Nk, 0 at -1)."""
    BH, Nk, kbs, D = xb.shape
    c, K = idx.shape[1:]
    safe = idx.clamp(0, Nk - 1)
    flat = (torch.arange(BH, device=idx.device).view(BH, 1, 1) * Nk + safe).reshape(-1)
    g = xb.reshape(BH * Nk, kbs, D).index_select(0, flat).view(BH, c, K, kbs, D)
    if null is not None:
        g = torch.where((idx == Nk)[..., None, None], null.view(BH, 1, 1, 1, D).to(g.dtype), g)
    return torch.where((idx < 0)[..., None, None], torch.zeros((), dtype=g.dtype, device=g.device), g)


class Layout:
    """The static description of one block attention call, shared by forward and backward."""

    def __init__(self, Nq, bs, Nk, kbs, K, own_bucket, causal, rotated, scale, dropout_p, seed):
        self.Nq, self.bs, self.Nk, self.kbs, self.K = Nq, bs, Nk, kbs, K
        self.own_bucket, self.causal, self.rotated = own_bucket, causal, rotated
        self.scale, self.dropout_p, self.seed = scale, dropout_p, seed
        self.L = K * kbs + (kbs if own_bucket else 0)

    def chunks(self, BH):
        step = chunk_size(BH, self.bs, self.L)
        for n, c0 in enumerate(range(0, self.Nq, step)):
            yield n, c0, min(self.Nq, c0 + step)

    def keys(self, kb, null, idx, w, c0, c1):
        """Keys (or values) seen by query buckets c0..c1: [BH, c, L, D], plus the gathered routed blocks."""
        g = gather_blocks(kb, null, idx[:, c0:c1])
        parts = [(g * w[:, c0:c1, :, None, None].to(g.dtype)).flatten(2, 3)]
        if self.own_bucket:
            parts.append(kb[:, c0:c1])
        return torch.cat(parts, dim=2), g

    def mask(self, idx, q_mask, kv_mask, c0, c1, device):
        """Boolean [BH | 1, c, bs, L] of allowed (query, key) pairs, or None when everything is allowed."""
        K, kbs, Nk, bs = self.K, self.kbs, self.Nk, self.bs
        idx_c = idx[:, c0:c1]
        parts = []
        routed = (idx_c >= 0)[..., None].expand(*idx_c.shape, kbs)
        if kv_mask is not None:
            safe = idx_c.clamp(0, Nk - 1)
            gathered = torch.gather(kv_mask, 1, safe.flatten(1)[..., None].expand(-1, -1, kbs)).view_as(routed)
            routed = routed & (gathered | (idx_c == Nk)[..., None])
        parts.append(routed.flatten(2))
        if self.own_bucket:
            own = kv_mask[:, c0:c1] if kv_mask is not None else torch.ones(1, c1 - c0, kbs, dtype=torch.bool, device=device)
            parts.append(own.expand(idx_c.shape[0], -1, -1))
        m = torch.cat(parts, dim=-1)[:, :, None, :]  # [BH, c, 1, L]
        if q_mask is not None:
            m = m & q_mask[:, c0:c1, :, None]
        if self.causal:
            tri = torch.ones(bs, kbs, dtype=torch.bool, device=device).tril()
            m = m.expand(-1, -1, bs, -1).clone()
            m[..., K * kbs:] &= tri
            if self.rotated is not None and c1 == self.Nq:
                # rotated heads: the last bucket's rows 1.. are the wrapped-around first tokens of the sequence;
                # they may see only their own (causal) keys 1..i, not the routed blocks nor key 0 (the last token)
                last = m[:, -1]
                wrapped = self.rotated.view(-1, 1, 1)
                last[:, 1:, :K * kbs + 1] &= ~wrapped
        return m

    def dropout_keep(self, shape, chunk, device):
        gen = torch.Generator(device=device).manual_seed(self.seed + chunk)
        return torch.rand(shape, generator=gen, device=device) >= self.dropout_p


def _scores(lay, qc, kc, m):
    s = torch.matmul(qc, kc.transpose(-1, -2)).mul_(lay.scale)
    if m is not None:
        s.masked_fill_(~m, float('-inf'))
    return s


def forward(lay, q, k, v, idx, w, null_k, null_v, q_mask, kv_mask):
    BH = q.shape[0]
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:-1], dtype=q.dtype, device=q.device)
    for n, c0, c1 in lay.chunks(BH):
        kc, _ = lay.keys(k, null_k, idx, w, c0, c1)
        vc, _ = lay.keys(v, null_v, idx, w, c0, c1)
        s = _scores(lay, q[:, c0:c1], kc, lay.mask(idx, q_mask, kv_mask, c0, c1, q.device))
        row_max = s.amax(dim=-1, keepdim=True)
        row_max.masked_fill_(row_max == float('-inf'), 0)  # rows with no allowed key attend to nothing
        p = s.sub_(row_max).exp_()
        denom = p.sum(dim=-1, keepdim=True)
        p.div_(denom.clamp_min(torch.finfo(p.dtype).tiny))
        lse[:, c0:c1] = (row_max + denom.log()).squeeze(-1)
        if lay.dropout_p > 0:
            p.mul_(lay.dropout_keep(p.shape, n, p.device)).div_(1 - lay.dropout_p)
        out[:, c0:c1] = torch.matmul(p, vc)
    return out, lse


def backward(lay, grads_needed, q, k, v, idx, w, null_k, null_v, q_mask, kv_mask, out, lse, dout):
    BH, Nk, kbs, D = k.shape
    K = lay.K
    dq = torch.empty_like(q)
    # one extra slot per row collects the null bucket's gradient (and the zeros of idx == -1)
    dk = torch.zeros(BH, Nk + 1, kbs, D, dtype=k.dtype, device=k.device)
    dv = torch.zeros_like(dk)
    dw = torch.zeros_like(w) if grads_needed['w'] else None
    delta = (dout * out).sum(dim=-1)
    lse_safe = lse.masked_fill(lse == float('-inf'), float('inf'))
    row_base = torch.arange(BH, device=k.device).view(BH, 1, 1) * (Nk + 1)
    for n, c0, c1 in lay.chunks(BH):
        qc, doc = q[:, c0:c1], dout[:, c0:c1]
        kc, gk = lay.keys(k, null_k, idx, w, c0, c1)
        vc, gv = lay.keys(v, null_v, idx, w, c0, c1)
        p = _scores(lay, qc, kc, lay.mask(idx, q_mask, kv_mask, c0, c1, q.device))
        p = p.sub_(lse_safe[:, c0:c1, :, None]).exp_()
        dp = torch.matmul(doc, vc.transpose(-1, -2))
        if lay.dropout_p > 0:
            keep = lay.dropout_keep(p.shape, n, p.device)
            dvc = torch.matmul((p * keep).transpose(-1, -2), doc).div_(1 - lay.dropout_p)
            dp.mul_(keep).div_(1 - lay.dropout_p)
        else:
            dvc = torch.matmul(p.transpose(-1, -2), doc)
        ds = p.mul_(dp.sub_(delta[:, c0:c1, :, None])).mul_(lay.scale)
        dq[:, c0:c1] = torch.matmul(ds, kc)
        dkc = torch.matmul(ds.transpose(-1, -2), qc)
        c = c1 - c0
        dk_routed = dkc[:, :, :K * kbs].reshape(BH, c, K, kbs, D)
        dv_routed = dvc[:, :, :K * kbs].reshape(BH, c, K, kbs, D)
        if dw is not None:
            dw[:, c0:c1] = (dk_routed * gk).sum((-1, -2)) + (dv_routed * gv).sum((-1, -2))
        if lay.own_bucket:
            dk[:, c0:c1] += dkc[:, :, K * kbs:]
            dv[:, c0:c1] += dvc[:, :, K * kbs:]
        idx_c = idx[:, c0:c1]
        slot = torch.where((idx_c < 0) | (idx_c >= Nk), Nk, idx_c)
        flat = (row_base + slot).reshape(-1)
        scale_w = w[:, c0:c1, :, None, None].to(dk.dtype)
        dk.view(-1, kbs, D).index_add_(0, flat, (dk_routed * scale_w).reshape(-1, kbs, D))
        dv.view(-1, kbs, D).index_add_(0, flat, (dv_routed * scale_w).reshape(-1, kbs, D))
    dnull_k = dk[:, Nk].sum(1) if null_k is not None else None
    dnull_v = dv[:, Nk].sum(1) if null_v is not None else None
    return dq, dk[:, :Nk], dv[:, :Nk], dw, dnull_k, dnull_v


class BlockAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, idx, w, null_k, null_v, q_mask, kv_mask, lay):
        out, lse = forward(lay, q, k, v, idx, w, null_k, null_v, q_mask, kv_mask)
        ctx.save_for_backward(q, k, v, idx, w, null_k, null_v, q_mask, kv_mask, out, lse)
        ctx.lay = lay
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, idx, w, null_k, null_v, q_mask, kv_mask, out, lse = ctx.saved_tensors
        needed = {'w': ctx.needs_input_grad[4]}
        dq, dk, dv, dw, dnk, dnv = backward(ctx.lay, needed, q, k, v, idx, w, null_k, null_v, q_mask, kv_mask,
                                            out, lse, dout.contiguous())
        return dq, dk, dv, None, dw, dnk, dnv, None, None, None


def block_attention(q, k, v, idx, w, null_k, null_v, q_mask, kv_mask, lay):
    return BlockAttentionFunction.apply(q, k, v, idx, w, null_k, null_v, q_mask, kv_mask, lay)
