"""The fused CPU kernel of block attention (csrc/block_attention_cpu.cpp; fp32, the extension sinkhorn_kernels._cpu).

Per query bucket it makes the scores, the softmax and every product in buffers that stay in cache, reading the
routed key / value blocks in place: the PyTorch path's gathered copies, weight multiplies and index_adds, and
some thirty ops per chunk, are gone. The fused self-attention layer runs it on CPU wherever `applies`, and the
PyTorch reference (`reference.py`, its ground truth in the tests) otherwise; SINKHORN_KERNELS_CPU_KERNEL=0 turns
it off. A call takes any number of (batch, head) pairs, each with its own pointers and row strides, and spreads
them over torch's intra-op threads.
"""
import os

import torch

from ..cpu_extension import extension as _cpu

# the tests switch it off to compare the layer on both paths
enabled = _cpu is not None and os.environ.get('SINKHORN_KERNELS_CPU_KERNEL', '1') != '0'


def applies(x, bucket_size, dim_head, dropout_p):
    """Whether the kernel serves a layer on x (its device and dtype) with these sizes; attention dropout stays on
    the PyTorch path, whose masks are drawn with torch's generator."""
    return (enabled and x.device.type == 'cpu' and x.dtype == torch.float32 and dropout_p == 0
            and bucket_size % _cpu.vector_floats == 0 and dim_head % _cpu.vector_floats == 0)


def _rows(t):
    """Pointer and row stride of [T, D] rows whose last stride is 1."""
    if t.stride(-1) != 1:
        raise ValueError(f'the CPU kernel reads rows of unit stride, got strides {t.stride()}')
    return t.data_ptr(), t.stride(0)


class Heads:
    """The (batch, head) pairs of one call, with the tensors they point into kept alive until it returns."""

    def __init__(self, lay, dim_head):
        self.layout = _layout(lay, dim_head)
        self.args, self._alive = [], []

    def add(self, rotated, q, k, v, idx, w, null_k=None, null_v=None, q_mask=None, kv_mask=None, out=None,
            dout=None, dq=None, dk=None, dv=None, dw=None, dnull_k=None, dnull_v=None):
        """q, k, v [T, D] rows; idx (int64), w [Nq, R]; null_k / null_v [D]; masks bool [T]. Outputs: out (forward)
        or dout, dq, dk, dv [T, D] rows (backward), with dw [Nq, R] and dnull_k / dnull_v [D]."""
        a = dict(rotated=int(rotated))
        for name, t in dict(q=q, k=k, v=v, out=out, dout=dout, dq=dq, dk=dk, dv=dv).items():
            if t is not None:
                a[name], a[name + '_rs'] = _rows(t)
        inputs = dict(idx=idx, w=w, null_k=null_k, null_v=null_v, q_mask=q_mask, kv_mask=kv_mask)
        for name, t in inputs.items():
            if t is not None:
                self._alive.append(t.contiguous())
                a[name] = self._alive[-1].data_ptr()
        for name, t in dict(dw=dw, dnull_k=dnull_k, dnull_v=dnull_v).items():
            if t is not None:
                if not t.is_contiguous():
                    raise ValueError(f'the CPU kernel writes {name} in place: it must be contiguous')
                a[name] = t.data_ptr()
        self.args.append(a)


def _layout(lay, dim_head):
    return dict(Nq=lay.Nq, bs=lay.bs, Nk=lay.Nk, kbs=lay.kbs, R=lay.n_routes, D=dim_head, causal=int(lay.causal),
                scale=lay.scale)


def _workers(layout, n_pairs, backward):
    """Threads of a call: backward gives each (batch, head) pair to one thread (it accumulates the pair's dk, dv),
    forward spreads the pairs' query buckets over them."""
    return max(1, min(torch.get_num_threads(), n_pairs if backward else n_pairs * layout['Nq']))


def _scratch_floats(layout, n_pairs, backward):
    return _cpu.scratch_floats(layout, backward, _workers(layout, n_pairs, backward))


def scratch_numel(lay, dim_head, n_pairs, backward):
    """fp32 elements of a call's scratch: per worker thread a few score-sized buffers, and in backward a head's dk
    and dv."""
    return _scratch_floats(_layout(lay, dim_head), n_pairs, backward)


def _run(kernel, heads, backward, scratch):
    n = _scratch_floats(heads.layout, len(heads.args), backward)
    if scratch is None or scratch.numel() < n:
        scratch = torch.empty(n)
    kernel(heads.layout, heads.args, _workers(heads.layout, len(heads.args), backward), scratch.data_ptr())


def forward(heads, scratch=None):
    """Writes every head's attention output (which may be its q); `scratch`: fp32 memory of any contents
    (allocated if too small)."""
    _run(_cpu.block_attention_forward, heads, False, scratch)


def backward(heads, scratch=None):
    """Writes dq (which may be q or dout), dk, dv (which may be k, v) and dw; adds into dnull_k / dnull_v (each
    pair its own: the pairs run in parallel)."""
    _run(_cpu.block_attention_backward, heads, True, scratch)
