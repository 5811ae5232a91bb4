"""The Triton kernels against the reference, forward and every gradient. Without a GPU they run in Triton's
interpreter (conftest sets TRITON_INTERPRET=1), at tiny shapes in fp32 and fp16 (its bf16 tl.dot is wrong).
fp32 must agree with the fp64 reference to 1e-4 relative to the output scale; fp16 follows FlashAttention's rule:
its error against fp64 is at most twice that of plain PyTorch computing in fp16."""
import pytest
import torch

import sinkhorn_kernels as sk
from sinkhorn_kernels import ops
from sinkhorn_kernels.ops import outputs
from sinkhorn_kernels.ops.block_attention import every_bucket_routes
from sinkhorn_kernels.ops.block_attention import triton as block_attention_kernels
from inputs import GRID, separated_qk
from naive import naive_block_attention
from rules import assert_within_rule
from test_ops import CASES, block_case

pytestmark = pytest.mark.skipif(not sk.available_backends()['triton'][0], reason='triton is not available')


@pytest.fixture(autouse=True)
def _nan_outputs(monkeypatch):
    monkeypatch.setattr(outputs, 'FILL', float('nan'))


def errors(results, exact):
    return [(r.double() - e).abs().max().item() for r, e in zip(results, exact)]


def check(ours, exact, baseline, dtype, names):
    """baseline: the same computation by plain PyTorch in `dtype` (only needed below fp32)."""
    assert all(torch.isfinite(t).all() for t in ours), 'the kernel left NaN or inf in an output'
    if dtype == torch.float32:
        for name, err, e in zip(names, errors(ours, exact), exact):
            assert err <= 1e-4 * max(1.0, e.abs().max().item()), f'{name}: error {err:.3g}'
        return
    for name, o, b, e in zip(names, ours, baseline, exact):
        assert_within_rule(o, b, e, name, slack=1e-6)


def plain_sinkhorn(x, n_iters):
    """Sinkhorn in the input's precision, no upcast: the low-precision baseline."""
    for _ in range(n_iters):
        x = x - torch.logsumexp(x, dim=-1, keepdim=True)
        x = x - torch.logsumexp(x, dim=-2, keepdim=True)
    return x.exp()


@pytest.mark.parametrize('dtype', [torch.float32, torch.float16])
@pytest.mark.parametrize('shape,n_iters', [((3, 5, 7), 4), ((2, 12, 12), 1), ((1, 130, 70), 3), ((2, 48, 144), 2)])
def test_sinkhorn_normalize(shape, n_iters, dtype):
    x = torch.randn(shape, dtype=torch.float64)
    dp = torch.randn(shape, dtype=torch.float64)

    def run(fn, dt):
        t = x.to(dt).clone().requires_grad_()
        out = fn(t)
        out.backward(dp.to(out.dtype))
        return [out, t.grad]

    exact = run(lambda t: ops.sinkhorn_normalize(t, n_iters, backend='reference'), torch.float64)
    ours = run(lambda t: ops.sinkhorn_normalize(t, n_iters, backend='triton'), dtype)
    check(ours, exact, run(lambda t: plain_sinkhorn(t, n_iters), dtype), dtype, ['p', 'dx'])


@pytest.fixture
def every_busy_block_split(monkeypatch):
    """One reader per dK/dV program: every key block read twice or more is split, its partial sums added after."""
    monkeypatch.setattr(block_attention_kernels, 'READERS_PER_PROGRAM', 1)


@pytest.fixture
def row_tiles_of_16(monkeypatch):
    """Query buckets split over programs of 16 rows, as buckets of 128 x 128 are on a GPU."""
    monkeypatch.setattr(block_attention_kernels, '_row_tile', lambda bs, d, elem: 16)


@pytest.mark.parametrize('dtype', [torch.float32, torch.float16])
@pytest.mark.parametrize('case', CASES)
def test_block_attention(case, dtype):
    compare_block_attention(CASES[case], dtype)


