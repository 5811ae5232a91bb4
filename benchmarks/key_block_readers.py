"""How unevenly the benchmark's layer inputs spread their routes over key blocks, and what that makes of the
longest program of block attention's dK/dV kernel: with one program per key block, and split as the Triton
kernel splits busy blocks (`READERS_PER_PROGRAM`). Routes of `SinkhornSelfAttention(512, 64, T, heads=8,
n_top_buckets=2)` on the benchmark's random input, from the functional op on the reference backend (attention
itself is not run), on CPU.

    python benchmarks/key_block_readers.py [--seq-lens 16384 65536]
"""
import argparse
import importlib

import torch
from einops import rearrange

import sinkhorn_kernels as sk
from sinkhorn_kernels.ops.block_attention import every_bucket_routes
from sinkhorn_kernels.ops.block_attention.triton import READERS_PER_PROGRAM

# the module, which `sinkhorn_kernels.ops` shadows with its function
functional = importlib.import_module('sinkhorn_kernels.ops.sinkhorn_attention')


def routes(T, causal, bucket=64):
    torch.manual_seed(0)
    layer = sk.SinkhornSelfAttention(512, bucket, T, heads=8, causal=causal, n_top_buckets=2)
    x = torch.randn(1, T, 512)
    split = lambda t: rearrange(t, 'b n (h d) -> b h n d', h=8)
    with torch.no_grad():
        q, k, v = (split(t) for t in (layer.to_q(x), *(x @ w.t() for w in layer.to_kv.weight.chunk(2))))
    seen = []

    def record(q, k, v, idx, w, **kw):
        seen.append(every_bucket_routes(idx, w, q.shape[2] // bucket, kw.get('own_bucket', True))[0])
        return torch.zeros_like(q)

    original, functional.block_attention = functional.block_attention, record
    try:
        null = (layer.null_keys[:, 0], layer.null_values[:, 0]) if causal else None
        functional.sinkhorn_attention(q, k, v, bucket_size=bucket, n_top_buckets=2, causal=causal, null_kv=null,
                                      backend='reference')
    finally:
        functional.block_attention = original
    return seen[0], T // bucket


def longest_chunk(readers, per_program):
    """The most readers one program walks when a block of c readers is split into max(1, c // per_program)."""
    chunks = (readers // per_program).clamp(min=1)
    return (readers - (chunks - 1) * per_program).max().item()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--seq-lens', type=int, nargs='+', default=[16384, 65536])
    args = parser.parse_args()
    print('| tokens | causal | readers per key block, mean / max | longest dK/dV program: one per block / split |')
    print('| --- | --- | --- | --- |')
    for T in args.seq_lens:
        for causal in (False, True):
            idx, Nk = routes(T, causal)
            readers = torch.stack([torch.bincount(row.flatten().long(), minlength=Nk + 1)[:Nk]
                                   for row in idx.flatten(0, 1)])  # null routes (index Nk) dropped
            print(f'| {T} | {causal} | {readers.float().mean():.1f} / {readers.max().item()} | '
                  f'{readers.max().item()} / {longest_chunk(readers, READERS_PER_PROGRAM)} |')


if __name__ == '__main__':
    main()
