"""Top-k bucket routing in Triton: the sort net's scores to the routes block attention reads, in one launch, and
their weights' gradient back to the scores in another.

One program per row of scores (a query bucket, or the single row of SortCut) of one (batch, head): the row sits
in registers, and each of the k rounds is a softmax over it (fp32, whatever the scores' dtype), its most
probable bucket (the route; its probability, 1 / the softmax's sum, is the weight) and that bucket's exclusion.
Forward writes the routes as block attention takes them: int32 indices and fp32 weights [B, H, Nq, R], causal
null columns as the null bucket Nk, SortCut's routes into every query bucket's row, the own bucket last at
weight 1. Backward replays the rounds from the scores: d logits = sum_j dw_j w_j (onehot(i_j) - p_j).
"""
import torch
import triton
import triton.language as tl

from ..outputs import new_output
from ..tiles import dot_tile

# the widest row of scores one program holds (key buckets plus causal null columns: 1M tokens at bucket 64)
MAX_COLUMNS = 16384


@triton.jit
def _logits(S, g, row, n_rows, n_cols, n_null, inv_temperature, CAUSAL: tl.constexpr, BLOCK: tl.constexpr):
    """Row `row` of the scores of (batch x head) g over BLOCK columns, / temperature; causal: -inf for the key
    buckets at or after the query bucket (the null columns come first)."""
    cols = tl.arange(0, BLOCK)
    s = tl.load(S + (g * n_rows + row) * n_cols + cols, mask=cols < n_cols, other=float('-inf')).to(tl.float32)
    logits = s * inv_temperature
    if CAUSAL:
        logits = tl.where((cols >= n_null) & (cols - n_null >= row), float('-inf'), logits)
    return cols, logits


@triton.jit
def _readers(row, n_rows, Nq):
    """The query buckets first..last - 1 that take row `row`'s routes: all of them for SortCut's single row."""
    first, last = row, row + 1
    if n_rows == 1:
        first, last = 0, Nq
    return first, last


@triton.jit
def _round(cols, logits):
    """One routing round: (the pick, its weight, the probabilities, the logits without the pick)."""
    e = tl.exp(logits - tl.max(logits, axis=0))
    total = tl.sum(e, axis=0)
    pick = tl.argmax(logits, axis=0, tie_break_left=True)
    return pick, 1.0 / total, e / total, tl.where(cols == pick, float('-inf'), logits)


@triton.jit
def _routes_fwd(S, IDX, W, n_rows, n_cols, Nq, Nk, R, K, n_null, inv_temperature, CAUSAL: tl.constexpr,
                OWN_BUCKET: tl.constexpr, BLOCK: tl.constexpr):
    row, g = tl.program_id(0), tl.program_id(1)
    cols, logits = _logits(S, g, row, n_rows, n_cols, n_null, inv_temperature, CAUSAL, BLOCK)
    first, last = _readers(row, n_rows, Nq)
    for j in range(K):
        pick, w, _, logits = _round(cols, logits)
        blk = pick - n_null
        if CAUSAL:
            blk = tl.where(pick < n_null, Nk, blk)
        for u in range(first, last):
            tl.store(IDX + (g * Nq + u) * R + j, blk.to(tl.int32))
            tl.store(W + (g * Nq + u) * R + j, w)
    if OWN_BUCKET:
        for u in range(first, last):
            tl.store(IDX + (g * Nq + u) * R + R - 1, u)
            tl.store(W + (g * Nq + u) * R + R - 1, 1.0)


@triton.jit
def _routes_bwd(S, DW, DS, n_rows, n_cols, Nq, R, K, n_null, inv_temperature, out_scale, CAUSAL: tl.constexpr,
                BLOCK: tl.constexpr):
    row, g = tl.program_id(0), tl.program_id(1)
    cols, logits = _logits(S, g, row, n_rows, n_cols, n_null, inv_temperature, CAUSAL, BLOCK)
    first, last = _readers(row, n_rows, Nq)
    d = tl.zeros([BLOCK], tl.float32)
    for j in range(K):
        pick, w, p, logits = _round(cols, logits)
        dw = 0.0
        for u in range(first, last):
            dw += tl.load(DW + (g * Nq + u) * R + j)
        d += (dw * w) * ((cols == pick).to(tl.float32) - p)
    tl.store(DS + (g * n_rows + row) * n_cols + cols, (d * (inv_temperature * out_scale)).to(DS.dtype.element_ty),
             mask=cols < n_cols)


def _launch_shape(scores):
    G = scores.shape[0] * scores.shape[1]
    n_rows, n_cols = scores.shape[-2:]
    if n_cols > MAX_COLUMNS:
        raise ValueError(f'the triton routing kernel takes at most {MAX_COLUMNS} key buckets (and null columns), got '
                         f'{n_cols}; use larger buckets or backend=\'reference\'')
    return (n_rows, G), dict(BLOCK=dot_tile(n_cols), num_warps=4 if n_cols <= 4096 else 8)


def forward(scores, k, temperature, causal, n_null, n_query_buckets, own_bucket):
    """scores [B, H, Nq or 1, n_null + Nk] -> (indices int32, weights fp32), [B, H, Nq, k (+ 1)]."""
    B, H, n_rows, n_cols = scores.shape
    R = k + own_bucket
    idx = new_output(torch.empty(B, H, n_query_buckets, R, device=scores.device, dtype=torch.int32))
    w = new_output(torch.empty(B, H, n_query_buckets, R, device=scores.device, dtype=torch.float32))
    grid, meta = _launch_shape(scores)
    _routes_fwd[grid](scores.contiguous(), idx, w, n_rows, n_cols, n_query_buckets, n_cols - n_null, R, k, n_null,
                      1.0 / temperature, CAUSAL=causal, OWN_BUCKET=own_bucket, **meta)
    return idx, w


def backward(scores, d_weights, k, temperature, causal, n_null, scale):
    """`scale` times the gradient of the scores (like them, computed in fp32) from that of `forward`'s weights
    (the own bucket's column ignored)."""
    B, H, n_rows, n_cols = scores.shape
    ds = new_output(torch.empty_like(scores, memory_format=torch.contiguous_format))
    grid, meta = _launch_shape(scores)
    _routes_bwd[grid](scores.contiguous(), d_weights.float().contiguous(), ds, n_rows, n_cols, d_weights.shape[2],
                      d_weights.shape[3], k, n_null, 1.0 / temperature, scale, CAUSAL=causal, **meta)
    return ds
