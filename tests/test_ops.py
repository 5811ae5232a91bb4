"""The reference ops: gradcheck in float64 and agreement with a loop-by-loop oracle."""
import pytest
import torch

from sinkhorn_kernels import ops
from naive import naive_block_attention

f64 = dict(dtype=torch.float64)


def rand(*shape, grad=True):
    return torch.randn(*shape, **f64).requires_grad_(grad)


def test_sinkhorn_normalize_is_doubly_stochastic_and_gradchecks():
    x = rand(3, 7, 7)
    p = ops.sinkhorn_normalize(x, 40)
    torch.testing.assert_close(p.sum(-1), torch.ones(3, 7, **f64), atol=1e-6, rtol=0)
    torch.testing.assert_close(p.sum(-2), torch.ones(3, 7, **f64), atol=1e-12, rtol=0)
    assert torch.autograd.gradcheck(lambda t: ops.sinkhorn_normalize(t, 5), (rand(2, 5, 6),))


def test_gumbel_sinkhorn_noise_is_seeded_and_optional():
    s = torch.rand(2, 6, 6, **f64)
    torch.manual_seed(3)
    a = ops.gumbel_sinkhorn(s, 5, 0.7)
    torch.manual_seed(3)
    b = ops.gumbel_sinkhorn(s, 5, 0.7)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, ops.gumbel_sinkhorn(s, 5, 0.7))
    torch.testing.assert_close(ops.gumbel_sinkhorn(s, 5, 0.7, noise=False), ops.gumbel_sinkhorn(s, 5, 0.7, noise=False))


def test_topk_routing_matches_dense_definition_and_gradchecks():
    s = rand(2, 5, 9)
    idx, w = ops.topk_routing(s, 3, temperature=0.5)
    logits = (s / 0.5).detach().clone()
    for j in range(3):
        p = logits.softmax(-1)
        torch.testing.assert_close(w[..., j], p.max(-1).values)
        assert torch.equal(idx[..., j], p.argmax(-1))
        logits.scatter_(-1, idx[..., j:j + 1], float('-inf'))
    assert torch.autograd.gradcheck(lambda t: ops.topk_routing(t, 3, 0.5)[1], (s,))


def block_case(causal=False, sortcut=False, null=False, masks=False, own=True, kbs=4, rotated=0, K=2, bs=4):
    B, H, D, nq = 2, 3, 5, 4
    nk = nq * bs // kbs if own else 3
    q, k, v = rand(B, H, nq * bs, D), rand(B, H, nk * kbs, D), rand(B, H, nk * kbs, D)
    rows = 1 if sortcut else nq
    idx = torch.stack([torch.randperm(nk + (1 if null else 0))[:K] for _ in range(B * H * rows)]).view(B, H, rows, K)
    idx[0, 0, 0, -1] = -1  # a route to no block
    w = torch.rand(B, H, rows, K, **f64).requires_grad_()
    null_kv = (rand(H, D), rand(H, D)) if null else None
    qm = km = None
    if masks:
        qm = torch.rand(B, nq * bs) > 0.2
        km = torch.rand(B, nk * kbs) > 0.3
        qm[1] = False  # a fully masked sequence
    kw = dict(bucket_size=bs, kv_bucket_size=kbs, own_bucket=own, causal=causal, n_rotated_heads=rotated,
              null_kv=null_kv, q_mask=qm, kv_mask=km)
    return (q, k, v, idx, w), kw


CASES = {
    'plain': dict(),
    'masks': dict(masks=True),
    'sortcut': dict(sortcut=True, masks=True),
    'routed_only_other_kv_bucket': dict(own=False, kbs=2),
    'causal_null_rotated': dict(causal=True, null=True, rotated=2, masks=True),
    'causal_k3': dict(causal=True, null=True, rotated=1, K=3),
}


@pytest.mark.parametrize('case', CASES)
def test_block_attention_matches_naive_oracle(case):
    (q, k, v, idx, w), kw = block_case(**CASES[case])
    out = ops.block_attention(q, k, v, idx, w, **kw)
    expected = naive_block_attention(q, k, v, idx, w, **kw)
    torch.testing.assert_close(out, expected)
    assert torch.isfinite(out).all()
    if kw['q_mask'] is not None:
        assert (out[1] == 0).all()  # fully masked queries attend to nothing


