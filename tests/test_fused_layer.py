"""The fused self-attention layer (ops.sinkhorn_self_attention, the reference backend's path for
SinkhornSelfAttention) against the same layer composed of separate ops and autograd."""
import pytest
import torch

import sinkhorn_kernels as sk
from sinkhorn_kernels import ops
from sinkhorn_kernels.attention import SinkhornSelfAttention
from sinkhorn_kernels.ops import outputs, self_attention
from sinkhorn_kernels.ops.summaries import add_sort_summaries_vjp, sort_summaries
from rules import assert_within_rule

f64 = dict(dtype=torch.float64)
CONFIGS = [dict(), dict(causal=True), dict(n_top_buckets=2), dict(causal=True, n_top_buckets=3), dict(n_sortcut=2),
           dict(kv_bucket_size=8, n_top_buckets=2), dict(kv_bucket_size=2), dict(n_local_attn_heads=2),
           dict(causal=True, n_local_attn_heads=1), dict(n_local_attn_heads=4), dict(causal=True, n_local_attn_heads=4)]


def weighted_sum(y):
    return (y * torch.linspace(-1, 1, y.numel(), **f64).view_as(y)).sum()


def forward_backward(layer, x, mask, fused, monkeypatch, loss=weighted_sum, backend='reference'):
    """Output, input gradient and parameter gradients on `backend`; counts the fused op's calls (its Function on
    the reference backend, `self_attention_fused`'s on the others)."""
    from sinkhorn_kernels.ops import self_attention_fused
    function = self_attention.SelfAttentionFunction if backend == 'reference' else \
        self_attention_fused.FusedSelfAttention
    calls = []
    apply = function.apply
    with monkeypatch.context() as m:
        m.setattr(function, 'apply', lambda *a: calls.append(1) or apply(*a))
        # at these sizes the layer op would run whole groups of heads, where it saves no memory
        m.setattr(self_attention_fused, 'saves_memory', lambda *a: True)
        m.setattr(outputs, 'FILL', float('nan'))  # a buffer element the layer op forgets to write fails
        if not fused:
            m.setattr(SinkhornSelfAttention, '_runs_fused', lambda self, x: False)
        layer.zero_grad()
        x.grad = None
        sk.set_backend(backend)
        try:
            y = layer(x, input_mask=mask)
            loss(y).backward()
        finally:
            sk.set_backend(None)
    assert len(calls) == (1 if fused else 0)
    return [y, x.grad] + [p.grad for p in layer.parameters()]


def padded(batch, T=32, left=5):
    """Left padding everywhere, right padding in the last sequence."""
    mask = torch.ones(batch, T, dtype=torch.bool)
    mask[:, :left] = False
    mask[-1, -3:] = False
    return mask


def assert_results_equal(ours, expected, atol, rtol):
    """The same gradients exist on both sides, and agree."""
    for a, b in zip(ours, expected):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, atol=atol, rtol=rtol)


