"""Sinkhorn normalization in Triton: all iterations of one matrix in one program, forward and backward.

Every iterate is x - a_t[i] - b_t[j] for the row offsets a_t = rowLSE(x - b_{t-1}) and column offsets
b_t = colLSE(x - a_t), so a program iterates only these vectors (kept per iteration, n + m floats each) and
walks the matrix in tiles: any size works, and nothing of size n x m is stored but the output, in x's dtype.
Backward rebuilds every iterate, P among them, from x and the vectors: it computes the offsets' gradients in a
reverse sweep, then dx in one pass. Each kernel writes every element of its buffers, so none is zeroed first.

Gumbel-Sinkhorn runs in the same two kernels: forward first writes the log-scores x = (log(s + eps) + g) / tau
of the scores s, in fp32, with the Gumbel noise g = -log(-log(u + eps) + eps) of uniform samples u, and
iterates on them; backward ends with the chain rule ds = dx / (tau (s + eps)).
"""
import torch
import triton
import triton.language as tl

from ..outputs import new_output
from ..tiles import next_power_of_2


@triton.jit
def _lse_along(X, s_out, s_in, n_out, n_in, OFF, OUT, BO: tl.constexpr, BI: tl.constexpr):
    """OUT[o] = logsumexp_i (X[o * s_out + i * s_in] - OFF[i]): row offsets with (s_out, s_in) = (m, 1), column
    offsets with (1, m), the same reduction on the transposed matrix."""
    for o0 in range(0, n_out, BO):
        outs = o0 + tl.arange(0, BO)
        run_max = tl.full([BO], float('-inf'), tl.float32)
        run_sum = tl.zeros([BO], tl.float32)
        for i0 in range(0, n_in, BI):
            ins = i0 + tl.arange(0, BI)
            ok = (outs[:, None] < n_out) & (ins[None, :] < n_in)
            z = tl.load(X + outs[:, None] * s_out + ins[None, :] * s_in, mask=ok, other=0.0).to(tl.float32)
            z -= tl.load(OFF + ins, mask=ins < n_in, other=0.0)[None, :]
            z = tl.where(ok, z, float('-inf'))
            new_max = tl.maximum(run_max, tl.max(z, axis=1))
            run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(z - new_max[:, None]), axis=1)
            run_max = new_max
        tl.store(OUT + outs, run_max + tl.log(run_sum), mask=outs < n_out)


@triton.jit
def _tile(i0, j0, n, m, BR: tl.constexpr, BC: tl.constexpr):
    """Rows, columns, mask and offsets of the BR x BC tile at (i0, j0) of a row-major n x m matrix."""
    rows = i0 + tl.arange(0, BR)
    cols = j0 + tl.arange(0, BC)
    return rows, cols, (rows[:, None] < n) & (cols[None, :] < m), rows[:, None] * m + cols[None, :]


@triton.jit
def _log_scores(S, U, X, n, m, inv_temp, eps, NOISE: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr):
    """X = (log(S + eps) + g) * inv_temp in fp32, with g the Gumbel noise of the uniform samples U when NOISE."""
    for i0 in range(0, n, BR):
        for j0 in range(0, m, BC):
            rows, cols, ok, offs = _tile(i0, j0, n, m, BR, BC)
            z = tl.log(tl.load(S + offs, mask=ok, other=1.0).to(tl.float32) + eps)
            if NOISE:
                u = tl.load(U + offs, mask=ok, other=0.5).to(tl.float32)
                z -= tl.log(-tl.log(u + eps) + eps)
            tl.store(X + offs, z * inv_temp, mask=ok)


