"""Block attention in Triton: FlashAttention-style online softmax over routed blocks loaded by index.

One program per (row tile of a query bucket, batch x head): a bucket's rows are split into tiles of BLOCK_M where
a whole bucket of queries with its key, value and score tiles would not fit in shared memory (bucket and head dim
128). Routes are idx/w [B, H, Nq, R] (int32 / fp32; the own bucket, when present, is the last route with weight
1); idx == Nk is the learned null bucket, -1 no block. Routed keys and values are scaled by their weight inside
the kernel: no gathered copy of K/V exists, and no score tensor.

Backward: a dQ kernel (which also gives the route weights' gradients, delta = rowsum(dO * O) for the next kernel,
and each program's share of the null bucket's gradient) walks each query bucket's routes; a dK/dV kernel walks,
for each key block, the list of (query bucket, route) that read it, from a reverse index (a program per 16 key
blocks lists their readers in order). Readers are not spread evenly: causal routing of the benchmark's random inputs
sends 253 query buckets to one key block at 16k tokens (977 at 64k) where the mean is 3, the running means of the
first buckets being the largest (`benchmarks/key_block_readers.py`). One program per block would leave that
block's running long after the others, so a block's readers are split into chunks of `READERS_PER_PROGRAM` to
`2 * READERS_PER_PROGRAM - 1`, one program each; the chunks of a split block write fp32 partial sums that a last
kernel adds up in order. The null bucket, one vector, takes its gradient from the dQ kernel's programs, each
summing its own share. Every gradient is written once, with no atomics, so results are deterministic.
"""
import torch
import triton
import triton.language as tl

from ..outputs import new_output
from ..tiles import cdiv, dot_tile, next_power_of_2
from .routes import BackwardBuffers, new_attention_output


@triton.jit
def _allowed(rows, cols, u, j, blk, h, b, QM, KM, sqm_b, sqm_h, skm_b, skm_h, H, Nq, Nk, R, n_rot, BS, KBS,
             CAUSAL: tl.constexpr, HAS_QMASK: tl.constexpr, HAS_KVMASK: tl.constexpr):
    """[BLOCK_M, BLOCK_N] of the (query row, key column) pairs that may attend, for route j of query bucket u.
    Scalar conditions are broadcast to vectors first (the Triton interpreter rejects scalar-and-block masks)."""
    blk_v = cols * 0 + blk
    ok = (rows[:, None] < BS) & (cols[None, :] < KBS) & (blk_v >= 0)[None, :]
    if HAS_QMASK:
        qm = tl.load(QM + b * sqm_b + h * sqm_h + u * BS + rows, mask=rows < BS, other=0)
        ok = ok & (qm != 0)[:, None]
    if HAS_KVMASK:
        safe = tl.minimum(tl.maximum(blk, 0), Nk - 1)
        km = tl.load(KM + b * skm_b + h * skm_h + safe * KBS + cols, mask=cols < KBS, other=0)
        ok = ok & ((km != 0) | (blk_v == Nk))[None, :]
    if CAUSAL:
        # causal attention always has the own bucket, as the last route
        routed = (cols * 0 + j) < R - 1
        ok = ok & ((cols[None, :] <= rows[:, None]) | routed[None, :])
        # rotated heads: the last bucket's rows 1.. are the wrapped-around first tokens of the sequence; they see
        # only their own earlier tokens, not the routed blocks nor key 0 (the last token)
        wrapped = ((rows * 0 + h) >= H - n_rot) & ((rows * 0 + u) == Nq - 1) & (rows >= 1)
        hidden = wrapped[:, None] & (routed | (cols == 0))[None, :]
        ok = ok & (hidden == 0)
    return ok


@triton.jit
def _load_block(X, NULL, blk, b, h, sxb, sxh, sxt, sxd, Nk, KBS, D, cols, dims, HAS_NULL: tl.constexpr):
    """Key or value block `blk` as [BLOCK_N, BLOCK_D] (the null vector repeated for blk == Nk, zeros for -1)."""
    safe = tl.minimum(tl.maximum(blk, 0), Nk - 1)
    blk_v = cols * 0 + blk
    ptrs = X + b * sxb + h * sxh + (safe * KBS + cols)[:, None] * sxt + dims[None, :] * sxd
    real = (cols < KBS) & (blk_v >= 0) & (blk_v < Nk)
    x = tl.load(ptrs, mask=real[:, None] & (dims[None, :] < D), other=0.0)
    if HAS_NULL:
        null = tl.load(NULL + h * D + dims, mask=dims < D, other=0.0).to(x.dtype)
        x = tl.where(((blk_v == Nk) & (cols < KBS))[:, None], null[None, :] + tl.zeros_like(x), x)
    return x


