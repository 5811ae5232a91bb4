"""The sort net's summaries in Triton: two launches forward and two backward for q and k together, where PyTorch
runs some thirty small ops for the causal running means.

With x the masked vectors, P_c the sum of x over the buckets before c and count_t the real tokens up to t:
  causal query (f = the bucket's first token):  sq_c = (P_c + x_f) / count_f
  causal key:  sk_c = sum_{t in c} (P_c + sum_{s in c, s <= t} x_s) / count_t = P_c * W_c + part_c,
               W_c = sum_{t in c} 1 / count_t
so both are P_c * W_c + part_c (the query's W_c = 1 / count_f). `_parts` (a program per bucket) computes a
bucket's total, part and W; `_combine` (a program per (batch x head) and block of dims) runs the prefix P over
the buckets. Backward mirrors it: `_later` sums d_c * W_c over the later buckets (the reverse scan), `_add_vjp`
adds each token's share into dx. Non-causal summaries are bucket means: `_parts` writes them, `_add_vjp` takes
them back, one launch each. Counts come from an int32 cumulative sum of the mask (one PyTorch op), or are t + 1.
SortCut's single query mean over the whole sequence is left to PyTorch. Sums are in fp32.

Each kernel's third grid axis is the tensor: 0 for q, 1 for k, with their own sizes and modes.
"""
import torch
import triton
import triton.language as tl

from ..outputs import carve, new_output
from ..tiles import cdiv, dot_tile
from .reference import add_bucket_mean_vjp, masked_bucket_mean, zero_masked

# what a tensor's summaries are (NONE: not computed here)
NONE, MEAN, FIRST, SUMMED = (tl.constexpr(i) for i in range(4))
BUCKETS_PER_STEP = 64  # buckets per step of the scans


@triton.jit
def _inverse_counts(CNT, b, h, scb, sch, t, ok, HAS_MASK: tl.constexpr):
    """1 / count_t (at least one token counted) at the positions t where ok, else 0."""
    if HAS_MASK:
        count = tl.load(CNT + b * scb + h * sch + t, mask=ok, other=1).to(tl.float32)
    else:
        count = (t + 1).to(tl.float32)
    return tl.where(ok, 1.0 / tl.maximum(count, 1.0), 0.0)


@triton.jit
def _real_rows(M, b, h, smb, smh, t, ok, HAS_MASK: tl.constexpr):
    """1.0 at the real tokens among positions t where ok, else 0.0."""
    if HAS_MASK:
        return tl.load(M + b * smb + h * smh + t, mask=ok, other=0).to(tl.float32)
    return ok.to(tl.float32)