@triton.jit
def _sinkhorn_fwd(X, P, A, B, S, U, n, m, n_iters, inv_temp, eps, SCORES: tl.constexpr, NOISE: tl.constexpr,
                  BR: tl.constexpr, BC: tl.constexpr):
    """A[t] = a_{t+1} (row offsets), B[t] = b_t (column offsets, b_0 = 0); P = exp(x - a_T - b_T) in P's dtype.
    SCORES: x is an fp32 buffer that the kernel fills from the scores S (and the uniform samples U when NOISE)."""
    g = tl.program_id(0).to(tl.int64)
    X += g * n * m
    P += g * n * m
    A += g * n_iters * n
    B += g * (n_iters + 1) * m
    if SCORES:
        _log_scores(S + g * n * m, U + g * n * m, X, n, m, inv_temp, eps, NOISE, BR, BC)
    for j0 in range(0, m, BC):
        cols = j0 + tl.arange(0, BC)
        tl.store(B + cols, tl.zeros([BC], tl.float32), mask=cols < m)
    tl.debug_barrier()
    for t in range(n_iters):
        _lse_along(X, m, 1, n, m, B + t * m, A + t * n, BR, BC)
        tl.debug_barrier()
        _lse_along(X, 1, m, m, n, A + t * n, B + (t + 1) * m, BC, BR)
        tl.debug_barrier()
    a_last, b_last = A + (n_iters - 1) * n, B + n_iters * m
    for i0 in range(0, n, BR):
        for j0 in range(0, m, BC):
            rows, cols, ok, offs = _tile(i0, j0, n, m, BR, BC)
            x = tl.load(X + offs, mask=ok, other=0.0).to(tl.float32)
            a = tl.load(a_last + rows, mask=rows < n, other=0.0)
            b = tl.load(b_last + cols, mask=cols < m, other=0.0)
            p = tl.exp(x - a[:, None] - b[None, :])
            tl.store(P + offs, p.to(P.dtype.element_ty), mask=ok)


@triton.jit
def _exp_sums(X, W, s_out, s_in, n_out, n_in, OWN, OTHER, OUT, accumulate, W_MATRIX: tl.constexpr,
              BO: tl.constexpr, BI: tl.constexpr):
    """OUT[o] = (OUT[o] if accumulate else 0) - sum_i w[o, i] exp(X[o * s_out + i * s_in] - OWN[o] - OTHER[i]):
    along rows with (m, 1) and the row offsets as OWN, along columns with (1, m) and the column offsets as OWN.
    The weight w is the matrix W laid out as X when W_MATRIX, else the vector W[i]."""
    for o0 in range(0, n_out, BO):
        outs = o0 + tl.arange(0, BO)
        own = tl.load(OWN + outs, mask=outs < n_out, other=0.0)
        acc = tl.load(OUT + outs, mask=(outs < n_out) & accumulate, other=0.0)
        for i0 in range(0, n_in, BI):
            ins = i0 + tl.arange(0, BI)
            ok = (outs[:, None] < n_out) & (ins[None, :] < n_in)
            offs = outs[:, None] * s_out + ins[None, :] * s_in
            x = tl.load(X + offs, mask=ok, other=0.0).to(tl.float32)
            other = tl.load(OTHER + ins, mask=ins < n_in, other=0.0)
            if W_MATRIX:
                w = tl.load(W + offs, mask=ok, other=0.0).to(tl.float32)
            else:
                w = tl.load(W + ins, mask=ins < n_in, other=0.0)[None, :]
            e = tl.where(ok, tl.exp(x - own[:, None] - other[None, :]), 0.0)
            acc -= tl.sum(e * w, axis=1)
        tl.store(OUT + outs, acc, mask=outs < n_out)