@pytest.mark.parametrize('cfg', CONFIGS, ids=str)
@pytest.mark.parametrize('masked', [False, True])
@pytest.mark.parametrize('batch', [1, 2])
def test_fused_layer_equals_composed_ops(cfg, masked, batch, monkeypatch):
    layer = SinkhornSelfAttention(16, 4, 32, heads=4, dim_head=5, **cfg).double()
    x = torch.randn(batch, 32, 16, **f64, requires_grad=True)
    mask = padded(batch) if masked else None
    fused = forward_backward(layer, x, mask, True, monkeypatch)
    assert_results_equal(fused, forward_backward(layer, x, mask, False, monkeypatch), atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize('chunk', [1, 4 * 12 * 3], ids=['one bucket', 'short last chunk'])
def test_fused_layer_chunking_does_not_change_results(chunk, monkeypatch):
    """The chunk workspace is cut to every chunk, a short last one included: results equal one chunk per head."""
    from sinkhorn_kernels.ops.block_attention import reference
    layer = SinkhornSelfAttention(16, 4, 32, heads=4, dim_head=5, causal=True, n_local_attn_heads=1).double()
    x = torch.randn(2, 32, 16, **f64, requires_grad=True)
    mask = torch.ones(2, 32, dtype=torch.bool)
    mask[0, :3] = False
    monkeypatch.setattr(reference, 'CHUNK_ELEMENTS', 1 << 20)  # every head in one chunk
    whole = forward_backward(layer, x, mask, True, monkeypatch)
    monkeypatch.setattr(reference, 'CHUNK_ELEMENTS', chunk)
    for a, b in zip(forward_backward(layer, x, mask, True, monkeypatch), whole):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize('cfg', [dict(), dict(causal=True, n_local_attn_heads=1)], ids=str)
@pytest.mark.parametrize('chunk_heads', [1, 3])
def test_fused_layer_backward_chunks_of_heads_do_not_change_results(cfg, chunk_heads, monkeypatch):
    """Backward recomputes the queries a chunk of heads at a time (a short last chunk included): the results equal
    those of one chunk per group."""
    layer = SinkhornSelfAttention(16, 4, 32, heads=4, dim_head=5, **cfg).double()
    x = torch.randn(2, 32, 16, **f64, requires_grad=True)
    mask = torch.ones(2, 32, dtype=torch.bool)
    mask[0, :3] = False
    monkeypatch.setattr(self_attention, 'backward_chunk_heads', lambda x, dim_head, groups: 4)
    whole = forward_backward(layer, x, mask, True, monkeypatch)
    monkeypatch.setattr(self_attention, 'backward_chunk_heads', lambda x, dim_head, groups: chunk_heads)
    for a, b in zip(forward_backward(layer, x, mask, True, monkeypatch), whole):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize('rows', [5, 2048], ids=['blocks of 5 rows', 'one block'])
def test_fused_layer_takes_an_expanded_output_gradient(rows, monkeypatch):
    """A sum's gradient is an expanded tensor: the output projection's backward makes it dense a block of rows at
    a time (a short last block included) and gives the composed ops' gradients."""
    monkeypatch.setattr(self_attention, 'DY_ROWS', rows)
    layer = SinkhornSelfAttention(16, 4, 32, heads=4, dim_head=5, causal=True, n_local_attn_heads=1).double()
    x = torch.randn(2, 32, 16, **f64, requires_grad=True)
    fused = forward_backward(layer, x, None, True, monkeypatch, loss=torch.sum)
    composed = forward_backward(layer, x, None, False, monkeypatch, loss=torch.sum)
    for a, b in zip(fused, composed):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize('cfg', [dict(), dict(causal=True, n_local_heads=1), dict(n_sortcut=1)], ids=str)
def test_sinkhorn_self_attention_gradients_with_dropout(cfg):
    B, T, dim, H, D = 1, 16, 6, 2, 3
    rand = lambda *s: torch.randn(*s, **f64, requires_grad=True)
    n_null = H - cfg.get('n_local_heads', 0)
    inputs = [rand(B, T, dim), rand(H * D, dim), rand(2 * H * D, dim), rand(dim, H * D), rand(dim)]
    if cfg.get('causal'):
        inputs += [rand(n_null, 1, D), rand(n_null, 1, D)]
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[:, -2:] = False

    def fn(x, wq, wkv, wo, bo, *null):
        torch.manual_seed(1)
        return ops.sinkhorn_self_attention(x, wq, wkv, wo, bo, heads=H, bucket_size=4, input_mask=mask,
                                           null_kv=tuple(null) or None, dropout_p=0.3, **cfg)

    torch.testing.assert_close(fn(*inputs), fn(*inputs))
    # every gradient against a central difference of the seeded forward, along a random direction (gradcheck's
    # column-by-column Jacobian would rebuild the buffers once per column)
    r = torch.randn_like(fn(*inputs))
    (fn(*inputs) * r).sum().backward()
    directions = [torch.randn_like(t) for t in inputs]
    eps = 1e-6
    shifted = lambda sign: (fn(*[t.detach() + sign * eps * d for t, d in zip(inputs, directions)]) * r).sum()
    numeric = (shifted(1) - shifted(-1)) / (2 * eps)
    analytic = sum((t.grad * d).sum() for t, d in zip(inputs, directions))
    torch.testing.assert_close(analytic, numeric, atol=1e-7, rtol=1e-6)


def test_fused_layer_backward_can_run_again():
    """The first backward turns the saved buffers into gradients; a second one (retain_graph) rebuilds them, with
    the same dropout masks."""
    layer = SinkhornSelfAttention(8, 4, 16, heads=2, causal=True, attn_dropout=0.5).double().train()
    x = torch.randn(1, 16, 8, **f64, requires_grad=True)
    y = (layer(x) * torch.randn(1, 16, 8, **f64)).sum()
    first = torch.autograd.grad(y, [x] + list(layer.parameters()), retain_graph=True)
    second = torch.autograd.grad(y, [x] + list(layer.parameters()))
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.parametrize('cfg', [dict(causal=False), dict(causal=True), dict(causal=False, n_sortcut=1),
                                 dict(causal=False, kv_bucket_size=2)], ids=str)
@pytest.mark.parametrize('masked', [False, True])
def test_sort_summaries_vjp_equals_autograd(cfg, masked):
    B, H, T, D = 2, 3, 16, 4
    cfg = dict(bucket_size=4, kv_bucket_size=cfg.pop('kv_bucket_size', 4), **cfg)
    q, k = (torch.randn(B, H, T, D, **f64, requires_grad=True) for _ in range(2))
    mask = torch.rand(B, T) > 0.3 if masked else None
    masks = dict(q_mask=None if mask is None else mask[:, None], kv_mask=None if mask is None else mask[:, None])
    sq, sk_ = sort_summaries(q, k, **cfg, **masks)
    d_sq, d_sk = torch.randn_like(sq), torch.randn_like(sk_)
    expected = torch.autograd.grad((sq, sk_), (q, k), (d_sq, d_sk))
    dq, dk = torch.zeros(B, H, T, D, **f64), torch.zeros(B, T, H, D, **f64).transpose(1, 2)  # any strides
    add_sort_summaries_vjp(d_sq, d_sk, dq, dk, **cfg, **masks)
    torch.testing.assert_close(dq, expected[0])
    torch.testing.assert_close(dk, expected[1])


def test_sinkhorn_self_attention_names_the_dtypes_of_each_backend():
    x, w = torch.randn(1, 8, 4), torch.randn(4, 4)
    with pytest.raises(ValueError, match='reference backend takes float32 or float64'):
        ops.sinkhorn_self_attention(x.half(), w, torch.randn(8, 4), w, torch.randn(4), heads=2, bucket_size=4)
    if sk.available_backends()['triton'][0]:
        with pytest.raises(ValueError, match='triton backend takes float16, bfloat16 or float32'):
            ops.sinkhorn_self_attention(x.double(), w, torch.randn(8, 4), w, torch.randn(4), heads=2, bucket_size=4,
                                        backend='triton')


def test_layer_uses_the_fused_op_only_where_it_applies():
    x = torch.randn(1, 16, 8)
    assert SinkhornSelfAttention(8, 4, 16, heads=2)._runs_fused(x)
    assert not SinkhornSelfAttention(8, 4, 16, heads=2, use_simple_sort_net=True)._runs_fused(x)
    assert not SinkhornSelfAttention(8, 4, 16, heads=2, non_permutative=False)._runs_fused(x)
    assert not SinkhornSelfAttention(8, 4, 16, heads=2, context_only=True)._runs_fused(x)
    assert not SinkhornSelfAttention(8, 4, 16, heads=2)._runs_fused(x.half())
    if not sk.available_backends()['triton'][0]:
        return
    from sinkhorn_kernels.ops import self_attention_fused
    sk.set_backend('triton')
    try:
        layer = SinkhornSelfAttention(8, 4, 16, heads=2)
        assert not layer._runs_fused(x)  # one chunk of both heads: more memory than the composed ops
        with pytest.MonkeyPatch.context() as m:
            m.setattr(self_attention_fused, 'chunk_heads', lambda x, dim_head: 1)
            assert layer._runs_fused(x) and layer._runs_fused(x.half()) and not layer._runs_fused(x.double())
    finally:
        sk.set_backend(None)


# the same layer op on the Triton kernels (`self_attention_fused`); without a GPU they run in the interpreter
needs_triton = pytest.mark.skipif(not sk.available_backends()['triton'][0], reason='triton is not available')


def on_triton(layer, x, mask, fused, monkeypatch):
    return forward_backward(layer, x, mask, fused, monkeypatch, backend='triton')


# two heads (the interpreter's time grows with the programs launched): causal, one in the rotated frame
TRITON_CONFIGS = [dict(), dict(causal=True), dict(causal=True, n_top_buckets=3), dict(n_sortcut=2),
                  dict(kv_bucket_size=8, n_top_buckets=2), dict(kv_bucket_size=2), dict(n_local_attn_heads=1),
                  dict(causal=True, n_local_attn_heads=1), dict(causal=True, n_local_attn_heads=2)]


@needs_triton
@pytest.mark.parametrize('cfg', TRITON_CONFIGS, ids=str)
def test_fused_layer_on_triton_equals_composed_ops(cfg, monkeypatch):
    """Chunks of heads, rotation by rows and recomputed q, k, v and outputs give the composed ops' results on the
    same kernels (fp32)."""
    layer = SinkhornSelfAttention(16, 4, 16, heads=2, dim_head=8, **cfg)
    x = torch.randn(2, 16, 16, requires_grad=True)
    mask = padded(2, T=16)
    fused = on_triton(layer, x, mask, True, monkeypatch)
    assert_results_equal(fused, on_triton(layer, x, mask, False, monkeypatch), atol=2e-5, rtol=1e-5)


@needs_triton
@pytest.mark.parametrize('cfg', [dict(), dict(causal=True), dict(n_sortcut=2)], ids=str)
def test_fused_layer_on_triton_routes_groups_of_several_chunks_from_x(cfg, monkeypatch):
    """A group of heads run in several chunks routes from the summaries of x, which the summary kernels take as
    heads of at most SUMMARY_DIMS dims (264 = 3 x 88), and takes the routes' gradient to dx and the weights."""
    from sinkhorn_kernels.ops import self_attention_fused
    assert self_attention_fused.x_heads(264) == 3
    monkeypatch.setattr(self_attention_fused, 'chunk_heads', lambda x, dim_head: 1)
    routed = []
    route = self_attention_fused._Routing.route
    monkeypatch.setattr(self_attention_fused._Routing, 'route', lambda *a: routed.append(1) or route(*a))
    layer = SinkhornSelfAttention(264, 4, 16, heads=4, dim_head=8, **cfg)
    x = torch.randn(2, 16, 264, requires_grad=True)
    mask = padded(2, T=16)
    fused = on_triton(layer, x, mask, True, monkeypatch)
    assert len(routed) == (2 if cfg.get('causal') else 1)
    assert_results_equal(fused, on_triton(layer, x, mask, False, monkeypatch), atol=2e-5, rtol=1e-5)


@needs_triton
@pytest.mark.parametrize('cfg', [dict(), dict(causal=True, n_local_attn_heads=1)], ids=str)
def test_fused_layer_on_triton_in_fp16_keeps_to_the_rule(cfg, monkeypatch):
    """fp16 against the fp64 reference: at most twice the composed ops' error on the same kernels."""
    layer = SinkhornSelfAttention(16, 4, 16, heads=2, dim_head=8, **cfg)
    x = torch.randn(2, 16, 16)
    mask = padded(2, T=16)
    exact = forward_backward(layer.double(), x.double().requires_grad_(), mask, False, monkeypatch)
    layer.half()
    fused = on_triton(layer, x.half().requires_grad_(), mask, True, monkeypatch)
    composed = on_triton(layer, x.half().requires_grad_(), mask, False, monkeypatch)
    names = ['y', 'dx'] + [n for n, _ in layer.named_parameters()]
    for name, a, b, e in zip(names, fused, composed, exact):
        assert_within_rule(a, b, e, name, slack=1e-3 * max(1.0, e.abs().max().item()))


@needs_triton
@pytest.mark.parametrize('cfg', [dict(), dict(causal=True, n_local_attn_heads=1)], ids=str)
@pytest.mark.parametrize('heads_per_chunk', [1, 2])
def test_fused_layer_on_triton_chunks_of_heads_do_not_change_results(cfg, heads_per_chunk, monkeypatch):
    from sinkhorn_kernels.ops import self_attention_fused
    layer = SinkhornSelfAttention(12, 4, 16, heads=3, dim_head=4, **cfg)
    x = torch.randn(2, 16, 12, requires_grad=True)
    mask = padded(2, T=16)
    monkeypatch.setattr(self_attention_fused, 'chunk_heads', lambda x, dim_head: 8)
    whole = on_triton(layer, x, mask, True, monkeypatch)
    monkeypatch.setattr(self_attention_fused, 'chunk_heads', lambda x, dim_head: heads_per_chunk)
    for a, b in zip(on_triton(layer, x, mask, True, monkeypatch), whole):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)


