"""The CUDA extension on a machine without a GPU: it builds wherever nvcc exists, imports, reports why the cuda
backend cannot run, and fails with clear errors. Its kernels are tested on GPU by tests/test_gpu.py."""
import shutil

import pytest
import torch

import sinkhorn_kernels as sk
from sinkhorn_kernels.ops import backends, cuda_extension

needs_nvcc = pytest.mark.skipif(shutil.which('nvcc') is None, reason='no nvcc: the package installs without _C')


@needs_nvcc
def test_extension_was_built_and_imports():
    ext = cuda_extension.load()
    assert ext is not None, 'nvcc is here but sinkhorn_kernels._C was not built: the install skipped or broke it'
    for name in ('sinkhorn_forward', 'sinkhorn_backward', 'block_attention_forward', 'block_attention_backward'):
        assert callable(getattr(ext, name))
    assert set(ext.cuda_architectures.split(',')) <= {'80', '86', '89', '90', '100', '120'}


@pytest.mark.skipif(torch.cuda.is_available(), reason='this machine has a GPU')
def test_backend_report_and_error_without_a_gpu():
    ok, reason = sk.available_backends()['cuda']
    assert not ok and ('no CUDA device' in reason or 'not built' in reason)
    q = torch.randn(1, 2, 32, 8)
    with pytest.raises(ValueError, match="backend 'cuda' is not available"):
        sk.ops.sinkhorn_attention(q, q, q, bucket_size=8, backend='cuda')


def test_report_names_a_missing_extension(monkeypatch):
    monkeypatch.setattr(cuda_extension, 'load', lambda: None)
    backends.refresh()
    try:
        ok, reason = sk.available_backends()['cuda']
        assert not ok and 'not built' in reason and 'nvcc' in reason
    finally:
        monkeypatch.undo()
        backends.refresh()


@needs_nvcc
@pytest.mark.skipif(torch.cuda.is_available(), reason='this machine has a GPU')
def test_a_launch_without_a_device_raises_instead_of_crashing():
    with pytest.raises(RuntimeError, match='sinkhorn_forward'):
        cuda_extension.load().sinkhorn_forward(0, 0, 0, 0, 1, 4, 4, 1, 0, 0)
    with pytest.raises(ValueError, match='dtype code'):
        cuda_extension.load().sinkhorn_forward(0, 0, 0, 0, 1, 4, 4, 1, 7, 0)


class FakeSinkhornKernels:
    """The extension's Sinkhorn entry points in PyTorch for CPU tensors, whose data_ptr the test makes a key into
    `tensors`: they hold the kernels to their contract (x, P, dP and dx in the one dtype the code names, offsets
    in fp32) and compute what the kernels would."""

    def __init__(self):
        self.tensors = {}

    def pointer(self, t):
        self.tensors[id(t)] = t
        return id(t)

    def sinkhorn_forward(self, x, p, a, b, G, n, m, n_iters, dtype, stream):
        x, p, a, b = (self.tensors[k] for k in (x, p, a, b))
        assert x.dtype == p.dtype == self.dtype(dtype) and a.dtype == b.dtype == torch.float32
        xf = x.float()
        b[:, 0] = 0
        for t in range(n_iters):
            a[:, t] = torch.logsumexp(xf - b[:, t, None, :], -1)
            b[:, t + 1] = torch.logsumexp(xf - a[:, t, :, None], -2)
        p.copy_(torch.exp(xf - a[:, -1, :, None] - b[:, -1, None, :]))

    def sinkhorn_backward(self, x, dp, dx, a, b, ga, gb, G, n, m, n_iters, dtype, stream):
        from sinkhorn_kernels.ops.sinkhorn import reference
        x, dp, dx = (self.tensors[k] for k in (x, dp, dx))
        assert x.dtype == dp.dtype == dx.dtype == self.dtype(dtype)
        with torch.enable_grad():  # backward runs without it
            xf = x.float().requires_grad_()
            dx.copy_(torch.autograd.grad(reference.sinkhorn_normalize(xf, n_iters), xf, dp.float())[0])

    @staticmethod
    def dtype(code):
        return {code: t for t, code in cuda_extension.DTYPE_CODES.items()}[code]


@pytest.mark.parametrize('dtype', [torch.float32, torch.float16])
def test_cuda_sinkhorn_launchers_keep_the_kernels_contract(dtype, monkeypatch):
    """The cuda backend's Python around its Sinkhorn kernels (casts, Gumbel-Sinkhorn's log-scores and chain rule),
    with the kernels emulated on CPU: one element type per kernel call, and the results of the reference."""
    from sinkhorn_kernels.ops.sinkhorn import cuda, fused, reference
    fake = FakeSinkhornKernels()
    monkeypatch.setattr(cuda, 'load', lambda: fake)
    monkeypatch.setattr(cuda, 'stream', lambda t: 0)
    monkeypatch.setattr(torch.Tensor, 'data_ptr', lambda t: fake.pointer(t))
    scores = torch.rand(3, 6, 5, dtype=torch.float64) + 0.05
    uniform = torch.rand(3, 6, 5, dtype=dtype)
    dp = torch.randn(3, 6, 5, dtype=torch.float64)
    runs = {
        'sinkhorn': (lambda t: fused.sinkhorn_normalize(t, 3, 'cuda'),
                     lambda t: reference.sinkhorn_normalize(t, 3)),
        'gumbel': (lambda t: fused.gumbel_sinkhorn(t, uniform, 3, 0.7, 'cuda'),
                   lambda t: reference.sinkhorn_normalize(reference.log_scores(t, uniform.double(), 0.7), 3)),
    }
    for name, (ours, exact) in runs.items():
        results = []
        for fn, dt in ((ours, dtype), (exact, torch.float64)):
            t = scores.to(dt, copy=True).requires_grad_()
            out = fn(t)
            assert out.dtype == dt
            out.backward(dp.to(dt))
            results.append((out, t.grad))
        tolerance = dict(rtol=1e-2, atol=1e-3) if dtype == torch.float16 else dict(rtol=1e-5, atol=1e-6)
        for got, want in zip(*results):
            torch.testing.assert_close(got.double(), want, **tolerance, msg=name)
