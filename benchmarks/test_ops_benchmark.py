"""pytest-benchmark suite of the ops: `python -m pytest benchmarks --benchmark-enable` (CI runs each once)."""
import pytest
import torch

from sinkhorn_kernels import ops

SEQ, HEADS, DIM_HEAD, BUCKET = 1024, 4, 32, 64


def qkv(requires_grad=True):
    torch.manual_seed(0)
    return [torch.randn(1, HEADS, SEQ, DIM_HEAD, requires_grad=requires_grad) for _ in range(3)]


def fwd_bwd(fn, leaves):
    def run():
        for t in leaves:
            t.grad = None
        fn().sum().backward()
    return run


@pytest.mark.parametrize('mode', ['fwd', 'fwd+bwd'])
def test_sinkhorn_normalize(benchmark, mode):
    x = torch.randn(256, 32, 32, requires_grad=True)
    fn = lambda: ops.sinkhorn_normalize(x, 8)
    benchmark(fn if mode == 'fwd' else fwd_bwd(fn, [x]))


def test_topk_routing(benchmark):
    scores = torch.randn(HEADS, 64, 64)
    benchmark(lambda: ops.topk_routing(scores, 2))


@pytest.mark.parametrize('causal', [False, True])
@pytest.mark.parametrize('mode', ['fwd', 'fwd+bwd'])
def test_sinkhorn_attention(benchmark, causal, mode):
    q, k, v = qkv()
    null = (torch.randn(HEADS, DIM_HEAD), torch.randn(HEADS, DIM_HEAD)) if causal else None
    fn = lambda: ops.sinkhorn_attention(q, k, v, bucket_size=BUCKET, n_top_buckets=2, causal=causal, null_kv=null)
    benchmark(fn if mode == 'fwd' else fwd_bwd(fn, [q, k, v]))


@pytest.mark.parametrize('mode', ['fwd', 'fwd+bwd'])
def test_block_attention(benchmark, mode):
    q, k, v = qkv()
    n = SEQ // BUCKET
    idx = torch.stack([torch.randperm(n)[:2] for _ in range(HEADS * n)]).view(1, HEADS, n, 2)
    w = torch.rand(1, HEADS, n, 2, requires_grad=True)
    fn = lambda: ops.block_attention(q, k, v, idx, w, bucket_size=BUCKET)
    benchmark(fn if mode == 'fwd' else fwd_bwd(fn, [q, k, v, w]))