@pytest.mark.parametrize('Nq,R,Nk', [(5, 3, 4), (40, 30, 7), (50, 3, 40)], ids=['small', 'tiles', 'groups'])
def test_reverse_index_kernel_lists_the_readers_of_each_block_in_order(Nq, R, Nk):
    from sinkhorn_kernels.ops.block_attention.routes import reverse_index
    idx = torch.randint(-1, Nk + 1, (2, 3, Nq, R), dtype=torch.int32)  # -1: no block, Nk: the null block
    readers, start, count = (outputs.new_output(torch.empty(6, n, dtype=torch.int32)) for n in (Nq * R, Nk + 1, Nk + 1))
    block_attention_kernels.write_reverse_index(idx, readers, start, count, Nk)
    exact = reverse_index(idx, Nk)
    # the null block's readers (block Nk, listed last) are not the kernel's to list
    start, count = start[:, :Nk], count[:, :Nk]
    assert torch.equal(start, exact[1][:, :Nk]) and torch.equal(count, exact[2][:, :Nk])
    for row, n in enumerate(count.sum(1).tolist()):  # routes to no block are listed nowhere
        assert torch.equal(readers[row, :n], exact[0][row, :n])


@pytest.mark.parametrize('case', ['masks', 'sortcut', 'causal_null_rotated'])
def test_block_attention_in_row_tiles(case, row_tiles_of_16):
    # 24 rows in two tiles, the second reaching past the bucket; causal attention needs equal bucket sizes
    kbs = 24 if CASES[case].get('causal') else 8
    compare_block_attention({**CASES[case], 'bs': 24, 'kbs': kbs}, torch.float32)


