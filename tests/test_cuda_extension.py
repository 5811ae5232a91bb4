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
