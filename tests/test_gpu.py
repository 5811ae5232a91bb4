"""GPU tests (marker `gpu`, skipped without CUDA): every available backend in bf16 / fp16 / fp32 against the fp32
reference, with FlashAttention's rule: the error is at most twice the reference's own low-precision error."""
import math

import pytest
import torch
import torch.nn.functional as F

import sinkhorn_kernels as sk
from sinkhorn_kernels import available_backends, ops
from sinkhorn_kernels.ops import outputs
from inputs import GRID, separated_qk
from rules import assert_within_rule
from test_triton import check, every_busy_block_split, gumbel_sinkhorn_runs, plain_sinkhorn  # noqa: F401 (a fixture)

pytestmark = pytest.mark.gpu

BACKENDS = [name for name, (ok, _) in available_backends().items() if ok]


@pytest.fixture(autouse=True)
def _nan_outputs(monkeypatch):
    monkeypatch.setattr(outputs, 'FILL', float('nan'))


def run(backend, dtype, cfg, q, k, v, null, mask, **extra):
    cast = lambda t: t.detach().to(dtype).requires_grad_()
    q_, k_, v_ = map(cast, (q, k, v))
    null_ = tuple(map(cast, null)) if cfg['causal'] else None
    out = ops.sinkhorn_attention(q_, k_, v_, bucket_size=cfg['bucket'], causal=cfg['causal'],
                                 n_top_buckets=cfg['n_top'], null_kv=null_, q_mask=mask, kv_mask=mask,
                                 backend=backend, **extra)
    out.float().square().sum().backward()
    return [out] + [t.grad for t in (q_, k_, v_) + (null_ or ())]


@pytest.mark.parametrize('cfg', GRID, ids=lambda c: '-'.join(f'{k}{v}' for k, v in c.items()))
@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize('backend', BACKENDS)
@pytest.mark.parametrize('extra', [{}, {'masked': True}, {'n_sortcut': 2}, {'non_permutative': False}],
                         ids=['plain', 'mask', 'sortcut', 'sinkhorn'])
def test_backend_against_fp32_reference(backend, dtype, cfg, extra):
    if cfg['causal'] and ('n_sortcut' in extra or 'non_permutative' in extra):
        pytest.skip('SortCut and Gumbel-Sinkhorn are non-causal only')
    compare_with_reference(backend, dtype, cfg, dict(extra))


@pytest.mark.parametrize('cfg', GRID[:2], ids=['noncausal', 'causal'])
@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float32])
@pytest.mark.parametrize('extra', [{}, {'n_sortcut': 2}], ids=['plain', 'sortcut'])
@pytest.mark.usefixtures('every_busy_block_split')
def test_triton_with_every_busy_block_split(dtype, cfg, extra):
    if cfg['causal'] and extra:
        pytest.skip('SortCut is non-causal only')
    compare_with_reference('triton', dtype, cfg, dict(extra))


def compare_with_reference(backend, dtype, cfg, extra):
    torch.manual_seed(0)
    B, H, T, D = 2, 4, cfg['bucket'] * cfg['n_buckets'], cfg['dim_head']
    mask = torch.rand(B, T, device='cuda') > 0.2 if extra.pop('masked', False) else None
    # routes that no precision's rounding can change (see separated_qk; test_triton checks that they do not)
    q, k = separated_qk(B, H, T, D, cfg['bucket'], cfg['causal'], mask, device='cuda')
    v = torch.randn(B, H, T, D, device='cuda')
    null = (torch.randn(H, D, device='cuda'), torch.randn(H, D, device='cuda'))
    exact = run('reference', torch.float64, cfg, q.double(), k.double(), v.double(),
                tuple(t.double() for t in null), mask, **extra)
    ref_low = run('reference', dtype, cfg, q, k, v, null, mask, **extra)
    ours = run(backend, dtype, cfg, q, k, v, null, mask, **extra)
    assert all(torch.isfinite(t).all() for t in ours), 'the kernel left NaN or inf in an output'
    for name, e, r, o in zip(['out', 'dq', 'dk', 'dv', 'dnull_k', 'dnull_v'], exact, ref_low, ours):
        # fp32: the kernels add up routes and readers in another order than PyTorch's reductions, a few units in
        # the last place of the tensor's largest value; 32 of them (2^-18 of it) are allowed on top of the rule
        slack = 2 ** -18 * e.abs().max().item() if dtype == torch.float32 else 1e-6
        assert_within_rule(o, r, e, name, slack)