@triton.jit
def _sinkhorn_bwd(X, DP, DX, A, B, GA, GB, S, n, m, n_iters, inv_temp, eps, SCORES: tl.constexpr,
                  BR: tl.constexpr, BC: tl.constexpr):
    """GA, GB: the gradients of the offsets, laid out as A and B (GB[0], that of the constant b_0, is left
    unwritten). SCORES: x came from the scores S (see `_sinkhorn_fwd`), whose gradient DX is."""
    g = tl.program_id(0).to(tl.int64)
    S += g * n * m
    X += g * n * m
    DP += g * n * m
    DX += g * n * m
    A += g * n_iters * n
    GA += g * n_iters * n
    B += g * (n_iters + 1) * m
    GB += g * (n_iters + 1) * m
    a_last, b_last = A + (n_iters - 1) * n, B + n_iters * m
    # P = exp(x - a_T - b_T): dP * P sends -rowsum to a_T and -colsum to b_T
    _exp_sums(X, DP, m, 1, n, m, a_last, b_last, GA + (n_iters - 1) * n, accumulate=False,
              W_MATRIX=True, BO=BR, BI=BC)
    _exp_sums(X, DP, 1, m, m, n, b_last, a_last, GB + n_iters * m, accumulate=False, W_MATRIX=True,
              BO=BC, BI=BR)
    tl.debug_barrier()
    for s in range(n_iters):
        t = n_iters - 1 - s
        # column step: b_{t+1} = colLSE(x - a_{t+1}) sends -sum_j gb[j] C[i, j] to a_{t+1} (a_T has dP * P's)
        _exp_sums(X, GB + (t + 1) * m, m, 1, n, m, A + t * n, B + (t + 1) * m, GA + t * n,
                  accumulate=s == 0, W_MATRIX=False, BO=BR, BI=BC)
        tl.debug_barrier()
        # row step: a_{t+1} = rowLSE(x - b_t) sends -sum_i ga[i] R[i, j] to b_t, unless t = 0
        if t > 0:
            _exp_sums(X, GA + t * n, 1, m, m, n, B + t * m, A + t * n, GB + t * m,
                      accumulate=False, W_MATRIX=False, BO=BC, BI=BR)
        tl.debug_barrier()
    # dx = dP * P + sum_t (gb_{t+1}[j] C_{t+1} + ga_{t+1}[i] R_{t+1}), where P is the last C
    for i0 in range(0, n, BR):
        for j0 in range(0, m, BC):
            rows, cols, ok, offs = _tile(i0, j0, n, m, BR, BC)
            x = tl.load(X + offs, mask=ok, other=0.0).to(tl.float32)
            dx = tl.zeros([BR, BC], tl.float32)
            c = tl.zeros([BR, BC], tl.float32)
            for t in range(n_iters):
                a = tl.load(A + t * n + rows, mask=rows < n, other=0.0)
                b_prev = tl.load(B + t * m + cols, mask=cols < m, other=0.0)
                b = tl.load(B + (t + 1) * m + cols, mask=cols < m, other=0.0)
                ga = tl.load(GA + t * n + rows, mask=rows < n, other=0.0)
                gb = tl.load(GB + (t + 1) * m + cols, mask=cols < m, other=0.0)
                c = tl.exp(x - a[:, None] - b[None, :])
                dx += gb[None, :] * c + ga[:, None] * tl.exp(x - a[:, None] - b_prev[None, :])
            dx += tl.load(DP + offs, mask=ok, other=0.0).to(tl.float32) * c
            if SCORES:
                dx *= inv_temp / (tl.load(S + offs, mask=ok, other=1.0).to(tl.float32) + eps)
            tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=ok)


def _tiles(n, m):
    """Row and column tile sizes: at most 32 x 64 where n and m are multiples of 16 (Triton then knows the rows
    aligned and vectorizes the loads), else 32 x 32 (each element keeps its own address: 32 x 64 took 157
    registers a thread). With 4 warps every kernel then takes at most 80 registers on an H100 (64 x 128 took 255
    and spilled 112 bytes in backward), so 4 programs fit an SM and 512 matrices run in one wave
    (tests/test_triton_compiles.py holds this)."""
    aligned = n % 16 == 0 and m % 16 == 0
    return min(32, next_power_of_2(n)), min(64 if aligned else 32, next_power_of_2(m))


def forward(x, n_iters, scores=None, noise=None, temperature=1.0, eps=0.0):
    """x [G, n, m] contiguous, n_iters >= 1 -> (P in x's dtype, row offsets [G, T, n], column offsets
    [G, T + 1, m], both fp32). With `scores` (contiguous, as x), x is an fp32 buffer to fill with their
    log-scores (see the module's docstring; `noise`: the uniform samples, or None), and P is in the scores'
    dtype."""
    G, n, m = x.shape
    p = new_output(torch.empty_like(x if scores is None else scores))
    a = new_output(torch.empty(G, n_iters, n, device=x.device, dtype=torch.float32))
    b = new_output(torch.empty(G, n_iters + 1, m, device=x.device, dtype=torch.float32))
    BR, BC = _tiles(n, m)
    s = scores if scores is not None else x
    _sinkhorn_fwd[(G,)](x, p, a, b, s, noise if noise is not None else s, n, m, n_iters, 1.0 / temperature, eps,
                        SCORES=scores is not None, NOISE=noise is not None, BR=BR, BC=BC, num_warps=4)
    return p, a, b


def backward(dp, x, a, b, scores=None, temperature=1.0, eps=0.0):
    """dp [G, n, m] in any float dtype -> dx in x's dtype, or with `scores` (see `forward`) their gradient."""
    G, n, m = x.shape
    dx = new_output(torch.empty_like(x if scores is None else scores))
    ga, gb = torch.empty_like(a), torch.empty_like(b)
    BR, BC = _tiles(n, m)
    _sinkhorn_bwd[(G,)](x, dp.contiguous(), dx, a, b, ga, gb, scores if scores is not None else x, n, m, a.shape[1],
                        1.0 / temperature, eps, SCORES=scores is not None, BR=BR, BC=BC, num_warps=4)
    return dx
