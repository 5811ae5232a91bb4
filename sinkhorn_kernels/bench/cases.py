"""What the suite measures: for each op, the implementations to compare and how to build one call of each.

A case builder returns (fn, inputs_requiring_grad, flops_fwd, io_bytes_fwd) for one configuration; `fn()` runs
the forward and returns a tensor to backpropagate from.
"""
import importlib.util

import torch
import torch.nn.functional as F

import sinkhorn_kernels as sk
from sinkhorn_kernels.ops import available_backends

OPS = ('sinkhorn', 'gumbel_sinkhorn', 'sinkhorn_attention', 'layer', 'lm')
# ops on routing matrices alone: no causal variant, sized by the buckets of a sequence
SINKHORN_OPS = ('sinkhorn', 'gumbel_sinkhorn')
GUMBEL_TEMPERATURE = 0.75  # SinkhornSelfAttention's default
DIM, HEADS = 512, 8
# the suffix of an implementation measured under torch.compile (default mode), e.g. 'reference+compile'
COMPILED = '+compile'


def has_reference():
    return importlib.util.find_spec('sinkhorn_transformer') is not None


def implementations(op, device):
    """The implementation names that can be measured for `op` on `device`: ours on every backend present, the
    reference, each of those also under torch.compile, and dense attention where it is comparable."""
    ours = [f'sinkhorn_kernels[{name}]' for name, (ok, _) in available_backends().items()
            if ok and (name == 'reference' or device == 'cuda')]
    ours += ['reference'] if has_reference() else []
    dense = []
    if op == 'sinkhorn_attention':
        dense.append('sdpa')
        if device == 'cuda':
            dense.append('flex')  # compiled already
    return ours + [impl + COMPILED for impl in ours] + dense


def backend_of(impl):
    """'sinkhorn_kernels[triton]' (or with the compile suffix) -> 'triton'; None for the other implementations."""
    impl = impl.removesuffix(COMPILED)
    return impl[len('sinkhorn_kernels['):-1] if impl.startswith('sinkhorn_kernels[') else None


def build(op, impl, cfg, device, dtype):
    """(fn, inputs_requiring_grad, flops_fwd, io_bytes_fwd) of one implementation; a compiled one starts from an
    empty compile cache, so that no earlier case's graphs count against the recompile limit (past which torch
    would run the function eagerly under the compiled name)."""
    base = impl.removesuffix(COMPILED)
    fn, leaves, flops, io = _build(op, base, cfg, device, dtype)
    if base != impl:
        torch.compiler.reset()
        fn = torch.compile(fn)
    return _with_backend(impl, fn), leaves, flops, io


def attention_keys_per_query(cfg):
    """Keys each query attends to (blocks actually computed): own bucket plus routed buckets (+ null for causal)."""
    return cfg['bucket_size'] * (1 + cfg['n_top'])


