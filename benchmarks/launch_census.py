"""What one forward + backward of SinkhornSelfAttention (or, with --op sinkhorn, of the benchmark's Sinkhorn
normalization step) asks of a GPU on the triton backend, counted on a CPU: the ATen ops that would launch a
kernel (views and allocations aside; those inside our custom ops included), the Triton launches, and the bytes
the ATen ops write. The Triton kernels run in the interpreter, whose own tensor copies are not counted; block
attention's kernels are not run at all (their outputs are not needed for counting), so a 4k-token step takes
seconds.

    python benchmarks/launch_census.py [--seq-len 4096] [--causal]
    python benchmarks/launch_census.py --op sinkhorn [--matrices 8]
"""
import argparse
import collections
import os

os.environ['TRITON_INTERPRET'] = '1'  # before triton is imported

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode, _get_current_dispatch_mode  # noqa: E402
from torch.utils._pytree import tree_flatten  # noqa: E402
from triton.runtime.interpreter import GridExecutor  # noqa: E402

import sinkhorn_kernels as sk  # noqa: E402
from sinkhorn_kernels.ops.block_attention import triton as block_attention_kernels  # noqa: E402
from sinkhorn_kernels.ops.routing import triton as routing_kernels  # noqa: E402
from sinkhorn_kernels.ops.sinkhorn import triton as sinkhorn_kernels  # noqa: E402
from sinkhorn_kernels.ops.summaries import triton as summary_kernels  # noqa: E402

NOT_LAUNCHES = {'view', 't', 'permute', 'detach', 'expand', '_unsafe_view', 'slice', 'unsqueeze', 'alias',
                'transpose', 'squeeze', 'select', 'split', 'split_with_sizes', 'as_strided', 'unbind', 'reshape',
                'unflatten', 'empty', 'empty_like', 'new_empty', 'empty_strided', 'lift_fresh'}
SKIPPED_KERNELS = {'_fwd', '_bwd_dq', '_bwd_dkv'}


class Census(TorchDispatchMode):
    def __init__(self, tally):
        super().__init__()
        self.tally = tally

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        # inside a custom op `to` and `contiguous` reach the mode, and may return their input: no launch
        returns_input = bool(args) and out is args[0] and not name.endswith('_')
        if (name not in NOT_LAUNCHES and func.namespace != 'sinkhorn_kernels' and not self.tally.interpreting
                and not returns_input):
            self.tally.ops[name] += 1
            written = out if not name.endswith('_') else args[0]  # in place: the tensor it writes
            self.tally.bytes += sum(t.numel() * t.element_size() for t in tree_flatten(written)[0]
                                    if isinstance(t, torch.Tensor))
        return out


class Tally:
    def __init__(self):
        self.ops, self.launches, self.bytes, self.interpreting = collections.Counter(), collections.Counter(), 0, False

    def install(self):
        """Counts Triton launches, and the ATen ops our launchers run (a custom op's body runs outside the
        dispatch mode that sees the op; the layer op calls some launchers directly)."""
        interpret = GridExecutor.__call__

        def launch(grid_executor, *args, **kwargs):
            self.launches[grid_executor.fn.__name__] += 1
            if grid_executor.fn.__name__ in SKIPPED_KERNELS:
                return None
            self.interpreting = True
            try:
                return interpret(grid_executor, *args, **kwargs)
            finally:
                self.interpreting = False

        GridExecutor.__call__ = launch
        for module, names in ((block_attention_kernels, ('forward', 'backward')),
                              (routing_kernels, ('forward', 'backward')), (summary_kernels, ('forward', 'add_vjp')),
                              (sinkhorn_kernels, ('forward', 'backward'))):
            for name in names:
                setattr(module, name, self._inside(getattr(module, name)))

    def _inside(self, fn):
        def run(*args, **kwargs):
            if isinstance(_get_current_dispatch_mode(), Census):  # called directly, not as a custom op: seen
                return fn(*args, **kwargs)
            with Census(self):
                return fn(*args, **kwargs)
        return run


def layer_step(args):
    layer = sk.SinkhornSelfAttention(512, 64, args.seq_len, heads=8, causal=args.causal, n_top_buckets=2).bfloat16()
    x = torch.randn(1, args.seq_len, 512, dtype=torch.bfloat16, requires_grad=True)
    return (lambda: layer(x).float().sum().backward(),
            f'{"causal" if args.causal else "non-causal"}, {args.seq_len} tokens')


def sinkhorn_step(args):
    """The benchmark's Sinkhorn case (128 x 128, 8 iterations, bf16) on --matrices matrices."""
    x = torch.randn(args.matrices, 128, 128, dtype=torch.bfloat16, requires_grad=True)
    return (lambda: sk.ops.sinkhorn_normalize(x, 8).float().sum().backward(),
            f'Sinkhorn normalization, {args.matrices} x 128 x 128')


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--op', choices=('layer', 'sinkhorn'), default='layer')
    p.add_argument('--seq-len', type=int, default=4096)
    p.add_argument('--causal', action='store_true')
    p.add_argument('--matrices', type=int, default=8)
    args = p.parse_args()
    tally = Tally()
    tally.install()
    step, what = (layer_step if args.op == 'layer' else sinkhorn_step)(args)
    sk.set_backend('triton')
    with Census(tally):
        step()
    print(f'{what}: {sum(tally.ops.values())} ATen ops and {sum(tally.launches.values())} Triton launches, '
          f'{tally.bytes / 2 ** 20:.1f} MB written by the ATen ops')
    print('ATen:', ', '.join(f'{name} {n}' for name, n in tally.ops.most_common()))
    print('Triton:', ', '.join(f'{name} {n}' for name, n in tally.launches.items()))


if __name__ == '__main__':
    main()
