"""Which implementation runs an op: 'reference' (PyTorch), 'triton' or 'cuda'.

Resolution order: the call's `backend=`, then `set_backend(...)`, then the environment variable
SINKHORN_KERNELS_BACKEND, then automatic: Triton for CUDA tensors when it is installed, the reference otherwise.
"""
import importlib
import importlib.util
import os

import torch

BACKENDS = ('reference', 'triton', 'cuda')
# what the fused backends (triton, cuda) take
FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

_global_backend = None


def optional_module(name):
    """The module `name` (a compiled extension), or None when the package was installed without it."""
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def triton_interpreted():
    return os.environ.get('TRITON_INTERPRET') == '1'


def _find_unavailable():
    """Backend name -> why it cannot run here (absent when it can)."""
    from .cuda_extension import load
    reasons = {}
    if load() is None:
        reasons['cuda'] = ('the CUDA extension sinkhorn_kernels._C is not built: install the package where nvcc is '
                           'available (see the README, "Building wheels")')
    elif not torch.cuda.is_available():
        reasons['cuda'] = 'the CUDA extension is built but there is no CUDA device'
    if importlib.util.find_spec('triton') is None:
        reasons['triton'] = 'triton is not installed (pip install triton)'
    elif not torch.cuda.is_available() and not triton_interpreted():
        reasons['triton'] = ('there is no CUDA device; to run the Triton kernels on CPU through the interpreter set '
                             'TRITON_INTERPRET=1 before importing sinkhorn_kernels')
    return reasons


# computed once at import: torch.compile then reads a constant instead of tracing imports
_unavailable = _find_unavailable()


def _unavailable_reasons():
    return _unavailable


def refresh():
    """Looks again for the backends (after building the extension in this process, or in tests)."""
    global _unavailable
    _unavailable = _find_unavailable()


def available_backends():
    """Maps every backend to (available, reason)."""
    reasons = _unavailable_reasons()
    return {name: (name not in reasons, reasons.get(name, 'available')) for name in BACKENDS}


def set_backend(name):
    """Sets the default backend for every op call that passes no `backend=` (None restores automatic)."""
    global _global_backend
    _global_backend = None if name is None else _validate(name)


def _validate(name):
    if name not in BACKENDS:
        raise ValueError(f'unknown backend {name!r}; choose one of {BACKENDS} or None for automatic')
    reason = _unavailable_reasons().get(name)
    if reason is not None:
        raise ValueError(f'backend {name!r} is not available: {reason}; use backend=\'reference\' or None')
    return name


def resolve_backend(backend, device):
    name = backend or _global_backend or os.environ.get('SINKHORN_KERNELS_BACKEND') or None
    if name is None:
        return 'triton' if device.type == 'cuda' and 'triton' not in _unavailable_reasons() else 'reference'
    name = _validate(name)
    if name == 'triton' and device.type != 'cuda' and not triton_interpreted():
        raise ValueError(f'backend \'triton\' got {device.type} tensors: the kernels run on CUDA tensors, or on CPU '
                         'tensors with TRITON_INTERPRET=1 set before importing sinkhorn_kernels')
    if name == 'cuda' and device.type != 'cuda':
        raise ValueError(f'backend \'cuda\' got {device.type} tensors; move them to a CUDA device')
    return name


def kernel_module(package, backend):
    """The module of `package` that launches `backend`'s kernels (ops/<op>/triton.py or ops/<op>/cuda.py)."""
    return importlib.import_module(f'{package}.{backend}')