def _build(op, impl, cfg, device, dtype):
    torch.manual_seed(0)
    B, H, T, D = cfg['batch'], cfg['heads'], cfg['seq_len'], cfg['dim_head']
    causal, bucket = cfg['causal'], cfg['bucket_size']
    elem = torch.finfo(dtype).bits // 8
    if op in SINKHORN_OPS:
        n, iters, gumbel = cfg['buckets'], cfg['sinkhorn_iter'], op == 'gumbel_sinkhorn'
        # Gumbel-Sinkhorn takes non-negative scores (it adds the log and the noise), Sinkhorn normalization log-scores
        x = (torch.rand if gumbel else torch.randn)(cfg['matrices'], n, n, device=device, dtype=dtype,
                                                     requires_grad=True)
        if impl == 'reference':
            from sinkhorn_transformer import sinkhorn_transformer as ref
            fn = ((lambda: ref.gumbel_sinkhorn(x, iters, GUMBEL_TEMPERATURE)) if gumbel else
                  (lambda: ref.sinkhorn_sorting_operator(x, iters)))
        elif gumbel:
            fn = lambda: sk.ops.gumbel_sinkhorn(x, iters, GUMBEL_TEMPERATURE, backend=backend_of(impl))
        else:
            fn = lambda: sk.ops.sinkhorn_normalize(x, iters, backend=backend_of(impl))
        # per iteration: two logsumexp passes (max, exp, sum, log) and two subtractions over the matrix
        return fn, [x], 10 * x.numel() * iters, 2 * x.numel() * elem

    if op == 'sinkhorn_attention':
        q, k, v = (torch.randn(B, H, T, D, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
        io = 4 * B * H * T * D * elem
        if impl == 'sdpa':
            fn = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal)
            return fn, [q, k, v], 4 * B * H * T * T * D // (2 if causal else 1), io
        keys = attention_keys_per_query(cfg)
        if impl == 'flex':
            fn = flex_with_routes(q, k, v, bucket, cfg['n_top'], causal)
            return fn, [q, k, v], 4 * B * H * T * keys * D, io
        flops = 4 * B * H * T * keys * D
        io += 2 * B * H * T * cfg['n_top'] * D * elem  # routed key/value blocks read once more per route
        if impl == 'reference':
            from sinkhorn_transformer.sinkhorn_transformer import SinkhornAttention, SinkhornCausalAttention
            if causal:
                attn = SinkhornCausalAttention(bucket, DIM, D, H, T, n_top_buckets=cfg['n_top'], temperature=0.75)
            else:
                attn = SinkhornAttention(bucket, DIM, D, H, T, n_top_buckets=cfg['n_top'])
            attn = attn.to(device, dtype)
            return (lambda: attn(q, k, v)), [q, k, v], flops, io
        null = tuple(torch.randn(H, D, device=device, dtype=dtype, requires_grad=True) for _ in range(2))
        fn = lambda: sk.ops.sinkhorn_attention(q, k, v, bucket_size=bucket, n_top_buckets=cfg['n_top'], causal=causal,
                                               null_kv=null if causal else None, backend=backend_of(impl))
        return fn, [q, k, v], flops, io

    if op == 'layer':
        module = _module(impl, 'SinkhornSelfAttention')(DIM, bucket, T, heads=H, causal=causal,
                                                       non_permutative=True, n_top_buckets=cfg['n_top'])
        module = module.to(device, dtype)
        x = torch.randn(B, T, DIM, device=device, dtype=dtype, requires_grad=True)
        flops = 4 * B * H * T * attention_keys_per_query(cfg) * D + 2 * B * T * DIM * (4 * H * D)
        return (lambda: module(x)), [x], flops, 2 * B * T * DIM * elem

    if op == 'lm':
        depth, vocab = cfg['depth'], 256
        model = _module(impl, 'SinkhornTransformerLM')(vocab, DIM, T, depth, heads=H, bucket_size=bucket,
                                                       causal=causal, n_top_buckets=cfg['n_top']).to(device, dtype)
        tokens = torch.randint(0, vocab, (B, T), device=device)
        loss = lambda: F.cross_entropy(model(tokens).transpose(1, 2).float(), tokens)
        params = sum(p.numel() for p in model.parameters())
        flops = depth * 4 * B * H * T * attention_keys_per_query(cfg) * D + 2 * B * T * params
        return loss, list(model.parameters()), flops, 2 * params * elem
    raise ValueError(f'unknown op {op!r}; choose from {OPS}')


def flex_with_routes(q, k, v, bucket, n_top, causal):
    """FlexAttention with the block mask of Sinkhorn attention: the own bucket plus n_top routed buckets per query
    bucket (earlier ones when causal, with the causal mask inside the own bucket). The routes are random: the
    sparsity pattern and the work are those of the real routing, not its values."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    B, H, T, _ = q.shape
    n = T // bucket
    gen = torch.Generator().manual_seed(0)
    scores = torch.rand(B, H, n, n, generator=gen)
    if causal:
        scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(), -1)  # earlier buckets only
    routes = scores.topk(min(n_top, n - 1), dim=-1).indices
    allowed = torch.zeros(B, H, n, n, dtype=torch.bool).scatter_(-1, routes, True)
    if causal:
        allowed &= torch.ones(n, n, dtype=torch.bool).tril(-1)  # the first buckets have fewer earlier ones
    allowed = (allowed | torch.eye(n, dtype=torch.bool)).to(q.device)

    def mask_mod(b, h, q_idx, kv_idx):
        ok = allowed[b, h, q_idx // bucket, kv_idx // bucket]
        if causal:
            ok = ok & ((q_idx // bucket != kv_idx // bucket) | (kv_idx <= q_idx))
        return ok

    block_mask = create_block_mask(mask_mod, B, H, T, T, device=q.device, BLOCK_SIZE=max(128, bucket))
    compiled = torch.compile(flex_attention)
    return lambda: compiled(q, k, v, block_mask=block_mask)


def _module(impl, name):
    if impl == 'reference':
        import sinkhorn_transformer
        return getattr(sinkhorn_transformer, name)
    return getattr(sk, name)


def _with_backend(impl, fn):
    """fn run with our backend of `impl` as the default (the model classes take no backend argument)."""
    if backend_of(impl) is None:
        return fn

    def run():
        sk.set_backend(backend_of(impl))
        try:
            return fn()
        finally:
            sk.set_backend(None)
    return run


def default_config(op, seq_len, batch, heads, dim_head, bucket_size, causal):
    cfg = dict(seq_len=seq_len, batch=batch, heads=heads, dim_head=dim_head, bucket_size=bucket_size,
               causal=causal, n_top=2, sinkhorn_iter=8, depth=2)
    if op in SINKHORN_OPS:
        # the Sinkhorn ops' size: one routing matrix per (batch, head), as many buckets as the sequence has
        cfg.update(buckets=max(2, seq_len // bucket_size), matrices=batch * heads * 64)
    return cfg


def validate(op, cfg):
    """Why a configuration cannot run, or None."""
    if cfg['seq_len'] % cfg['bucket_size']:
        return f'sequence length {cfg["seq_len"]} is not a multiple of the bucket size {cfg["bucket_size"]}'
    if cfg['seq_len'] < 2 * cfg['bucket_size'] and op not in SINKHORN_OPS:
        return f'sequence length {cfg["seq_len"]} needs at least two buckets of {cfg["bucket_size"]}'
    if op in ('layer', 'lm') and cfg['heads'] * cfg['dim_head'] != DIM:
        return f'the {op} benchmark uses dim {DIM}: heads * dim_head must equal {DIM}'
    return None