@triton.jit
def _bucket_rows(X, b, h, u, sxb, sxh, sxt, sxd, rows, dims, BS, D):
    """Rows of query bucket u of a [B, H, T, D] tensor as [BLOCK_M, BLOCK_D] (zeros past the bucket and D)."""
    return tl.load(X + b * sxb + h * sxh + (u * BS + rows)[:, None] * sxt + dims[None, :] * sxd,
                   mask=(rows[:, None] < BS) & (dims[None, :] < D), other=0.0)


@triton.jit
def _query_tile(BLOCK_M: tl.constexpr, ROW_TILES: tl.constexpr):
    """(query bucket, the rows of the bucket this program owns) from program id 0."""
    pid = tl.program_id(0)
    return pid // ROW_TILES, (pid % ROW_TILES) * BLOCK_M + tl.arange(0, BLOCK_M)


@triton.jit
def _fwd(Q, K, V, O, LSE, IDX, W, NK, NV, QM, KM,
         sqb, sqh, sqt, sqd, skb, skh, skt, skd, svb, svh, svt, svd, sob, soh, sot, sod,
         sqm_b, sqm_h, skm_b, skm_h, H, Nq, Nk, R, n_rot, scale, p_drop, seed,
         BS: tl.constexpr, KBS: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
         BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, HAS_NULL: tl.constexpr,
         HAS_QMASK: tl.constexpr, HAS_KVMASK: tl.constexpr, PRECISION: tl.constexpr, DROPOUT: tl.constexpr,
         ROW_TILES: tl.constexpr):
    u, rows = _query_tile(BLOCK_M, ROW_TILES)
    bh = tl.program_id(1)
    b, h = bh // H, bh % H
    cols = tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    q = _bucket_rows(Q, b, h, u, sqb, sqh, sqt, sqd, rows, dims, BS, D)
    run_max = tl.full([BLOCK_M], float('-inf'), tl.float32)
    run_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    route = (bh * Nq + u) * R
    for j in range(R):
        blk = tl.load(IDX + route + j)
        w = tl.load(W + route + j)
        k = _load_block(K, NK, blk, b, h, skb, skh, skt, skd, Nk, KBS, D, cols, dims, HAS_NULL)
        v = _load_block(V, NV, blk, b, h, svb, svh, svt, svd, Nk, KBS, D, cols, dims, HAS_NULL)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * (scale * w)
        ok = _allowed(rows, cols, u, j, blk, h, b, QM, KM, sqm_b, sqm_h, skm_b, skm_h, H, Nq, Nk, R, n_rot, BS, KBS,
                      CAUSAL, HAS_QMASK, HAS_KVMASK)
        s = tl.where(ok, s, float('-inf'))
        new_max = tl.maximum(run_max, tl.max(s, axis=1))
        shift = tl.where(new_max == float('-inf'), 0.0, new_max)  # rows with nothing visible yet
        p = tl.exp(s - shift[:, None])
        alpha = tl.exp(run_max - shift)
        run_sum = run_sum * alpha + tl.sum(p, axis=1)
        p = _kept(p, seed, route + j, rows, cols, p_drop, BLOCK_N, DROPOUT)
        acc = acc * alpha[:, None] + tl.dot((p * w).to(v.dtype), v, input_precision=PRECISION)
        run_max = new_max
    dead = run_sum == 0.0  # no visible key: attend to nothing
    out = tl.where(dead[:, None], 0.0, acc / tl.where(dead, 1.0, run_sum)[:, None])
    tl.store(O + b * sob + h * soh + (u * BS + rows)[:, None] * sot + dims[None, :] * sod, out.to(O.dtype.element_ty),
             mask=(rows[:, None] < BS) & (dims[None, :] < D))
    # +inf for dead rows: backward's exp(s - lse) is then 0 for every key
    lse = tl.where(dead, float('inf'), run_max + tl.log(tl.where(dead, 1.0, run_sum)))
    tl.store(LSE + bh * Nq * BS + u * BS + rows, lse, mask=rows < BS)


