"""Compiles the Triton kernels' launches for a GPU that is not here: Triton compiles to a cubin for any target
without a device (ptxas ships with it). The interpreter runs the kernels' code but not the compiler, so what only
the compiler rejects (and a tile that needs more shared memory than the GPU has) would show first on a GPU.

`record(specs)` notes every launch the interpreter runs (kernel, argument types, constexprs, warps and stages);
`compile_all(specs, arch)` compiles each distinct one in a fresh process where the kernels are not interpreted
(this file run as a script) and returns their resources (shared memory, and registers a thread read from the
cubin by the cuobjdump that Triton ships), or the compiler's error.
"""
import contextlib
import json
import os
import re
import subprocess
import sys

import torch

TYPES = {torch.float32: 'fp32', torch.float16: 'fp16', torch.bfloat16: 'bf16', torch.int64: 'i64',
         torch.int32: 'i32', torch.int16: 'i16', torch.int8: 'i8', torch.uint8: 'u8', torch.bool: 'i1'}


def _argument(value, constexpr):
    """(signature type, constexpr value or None, divisible by 16) of one argument as Triton's launcher sees it."""
    if constexpr or value is None:
        return 'constexpr', getattr(value, 'value', value), False  # tl.constexpr objects by their value
    if isinstance(value, torch.Tensor):
        return '*' + TYPES[value.dtype], None, value.data_ptr() % 16 == 0
    if isinstance(value, bool):
        return 'i1', None, False
    if isinstance(value, int):
        return ('i32' if -2 ** 31 <= value < 2 ** 31 else 'i64'), None, value % 16 == 0
    if isinstance(value, float):
        return 'fp32', None, False
    raise TypeError(f'no Triton type for {type(value).__name__}')


def spec(executor, args, kwargs):
    fn = executor.fn
    values = dict(zip(executor.arg_names, args)) | {k: v for k, v in kwargs.items() if k in executor.arg_names}
    signature, constexprs, divisible = {}, {}, []
    for i, name in enumerate(executor.arg_names):
        kind, value, aligned = _argument(values.get(name), name in executor.constexprs)
        signature[name] = kind
        if kind == 'constexpr':
            constexprs[name] = value
        if aligned:
            divisible.append(i)
    return dict(module=fn.__module__, kernel=fn.__name__, signature=signature, constexprs=constexprs,
                divisible=divisible, num_warps=kwargs.get('num_warps', 4), num_stages=kwargs.get('num_stages', 3))


@contextlib.contextmanager
def record(specs):
    """Appends to `specs` the spec of every kernel launch the interpreter runs inside the block."""
    from triton.runtime.interpreter import GridExecutor
    interpret = GridExecutor.__call__

    def launch(executor, *args, **kwargs):
        specs.append(spec(executor, args, kwargs))
        return interpret(executor, *args, **kwargs)

    GridExecutor.__call__ = launch
    try:
        yield specs
    finally:
        GridExecutor.__call__ = interpret


def distinct(specs):
    return list({json.dumps(s, sort_keys=True): s for s in specs}.values())


def compile_all(specs, arch):
    """-> [(spec, resources or None, error or None)] for the distinct specs, compiled for sm_`arch`; resources:
    dict(shared=bytes, registers=count)."""
    specs = distinct(specs)
    env = {k: v for k, v in os.environ.items() if k != 'TRITON_INTERPRET'}
    done = subprocess.run([sys.executable, __file__, str(arch)], input=json.dumps(specs), capture_output=True,
                          text=True, env=env, check=True)
    return [(s, r['resources'], r['error']) for s, r in zip(specs, json.loads(done.stdout))]


def _registers(cubin):
    import tempfile

    from triton import knobs
    with tempfile.NamedTemporaryFile(suffix='.cubin') as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([knobs.nvidia.cuobjdump.path, '-res-usage', f.name], capture_output=True, text=True,
                               check=True).stdout
    return int(re.search(r'\bREG:(\d+)', usage).group(1))


def _compile(s, arch):
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import ASTSource
    fn = getattr(importlib.import_module(s['module']), s['kernel'])
    src = ASTSource(fn, s['signature'], constexprs=s['constexprs'],
                    attrs={(i,): [['tt.divisibility', 16]] for i in s['divisible']})
    try:
        kernel = triton.compile(src, target=GPUTarget('cuda', arch, 32),
                                options=dict(num_warps=s['num_warps'], num_stages=s['num_stages']))
    except Exception as e:  # the compiler's message is the result
        return dict(resources=None, error=f'{type(e).__name__}: {e}'[:2000])
    return dict(resources=dict(shared=kernel.metadata.shared, registers=_registers(kernel.asm['cubin'])), error=None)


if __name__ == '__main__':
    print(json.dumps([_compile(s, int(sys.argv[1])) for s in json.load(sys.stdin)]))
