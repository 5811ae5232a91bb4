"""One test per place where sinkhorn-transformer 0.11.4 is wrong (../shared/reference-notes.md, README)."""
import pytest
import torch

import sinkhorn_kernels as sk
from sinkhorn_kernels import ops
from sinkhorn_kernels.ops.sinkhorn_attention import attention_sort_scores, topk_routes
from conftest import reference_pair

LM = dict(num_tokens=40, dim=32, max_seq_len=128, depth=2, heads=4, bucket_size=16)


def test_1_routed_values_are_values():
    ref, ours = reference_pair('SinkhornSelfAttention', 32, 8, 64, heads=4, n_top_buckets=2, tie_values_to_keys=False)
    for m in (ref, ours):
        with torch.no_grad():
            m.to_kv.weight[32:] = 0  # v = 0: attention outputs 0, the layer outputs its bias
    x = torch.randn(2, 64, 32)
    torch.testing.assert_close(ours(x), ours.to_out.bias.expand(2, 64, 32))
    assert not torch.allclose(ref(x), ref.to_out.bias.expand(2, 64, 32))  # the reference routes keys as values


@pytest.mark.parametrize('n_top', [1, 2, 3])
def test_2_masked_keys_never_leak_for_any_n_top(n_top):
    B, H, T, D = 2, 4, 64, 8
    q, k, v = (torch.randn(B, H, T, D) for _ in range(3))
    mask = torch.rand(B, T) > 0.3
    null = (torch.randn(H, D), torch.randn(H, D))
    run = lambda k, v: ops.sinkhorn_attention(q, k, v, bucket_size=8, causal=True, n_top_buckets=n_top,
                                              null_kv=null, q_mask=mask, kv_mask=mask)
    noise = (~mask)[:, None, :, None] * 100
    torch.testing.assert_close(run(k + noise, v + noise)[:, :, mask[0]], run(k, v)[:, :, mask[0]])


def test_3_fully_masked_queries_attend_to_nothing():
    q, k, v = (torch.randn(1, 2, 32, 4) for _ in range(3))
    mask = torch.zeros(1, 32, dtype=torch.bool)
    for causal in (False, True):
        null = (torch.randn(2, 4), torch.randn(2, 4)) if causal else None
        out = ops.sinkhorn_attention(q, k, v, bucket_size=8, causal=causal, null_kv=null, q_mask=mask, kv_mask=mask)
        assert (out == 0).all()


def causal_leaks(model, x, mask):
    """Largest gradient of any output position with respect to any later input position."""
    x = x.clone().requires_grad_()
    out = model(x, input_mask=mask)
    worst = 0.
    for t in range(x.shape[1] - 1):
        grad, = torch.autograd.grad(out[:, t].sum(), x, retain_graph=True)
        worst = max(worst, grad[:, t + 1:].abs().max().item())
    return worst


CAUSAL_CONFIGS = {
    'n_top_1': dict(n_top_buckets=1),
    'n_top_2_local_heads': dict(n_top_buckets=2, n_local_attn_heads=1),
    'n_top_3': dict(n_top_buckets=3),
    'reversible': dict(n_top_buckets=2, reversible=True),
    'simple_sort_net': dict(n_top_buckets=2, use_simple_sort_net=True),
}


@pytest.mark.parametrize('name', CAUSAL_CONFIGS)
def test_3_no_output_depends_on_a_later_input_with_left_padding(name):
    model = sk.SinkhornTransformer(dim=16, depth=3, heads=4, bucket_size=8, max_seq_len=48, causal=True,
                                   **CAUSAL_CONFIGS[name]).eval()
    x = torch.randn(2, 48, 16)
    mask = torch.ones(2, 48, dtype=torch.bool)
    mask[0, :13] = False  # left padding, as AutoregressiveWrapper pads
    assert causal_leaks(model, x, mask) == 0


def test_3_reference_leaks_the_future_with_left_padding():
    import sinkhorn_transformer as st
    model = st.SinkhornTransformer(dim=16, depth=3, heads=4, bucket_size=8, max_seq_len=48, causal=True,
                                   n_top_buckets=2).eval()
    mask = torch.ones(2, 48, dtype=torch.bool)
    mask[0, :13] = False
    assert causal_leaks(model, torch.randn(2, 48, 16), mask) > 0


@pytest.mark.parametrize('kw', [dict(), dict(causal=True), dict(n_sortcut=2), dict(non_permutative=False),
                                dict(non_permutative=False, n_sortcut=2), dict(n_local_attn_heads=2),
                                dict(kv_bucket_size=32), dict(causal=True, use_simple_sort_net=True)])