@triton.jit
def _kept(p, seed, tile, rows, cols, p_drop, BLOCK_N: tl.constexpr, DROPOUT: tl.constexpr):
    """Attention dropout of the probabilities of one (query bucket, route) tile, scaled by 1 / (1 - p_drop). The
    mask comes from Philox keyed by (seed + tile, position in the tile), so every kernel regenerates the same one;
    `seed` points to a one-element int32 tensor."""
    if DROPOUT:
        keep = tl.rand(tl.load(seed) + tile, rows[:, None] * BLOCK_N + cols[None, :]) >= p_drop
        return tl.where(keep, p / (1 - p_drop), 0.0)
    return p


@triton.jit
def _scores_and_probs(q, k, w, lse, ok, scale, PRECISION: tl.constexpr):
    s_raw = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
    p = tl.where(ok, tl.exp(s_raw * w - lse[:, None]), 0.0)
    return s_raw, p


@triton.jit
def _bwd_dq(Q, K, V, O, DO, DQ, DW, DNULL, LSE, DELTA, IDX, W, NK, NV, QM, KM,
            sqb, sqh, sqt, sqd, skb, skh, skt, skd, svb, svh, svt, svd, sob, soh, sot, sod, sdob, sdoh, sdot, sdod,
            sdqb, sdqh, sdqt, sdqd, sqm_b, sqm_h, skm_b, skm_h, H, Nq, Nk, R, n_rot, scale, p_drop, seed,
            BS: tl.constexpr, KBS: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
            BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, HAS_NULL: tl.constexpr,
            HAS_QMASK: tl.constexpr, HAS_KVMASK: tl.constexpr, PRECISION: tl.constexpr, DROPOUT: tl.constexpr,
            ROW_TILES: tl.constexpr):
    u, rows = _query_tile(BLOCK_M, ROW_TILES)
    bh = tl.program_id(1)
    b, h = bh // H, bh % H
    cols = tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    q = _bucket_rows(Q, b, h, u, sqb, sqh, sqt, sqd, rows, dims, BS, D)
    do = _bucket_rows(DO, b, h, u, sdob, sdoh, sdot, sdod, rows, dims, BS, D)
    lse = tl.load(LSE + bh * Nq * BS + u * BS + rows, mask=rows < BS, other=float('inf'))
    # delta = rowsum(dO * O) in fp32, written for the dK/dV kernel, which runs after this one
    o = _bucket_rows(O, b, h, u, sob, soh, sot, sod, rows, dims, BS, D)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), axis=1)
    tl.store(DELTA + bh * Nq * BS + u * BS + rows, delta, mask=rows < BS)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # the null block repeats one key and one value, so their gradients are the column sums of its dK and dV,
    # (w scale ds)^T q and (w dropout(p))^T dO: per row, w times the row sums of ds and dropout(p), which add up
    # over the null routes, then one product with q and dO
    null_k_rows = tl.zeros([BLOCK_M], tl.float32)
    null_v_rows = tl.zeros([BLOCK_M], tl.float32)
    route = (bh * Nq + u) * R
    for j in range(R):
        blk = tl.load(IDX + route + j)
        w = tl.load(W + route + j)
        k = _load_block(K, NK, blk, b, h, skb, skh, skt, skd, Nk, KBS, D, cols, dims, HAS_NULL)
        v = _load_block(V, NV, blk, b, h, svb, svh, svt, svd, Nk, KBS, D, cols, dims, HAS_NULL)
        ok = _allowed(rows, cols, u, j, blk, h, b, QM, KM, sqm_b, sqm_h, skm_b, skm_h, H, Nq, Nk, R, n_rot, BS, KBS,
                      CAUSAL, HAS_QMASK, HAS_KVMASK)
        s_raw, p = _scores_and_probs(q, k, w, lse, ok, scale, PRECISION)
        dp_raw = tl.dot(do, tl.trans(v), input_precision=PRECISION)  # dO . v before the route weight
        p_kept = _kept(p, seed, route + j, rows, cols, p_drop, BLOCK_N, DROPOUT)
        # the gradient of the probabilities before dropout: dP = dropout(w dO . v)
        ds = p * (_kept(dp_raw * w, seed, route + j, rows, cols, p_drop, BLOCK_N, DROPOUT) - delta[:, None])
        dq += tl.dot((ds * w).to(k.dtype), k, input_precision=PRECISION)
        if HAS_NULL:
            null_w = tl.where(blk == Nk, w, 0.0)
            null_k_rows += tl.sum(ds, axis=1) * null_w
            null_v_rows += tl.sum(p_kept, axis=1) * null_w
        # s = w * s_raw and the values are w * v: d/dw = <ds, s_raw> + <dropout(p), dO v>; one partial sum per
        # row tile, added up after the kernel (no atomics)
        tl.store(DW + (route + j) * ROW_TILES + tl.program_id(0) % ROW_TILES,
                 tl.sum(tl.sum(ds * s_raw + p_kept * dp_raw, axis=1), axis=0))
    tl.store(DQ + b * sdqb + h * sdqh + (u * BS + rows)[:, None] * sdqt + dims[None, :] * sdqd,
             (dq * scale).to(DQ.dtype.element_ty), mask=(rows[:, None] < BS) & (dims[None, :] < D))
    if HAS_NULL:
        # DNULL [2, B x H, programs along axis 0, D]: this program's shares, summed after the kernel
        share = (bh * tl.num_programs(0) + tl.program_id(0)) * D + dims
        tl.store(DNULL + share, tl.sum(null_k_rows[:, None] * q.to(tl.float32), axis=0) * scale, mask=dims < D)
        tl.store(DNULL + tl.num_programs(1) * tl.num_programs(0) * D + share,
                 tl.sum(null_v_rows[:, None] * do.to(tl.float32), axis=0), mask=dims < D)