@pytest.mark.parametrize('per_program', [1, 2])
@pytest.mark.parametrize('case', ['plain', 'sortcut', 'causal_null_rotated'])
def test_block_attention_splits_the_readers_of_busy_blocks(case, per_program, monkeypatch):
    # a block with 2 * per_program readers or more is split over programs whose partial sums are added after
    monkeypatch.setattr(block_attention_kernels, 'READERS_PER_PROGRAM', per_program)

    def has_split_blocks(idx, q, k, kw):
        full = every_bucket_routes(idx, idx, q.shape[2] // kw['bucket_size'], kw['own_bucket'])[0]
        readers = [(full == n).flatten(2).sum(-1) for n in range(k.shape[2] // kw['kv_bucket_size'])]
        assert torch.stack(readers).max() >= 2 * per_program, 'no key block is split: the case does not test it'

    compare_block_attention(CASES[case], torch.float32, check_routes=has_split_blocks)


def compare_block_attention(case, dtype, check_routes=None):
    (q, k, v, idx, w), kw = block_case(**case)
    if check_routes:
        check_routes(idx, q, k, kw)
    leaves = [q, k, v, w] + list(kw['null_kv'] or ())
    dout = torch.randn_like(q)

    def run(fn, dt):
        ts = [t.detach().to(dt).requires_grad_() for t in leaves]
        null = tuple(ts[4:]) or None
        out = fn(*ts[:4], {**kw, 'null_kv': null})
        out.backward(dout.to(out.dtype))
        return [out] + [t.grad for t in ts]

    exact = run(lambda q, k, v, w, kw_: ops.block_attention(q, k, v, idx, w, backend='reference', **kw_), torch.float64)
    ours = run(lambda q, k, v, w, kw_: ops.block_attention(q, k, v, idx, w, backend='triton', **kw_), dtype)
    baseline = run(lambda q, k, v, w, kw_: naive_block_attention(q, k, v, idx, w, **kw_), dtype)
    check(ours, exact, baseline, dtype, ['out', 'dq', 'dk', 'dv', 'dw', 'dnull_k', 'dnull_v'])


def distinct_summaries(B, H, rows, Nk, dtype):
    """Bucket summaries whose scores are distinct per row and exact in fp16 (no ties, so every implementation
    must pick the same routes): scores[..., i, j] = sq[..., i, j], a permutation of 0.125, 0.375, ..."""
    D = 16
    vals = torch.stack([torch.randperm(Nk) for _ in range(B * H * rows)]).view(B, H, rows, Nk) / 4 + 0.125
    sq = torch.nn.functional.pad(vals, (0, D - Nk))
    sk = 4 * torch.eye(Nk, D).expand(B, H, Nk, D)  # summary_scores divides by sqrt(D) = 4
    return sq.to(dtype), sk.to(dtype)


@pytest.mark.parametrize('dtype', [torch.float32, torch.float16])
@pytest.mark.parametrize('causal,n_top,n_sortcut,own_bucket', [
    (False, 2, 0, True), (False, 3, 0, False), (True, 2, 0, True), (True, 3, 0, True), (False, 2, 3, False),
    (False, 2, 2, True)], ids=['plain', 'no_own', 'causal2', 'causal3', 'sortcut', 'sortcut_own'])
def test_topk_routes_kernel(causal, n_top, n_sortcut, own_bucket, dtype):
    from sinkhorn_kernels.ops.sinkhorn_attention import summary_routes, summary_routes_backward
    B, H, Nq, Nk = 2, 3, 6, 6 if causal else 9
    sq, sk = distinct_summaries(B, H, 1 if n_sortcut else Nq, Nk, torch.float64)
    opts = dict(causal=causal, n_top_buckets=n_top, n_sortcut=n_sortcut, temperature=0.7, own_bucket=own_bucket)
    _, idx, w = summary_routes(sq, sk, **opts, n_query_buckets=Nq)
    d_w = torch.randn(w.shape, dtype=torch.float64)

    def run(backend, dt):
        q, k = sq.to(dt), sk.to(dt)
        scores, i, wt = summary_routes(q, k, **opts, n_query_buckets=Nq, backend=backend)
        return i, [wt, *summary_routes_backward(scores, q, k, d_w.to(wt.dtype), **opts, backend=backend)]

    ours_idx, ours = run('triton', dtype)
    assert ours_idx.dtype == torch.int32 and ours[0].dtype == torch.float32
    assert torch.equal(ours_idx.long(), idx)
    _, exact = run('reference', torch.float64)
    check(ours, exact, run('reference', dtype)[1], dtype, ['weights', 'd_sq', 'd_sk'])


@pytest.mark.parametrize('dtype', [torch.float32, torch.float16])
@pytest.mark.parametrize('causal,n_sortcut,masked,T,bs,kbs', [
    (False, 0, False, 60, 6, 12), (False, 0, True, 60, 5, 5), (False, 2, True, 48, 8, 6), (True, 0, False, 60, 5, 5),
    (True, 0, True, 64, 8, 8), (True, 0, True, 8 * 130, 8, 8)],
    ids=['plain', 'masked', 'sortcut', 'causal', 'causal_masked', 'causal_130_buckets'])
def test_sort_summaries_kernels(causal, n_sortcut, masked, T, bs, kbs, dtype):
    """The summary kernels against the reference, forward and vector-Jacobian product, on q and k as the layer op
    holds them (views of one packed buffer), with a query mask that leaves whole buckets without a real token and
    another key mask (130 buckets: the scans take several steps)."""
    from sinkhorn_kernels.ops.summaries import add_sort_summaries_vjp, sort_summaries
    B, H, D = 2, 3, 12
    qkv = torch.randn(B, T, 3, H, D, dtype=torch.float64)
    q_mask = kv_mask = None
    if masked:
        q_mask = torch.rand(B, 1, T) > 0.3
        q_mask[0, :, :2 * kbs + 1] = False
        q_mask = q_mask.expand(B, H, T)
        kv_mask = torch.rand(B, H, T) > 0.5
    opts = dict(bucket_size=bs, kv_bucket_size=kbs, causal=causal, n_sortcut=n_sortcut, q_mask=q_mask,
                kv_mask=kv_mask)
    n_query = 1 if n_sortcut else T // bs
    d_sq, d_sk = torch.randn(B, H, n_query, D, dtype=torch.float64), torch.randn(B, H, T // kbs, D,
                                                                                  dtype=torch.float64)
    dqk = torch.randn(B, T, 2, H, D, dtype=torch.float64)

    def run(backend, dt):
        q, k = (qkv[:, :, i].to(dt).transpose(1, 2) for i in range(2))
        dq, dk = (t.transpose(1, 2) for t in dqk.to(dt).unbind(2))
        summaries = sort_summaries(q, k, **opts, backend=backend)
        add_sort_summaries_vjp(d_sq.to(dt), d_sk.to(dt), dq, dk, **opts, backend=backend)
        return [*summaries, dq, dk]

    ours, exact = run('triton', dtype), run('reference', torch.float64)
    assert [t.dtype for t in ours] == [dtype] * 4
    if dtype == torch.float32:  # element by element: a late bucket's running mean is small beside an early one's
        for name, o, e in zip(['sq', 'sk', 'dq', 'dk'], ours, exact):
            torch.testing.assert_close(o.double(), e, rtol=1e-5, atol=1e-5, msg=lambda m: f'{name}: {m}')
    check(ours, exact, run('reference', dtype), dtype, ['sq', 'sk', 'dq', 'dk'])


class _Grids:
    """A kernel whose launches record their grids."""

    def __init__(self, kernel, grids):
        self.kernel, self.grids = kernel, grids

    def __getitem__(self, grid):
        self.grids.append(grid)
        return self.kernel[grid]


@pytest.mark.parametrize('causal,masked', [(False, False), (False, True), (True, True)])
def test_sort_summaries_vjp_kernels_into_one_tensor(causal, masked, monkeypatch):
    """The layer op adds both summaries' vector-Jacobian products into one tensor, dx: q's and k's programs must
    then take a launch each (in one they would add into the same rows at once, which the interpreter, running
    programs one by one, cannot show), and the sum is the reference's."""
    from sinkhorn_kernels.ops.summaries import add_sort_summaries_vjp
    from sinkhorn_kernels.ops.summaries import triton as kernels
    B, H, T, D, bs = 2, 3, 40, 12, 5
    mask = (torch.rand(B, 1, T) > 0.3).expand(B, H, T) if masked else None
    opts = dict(bucket_size=bs, kv_bucket_size=bs, causal=causal, q_mask=mask, kv_mask=mask)
    d_sq, d_sk = torch.randn(2, B, H, T // bs, D).unbind(0)
    dx = torch.randn(B, T, H, D).transpose(1, 2)
    grids = []
    monkeypatch.setattr(kernels, '_add_vjp', _Grids(kernels._add_vjp, grids))
    ours, expected = dx.clone(), dx.clone()
    add_sort_summaries_vjp(d_sq, d_sk, ours, ours, **opts, backend='triton')
    add_sort_summaries_vjp(d_sq, d_sk, expected, expected, **opts)
    assert [grid[2] for grid in grids] == [1, 1]
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


def test_custom_ops_pass_opcheck():
    """torch.library.opcheck (schema and mutations, fake tensors, autograd registration, AOT dispatch) on every
    custom op of the triton backend, with the arguments a layer step gives it: causal with padding and dropout,
    SortCut, and Gumbel-Sinkhorn mode; and plain Sinkhorn normalization."""
    from torch.utils._python_dispatch import TorchDispatchMode

    calls = {}

    class Calls(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.namespace == 'sinkhorn_kernels':
                calls.setdefault(func, [a.clone() if isinstance(a, torch.Tensor) else a for a in args])
            return func(*args, **(kwargs or {}))

    x = torch.randn(1, 32, 16, requires_grad=True)
    mask = torch.arange(32)[None] >= 3
    sk.set_backend('triton')
    try:
        with Calls():
            for options in (dict(causal=True, attn_dropout=0.2, n_top_buckets=2), dict(n_sortcut=2),
                            dict(non_permutative=False)):
                layer = sk.SinkhornSelfAttention(16, 8, 32, heads=2, **options)
                layer(x, input_mask=mask).sum().backward()
            ops.sinkhorn_normalize(torch.randn(2, 5, 6, requires_grad=True), 3).sum().backward()
    finally:
        sk.set_backend(None)
    assert {f.__name__.split('.')[0] for f in calls} == {
        'block_attention_fwd', 'block_attention_bwd', 'topk_routes_fwd', 'topk_routes_bwd', 'sort_summaries',
        'add_sort_summaries_vjp', 'gumbel_sinkhorn_fwd', 'gumbel_sinkhorn_bwd', 'sinkhorn_fwd', 'sinkhorn_bwd'}
    for func, args in calls.items():
        torch.library.opcheck(func, args)


def gumbel_sinkhorn_runs(shape, noise, dtype, backend, device='cpu'):
    """(ours, exact, baseline) outputs and scores' gradients of Gumbel-Sinkhorn under one seed: `backend` in
    `dtype`, the fp64 reference on the same uniform samples (one torch.rand in `dtype`, as every backend draws
    them), and the reference backend in `dtype`."""
    from sinkhorn_kernels.ops.sinkhorn import reference
    scores = torch.rand(shape, dtype=torch.float64, device=device) + 0.05
    dp = torch.randn(shape, dtype=torch.float64, device=device)

    def run(fn, dt):
        t = scores.to(dt).clone().requires_grad_()
        torch.manual_seed(7)
        out = fn(t)
        out.backward(dp.to(out.dtype))
        return [out, t.grad]

    torch.manual_seed(7)
    uniform = torch.rand(shape, dtype=dtype, device=device).double() if noise else None
    exact = run(lambda t: reference.sinkhorn_normalize(reference.log_scores(t, uniform, 0.7), 3), torch.float64)
    ours = run(lambda t: ops.gumbel_sinkhorn(t, 3, 0.7, noise=noise, backend=backend), dtype)
    baseline = run(lambda t: ops.gumbel_sinkhorn(t, 3, 0.7, noise=noise, backend='reference'), dtype)
    return ours, exact, baseline


@pytest.mark.parametrize('dtype', [torch.float32, torch.float16])
@pytest.mark.parametrize('noise', [True, False], ids=['noise', 'no_noise'])
@pytest.mark.parametrize('shape', [(3, 5, 7), (2, 48, 144)])
def test_gumbel_sinkhorn(shape, noise, dtype):
    """The kernels make the log-scores and their Gumbel noise themselves, from the uniform samples of one
    torch.rand in the scores' dtype: under one seed they match the fp64 reference on those same samples, output
    and the scores' gradient (fp16 by FlashAttention's rule, against the reference backend in fp16)."""
    check(*gumbel_sinkhorn_runs(shape, noise, dtype, 'triton'), dtype, ['p', 'dscores'])


def test_launch_sizes_agree_with_triton():
    """The launchers size tiles and grids with plain arithmetic (`ops.tiles`), Triton's constexpr functions being
    slow host calls; the results must be the same."""
    import triton
    from sinkhorn_kernels.ops.tiles import cdiv, dot_tile, next_power_of_2
    for n in range(1, 2100):
        assert next_power_of_2(n) == triton.next_power_of_2(n) and dot_tile(n) == max(16, next_power_of_2(n))
        assert all(cdiv(n, d) == triton.cdiv(n, d) for d in (1, 3, 16, 64, 97))


def graph_nodes(t):
    """The names of the autograd nodes that lead to t."""
    names, todo = [], [t.grad_fn]
    while todo:
        node = todo.pop()
        if node is not None:
            names.append(type(node).__name__)
            todo += [next_node for next_node, _ in node.next_functions]
    return names


@pytest.mark.parametrize('dtype', [torch.float32, torch.float16])
def test_sinkhorn_backward_keeps_its_input_and_the_offsets_only(dtype):
    """The kernel writes P in the scores' dtype (no cast in the graph) and backward rebuilds P from the scores and
    the offset vectors, so autograd keeps no matrix but the scores."""
    x = torch.randn(4, 24, 40, dtype=dtype, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        p = ops.sinkhorn_normalize(x, 3, backend='triton')
    assert p.dtype == dtype and 'ToCopyBackward0' not in graph_nodes(p)
    matrices = [t for t in saved if t.numel() >= x[0].numel()]
    assert len(matrices) == 1 and matrices[0].data_ptr() == x.data_ptr(), [t.shape for t in saved]
    assert sum(t.numel() for t in saved if t is not matrices[0]) == 4 * (3 * 24 + 4 * 40)


@pytest.mark.parametrize('dtype', [torch.float32, torch.float16])
def test_sinkhorn_ops_pass_opcheck_on_strided_scores(dtype):
    """The kernels write P and the gradient contiguous, in the scores' dtype, whatever their strides; so must the
    fake implementations."""
    from sinkhorn_kernels.ops.sinkhorn import fused

    x = torch.randn(3, 5, 4, dtype=dtype).transpose(1, 2)
    torch.library.opcheck(fused.sinkhorn_fwd.op, (x, 2, 'triton'))
    p, a, b = fused.sinkhorn_fwd(x, 2, 'triton')
    assert p.dtype == dtype
    torch.library.opcheck(fused.sinkhorn_bwd.op, (torch.randn_like(p), x, a, b, 'triton'))


def test_kernel_ops_go_through_the_dispatcher_only_where_something_may_watch():
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._python_dispatch import TorchDispatchMode
    from sinkhorn_kernels.ops.library import _watched

    x = torch.randn(2, 3)
    assert not _watched((x, torch.nn.Parameter(x), None, 3, 'triton'))
    assert _watched((x.to('meta'),))
    with FakeTensorMode() as mode:
        fake = mode.from_tensor(x)
    assert _watched((fake,))
    with TorchDispatchMode():
        assert _watched((x,))
    with torch.profiler.profile():
        assert _watched((x,))
    traced = []
    torch.jit.trace(lambda t: traced.append(_watched((t,))) or t * 1, x, check_trace=False)
    assert traced == [True]


def test_fused_attention_traces_on_fake_tensors():
    """Fake tensors (shape inference, memory planning) go through the ops' fake implementations: a direct call
    would hand them to the kernels."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q, k, v = (torch.randn(1, 2, 32, 16, requires_grad=True) for _ in range(3))
        out = ops.sinkhorn_attention(q, k, v, bucket_size=8, n_top_buckets=2, backend='triton')
        out.sum().backward()
        p = ops.sinkhorn_normalize(q[0], 3, backend='triton')
    assert out.shape == q.shape and q.grad.shape == q.shape and p.shape == q[0].shape


def test_topk_routes_kernel_rejects_too_many_buckets():
    from sinkhorn_kernels.ops.routing import triton as routing_kernels
    scores = torch.zeros(1, 1, 1, routing_kernels.MAX_COLUMNS + 1)
    with pytest.raises(ValueError, match='at most 16384 key buckets'):
        routing_kernels.forward(scores, 1, 1.0, False, 0, 1, False)


@pytest.mark.parametrize('kw', [dict(), dict(causal=True, n_top_buckets=2), dict(causal=True, n_top_buckets=3),
                                dict(n_sortcut=2), dict(non_permutative=False), dict(kv_bucket_size=8),
                                dict(masked=True), dict(causal=True, masked=True), dict(causal=True, masked='left')],
                         ids=['plain', 'causal2', 'causal3', 'sortcut', 'sinkhorn', 'kv_bucket', 'mask', 'causal_mask',
                              'causal_left_padding'])
def test_sinkhorn_attention(kw):
    kw = dict(kw)
    torch.manual_seed(1)
    B, H, T, D = 2, 4, 64, 16
    q, k, v = (torch.randn(B, H, T, D) for _ in range(3))
    null = (torch.randn(H, D), torch.randn(H, D))
    masked = kw.pop('masked', False)
    if masked:
        mask = torch.rand(B, T) > 0.25
        if masked == 'left':  # a whole bucket of padding (and part of the next), whose keys tie with the null's
            mask = torch.arange(T).expand(B, T) >= 20
        kw.update(q_mask=mask, kv_mask=mask)

    def run(backend, dt):
        ts = [t.to(dt).clone().requires_grad_() for t in (q, k, v, *null)]
        out = ops.sinkhorn_attention(*ts[:3], bucket_size=16, null_kv=tuple(ts[3:]) if kw.get('causal') else None,
                                     backend=backend, **kw)
        out.square().sum().backward()
        return [out] + [t.grad for t in ts if t.grad is not None]

    check(run('triton', torch.float32), run('reference', torch.float64), None, torch.float32,
          ['out', 'dq', 'dk', 'dv', 'dnull_k', 'dnull_v'])


def test_causal_routing_splits_its_busiest_key_blocks(monkeypatch):
    # causal routing of random inputs crowds the first key buckets (their running means are the largest): at
    # the default READERS_PER_PROGRAM, some block must be split for the kernel's own reasons, not a test's
    plans = []

    class Recorded:
        def __getitem__(self, grid):
            def launch(count, plan, *args, **meta):
                real[grid](count, plan, *args, **meta)
                plans.append(plan.clone())
            return launch

    real = block_attention_kernels._chunk_plan
    monkeypatch.setattr(block_attention_kernels, '_chunk_plan', Recorded())
    torch.manual_seed(0)
    B, H, T, D, bs = 1, 2, 256, 8, 4
    q, k, v = (torch.randn(B, H, T, D) for _ in range(3))
    null = (torch.randn(H, D), torch.randn(H, D))

    def run(backend, dt):
        ts = [t.to(dt).clone().requires_grad_() for t in (q, k, v, *null)]
        out = ops.sinkhorn_attention(*ts[:3], bucket_size=bs, n_top_buckets=2, causal=True, null_kv=tuple(ts[3:]),
                                     backend=backend)
        out.square().sum().backward()
        return [out] + [t.grad for t in ts]

    ours = run('triton', torch.float32)
    Nk = T // bs
    assert len(plans) == 1 and (plans[0][:, 0, Nk] > Nk).any(), 'no key block was split'
    check(ours, run('reference', torch.float64), None, torch.float32, ['out', 'dq', 'dk', 'dv', 'dnull_k', 'dnull_v'])


def test_sinkhorn_attention_on_triton_is_one_autograd_node():
    # the sort net, the routing and block attention: no autograd graph of the routing's small ops in between
    q, k, v = (torch.randn(1, 2, 32, 16, requires_grad=True) for _ in range(3))
    out = ops.sinkhorn_attention(q, k, v, bucket_size=8, n_top_buckets=2, backend='triton')
    assert type(out.grad_fn).__name__ == 'TopkAttentionBackward'
    assert [type(f).__name__ for f, _ in out.grad_fn.next_functions[:3]] == ['AccumulateGrad'] * 3


@pytest.mark.parametrize('extra', [{}, {'masked': True}, {'n_sortcut': 2}], ids=['plain', 'mask', 'sortcut'])
@pytest.mark.parametrize('cfg', GRID, ids=lambda c: '-'.join(f'{k}{v}' for k, v in c.items()))
def test_gpu_suite_inputs_route_alike_in_every_precision(cfg, extra, monkeypatch):
    """The GPU suite holds each precision to twice the reference's error, which only holds while both route to
    the same buckets as fp64: its inputs (`separated_qk`) must, for either routing (PyTorch, the Triton kernel)."""
    from sinkhorn_kernels.ops.block_attention import fused, reference
    if cfg['causal'] and extra:
        pytest.skip('SortCut is non-causal only; causal masks are covered by the causal configurations')
    routes = []

    def record(idx, q):
        routes.append(idx.long())
        B, H, T, D = q.shape
        return q.new_zeros(B, H, T, D), q.new_zeros(B, H, T, dtype=torch.float32)

    monkeypatch.setattr(reference, 'block_attention', lambda q, k, v, idx, *a: record(idx, q)[0])
    monkeypatch.setattr(fused, 'block_attention_fwd', lambda q, k, v, idx, *a: record(idx, q))
    B, H, T, D = 2, 4, cfg['bucket'] * cfg['n_buckets'], cfg['dim_head']
    for seed in range(4):
        torch.manual_seed(seed)
        mask = torch.rand(B, T) > 0.2 if extra.get('masked') else None
        q, k = separated_qk(B, H, T, D, cfg['bucket'], cfg['causal'], mask)
        null = (torch.randn(H, D), torch.randn(H, D)) if cfg['causal'] else None
        routes.clear()
        for backend, dtype in [('reference', torch.float64), ('reference', torch.bfloat16),
                               ('reference', torch.float16), ('triton', torch.bfloat16), ('triton', torch.float16)]:
            with torch.no_grad():
                ops.sinkhorn_attention(q.to(dtype), k.to(dtype), k.to(dtype), bucket_size=cfg['bucket'],
                                       causal=cfg['causal'], n_top_buckets=cfg['n_top'], q_mask=mask, kv_mask=mask,
                                       null_kv=None if null is None else tuple(t.to(dtype) for t in null),
                                       backend=backend, n_sortcut=extra.get('n_sortcut', 0))
        assert len(routes) == 5
        assert all(torch.equal(r, routes[0]) for r in routes[1:]), f'seed {seed}: the routes differ'


@pytest.mark.parametrize('kw', [dict(causal=True, n_local_attn_heads=1), dict(), dict(reversible=True, causal=True)])
def test_model_trains_the_same_on_triton(kw):
    model = sk.SinkhornTransformerLM(num_tokens=20, dim=32, depth=2, max_seq_len=64, heads=4, bucket_size=16, **kw)
    x = torch.randint(0, 20, (2, 64))
    grads = []
    for backend in ('reference', 'triton'):
        sk.set_backend(backend)
        try:
            model.zero_grad()
            logits = model(x)
            logits.square().mean().backward()
            grads.append([logits] + [p.grad.clone() for p in model.parameters() if p.grad is not None])
        finally:
            sk.set_backend(None)
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize('backend,options', [('triton', dict(causal=True, attn_dropout=0.1)),
                                             ('triton', dict(non_permutative=False)),
                                             ('reference', dict(causal=True))],
                         ids=['triton', 'triton_sinkhorn_mode', 'reference'])
def test_compile_fullgraph_without_graph_breaks(backend, options):
    # Triton with attention dropout in training too: its seed stays on the device, so it breaks no graph (the
    # reference draws its masks on the host, a graph break, see the README). Gumbel-Sinkhorn mode runs the
    # Sinkhorn and block attention Functions, the causal top-k layer its own
    model = sk.SinkhornTransformerLM(num_tokens=20, dim=32, depth=1, max_seq_len=64, heads=4, bucket_size=16,
                                     **options)
    x = torch.randint(0, 20, (1, 64))
    sk.set_backend(backend)
    try:
        torch.manual_seed(3)
        # against the composed ops, which torch.compile traces: the eager layer op draws a dropout seed per chunk of
        # heads, the composed ops one for all
        with pytest.MonkeyPatch.context() as m:
            m.setattr(sk.SinkhornSelfAttention, '_runs_fused', lambda self, x: False)
            eager = model(x)
        compiled = torch.compile(model, fullgraph=True, backend='aot_eager')
        torch.manual_seed(3)
        out = compiled(x)
        out.square().mean().backward()
    finally:
        sk.set_backend(None)
    torch.testing.assert_close(out, eager, atol=1e-5, rtol=1e-5)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize('tiled,split', [(False, False), (True, False), (False, True)],
                         ids=['whole_buckets', 'row_tiles', 'split_blocks'])
def test_dropout_is_seeded_and_its_backward_matches_its_forward(tiled, split, request):
    if tiled:  # 24 rows in two tiles of 16, the second reaching past the bucket
        request.getfixturevalue('row_tiles_of_16')
    if split:
        request.getfixturevalue('every_busy_block_split')
    sizes = dict(bs=24, kbs=24) if tiled else {}
    (q, k, v, idx, w), kw = block_case(causal=True, null=True, rotated=2, masks=True, **sizes)
    leaves = [t.detach().float() for t in [q, k, v, w, *kw['null_kv']]]
    g = torch.randn(q.shape)

    def f(q, k, v, w, nk, nv, seed=7):
        torch.manual_seed(seed)
        out = ops.block_attention(q, k, v, idx, w, backend='triton', dropout_p=0.3, **{**kw, 'null_kv': (nk, nv)})
        return (out * g).sum()

    if not tiled:  # the seed's effect does not depend on the tiling
        base = f(*leaves)
        assert base == f(*leaves) and base != f(*leaves, seed=8)
    # backward against a central difference of the same (seeded) forward along a random direction
    ts = [t.clone().requires_grad_() for t in leaves]
    f(*ts).backward()
    direction = [torch.randn_like(t) for t in leaves]
    eps = 1e-2
    numeric = (f(*[t + eps * d for t, d in zip(leaves, direction)]) -
               f(*[t - eps * d for t, d in zip(leaves, direction)])) / (2 * eps)
    analytic = sum((t.grad * d).sum() for t, d in zip(ts, direction))
    assert abs(numeric - analytic) <= 1e-2 * max(1.0, abs(analytic)), (numeric, analytic)


def test_dropout_is_unbiased():
    # with values of ones every output is sum_j dropout(p)_ij, 1 in expectation
    qv = torch.randn(2, 4, 256, 16)
    ones = torch.ones_like(qv)
    n = 256 // 16
    idx2 = torch.stack([torch.randperm(n)[:2] for _ in range(8 * n)]).view(2, 4, n, 2)
    out = ops.block_attention(qv, qv, ones, idx2, torch.ones(2, 4, n, 2), bucket_size=16, dropout_p=0.3,
                              backend='triton')
    assert abs(out.mean().item() - 1) < 0.05 and (out - 1).abs().max() > 0.1


def test_triton_rejects_what_it_does_not_support():
    q = torch.randn(1, 2, 32, 8)
    idx = torch.zeros(1, 2, 4, 1, dtype=torch.long)
    w = torch.ones(1, 2, 4, 1)
    with pytest.raises(ValueError, match='float16, bfloat16, float32'):
        ops.block_attention(q.double(), q.double(), q.double(), idx, w, bucket_size=8, backend='triton')
    big = torch.randn(1, 1, 512, 8)
    with pytest.raises(ValueError, match='up to 128'):
        ops.block_attention(big, big, big, idx[:, :1, :2], w[:, :1, :2], bucket_size=256, backend='triton')
