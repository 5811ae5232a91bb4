"""What the host spends around the fused kernels, measured on a CPU: the kernel ops' calls direct (plain eager,
the default) and through the dispatcher (as under torch.compile, a dispatch mode or the profiler; see
`sinkhorn_kernels.ops.library`). Triton launches are made no-ops, so every figure is Python, autograd, the
dispatcher and the small ATen ops; the kernels' own launch cost (some 10-20 us each on a GPU host) comes on top
either way.

Per op: microseconds a call, with the arguments of a causal, padded, dropout layer step (tiny shapes); and how
many calls one SinkhornSelfAttention forward + backward makes at --seq-len (dim 512, 8 heads, bucket 64, n_top 2,
the layer goal's shape), so the dispatcher's share of a step. Then whole calls both ways: Sinkhorn normalization
and top-k `sinkhorn_attention`, forward + backward.

    python benchmarks/host_overhead.py [--seq-len 16384] [--causal]
"""
import argparse
import collections
import os

os.environ['TRITON_INTERPRET'] = '1'  # before triton is imported

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from triton.runtime.interpreter import GridExecutor  # noqa: E402

import sinkhorn_kernels as sk  # noqa: E402
from sinkhorn_kernels.bench.measure import percentile, timer  # noqa: E402
from sinkhorn_kernels.ops import library  # noqa: E402


class Calls(TorchDispatchMode):
    """Records each kernel op's calls (and the first call's arguments); being a dispatch mode, it sends them all
    through the dispatcher."""

    def __init__(self):
        super().__init__()
        self.count, self.args = collections.Counter(), {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == library.NAMESPACE:
            name = func.__name__.split('.')[0]
            self.count[name] += 1
            self.args.setdefault(name, args)
        return func(*args, **(kwargs or {}))


def layer_step(seq_len, causal, dtype, mask=False, **kw):
    layer = sk.SinkhornSelfAttention(512, 64, seq_len, heads=8, causal=causal, n_top_buckets=2, **kw).to(dtype)
    x = torch.randn(1, seq_len, 512, dtype=dtype, requires_grad=True)
    input_mask = torch.arange(seq_len)[None] >= 3 if mask else None
    return lambda: layer(x, input_mask=input_mask).float().sum().backward()


def median_us(fn, repeats):
    fn()
    time_ms = timer('cpu')
    return percentile([time_ms(fn) for _ in range(repeats)], 0.5) * 1e3


def both_ways(fn, repeats):
    """(direct, through the dispatcher) host microseconds of fn."""
    direct = median_us(fn, repeats)
    watched = library._watched
    library._watched = lambda args: True
    try:
        return direct, median_us(fn, repeats)
    finally:
        library._watched = watched


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--seq-len', type=int, default=16384)
    p.add_argument('--causal', action='store_true')
    p.add_argument('--repeats', type=int, default=200)
    args = p.parse_args()
    GridExecutor.__init__ = GridExecutor.__call__ = lambda *a, **k: None
    sk.set_backend('triton')

    captured = Calls()
    with captured:  # one step of each kind, small: every op's arguments
        layer_step(128, True, torch.float32, mask=True, attn_dropout=0.1)()
        layer_step(128, False, torch.float32, non_permutative=False)()
    counted = Calls()
    with counted:
        layer_step(args.seq_len, args.causal, torch.float32)()

    print(f'{"op":<24}{"direct us":>10}{"dispatched us":>15}{"calls per step":>16}')
    saved = 0.0
    for name, call in library.KERNEL_OPS.items():  # all registered by the steps above
        direct, dispatched = both_ways(lambda: call(*captured.args[name]), args.repeats)
        saved += counted.count[name] * (dispatched - direct)
        print(f'{name:<24}{direct:>10.1f}{dispatched:>15.1f}{counted.count[name]:>16}')
    kind = 'causal' if args.causal else 'non-causal'
    print(f'layer step, {kind}, {args.seq_len} tokens: {sum(counted.count.values())} kernel op calls; the '
          f'dispatcher would add {saved / 1000:.2f} ms of host time')

    x = torch.randn(512, 16, 16, requires_grad=True)
    q, k, v = (torch.randn(1, 8, 1024, 64, requires_grad=True) for _ in range(3))
    for name, fn in (('Sinkhorn normalization 512 x 16 x 16, 8 iterations',
                      lambda: sk.ops.sinkhorn_normalize(x, 8).sum().backward()),
                     ('sinkhorn_attention top-k, 8 heads x 1024 x 64',
                      lambda: sk.ops.sinkhorn_attention(q, k, v, bucket_size=64, n_top_buckets=2).sum().backward())):
        direct, dispatched = both_ways(fn, args.repeats)
        print(f'{name}, forward + backward: {direct:.0f} us direct, {dispatched:.0f} us through the dispatcher')


if __name__ == '__main__':
    main()