@pytest.mark.parametrize('n', [7, 100, 1000])
@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize('backend', BACKENDS)
def test_sinkhorn_normalize_against_fp64_reference(backend, dtype, n):
    x = torch.randn(6, n, n, device='cuda', dtype=torch.float64)
    dp = torch.randn(6, n, n, device='cuda', dtype=torch.float64)

    def run(fn, dt):
        t = x.to(dt).clone().requires_grad_()
        out = fn(t)
        out.backward(dp.to(out.dtype))
        return [out, t.grad]

    exact = run(lambda t: ops.sinkhorn_normalize(t, 8, backend='reference'), torch.float64)
    ours = run(lambda t: ops.sinkhorn_normalize(t, 8, backend=backend), dtype)
    check(ours, exact, run(lambda t: plain_sinkhorn(t, 8), dtype), dtype, ['p', 'dx'])


@pytest.mark.parametrize('n', [7, 100])
@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize('backend', BACKENDS)
def test_gumbel_sinkhorn_against_fp64_reference_on_the_same_noise(backend, dtype, n):
    check(*gumbel_sinkhorn_runs((6, n, n), True, dtype, backend, 'cuda'), dtype, ['p', 'dscores'])


@pytest.mark.parametrize('backend', BACKENDS)
def test_compiled_lm_trains_without_graph_breaks(backend):
    torch.manual_seed(0)
    # attention dropout on Triton, whose seed stays on the device (the cuda kernels have no dropout yet, the
    # reference draws its masks on the host: a graph break)
    model = sk.SinkhornTransformerLM(num_tokens=64, dim=128, depth=2, max_seq_len=512, heads=4, bucket_size=64,
                                     causal=True, n_top_buckets=2, attn_dropout=0.1 if backend == 'triton' else 0.0)
    model = model.cuda()
    x = torch.randint(0, 64, (2, 512), device='cuda')
    loss_of = lambda m: F.cross_entropy(m(x)[:, :-1].transpose(1, 2), x[:, 1:])
    compiled = torch.compile(model, fullgraph=True)  # fullgraph: any graph break is an error
    sk.set_backend(backend)
    try:
        model.eval()
        torch.testing.assert_close(compiled(x), model(x), atol=1e-3, rtol=1e-3)
        model.train()
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        losses = []
        for _ in range(6):
            opt.zero_grad()
            loss = loss_of(compiled)
            loss.backward()
            opt.step()
            losses.append(loss.item())
    finally:
        sk.set_backend(None)
    assert all(map(math.isfinite, losses)) and losses[-1] < losses[0], losses


@pytest.mark.parametrize('causal', [False, True], ids=['noncausal', 'causal'])
@pytest.mark.parametrize('backend', BACKENDS)
def test_layer_op_equals_the_composed_ops_in_less_memory(backend, causal, monkeypatch):
    """SinkhornSelfAttention in eager mode (`ops.sinkhorn_self_attention`, which recomputes q, k, v and the
    attention output by chunks of heads) against its composed ops on the same backend, fp32: the same output and
    gradients, and a lower peak (one head a chunk here: about half the composed ops')."""
    torch.manual_seed(0)
    T = 8192
    layer = sk.SinkhornSelfAttention(512, 64, T, heads=8, causal=causal, n_top_buckets=2).cuda()
    x = torch.randn(1, T, 512, device='cuda', requires_grad=True)
    g = torch.randn(1, T, 512, device='cuda')

    def step(fused):
        with monkeypatch.context() as m:
            if not fused:
                m.setattr(sk.SinkhornSelfAttention, '_runs_fused', lambda self, x: False)
            sk.set_backend(backend)
            try:
                layer.zero_grad(set_to_none=True)
                x.grad = None
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                y = layer(x)
                (y * g).sum().backward()
                torch.cuda.synchronize()
                return [y.detach(), x.grad] + [p.grad for p in layer.parameters()], torch.cuda.max_memory_allocated()
            finally:
                sk.set_backend(None)

    composed, composed_peak = step(False)
    fused, fused_peak = step(True)
    for a, b in zip(fused, composed):
        torch.testing.assert_close(a, b, atol=1e-3 * max(1.0, b.abs().max().item()), rtol=1e-3)
    assert fused_peak < 0.75 * composed_peak, (fused_peak, composed_peak)
