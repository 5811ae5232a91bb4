"""Every Triton kernel, as the layer and the ops launch it, compiles for an H100 (sm_90) within its shared memory:
the interpreter runs the kernels here without their compiler (see `ahead_of_time`)."""
import pytest
import torch

import sinkhorn_kernels as sk
from sinkhorn_kernels.ops.sinkhorn import sinkhorn_normalize
from ahead_of_time import compile_all, record

pytestmark = pytest.mark.skipif(not sk.available_backends()['triton'][0], reason='triton is not available')

H100_SHARED_BYTES = 227 * 1024  # the most shared memory one block of an H100 may take
# Sinkhorn's programs (4 warps, one a matrix) are latency-bound: at most 128 registers a thread lets 4 of them
# share an SM's 64K registers, so the benchmark's 512 matrices run in one wave on 132 SMs (at 255, where the
# 64 x 128 tiles were, ptxas also spilled)
SINKHORN_REGISTERS = 128

LAYERS = [  # dtype, bucket size, dim_head, layer options, padded
    (torch.bfloat16, 64, 64, dict(), False),  # the benchmark's layer
    (torch.bfloat16, 64, 64, dict(causal=True, attn_dropout=0.1), True),
    (torch.float32, 128, 128, dict(causal=True), True),
    (torch.float16, 128, 128, dict(kv_bucket_size=64, n_top_buckets=2, attn_dropout=0.1), True),
    (torch.float32, 32, 32, dict(n_sortcut=2, n_local_attn_heads=1), False),
    (torch.bfloat16, 64, 64, dict(non_permutative=False), False),  # Gumbel-Sinkhorn
]


def launches():
    """The specs of the launches of a forward and backward of each layer, and of Sinkhorn normalization."""
    specs = []
    sk.set_backend('triton')
    try:
        with record(specs):
            for dtype, bucket, dim_head, options, padded in LAYERS:
                T = 4 * bucket
                layer = sk.SinkhornSelfAttention(2 * dim_head, bucket, T, heads=2, dim_head=dim_head,
                                                 **options).to(dtype)
                x = torch.randn(1, T, 2 * dim_head, dtype=dtype, requires_grad=True)
                mask = torch.arange(T)[None] >= 3 if padded else None
                layer(x, input_mask=mask).float().sum().backward()
            for dtype, n in ((torch.float32, 130), (torch.bfloat16, 128)):  # several masked tiles; the benchmark
                x = torch.randn(2, n, n, dtype=dtype, requires_grad=True)
                sinkhorn_normalize(x, 3).sum().backward()
    finally:
        sk.set_backend(None)
    return specs


def test_every_kernel_compiles_for_an_h100():
    specs = launches()
    kernels = {s['kernel'] for s in specs}
    assert {'_fwd', '_bwd_dq', '_bwd_dkv', '_routes_fwd', '_routes_bwd', '_parts', '_add_vjp', '_sinkhorn_fwd',
            '_sinkhorn_bwd'} <= kernels, f'launches not recorded: {sorted(kernels)}'
    results = compile_all(specs, 90)
    failed = [f"{s['kernel']} {s['constexprs']}: {error}" for s, _, error in results if error]
    assert not failed, '\n'.join(failed)
    over = [f"{s['kernel']} {s['constexprs']} stages {s['num_stages']}: {r['shared']} bytes"
            for s, r, _ in results if r['shared'] > H100_SHARED_BYTES]
    assert not over, 'over an H100\'s shared memory:\n' + '\n'.join(over)
    sinkhorn = [(s, r) for s, r, _ in results if s['kernel'].startswith('_sinkhorn')]
    assert sinkhorn and all(r['registers'] > 0 for _, r in sinkhorn)
    heavy = [f"{s['kernel']} {s['signature']['X']} {s['constexprs']}: {r['registers']} registers"
             for s, r in sinkhorn if r['registers'] > SINKHORN_REGISTERS]
    assert not heavy, 'Sinkhorn kernels over their register budget:\n' + '\n'.join(heavy)