def saved_bytes(layer, x, backend):
    """Bytes that autograd keeps from forward to backward, besides x and the parameters."""
    own = {t.untyped_storage().data_ptr() for t in [x, *layer.parameters()]}
    saved = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in own:
            saved[s.data_ptr()] = s.nbytes()
        return t

    sk.set_backend(backend)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            layer(x)
    finally:
        sk.set_backend(None)
    return sum(saved.values())


@needs_triton
@pytest.mark.parametrize('causal', [False, True])
def test_fused_layer_on_triton_keeps_only_the_routes(causal, monkeypatch):
    from sinkhorn_kernels.ops import self_attention_fused
    monkeypatch.setattr(self_attention_fused, 'saves_memory', lambda *a: True)
    B, T, dim, H, D = 1, 256, 64, 4, 16
    layer = SinkhornSelfAttention(dim, 16, T, heads=H, dim_head=D, causal=causal)
    x = torch.randn(B, T, dim, requires_grad=True)
    output = B * T * H * D * x.element_size()
    # the routes and what their backward reads: a few numbers per bucket, the bucket summaries, the scores
    assert saved_bytes(layer, x, 'triton') <= output / 2
    monkeypatch.setattr(SinkhornSelfAttention, '_runs_fused', lambda self, x: False)
    assert saved_bytes(layer, x, 'triton') >= 4 * output  # the composed ops keep q, k, v and the output


