"""Kernel launchers as torch.library custom ops that plain eager calls skip.

torch.compile needs the launchers as ops: opaque to tracing, with fake implementations that give the outputs'
shapes. So do torch.export, the JIT tracer, fake and meta tensors, dispatch modes, tensor subclasses and the
profiler's op names. A plain eager call needs none of it, and the dispatcher's round trip from Python to C++ and
back through a custom op's Python kernels costs tens of microseconds a call, more with `register_autograd`
(pytorch/pytorch#139500, #176592): the layer step is host-bound at 16k tokens on an H100
(benchmarks/results/h100-2026-11-26/profile.txt: 5.7 ms of CPU time against 1.1 ms on the GPU). So `kernel_op`
registers the launcher and returns a function that calls the op where anything may be watching and the launcher
itself otherwise; autograd lives in `torch.autograd.Function`s around these ops, which torch.compile traces.
`benchmarks/host_overhead.py` measures both ways.
"""
import functools

import torch

NAMESPACE = 'sinkhorn_kernels'
_PLAIN = (torch.Tensor, torch.nn.Parameter)
# name -> the function `kernel_op` returned, for every op registered so far (their modules load lazily)
KERNEL_OPS = {}


def _watched(args):
    """Whether a call with these arguments must go through the dispatcher: under torch.compile or torch.export,
    the JIT tracer, a dispatch or function mode (fake tensors among them), the profiler, or arguments that are
    tensor subclasses or meta."""
    if (torch.compiler.is_compiling() or torch._C._get_tracing_state() or torch._C._len_torch_dispatch_stack()
            or torch._C._is_torch_function_mode_enabled() or torch.autograd._profiler_enabled()):
        return True
    return any(isinstance(a, torch.Tensor) and (type(a) not in _PLAIN or a.is_meta) for a in args)


def kernel_op(name, mutates_args=()):
    """Decorator: registers `fn` as the custom op sinkhorn_kernels::`name` and returns a function with fn's
    signature (positional arguments only) that runs fn directly unless `_watched`. `.op` is the registered op
    (for opcheck), `.register_fake` its fake registration. A direct call leaves the version counters of the
    tensors it mutates alone; ours mutate only gradient buffers that autograd never saved."""
    def register(fn):
        op = torch.library.custom_op(f'{NAMESPACE}::{name}', mutates_args=mutates_args)(fn)

        @functools.wraps(fn)
        def call(*args):
            return op(*args) if _watched(args) else fn(*args)

        call.op, call.register_fake = op, op.register_fake
        KERNEL_OPS[name] = call
        return call
    return register
