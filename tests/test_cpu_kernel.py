"""The fused CPU kernel of block attention (csrc/block_attention_cpu.cpp) against the PyTorch reference: the op on
its own, every build of it (one per instruction set), and the fused layer that runs it.

fp32 kernels pass if their error against the float64 reference is at most twice the fp32 reference's own error
(FlashAttention's rule), plus a floor of a few fp32 ulps where that error is zero."""
import os
import subprocess
import sys

import pytest
import torch

from sinkhorn_kernels.attention import SinkhornSelfAttention
from sinkhorn_kernels.ops import cpu_extension, self_attention
from sinkhorn_kernels.ops.block_attention import cpu, with_own_bucket
from sinkhorn_kernels.ops.block_attention import reference as blocks
from rules import assert_within_rule

pytestmark = pytest.mark.skipif(not cpu.enabled, reason='the CPU kernels (sinkhorn_kernels._cpu) are not built')

FLOOR = 4e-6


def within_rule(kernel, ref32, ref64, name):
    assert_within_rule(kernel, ref32, ref64, name, slack=FLOOR * max(1.0, ref64.abs().max().item()))


def packed(B, H, T, D, dtype):
    """q, k, v as the fused layer holds them: [B, H, T, D] views of one [B, T, 3, H, D] buffer."""
    qkv = torch.randn(B, T, 3, H, D, dtype=dtype)
    return [qkv[:, :, i].transpose(1, 2) for i in range(3)]


def routes(B, H, Nq, Nk, n, own, null, none):
    """n routes per query bucket (some to the null bucket or to no block), weights in (0.1, 1.1), the own bucket
    appended last."""
    idx = torch.randint(0, Nk, (B, H, Nq, n))
    if null:
        idx[..., 0] = torch.where(torch.rand(B, H, Nq) < 0.5, Nk, idx[..., 0])
    if none:
        idx[..., -1] = torch.where(torch.rand(B, H, Nq) < 0.3, -1, idx[..., -1])
    w = torch.rand(B, H, Nq, n) + 0.1
    return with_own_bucket(idx, w) if own else (idx, w)


def kernel_heads(lay, q, k, v, idx, w, null_k, null_v, q_mask, kv_mask, **outputs):
    """The kernel's call over every (batch, head) of [B, H, T, D] tensors; outputs: name -> [B, H, ...] tensor."""
    B, H = q.shape[:2]
    heads = cpu.Heads(lay, q.shape[-1])
    per_head = lambda m, b, h: None if m is None else m[b, h if m.shape[1] > 1 else 0]
    for b in range(B):
        for h in range(H):
            null = [None if t is None else t[h] for t in (null_k, null_v)]
            heads.add(h >= H - lay.n_rotated_heads, q[b, h], k[b, h], v[b, h], idx[b, h], w[b, h], *null,
                      per_head(q_mask, b, h), per_head(kv_mask, b, h),
                      **{name: t[b, h] for name, t in outputs.items()})
    return heads


CASES = {
    'weighted': dict(),
    'causal, null bucket, rotated heads': dict(causal=True, null=True, rotated=2),
    'no block': dict(none=True),
    'masked': dict(masked=True),
    'causal, masked, no block': dict(causal=True, null=True, none=True, masked=True, rotated=1),
    'kv buckets of 8': dict(kbs=8, own=False),
    'unit weights (local heads)': dict(unit=True, none=True),
}