@needs_triton
def test_fused_layer_on_triton_gives_each_chunk_its_own_dropout_masks(monkeypatch):
    """Heads with the same weights give the same outputs, until dropout: then each chunk (numbering its heads from
    0) must draw its own masks."""
    from sinkhorn_kernels.ops import self_attention_fused
    calls = []
    apply = self_attention_fused.FusedSelfAttention.apply
    monkeypatch.setattr(self_attention_fused, 'chunk_heads', lambda x, dim_head: 1)
    monkeypatch.setattr(self_attention_fused.FusedSelfAttention, 'apply', lambda *a: calls.append(1) or apply(*a))
    H, D = 3, 4
    layer = SinkhornSelfAttention(H * D, 4, 32, heads=H, dim_head=D, attn_dropout=0.5).train()
    with torch.no_grad():
        for w in (layer.to_q.weight, *layer.to_kv.weight.chunk(2)):
            w.copy_(w[:D].repeat(H, 1))
        layer.to_out.weight.copy_(torch.eye(H * D))
        layer.to_out.bias.zero_()
    x = torch.randn(1, 32, H * D)
    sk.set_backend('triton')
    try:
        heads = layer(x).view(1, 32, H, D).unbind(2)
        layer.attn_dropout = 0.
        same = layer(x).view(1, 32, H, D).unbind(2)
    finally:
        sk.set_backend(None)
    assert all(torch.allclose(h, same[0], atol=1e-5) for h in same[1:])
    assert all(not torch.allclose(h, heads[0], atol=1e-3) for h in heads[1:])
    assert len(calls) == 2


