"""Bad input gets a ValueError that names the problem and the fix; fully masked input stays finite."""
import pytest
import torch

import sinkhorn_kernels as sk
from sinkhorn_kernels import ops

LM = dict(num_tokens=40, dim=32, max_seq_len=128, depth=1, heads=4, bucket_size=16)


def raises(match, fn, *args, **kwargs):
    with pytest.raises(ValueError, match=match):
        fn(*args, **kwargs)


def test_sequence_not_a_bucket_multiple_points_to_autopadder():
    raises('Autopadder', sk.SinkhornTransformerLM(**LM), torch.randint(0, 40, (1, 100)))
    padded = sk.Autopadder(sk.SinkhornTransformerLM(**LM))
    assert padded(torch.randint(0, 40, (1, 100))).shape == (1, 100, 40)


def test_longer_than_max_seq_len():
    raises('exceeds max_seq_len 128', sk.SinkhornTransformerLM(**LM), torch.randint(0, 40, (1, 144)))


def test_context_batch_or_width_mismatch():
    model = sk.SinkhornTransformer(dim=32, depth=1, heads=4, bucket_size=16, receives_context=True)
    x = torch.randn(2, 32, 32)
    raises('context must be', model, x, context=torch.randn(3, 32, 32))
    raises('context must be', model, x, context=torch.randn(2, 32, 16))
    raises('needs context', model, x)
    raises('receives_context=True', sk.SinkhornTransformer(dim=32, depth=1, bucket_size=16), x, context=x)


def test_bad_configurations():
    raises('SortCut', sk.SinkhornSelfAttention, 32, 16, 64, causal=True, n_sortcut=2)
    raises('n_local_attn_heads', sk.SinkhornSelfAttention, 32, 16, 64, heads=4, n_local_attn_heads=5)
    raises('divisible', sk.SinkhornSelfAttention, 30, 16, 64, heads=4)
    raises('max_seq_len', sk.SinkhornTransformerLM, 10, 32, 100, 1, bucket_size=16)


def test_masks_of_wrong_shape_or_dtype():
    model = sk.SinkhornTransformerLM(**LM)
    x = torch.randint(0, 40, (2, 128))
    raises('torch.bool', model, x, input_mask=torch.ones(2, 128))
    raises('shape', model, x, input_mask=torch.ones(2, 64, dtype=torch.bool))


def test_op_inputs():
    q = torch.randn(1, 2, 32, 4)
    raises('batch, heads, seq, dim_head', ops.sinkhorn_attention, q[0], q[0], q[0], bucket_size=8)
    raises('not a multiple of the bucket size', ops.sinkhorn_attention, q, q, q, bucket_size=5)
    raises('null_kv', ops.sinkhorn_attention, q, q, q, bucket_size=8, causal=True)
    raises('k must be', ops.topk_routing, torch.randn(2, 3), 4)
    raises('dropout_p', ops.sinkhorn_attention, q, q, q, bucket_size=8, dropout_p=1.5)


def test_backends_report_and_reject_clearly():
    report = sk.available_backends()
    assert report['reference'] == (True, 'available')
    q = torch.randn(1, 2, 32, 4)
    raises('unknown backend', ops.sinkhorn_attention, q, q, q, bucket_size=8, backend='tpu')
    for name in ('triton', 'cuda'):
        if not report[name][0]:
            raises(f'backend {name!r} is not available', ops.sinkhorn_attention, q, q, q, bucket_size=8, backend=name)
    raises('unknown backend', sk.set_backend, 'nope')


def test_fully_masked_inputs_give_finite_outputs_and_gradients():
    for kw in (dict(), dict(causal=True), dict(non_permutative=False), dict(n_local_attn_heads=2)):
        model = sk.SinkhornTransformerLM(**LM, **kw)
        out = model(torch.randint(0, 40, (2, 128)), input_mask=torch.zeros(2, 128, dtype=torch.bool))
        out.sum().backward()
        assert torch.isfinite(out).all()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