def run_case(case, B=2, H=3, T=64, D=16, bs=16, layer_aliases=False):
    """The kernel's outputs and gradients, and the reference's in fp32 and float64. Gradients are written over q,
    k, v; with layer_aliases as the fused layer writes them: the output over the queries, then (with the queries
    recomputed elsewhere) the output's gradient in their place and dq over it."""
    torch.manual_seed(0)
    causal, kbs = case.get('causal', False), case.get('kbs', bs)
    Nq, Nk = T // bs, T // kbs
    own = case.get('own', True)
    idx, w = routes(B, H, Nq, Nk, 2, own, case.get('null', False), case.get('none', False))
    if case.get('unit'):
        w = torch.ones_like(w)
    lay = blocks.Layout(Nq, bs, Nk, kbs, idx.shape[-1], causal, case.get('rotated', 0), case.get('null', False),
                        case.get('none', False), case.get('unit', False), D ** -0.5, 0.0, 0)
    mask = None
    if case.get('masked'):
        mask = torch.rand(B, 1, T) > 0.2
        mask[0, 0, :bs] = False  # a whole query bucket and key block of padding
    q64, k64, v64 = packed(B, H, T, D, torch.float64)
    null64 = [torch.randn(H, D, dtype=torch.float64) for _ in range(2)] if case.get('null') else [None, None]
    dout64 = torch.randn(B, H, T, D, dtype=torch.float64)

    def reference(dtype):
        q, k, v, dout = (t.to(dtype) for t in (q64, k64, v64, dout64))
        null = [None if t is None else t.to(dtype) for t in null64]
        out = torch.empty_like(q)
        blocks.forward(lay, q, k, v, idx, w.to(dtype), *null, mask, mask, out)
        dq, dk, dv = torch.empty_like(q), torch.zeros_like(k), torch.zeros_like(v)
        dw, dnk, dnv = blocks.backward(lay, True, q, k, v, idx, w.to(dtype), *null, mask, mask, dout, dq, dk, dv)
        return dict(out=out, dq=dq, dk=dk, dv=dv, dw=dw, dnull_k=dnk, dnull_v=dnv)

    # the kernel in the fused layer's way: q, k, v strided views of one buffer
    qkv = torch.stack([q64, k64, v64], 2).float().transpose(1, 3).contiguous()  # [B, T, 3, H, D]
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    null = [None if t is None else t.float() for t in null64]
    dout = dout64.float()
    if layer_aliases:  # the output takes the queries' place (backward's queries are a copy elsewhere)
        queries, out = q.clone(), q
    else:
        out = torch.empty(B, T, H, D).transpose(1, 2)
    cpu.forward(kernel_heads(lay, q, k, v, idx, w, *null, mask, mask, out=out))
    got = dict(out=out.clone())
    if layer_aliases:  # then the output's gradient takes the output's place, and dq the gradient's
        dout, q = q.copy_(dout), queries
    dq = dout if layer_aliases else q
    dw = torch.empty(B, H, *idx.shape[2:])
    dnull = [torch.zeros(B, H, D) for _ in range(2)] if null[0] is not None else []
    extra = dict(dnull_k=dnull[0], dnull_v=dnull[1]) if dnull else {}
    cpu.backward(kernel_heads(lay, q, k, v, idx, w, *null, mask, mask, dout=dout, dq=dq, dk=k, dv=v, dw=dw,
                              **extra))
    got.update(dq=dq, dk=k, dv=v, dw=dw)
    if dnull:
        got.update(dnull_k=dnull[0].sum(0), dnull_v=dnull[1].sum(0))
    return got, reference(torch.float32), reference(torch.float64)


@pytest.mark.parametrize('case', CASES.values(), ids=CASES.keys())
@pytest.mark.parametrize('layer_aliases', [False, True], ids=['dq over q', 'out over q, dq over dout'])
def test_kernel_equals_reference(case, layer_aliases):
    got, ref32, ref64 = run_case(case, layer_aliases=layer_aliases)
    for name, t in got.items():
        within_rule(t, ref32[name], ref64[name], name)


def test_every_build_equals_reference():
    """The avx2 and generic builds (which other CPUs run) against the reference, each in a process of its own."""
    code = ('import sys; sys.path.insert(0, "tests"); import test_cpu_kernel as t; '
            '[t.test_kernel_equals_reference(c, a) for c in t.CASES.values() for a in (False, True)]; '
            'from sinkhorn_kernels.ops.block_attention import cpu; print(cpu._cpu.isa)')
    for isa in ('avx2', 'generic'):
        env = dict(os.environ, SINKHORN_KERNELS_CPU_ISA=isa)
        run = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True)
        assert run.returncode == 0, run.stderr[-3000:]
        assert run.stdout.split()[-1] in (isa, 'generic')  # a CPU without AVX2 falls back to generic


LAYER_CONFIGS = [dict(), dict(causal=True), dict(n_top_buckets=2), dict(causal=True, n_top_buckets=3),
                 dict(n_sortcut=2), dict(kv_bucket_size=32, n_top_buckets=2), dict(n_local_attn_heads=2),
                 dict(causal=True, n_local_attn_heads=1), dict(causal=True, n_local_attn_heads=4)]