@triton.jit
def _bwd_dkv(Q, K, V, DO, DK, DV, PARTS, LSE, DELTA, IDX, W, NK, NV, QM, KM, READERS, START, COUNT, PLAN, OWNER,
             sqb, sqh, sqt, sqd, skb, skh, skt, skd, svb, svh, svt, svd, sdob, sdoh, sdot, sdod,
             sdkb, sdkh, sdkt, sdkd, sdvb, sdvh, sdvt, sdvd, sqm_b, sqm_h, skm_b, skm_h, H, Nq, Nk, R, n_rot, scale,
             p_drop, seed, per_program, n_slots, BS: tl.constexpr, KBS: tl.constexpr, D: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
             HAS_NULL: tl.constexpr, HAS_QMASK: tl.constexpr, HAS_KVMASK: tl.constexpr, PRECISION: tl.constexpr,
             DROPOUT: tl.constexpr, ROW_TILES: tl.constexpr):
    """Program `chunk_id` takes that chunk of the plan (`_chunk_plan`); the grid has room for the most chunks there
    can be, and programs past the plan's count do nothing."""
    chunk_id = tl.program_id(0)
    bh = tl.program_id(1)
    b, h = bh // H, bh % H
    plan = PLAN + bh * 2 * (Nk + 1)
    total = tl.load(plan + Nk)
    live = chunk_id < total
    n = tl.load(OWNER + bh * tl.num_programs(0) + chunk_id, mask=live, other=0)  # the key block
    chunk = chunk_id - tl.load(plan + n)
    chunks = tl.load(plan + n + 1) - tl.load(plan + n)
    cols = tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    k = _load_block(K, NK, n, b, h, skb, skh, skt, skd, Nk, KBS, D, cols, dims, HAS_NULL)
    v = _load_block(V, NV, n, b, h, svb, svh, svt, svd, Nk, KBS, D, cols, dims, HAS_NULL)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    start = tl.load(START + bh * (Nk + 1) + n)
    first = chunk * per_program
    # the last chunk takes the rest; programs past the plan read nothing
    last = tl.where(chunk == chunks - 1, tl.load(COUNT + bh * (Nk + 1) + n), first + per_program)
    for r in range(first, tl.where(live, last, first)):
        e = tl.load(READERS + bh * Nq * R + start + r)
        u, j = e // R, e % R
        w = tl.load(W + bh * Nq * R + e)
        tile = bh * Nq * R + e
        for r0 in range(0, ROW_TILES * BLOCK_M, BLOCK_M):
            rows = r0 + tl.arange(0, BLOCK_M)
            q = _bucket_rows(Q, b, h, u, sqb, sqh, sqt, sqd, rows, dims, BS, D)
            do = _bucket_rows(DO, b, h, u, sdob, sdoh, sdot, sdod, rows, dims, BS, D)
            lse = tl.load(LSE + bh * Nq * BS + u * BS + rows, mask=rows < BS, other=float('inf'))
            delta = tl.load(DELTA + bh * Nq * BS + u * BS + rows, mask=rows < BS, other=0.0)
            ok = _allowed(rows, cols, u, j, n, h, b, QM, KM, sqm_b, sqm_h, skm_b, skm_h, H, Nq, Nk, R, n_rot, BS,
                          KBS, CAUSAL, HAS_QMASK, HAS_KVMASK)
            s_raw, p = _scores_and_probs(q, k, w, lse, ok, scale, PRECISION)
            p_kept = _kept(p, seed, tile, rows, cols, p_drop, BLOCK_N, DROPOUT)
            dv += tl.dot(tl.trans((p_kept * w).to(do.dtype)), do, input_precision=PRECISION)
            dp = _kept(tl.dot(do, tl.trans(v), input_precision=PRECISION) * w, seed, tile, rows, cols, p_drop,
                       BLOCK_N, DROPOUT)
            ds = p * (dp - delta[:, None])
            dk += tl.dot(tl.trans((ds * (w * scale)).to(q.dtype)), q, input_precision=PRECISION)
    blk_ok = (cols[:, None] < KBS) & (dims[None, :] < D)
    live_v = (cols * 0 + chunk_id) < total
    whole = (live_v & (cols * 0 + chunks == 1))[:, None]  # the block's only chunk writes the gradients
    tl.store(DK + b * sdkb + h * sdkh + (n * KBS + cols)[:, None] * sdkt + dims[None, :] * sdkd,
             dk.to(DK.dtype.element_ty), mask=blk_ok & whole)
    tl.store(DV + b * sdvb + h * sdvh + (n * KBS + cols)[:, None] * sdvt + dims[None, :] * sdvd,
             dv.to(DV.dtype.element_ty), mask=blk_ok & whole)
    part = _part_tile(PARTS, bh, tl.load(plan + Nk + 1 + n) + chunk, n_slots, cols, dims, BLOCK_N, BLOCK_D)
    split = (live_v & (cols * 0 + chunks > 1))[:, None]
    tl.store(part, dk, mask=split)
    tl.store(part + BLOCK_N * BLOCK_D, dv, mask=split)