@pytest.mark.parametrize('case', CASES)
def test_block_attention_gradcheck(case):
    (q, k, v, idx, w), kw = block_case(**CASES[case])
    inputs = [q, k, v, w] + (list(kw['null_kv']) if kw['null_kv'] is not None else [])

    def fn(q, k, v, w, *null):
        return ops.block_attention(q, k, v, idx, w, **{**kw, 'null_kv': tuple(null) or None})

    assert torch.autograd.gradcheck(fn, inputs)


def test_block_attention_dropout_is_seeded_and_backward_consistent():
    (q, k, v, idx, w), kw = block_case(masks=True)
    torch.manual_seed(5)
    a = ops.block_attention(q, k, v, idx, w, dropout_p=0.3, **kw)
    torch.manual_seed(5)
    b = ops.block_attention(q, k, v, idx, w, dropout_p=0.3, **kw)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, ops.block_attention(q, k, v, idx, w, **kw))

    def fn(q, k, v, w):
        torch.manual_seed(5)
        return ops.block_attention(q, k, v, idx, w, dropout_p=0.3, **kw)

    assert torch.autograd.gradcheck(fn, (q, k, v, w))


def test_block_attention_chunking_does_not_change_results(monkeypatch):
    from sinkhorn_kernels.ops.block_attention import reference
    (q, k, v, idx, w), kw = block_case(causal=True, null=True, rotated=2, masks=True)
    dout = torch.randn_like(q)

    def run():
        out = ops.block_attention(q, k, v, idx, w, **kw)
        return [out, *torch.autograd.grad(out, (q, k, v, w), dout)]

    whole = run()
    monkeypatch.setattr(reference, 'CHUNK_ELEMENTS', 1)  # one query bucket per chunk
    # the unchunked gradients pass gradcheck (test_block_attention_gradcheck): the chunked ones must equal them
    for chunked, expected in zip(run(), whole):
        torch.testing.assert_close(chunked, expected)


@pytest.mark.parametrize('kw', [dict(), dict(n_sortcut=2), dict(causal=True), dict(non_permutative=False),
                                dict(kv_bucket_size=2, n_top_buckets=2)])
def test_sinkhorn_attention_gradcheck(kw):
    B, H, T, D = 1, 2, 16, 3
    q, k, v = rand(B, H, T, D), rand(B, H, T, D), rand(B, H, T, D)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[:, -3:] = False
    extra = dict(null_kv=(rand(H, D), rand(H, D))) if kw.get('causal') else {}
    inputs = [q, k, v] + list(extra.get('null_kv', ()))

    def fn(q, k, v, *null):
        return ops.sinkhorn_attention(q, k, v, bucket_size=4, q_mask=mask, kv_mask=mask,
                                      **kw, **({'null_kv': tuple(null)} if null else {}))

    assert torch.autograd.gradcheck(fn, inputs)


def test_local_attention_matches_reference_package():
    from local_attention import LocalAttention
    for causal in (False, True):
        q, k, v = (rand(2, 3, 32, 8, grad=False) for _ in range(3))
        mask = torch.rand(2, 32) > 0.2
        ref = LocalAttention(8, causal, look_forward=0 if causal else 1)(q, k, v, input_mask=mask)
        ours = ops.local_attention(q, k, v, window_size=8, causal=causal, kv_mask=mask)
        torch.testing.assert_close(ours, ref)


@pytest.mark.parametrize('cfg', [dict(causal=False), dict(causal=True), dict(causal=False, n_sortcut=2)], ids=str)
def test_topk_routes_backward_equals_autograd(cfg):
    """The fused layer's hand-written routing backward against autograd through topk_routes."""
    from sinkhorn_kernels.ops.sinkhorn_attention import topk_routes, topk_routes_backward
    n_null = 2 if cfg['causal'] else 0
    rows = 1 if cfg.get('n_sortcut') else 6
    scores = torch.randn(2, 3, rows, 6 + n_null, dtype=torch.float64, requires_grad=True)
    opts = dict(n_top_buckets=2, n_sortcut=cfg.get('n_sortcut', 0), temperature=0.7, n_null=n_null,
                causal=cfg['causal'])
    _, w = topk_routes(scores, **opts)
    d_w = torch.randn_like(w)
    expected, = torch.autograd.grad(w, scores, d_w)
    torch.testing.assert_close(topk_routes_backward(scores.detach(), d_w, **opts), expected)