@triton.jit
def _bucket_parts(X, M, CNT, OUT, TOT, PART, WGT, g, c, H, N, BS, D, sxb, sxh, sxt, sxd, smb, smh, scb, sch,
                  MODE: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    if c < N:
        b, h = g // H, g % H
        rows, dims = tl.arange(0, BLOCK_T), tl.arange(0, BLOCK_D)
        t, ok = c * BS + rows, rows < BS
        m = _real_rows(M, b, h, smb, smh, t, ok, HAS_MASK)
        x = tl.load(X + b * sxb + h * sxh + t[:, None] * sxt + dims[None, :] * sxd,
                    mask=ok[:, None] & (dims[None, :] < D), other=0.0).to(tl.float32) * m[:, None]
        at = (g * N + c) * D + dims
        total = tl.sum(x, axis=0)
        if MODE == MEAN:
            tl.store(OUT + at, (total / tl.maximum(tl.sum(m, axis=0), 1.0)).to(OUT.dtype.element_ty), mask=dims < D)
        else:
            inv = _inverse_counts(CNT, b, h, scb, sch, t, ok, HAS_MASK)
            if MODE == FIRST:
                w = tl.sum(tl.where(rows == 0, inv, 0.0), axis=0)
                part = tl.sum(tl.where(rows[:, None] == 0, x, 0.0), axis=0) * w
            else:
                w = tl.sum(inv, axis=0)
                part = tl.sum(tl.cumsum(x, axis=0) * inv[:, None], axis=0)
            tl.store(TOT + at, total, mask=dims < D)
            tl.store(PART + at, part, mask=dims < D)
            tl.store(WGT + g * N + c, w)


@triton.jit
def _parts(Q, QM, QC, SQ, QTOT, QPART, QWGT, K, KM, KC, SK, KTOT, KPART, KWGT, H, Nq, Nk, BS, KBS, D,
           sqb, sqh, sqt, sqd, skb, skh, skt, skd, sqmb, sqmh, skmb, skmh, sqcb, sqch, skcb, skch,
           MODE_Q: tl.constexpr, MODE_K: tl.constexpr, HAS_QMASK: tl.constexpr, HAS_KVMASK: tl.constexpr,
           BLOCK_TQ: tl.constexpr, BLOCK_TK: tl.constexpr, BLOCK_D: tl.constexpr):
    c, g = tl.program_id(0), tl.program_id(1)
    if tl.program_id(2) == 0:
        if MODE_Q != NONE:
            _bucket_parts(Q, QM, QC, SQ, QTOT, QPART, QWGT, g, c, H, Nq, BS, D, sqb, sqh, sqt, sqd, sqmb, sqmh,
                          sqcb, sqch, MODE_Q, HAS_QMASK, BLOCK_TQ, BLOCK_D)
    else:
        _bucket_parts(K, KM, KC, SK, KTOT, KPART, KWGT, g, c, H, Nk, KBS, D, skb, skh, skt, skd, skmb, skmh, skcb,
                      skch, MODE_K, HAS_KVMASK, BLOCK_TK, BLOCK_D)


@triton.jit
def _scan_prefix(OUT, TOT, PART, WGT, g, d0, N, D, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """out_c = P_c * W_c + part_c over the buckets in order, P carried from step to step."""
    dims, steps = d0 + tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_N)
    carry = tl.zeros([BLOCK_D], tl.float32)
    for c0 in range(0, N, BLOCK_N):
        c = c0 + steps
        ok = (c[:, None] < N) & (dims[None, :] < D)
        at = (g * N + c[:, None]) * D + dims[None, :]
        total = tl.load(TOT + at, mask=ok, other=0.0)
        before = carry[None, :] + tl.cumsum(total, axis=0) - total
        w = tl.load(WGT + g * N + c, mask=c < N, other=0.0)
        out = before * w[:, None] + tl.load(PART + at, mask=ok, other=0.0)
        tl.store(OUT + at, out.to(OUT.dtype.element_ty), mask=ok)
        carry += tl.sum(total, axis=0)


@triton.jit
def _combine(SQ, QTOT, QPART, QWGT, SK, KTOT, KPART, KWGT, Nq, Nk, D, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Causal only (the scans' one caller), so both tensors have running means."""
    g, d0 = tl.program_id(0), tl.program_id(1) * BLOCK_D
    if tl.program_id(2) == 0:
        _scan_prefix(SQ, QTOT, QPART, QWGT, g, d0, Nq, D, BLOCK_N, BLOCK_D)
    else:
        _scan_prefix(SK, KTOT, KPART, KWGT, g, d0, Nk, D, BLOCK_N, BLOCK_D)


@triton.jit
def _bucket_weights(CNT, b, h, scb, sch, c, N, BS, HAS_MASK: tl.constexpr, BLOCK_T: tl.constexpr):
    """W_c of the buckets c (a vector; see the module's docstring) from the counts of their first BLOCK_T tokens
    (1 for the query's W, the whole bucket for the key's)."""
    rows = tl.arange(0, BLOCK_T)
    t = c[:, None] * BS + rows[None, :]
    ok = (rows[None, :] < BS) & (c[:, None] < N)
    return tl.sum(_inverse_counts(CNT, b, h, scb, sch, t, ok, HAS_MASK), axis=1)


@triton.jit
def _scan_later(DS, LATER, CNT, g, d0, H, N, BS, D, scb, sch, HAS_MASK: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """later_c = sum over the buckets after c of d_c' * W_c', from the last bucket back."""
    b, h = g // H, g % H
    dims, steps = d0 + tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_N)
    carry = tl.zeros([BLOCK_D], tl.float32)
    n_steps = tl.cdiv(N, BLOCK_N)
    for i in range(n_steps):
        c = (n_steps - 1 - i) * BLOCK_N + steps
        ok = (c[:, None] < N) & (dims[None, :] < D)
        at = (g * N + c[:, None]) * D + dims[None, :]
        w = _bucket_weights(CNT, b, h, scb, sch, c, N, BS, HAS_MASK, BLOCK_T)
        gw = tl.load(DS + at, mask=ok, other=0.0).to(tl.float32) * w[:, None]
        step_total = tl.sum(gw, axis=0)
        tl.store(LATER + at, carry[None, :] + step_total[None, :] - tl.cumsum(gw, axis=0), mask=ok)
        carry += step_total


@triton.jit
def _later(DSQ, QLATER, QC, DSK, KLATER, KC, H, Nq, Nk, BS, KBS, D, sqcb, sqch, skcb, skch, HAS_QMASK: tl.constexpr,
           HAS_KVMASK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_TK: tl.constexpr, BLOCK_D: tl.constexpr):
    """Causal only, as `_combine`: the query's W reads one count a bucket, the key's a whole bucket's."""
    g, d0 = tl.program_id(0), tl.program_id(1) * BLOCK_D
    if tl.program_id(2) == 0:
        _scan_later(DSQ, QLATER, QC, g, d0, H, Nq, BS, D, sqcb, sqch, HAS_QMASK, BLOCK_N, 1, BLOCK_D)
    else:
        _scan_later(DSK, KLATER, KC, g, d0, H, Nk, KBS, D, skcb, skch, HAS_KVMASK, BLOCK_N, BLOCK_TK, BLOCK_D)


@triton.jit
def _bucket_vjp(DS, LATER, DX, M, CNT, g, c, H, N, BS, D, sxb, sxh, sxt, sxd, smb, smh, scb, sch,
                MODE: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    if c < N:
        b, h = g // H, g % H
        rows, dims = tl.arange(0, BLOCK_T), tl.arange(0, BLOCK_D)
        t, ok = c * BS + rows, rows < BS
        m = _real_rows(M, b, h, smb, smh, t, ok, HAS_MASK)
        d = tl.load(DS + (g * N + c) * D + dims, mask=dims < D, other=0.0).to(tl.float32)
        if MODE == MEAN:
            share = tl.zeros([BLOCK_T, BLOCK_D], tl.float32) + (d / tl.maximum(tl.sum(m, axis=0), 1.0))[None, :]
        else:
            later = tl.load(LATER + (g * N + c) * D + dims, mask=dims < D, other=0.0)
            inv = _inverse_counts(CNT, b, h, scb, sch, t, ok, HAS_MASK)
            if MODE == FIRST:
                first = tl.sum(tl.where(rows == 0, inv, 0.0), axis=0)
                share = later[None, :] + tl.where(rows[:, None] == 0, (d * first)[None, :], 0.0)
            else:
                suffix = tl.sum(inv, axis=0) - tl.cumsum(inv, axis=0) + inv  # sum of inv from t to the bucket's end
                share = later[None, :] + d[None, :] * suffix[:, None]
        ptrs = DX + b * sxb + h * sxh + t[:, None] * sxt + dims[None, :] * sxd
        tile = ok[:, None] & (dims[None, :] < D)
        dx = tl.load(ptrs, mask=tile, other=0.0).to(tl.float32) + share * m[:, None]
        tl.store(ptrs, dx.to(DX.dtype.element_ty), mask=tile)


@triton.jit
def _add_vjp(DSQ, QLATER, DQ, QM, QC, DSK, KLATER, DK, KM, KC, H, Nq, Nk, BS, KBS, D,
             sqb, sqh, sqt, sqd, skb, skh, skt, skd, sqmb, sqmh, skmb, skmh, sqcb, sqch, skcb, skch, first_side,
             MODE_Q: tl.constexpr, MODE_K: tl.constexpr, HAS_QMASK: tl.constexpr, HAS_KVMASK: tl.constexpr,
             BLOCK_TQ: tl.constexpr, BLOCK_TK: tl.constexpr, BLOCK_D: tl.constexpr):
    """The third grid axis from `first_side` on: 0 adds into dq, 1 into dk."""
    c, g = tl.program_id(0), tl.program_id(1)
    if tl.program_id(2) + first_side == 0:
        if MODE_Q != NONE:
            _bucket_vjp(DSQ, QLATER, DQ, QM, QC, g, c, H, Nq, BS, D, sqb, sqh, sqt, sqd, sqmb, sqmh, sqcb, sqch,
                        MODE_Q, HAS_QMASK, BLOCK_TQ, BLOCK_D)
    else:
        _bucket_vjp(DSK, KLATER, DK, KM, KC, g, c, H, Nk, KBS, D, skb, skh, skt, skd, skmb, skmh, skcb, skch,
                    MODE_K, HAS_KVMASK, BLOCK_TK, BLOCK_D)


class _Launch:
    """Sizes, modes, masks and their counts of one call, on q and k (or dq and dk)."""

    def __init__(self, q, k, q_mask, kv_mask, bs, kbs, causal, n_sortcut):
        self.B, self.H, Tq, self.D = q.shape
        self.Nq, self.Nk = Tq // bs, k.shape[2] // kbs
        self.sortcut = bool(n_sortcut) and not causal
        modes = (FIRST, SUMMED) if causal else (NONE if self.sortcut else MEAN, MEAN)
        # the counts only where running means need them: one PyTorch op per mask
        counts = lambda m: m.cumsum(-1, dtype=torch.int32) if causal and m is not None else None
        q_counts = counts(q_mask)
        self.counts = (q_counts, q_counts if kv_mask is q_mask else counts(kv_mask))
        self.masks = (q_mask, kv_mask)
        self.block_d = dot_tile(self.D)
        self.meta = dict(MODE_Q=modes[0], MODE_K=modes[1], HAS_QMASK=q_mask is not None,
                         HAS_KVMASK=kv_mask is not None)
        self.tiles = dict(BLOCK_TQ=dot_tile(bs), BLOCK_TK=dot_tile(kbs), BLOCK_D=self.block_d,
                          num_warps=4 if max(dot_tile(bs), dot_tile(kbs)) * self.block_d <= 64 * 64 else 8)
        self.sizes = (self.H, self.Nq, self.Nk, bs, kbs, self.D)

    def row_strides(self, dummy):
        """The masks (or a dummy), their counts (or a dummy) and the strides of both, as the kernels take them."""
        pick = lambda t: t if t is not None else dummy
        strides = lambda t: (t.stride(0), t.stride(1)) if t is not None else (0, 0)
        return ([pick(t) for t in self.masks], [pick(t) for t in self.counts],
                [s for t in self.masks for s in strides(t)], [s for t in self.counts for s in strides(t)])

    def scan_grid(self):
        block = min(self.block_d, 64)
        return (self.B * self.H, cdiv(self.D, block), 2), block


def forward(q, k, q_mask, kv_mask, bs, kbs, causal, n_sortcut):
    """-> (sq [B, H, Nq or 1, D], sk [B, H, Nk, D]) in q's dtype, as `reference.sort_summaries`."""
    L = _Launch(q, k, q_mask, kv_mask, bs, kbs, causal, n_sortcut)
    G, D = L.B * L.H, L.D
    sq = None if L.sortcut else new_output(q.new_empty(L.B, L.H, L.Nq, D))
    sk = new_output(k.new_empty(L.B, L.H, L.Nk, D))
    # the causal scans' inputs (totals, parts and weights by bucket) in one buffer; q stands in without them
    qtot = qpart = ktot = kpart = qw = kw = q
    if causal:
        qtot, qpart, ktot, kpart, qw, kw = carve(
            new_output(q.new_empty(2 * G * D * (L.Nq + L.Nk) + G * (L.Nq + L.Nk), dtype=torch.float32)),
            [(G, L.Nq, D), (G, L.Nq, D), (G, L.Nk, D), (G, L.Nk, D), (G, L.Nq), (G, L.Nk)])
    (qm, km), (qc, kc), mask_strides, count_strides = L.row_strides(q)
    out_q = sq if sq is not None else sk  # never written: SortCut's query mode is NONE
    _parts[(max(L.Nq, L.Nk), G, 2)](q, qm, qc, out_q, qtot, qpart, qw, k, km, kc, sk, ktot, kpart, kw, *L.sizes,
                                    *q.stride(), *k.stride(), *mask_strides, *count_strides, **L.meta, **L.tiles)
    if causal:
        grid, block = L.scan_grid()
        _combine[grid](sq, qtot, qpart, qw, sk, ktot, kpart, kw, L.Nq, L.Nk, D, BLOCK_N=BUCKETS_PER_STEP,
                       BLOCK_D=block)
    if L.sortcut:
        sq = masked_bucket_mean(zero_masked(q, q_mask), q_mask, 1)
    return sq, sk


def add_vjp(d_sq, d_sk, dq, dk, q_mask, kv_mask, bs, kbs, causal, n_sortcut):
    """Adds `forward`'s vector-Jacobian product for d_sq, d_sk into dq, dk ([B, H, T, D] of any strides, disjoint
    or one tensor) in place, as `reference.add_sort_summaries_vjp`."""
    L = _Launch(dq, dk, q_mask, kv_mask, bs, kbs, causal, n_sortcut)
    G, D = L.B * L.H, L.D
    d_sq, d_sk = d_sq.contiguous(), d_sk.contiguous()
    (qm, km), (qc, kc), mask_strides, count_strides = L.row_strides(dq)
    q_later = k_later = d_sq
    if causal:
        q_later, k_later = carve(new_output(dq.new_empty(G * D * (L.Nq + L.Nk), dtype=torch.float32)),
                                 [(G, L.Nq, D), (G, L.Nk, D)])
        grid, block = L.scan_grid()
        _later[grid](d_sq, q_later, qc, d_sk, k_later, kc, *L.sizes, *count_strides, HAS_QMASK=q_mask is not None,
                     HAS_KVMASK=kv_mask is not None, BLOCK_N=BUCKETS_PER_STEP, BLOCK_TK=L.tiles['BLOCK_TK'],
                     BLOCK_D=block)
    # dq and dk may be one tensor (the layer op adds both into dx): q's and k's programs would then add into the
    # same rows at once, so they take a launch each
    for n_sides, first in ([(1, 0), (1, 1)] if dq.data_ptr() == dk.data_ptr() else [(2, 0)]):
        _add_vjp[(max(L.Nq, L.Nk), G, n_sides)](d_sq, q_later, dq, qm, qc, d_sk, k_later, dk, km, kc, *L.sizes,
                                                *dq.stride(), *dk.stride(), *mask_strides, *count_strides, first,
                                                **L.meta, **L.tiles)
    if L.sortcut:
        add_bucket_mean_vjp(d_sq, dq, q_mask, 1)