@needs_triton
@pytest.mark.parametrize('cfg', [dict(), dict(causal=True, n_local_attn_heads=1)], ids=str)
def test_fused_layer_on_triton_gradients_with_dropout(cfg, monkeypatch):
    """Every gradient against a central difference of the seeded forward along a random direction."""
    from sinkhorn_kernels.ops import self_attention_fused
    calls = []
    apply = self_attention_fused.FusedSelfAttention.apply
    monkeypatch.setattr(self_attention_fused, 'saves_memory', lambda *a: True)
    monkeypatch.setattr(self_attention_fused.FusedSelfAttention, 'apply', lambda *a: calls.append(1) or apply(*a))
    layer = SinkhornSelfAttention(16, 4, 16, heads=2, dim_head=8, attn_dropout=0.3, **cfg).train()
    x = torch.randn(1, 16, 16)
    r = torch.randn(1, 16, 16)
    params = list(layer.parameters())
    mask = padded(1, T=16, left=3)

    def f(x):
        torch.manual_seed(5)
        sk.set_backend('triton')
        try:
            return (layer(x, input_mask=mask) * r).sum()
        finally:
            sk.set_backend(None)

    leaves = [x.clone().requires_grad_()]
    f(leaves[0]).backward()
    direction = [torch.randn_like(t) for t in [x, *params]]
    analytic = sum((t.grad * d).sum() for t, d in zip([leaves[0], *params], direction))
    eps = 1e-3  # small enough that no route changes between the two sides
    shifted = []
    for sign in (1, -1):
        with torch.no_grad():
            for p, d in zip(params, direction[1:]):
                p.add_(sign * eps * d)
            shifted.append(f(x + sign * eps * direction[0]))
            for p, d in zip(params, direction[1:]):
                p.sub_(sign * eps * d)
    numeric = (shifted[0] - shifted[1]) / (2 * eps)
    assert abs(numeric - analytic) <= 1e-2 * max(1.0, abs(analytic)), (numeric, analytic)
    assert len(calls) == 3