@pytest.mark.parametrize('side', ['right', 'left'])
def test_4_padding_never_changes_real_outputs(kw, side):
    model = sk.SinkhornTransformerLM(**LM, **kw).eval()
    x = torch.randint(1, 40, (2, 128))
    mask = torch.ones(2, 128, dtype=torch.bool)
    pad = slice(100, None) if side == 'right' else slice(0, 28)
    mask[0, pad] = False
    other = x.clone()
    other[0, pad] = torch.randint(1, 40, other[0, pad].shape)
    torch.testing.assert_close(model(other, input_mask=mask)[mask], model(x, input_mask=mask)[mask])


def test_4_causal_routes_never_go_to_a_bucket_of_padding():
    """A key bucket without a real token summarizes to zero and would tie with the null buckets (score 0), which
    the backends break differently (torch.topk here, the lowest index in the Triton kernel): it scores -inf."""
    B, H, T, D, bs = 2, 2, 64, 8, 8
    q, k = torch.randn(B, H, T, D), torch.randn(B, H, T, D)
    mask = torch.ones(B, H, T, dtype=torch.bool)
    mask[..., :2 * bs + 3] = False  # two whole buckets of left padding, and part of the third
    scores = attention_sort_scores(q, k, bucket_size=bs, kv_bucket_size=bs, causal=True, n_null=2, q_mask=mask,
                                   kv_mask=mask)
    idx, _ = topk_routes(scores, causal=True, n_top_buckets=2, n_sortcut=0, temperature=0.75, n_null=2)
    assert not ((idx == 0) | (idx == 1)).any()
    assert (idx == 2).any()  # the partly padded bucket stays a candidate


def test_5_decoder_mask_is_not_applied_to_the_context():
    layer = sk.SinkhornSelfAttention(32, 16, 64, heads=4, context_only=True, n_sortcut=2)
    x, context = torch.randn(2, 64, 32), torch.randn(2, 128, 32)
    mask = torch.ones(2, 64, dtype=torch.bool)
    mask[:, 40:] = False
    real_context = torch.ones(2, 128, dtype=torch.bool)
    torch.testing.assert_close(layer(x, input_mask=mask, context=context),
                               layer(x, input_mask=mask, context=context, context_mask=real_context))


def test_6_context_is_projected_and_dim_head_may_differ():
    model = sk.SinkhornTransformer(dim=32, depth=1, heads=4, dim_head=12, bucket_size=16, receives_context=True)
    out = model(torch.randn(2, 64, 32), context=torch.randn(2, 96, 32))
    assert out.shape == (2, 64, 32)
    ctx_layer = model.layers[1][0].fn
    assert ctx_layer.to_kv.weight.shape == (2 * 48, 32)


def test_7_return_embeddings_with_emb_dim():
    model = sk.SinkhornTransformerLM(**LM, emb_dim=24, return_embeddings=True)
    assert model(torch.randint(0, 40, (2, 128))).shape == (2, 128, 32)


def test_8_sortcut_with_gumbel_sinkhorn_and_masks():
    model = sk.SinkhornTransformerLM(**LM, non_permutative=False, n_sortcut=2)
    mask = torch.ones(2, 128, dtype=torch.bool)
    mask[1, 90:] = False
    assert torch.isfinite(model(torch.randint(0, 40, (2, 128)), input_mask=mask)).all()


def test_9_eval_is_deterministic_in_gumbel_mode():
    model = sk.SinkhornTransformerLM(**LM, non_permutative=False).eval()
    x = torch.randint(0, 40, (2, 128))
    torch.testing.assert_close(model(x), model(x))
    model.train()
    assert not torch.allclose(model(x), model(x))  # training keeps its Gumbel noise


def test_10_reversible_backward_in_eval_equals_plain_autograd():
    model = sk.SinkhornTransformer(dim=16, depth=2, heads=4, bucket_size=8, causal=True, reversible=True).eval()
    x = torch.randn(2, 32, 16, requires_grad=True)
    model(x).square().sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    # the same network with ordinary autograd through every block
    x2 = x.detach().clone().requires_grad_()
    x1_, x2_ = x2, x2
    for f, g in model.layers:
        x1_ = x1_ + f(x2_)
        x2_ = x2_ + g(x1_)
    (x1_ + x2_).square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, atol=1e-5, rtol=1e-4)
    for p, g in zip(model.parameters(), grads):
        torch.testing.assert_close(g, p.grad, atol=1e-5, rtol=1e-4)


def test_random_truncation_keeps_the_callers_mask():
    from sinkhorn_kernels.autoregressive import random_truncate_inputs
    x = torch.arange(1, 21).repeat(3, 1)
    mask = torch.ones(3, 20, dtype=torch.bool)
    mask[:, 1] = False
    seqs, masks = random_truncate_inputs(x, mask)
    for s, m in zip(seqs, masks):
        assert not m[s == 2].any()  # token 2 sat at the masked position
        assert not m[s == 0].any()  # left padding is masked