@triton.jit
def _part_tile(PARTS, bh, slot, n_slots, cols, dims, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Pointers to the dK partial sum in slot `slot` of PARTS [B x H, n_slots, 2 (dK, dV), BLOCK_N, BLOCK_D]
    (offsets in int64: the buffer passes 2^31 elements at about 85 heads of a million tokens, dim_head 64)."""
    return PARTS + ((bh.to(tl.int64) * n_slots + slot) * 2 * BLOCK_N + cols)[:, None] * BLOCK_D + dims[None, :]


@triton.jit
def _chunk_plan(COUNT, PLAN, OWNER, Nk, per_program, n_programs, BLOCK: tl.constexpr):
    """Splits the readers of each key block of (batch x head) program_id(0) into max(1, count // per_program)
    chunks, one dK/dV program each, and gives every chunk of a block with more than one a slot for its partial
    sums: PLAN[bh, 0, n] is block n's first chunk (PLAN[bh, 0, Nk]: the number of chunks), PLAN[bh, 1, n] its
    first slot, OWNER[bh, c] (of n_programs) the block of chunk c."""
    bh = tl.program_id(0)
    chunks_before = 0
    slots_before = 0
    for n0 in range(0, Nk, BLOCK):
        n = n0 + tl.arange(0, BLOCK)
        count = tl.load(COUNT + bh * (Nk + 1) + n, mask=n < Nk, other=0)
        chunks = tl.where(n < Nk, tl.maximum(count // per_program, 1), 0)
        slots = tl.where(chunks > 1, chunks, 0)
        first = chunks_before + tl.cumsum(chunks, axis=0) - chunks
        tl.store(PLAN + bh * 2 * (Nk + 1) + n, first, mask=n < Nk)
        for c in range(tl.max(chunks, axis=0)):
            tl.store(OWNER + bh * n_programs + first + c, n, mask=c < chunks)
        tl.store(PLAN + (bh * 2 + 1) * (Nk + 1) + n, slots_before + tl.cumsum(slots, axis=0) - slots, mask=n < Nk)
        chunks_before += tl.sum(chunks, axis=0)
        slots_before += tl.sum(slots, axis=0)
    tl.store(PLAN + bh * 2 * (Nk + 1) + Nk, chunks_before)


@triton.jit
def _sum_parts(PARTS, PLAN, DK, DV, sdkb, sdkh, sdkt, sdkd, sdvb, sdvh, sdvt, sdvd, H, Nk, n_slots,
               KBS: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """dK and dV of key block program_id(0) from its chunks' partial sums, added in chunk order, where the dK/dV
    kernel split it (the others it wrote itself)."""
    n, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    plan = PLAN + bh * 2 * (Nk + 1)
    chunks = tl.load(plan + n + 1) - tl.load(plan + n)
    slot = tl.load(plan + Nk + 1 + n)
    cols = tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for c in range(tl.where(chunks > 1, chunks, 0)):
        part = _part_tile(PARTS, bh, slot + c, n_slots, cols, dims, BLOCK_N, BLOCK_D)
        dk += tl.load(part)
        dv += tl.load(part + BLOCK_N * BLOCK_D)
    ok = (cols[:, None] < KBS) & (dims[None, :] < D) & (cols * 0 + chunks > 1)[:, None]
    tl.store(DK + b * sdkb + h * sdkh + (n * KBS + cols)[:, None] * sdkt + dims[None, :] * sdkd,
             dk.to(DK.dtype.element_ty), mask=ok)
    tl.store(DV + b * sdvb + h * sdvh + (n * KBS + cols)[:, None] * sdvt + dims[None, :] * sdvd,
             dv.to(DV.dtype.element_ty), mask=ok)


@triton.jit
def _reverse_index(IDX, READERS, START, COUNT, E, Nk, GROUP: tl.constexpr, BLOCK_E: tl.constexpr):
    """For key blocks n < Nk of (batch x head) bh: the flat route numbers u * R + j with IDX[bh, u, j] == n, in
    increasing order, into READERS[bh, START[bh, n]:][:COUNT[bh, n]], where START counts the routes to lower
    blocks: the reverse index `routes.reverse_index` sorts out. A program lists the readers of GROUP blocks, so
    the routes are read Nk / GROUP times rather than Nk times (at a million tokens they are 48k per head). The
    null block's entry (n = Nk) is left unwritten: the dQ kernel takes its gradient."""
    bh = tl.program_id(1)
    blocks = tl.program_id(0) * GROUP + tl.arange(0, GROUP)
    before = 0  # routes to blocks below the group's
    count = tl.zeros([GROUP], tl.int32)
    for e0 in range(0, E, BLOCK_E):
        e = e0 + tl.arange(0, BLOCK_E)
        blk = tl.load(IDX + bh * E + e, mask=e < E, other=-1)
        before += tl.sum(((blk >= 0) & (blk < tl.program_id(0) * GROUP)).to(tl.int32), axis=0)
        count += tl.sum((blk[None, :] == blocks[:, None]).to(tl.int32), axis=1)
    start = before + tl.cumsum(count, axis=0) - count
    listed = tl.zeros([GROUP], tl.int32)
    for e0 in range(0, E, BLOCK_E):
        e = e0 + tl.arange(0, BLOCK_E)
        hit = (tl.load(IDX + bh * E + e, mask=e < E, other=-1)[None, :] == blocks[:, None]).to(tl.int32)
        at = (start + listed)[:, None] + tl.cumsum(hit, axis=1) - 1
        tl.store(READERS + bh * E + at, e[None, :] + tl.zeros_like(at), mask=hit != 0)
        listed += tl.sum(hit, axis=1)
    tl.store(START + bh * (Nk + 1) + blocks, start, mask=blocks < Nk)
    tl.store(COUNT + bh * (Nk + 1) + blocks, count, mask=blocks < Nk)


def write_reverse_index(idx, readers, start, count, Nk):
    """Writes the reverse index of routes idx [B, H, Nq, R] into readers [B x H, Nq * R], start and count
    [B x H, Nk + 1] (see `_reverse_index`)."""
    BH, E = readers.shape
    group = min(16, next_power_of_2(Nk))
    _reverse_index[(cdiv(Nk, group), BH)](idx, readers, start, count, E, Nk, GROUP=group,
                                          BLOCK_E=min(256, next_power_of_2(E)))


# readers of a key block per dK/dV program (a split block's chunks take up to twice as many). Split blocks cost
# fp32 partial sums, at most (all routes / READERS_PER_PROGRAM) slots of 2 x bucket x dim_head: at 16, with 3
# routes per query bucket, a buffer of 3/4 of q's size, for a longest program of at most 31 readers.
READERS_PER_PROGRAM = 16


def _row_tile(bs, d, elem):
    """Query rows per program: the whole bucket while its query tile is at most 16 KB; fewer rows otherwise (a
    bf16 bucket of 128 x 128 needs 256 KB of shared memory in the dQ kernel, over the 227 KB of an H100)."""
    return min(dot_tile(bs), max(16, 16384 // (dot_tile(d) * elem)))


def _pipeline_stages(block_n, block_d, elem):
    """Software-pipeline depth of the route loop: each stage buffers one key and one value block in shared
    memory, and an fp32 128 x 128 pair (128 KB) in three stages would exceed the 227 KB of an H100 (compiled for
    sm_90: 393 KB forward, 458 KB dQ)."""
    return max(1, min(3, (192 * 1024) // (2 * block_n * block_d * elem)))


class Launch:
    """Sizes, flags and strides shared by the three kernels of one call."""

    def __init__(self, q, k, idx, null_k, q_mask, kv_mask, bs, kbs, causal, n_rotated_heads, scale, dropout_p, seed):
        self.B, self.H, Tq, self.D = q.shape
        self.Nq, self.Nk, self.R = Tq // bs, k.shape[2] // kbs, idx.shape[-1]
        self.q_mask, self.kv_mask = q_mask, kv_mask
        qm_strides = (q_mask.stride(0), q_mask.stride(1)) if q_mask is not None else (0, 0)
        km_strides = (kv_mask.stride(0), kv_mask.stride(1)) if kv_mask is not None else (0, 0)
        self.mask_strides = (*qm_strides, *km_strides)
        self.sizes = (self.H, self.Nq, self.Nk, self.R, n_rotated_heads if causal else 0, scale, dropout_p, seed)
        block_m = _row_tile(bs, self.D, q.element_size())
        self.row_tiles = cdiv(bs, block_m)
        self.meta = dict(BS=bs, KBS=kbs, D=self.D, BLOCK_M=block_m, BLOCK_N=dot_tile(kbs),
                         BLOCK_D=dot_tile(self.D),
                         CAUSAL=causal, HAS_NULL=null_k is not None, HAS_QMASK=q_mask is not None,
                         HAS_KVMASK=kv_mask is not None,
                         PRECISION='ieee' if q.dtype == torch.float32 else 'tf32', DROPOUT=dropout_p > 0,
                         num_warps=4 if dot_tile(bs) * dot_tile(self.D) <= 64 * 64 else 8,
                         num_stages=_pipeline_stages(dot_tile(kbs), dot_tile(self.D), q.element_size()),
                         ROW_TILES=self.row_tiles)

    def masks(self, dummy):
        return (self.q_mask if self.q_mask is not None else dummy, self.kv_mask if self.kv_mask is not None else dummy)


def _strides(*tensors):
    return [s for t in tensors for s in t.stride()]


def forward(q, k, v, idx, w, null_k, null_v, q_mask, kv_mask, bs, kbs, causal, n_rotated_heads, scale, dropout_p,
            seed):
    """-> (out [B, H, Tq, D] stored as [B, Tq, H, D], lse [B, H, Tq] fp32)."""
    L = Launch(q, k, idx, null_k, q_mask, kv_mask, bs, kbs, causal, n_rotated_heads, scale, dropout_p, seed)
    out, lse = new_attention_output(q)
    null_k = null_k if null_k is not None else q
    null_v = null_v if null_v is not None else q
    _fwd[(L.Nq * L.row_tiles, L.B * L.H)](q, k, v, out, lse, idx, w, null_k, null_v, *L.masks(idx),
                                          *_strides(q, k, v, out), *L.mask_strides, *L.sizes, **L.meta)
    return out, lse


def backward(dout, q, k, v, out, lse, idx, w, null_k, null_v, q_mask, kv_mask, bs, kbs, causal, n_rotated_heads,
             scale, dropout_p, seed, grads=None):
    """-> (dq, dk, dv, dw [B, H, Nq, R] fp32, dnull [2, B, H, D] fp32 (the null key's, the null value's) or None);
    `grads`: the dq, dk, dv to write (any strides), else new ones."""
    L = Launch(q, k, idx, null_k, q_mask, kv_mask, bs, kbs, causal, n_rotated_heads, scale, dropout_p, seed)
    buf = BackwardBuffers(dout, q, k, v, out, idx, null_k, kbs, by_kernels=True, grads=grads)
    E = L.Nq * L.R
    write_reverse_index(idx, buf.readers, buf.start, buf.count, L.Nk)
    has_null = null_k is not None
    nk, nv = (null_k, null_v) if has_null else (q, q)
    masks = L.masks(idx)
    # one partial sum of the route weights' gradient per row tile (a whole bucket in one tile: the gradient itself)
    dw_tiles = (buf.dw if L.row_tiles == 1 else
                new_output(torch.empty(*idx.shape, L.row_tiles, device=q.device, dtype=torch.float32)))
    dq_programs = L.Nq * L.row_tiles
    null_shares = (new_output(torch.empty(2, L.B, L.H, dq_programs, L.D, device=q.device, dtype=torch.float32))
                   if has_null else buf.dq)
    _bwd_dq[(dq_programs, L.B * L.H)](
        q, k, v, out, dout, buf.dq, dw_tiles, null_shares, lse, buf.delta, idx, w, nk, nv, *masks,
        *_strides(q, k, v, out, dout, buf.dq),
        *L.mask_strides, *L.sizes, **L.meta)
    per_program = READERS_PER_PROGRAM
    # a block of c readers has max(1, c // per_program) chunks: at most Nk + E // per_program in all
    n_programs = L.Nk + E // per_program
    plan = new_output(torch.empty(L.B * L.H, 2, L.Nk + 1, device=q.device, dtype=torch.int32))
    owner = new_output(torch.empty(L.B * L.H, n_programs, device=q.device, dtype=torch.int32))
    _chunk_plan[(L.B * L.H,)](buf.count, plan, owner, L.Nk, per_program, n_programs,
                              BLOCK=min(1024, next_power_of_2(L.Nk)))
    n_slots = max(1, E // per_program)
    meta = L.meta
    parts = new_output(torch.empty(L.B * L.H, n_slots, 2, meta['BLOCK_N'], meta['BLOCK_D'], device=q.device,
                                   dtype=torch.float32))
    _bwd_dkv[(n_programs, L.B * L.H)](
        q, k, v, dout, buf.dk, buf.dv, parts, lse, buf.delta, idx, w, nk, nv, *masks, buf.readers, buf.start,
        buf.count, plan, owner, *_strides(q, k, v, dout, buf.dk, buf.dv), *L.mask_strides, *L.sizes, per_program,
        n_slots, **meta)
    _sum_parts[(L.Nk, L.B * L.H)](parts, plan, buf.dk, buf.dv, *_strides(buf.dk, buf.dv), L.H, L.Nk, n_slots,
                                  KBS=kbs, D=L.D, BLOCK_N=meta['BLOCK_N'], BLOCK_D=meta['BLOCK_D'])
    if L.row_tiles > 1:
        torch.sum(dw_tiles, -1, out=buf.dw)
    if has_null:
        torch.sum(null_shares, 3, out=buf.dnull)
    return buf.grads()