def layer_grads(layer, x, mask, weights):
    layer.zero_grad()
    x.grad = None
    y = layer(x, input_mask=mask)
    (y * weights.to(y.dtype)).sum().backward()
    return [y, x.grad] + [p.grad for p in layer.parameters()]


@pytest.mark.parametrize('cfg', LAYER_CONFIGS, ids=str)
@pytest.mark.parametrize('masked', [False, True])
@pytest.mark.parametrize('chunk_heads', [1, 3])
def test_fused_layer_on_the_kernel_equals_reference(cfg, masked, chunk_heads, monkeypatch):
    """SinkhornSelfAttention in fp32 runs the kernel (forward: one call per kind of head; backward: one per chunk
    of heads, a short last chunk included) and stays within the rule of the PyTorch path in float64."""
    monkeypatch.setattr(self_attention, 'backward_chunk_heads', lambda x, dim_head, groups: chunk_heads)
    B, T = 2, 128
    layer = SinkhornSelfAttention(32, 16, T, heads=4, dim_head=16, **cfg)
    x = torch.randn(B, T, 32, dtype=torch.float64, requires_grad=True)
    mask = None
    if masked:
        mask = torch.ones(B, T, dtype=torch.bool)
        mask[:, :21] = False
        mask[-1, -5:] = False
    weights = torch.randn(B, T, 32, dtype=torch.float64)
    calls = []  # (forward or backward, (batch, head) pairs)
    for name in ('forward', 'backward'):
        original = getattr(cpu, name)
        monkeypatch.setattr(cpu, name, lambda heads, scratch=None, f=original, n=name:
                            calls.append((n, len(heads.args))) or f(heads, scratch))
    x32 = x.detach().float().requires_grad_()
    got = layer_grads(layer, x32, mask, weights)
    local = cfg.get('n_local_attn_heads', 0)
    assert [c for c in calls if c[0] == 'forward'] == [('forward', B * n) for n in (local, 4 - local) if n]
    backward = [n for name, n in calls if name == 'backward']
    assert sum(backward) == B * 4 and max(backward) <= B * chunk_heads
    monkeypatch.setattr(cpu, 'enabled', False)
    ref32 = layer_grads(layer, x32, mask, weights)
    ref64 = layer_grads(layer.double(), x, mask, weights)
    for i, (a, b, c) in enumerate(zip(got, ref32, ref64)):
        within_rule(a, b, c, f'output / gradient {i}')


def test_kernel_applies_to_fp32_without_dropout_and_whole_vectors():
    x = torch.randn(1, 32, 16)
    assert cpu.applies(x, 16, 16, 0.0)
    assert not cpu.applies(x.double(), 16, 16, 0.0)
    assert not cpu.applies(x, 16, 16, 0.1)  # dropout draws its masks with torch's generator
    assert not cpu.applies(x, 8, 16, 0.0)
    assert not cpu.applies(x, 16, 24, 0.0)


@pytest.mark.skipif(not os.path.exists('/sys/kernel/mm/transparent_hugepage'), reason='no transparent huge pages')
def test_huge_page_advice_takes_the_whole_pages_of_a_buffer():
    t = torch.empty(4 << 20)
    ext = cpu_extension.extension
    assert ext.advise_huge_pages(t.data_ptr(), t.numel() * t.element_size())
    assert not ext.advise_huge_pages(t.data_ptr() + 1, 100)  # no whole page inside
    big = torch.empty(cpu_extension.HUGE_PAGES_MIN_BYTES // 4)
    assert cpu_extension.on_huge_pages(big.fill_(2)) is big and bool((big == 2).all())


def test_kernel_rejects_rows_that_are_not_unit_stride():
    lay = blocks.Layout(2, 16, 2, 16, 1, False, 0, False, False, True, 0.25, 0.0, 0)
    t = torch.randn(32, 16)
    with pytest.raises(ValueError, match='unit stride'):
        cpu.Heads(lay, 16).add(False, t.t().contiguous().t(), t, t, torch.zeros(2, 1, dtype=torch.long),
                               torch.ones(2, 1))
    with pytest.raises(ValueError, match='contiguous'):
        cpu.Heads(lay, 16).add(False, t, t, t, torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1),
                               dw=torch.empty(2, 2)[:, :1])
