"""Which implementation runs an op: 'reference' (PyTorch), 'triton' or 'cuda'.

Resolution order: the call's `backend=`, then `set_backend(...)`, then the environment variable
SINKHORN_KERNELS_BACKEND, then automatic (the fastest available one for the tensor's device).
"""
import os

BACKENDS = ('reference', 'triton', 'cuda')

_global_backend = None


def _unavailable_reasons():
    """Backend name -> why it cannot run here (absent when it can)."""
    return {
        'triton': 'the fused Triton kernels are not implemented yet in this release',
        'cuda': 'the CUDA C++ extension sinkhorn_kernels._C is not implemented yet in this release',
    }


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
    if name is not None:
        return _validate(name)
    # automatic: the fused backends only exist for CUDA tensors; until they ship everything runs the reference
    return 'reference'
