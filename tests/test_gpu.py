"""GPU tests (marker `gpu`, skipped without CUDA): every available backend in bf16 / fp16 / fp32 against the fp32
reference, with FlashAttention's rule: the error is at most twice the reference's own low-precision error."""
import pytest
import torch

from sinkhorn_kernels import available_backends, ops

pytestmark = pytest.mark.gpu

BACKENDS = [name for name, (ok, _) in available_backends().items() if ok]
GRID = [dict(bucket=b, dim_head=d, n_buckets=n, causal=c, n_top=t)
        for b, d, n, c, t in [(32, 32, 7, False, 1), (64, 64, 12, True, 2), (128, 128, 5, False, 4),
                              (64, 128, 9, True, 3), (32, 64, 6, True, 1), (128, 32, 3, False, 2)]]


def run(backend, dtype, cfg, q, k, v, null, mask, **extra):
    cast = lambda t: t.detach().to(dtype).requires_grad_()
    q_, k_, v_ = map(cast, (q, k, v))
    null_ = tuple(map(cast, null)) if cfg['causal'] else None
    out = ops.sinkhorn_attention(q_, k_, v_, bucket_size=cfg['bucket'], causal=cfg['causal'],
                                 n_top_buckets=cfg['n_top'], null_kv=null_, q_mask=mask, kv_mask=mask,
                                 backend=backend, **extra)
    out.float().square().sum().backward()
    return [out] + [t.grad for t in (q_, k_, v_)]


@pytest.mark.parametrize('cfg', GRID, ids=lambda c: '-'.join(f'{k}{v}' for k, v in c.items()))
@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize('backend', BACKENDS)
@pytest.mark.parametrize('extra', [{}, {'masked': True}, {'n_sortcut': 2}, {'non_permutative': False}],
                         ids=['plain', 'mask', 'sortcut', 'sinkhorn'])
def test_backend_against_fp32_reference(backend, dtype, cfg, extra):
    if cfg['causal'] and ('n_sortcut' in extra or 'non_permutative' in extra):
        pytest.skip('SortCut and Gumbel-Sinkhorn are non-causal only')
    torch.manual_seed(0)
    B, H, T, D = 2, 4, cfg['bucket'] * cfg['n_buckets'], cfg['dim_head']
    q, k, v = (torch.randn(B, H, T, D, device='cuda') for _ in range(3))
    null = (torch.randn(H, D, device='cuda'), torch.randn(H, D, device='cuda'))
    mask = None
    if extra.pop('masked', False):
        mask = torch.rand(B, T, device='cuda') > 0.2
    exact = run('reference', torch.float64, cfg, q.double(), k.double(), v.double(),
                tuple(t.double() for t in null), mask, **extra)
    ref_low = run('reference', dtype, cfg, q, k, v, null, mask, **extra)
    ours = run(backend, dtype, cfg, q, k, v, null, mask, **extra)
    for name, e, r, o in zip(['out', 'dq', 'dk', 'dv'], exact, ref_low, ours):
        ref_err = (r.double() - e).abs().max().item()
        err = (o.double() - e).abs().max().item()
        assert err <= 2 * ref_err + 1e-6, f'{name}: error {err:.3g} > 2 x reference error {ref_err:.3g}'
