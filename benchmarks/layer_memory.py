"""Peak memory of one SinkhornSelfAttention forward + backward as a GPU's allocator counts it, measured on a CPU:
the bytes of every tensor storage alive, summed after each ATen op (the input, the parameters and their
gradients included; scratch that a custom op frees before it returns is not seen). The Triton kernels run in the
interpreter, so a step at 8k tokens takes minutes.

    python benchmarks/layer_memory.py [--seq-len 4096] [--causal] [--dtype float32] [--impl fused]

--impl: fused (the layer on the triton backend as it runs in eager mode: as one op wherever that saves memory),
composed (the same backend through separate ops) or reference (sinkhorn-transformer, in PyTorch).
"""
import argparse
import os
import weakref

os.environ['TRITON_INTERPRET'] = '1'  # before triton is imported

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_flatten  # noqa: E402

import sinkhorn_kernels as sk  # noqa: E402


class LiveBytes(TorchDispatchMode):
    def __init__(self, tensors):
        super().__init__()
        self.live, self.peak = {}, 0
        for t in tensors:
            self.track(t)

    def track(self, t):
        s = t.untyped_storage()
        if s.data_ptr() not in self.live and s.nbytes():
            self.live[s.data_ptr()] = s.nbytes()
            weakref.finalize(s, self.live.pop, s.data_ptr(), None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.track(t)
        self.peak = max(self.peak, sum(list(self.live.values())))
        return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--seq-len', type=int, default=4096)
    p.add_argument('--causal', action='store_true')
    p.add_argument('--dtype', default='float32', choices=['float32', 'float16'])
    p.add_argument('--impl', default='fused', choices=['fused', 'composed', 'reference'])
    args = p.parse_args()
    dtype, T = getattr(torch, args.dtype), args.seq_len
    if args.impl == 'reference':
        import sinkhorn_transformer
        cls = sinkhorn_transformer.SinkhornSelfAttention
    else:
        cls = sk.SinkhornSelfAttention
        if args.impl == 'composed':
            cls._runs_fused = lambda self, x: False
        sk.set_backend('triton')
    layer = cls(512, 64, T, heads=8, causal=args.causal, n_top_buckets=2).to(dtype)
    x = torch.randn(1, T, 512, dtype=dtype, requires_grad=True)
    layer(x).float().sum().backward()  # a first step, so that nothing below is a one-time allocation
    x.grad = None
    layer.zero_grad(set_to_none=True)
    mode = LiveBytes([x, *layer.parameters()])
    with mode:
        layer(x).float().sum().backward()
    print(f'{args.impl}, {"causal" if args.causal else "non-causal"}, {T} tokens, {args.dtype}: peak '
          f'{mode.peak / 2 ** 20:.1f} MB of live tensors')


if __name__ == '__main__':
    main()
