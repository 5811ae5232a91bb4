import torch

from ..._checks import check_bucket_multiple, require
from ..backends import FUSED_DTYPES, resolve_backend
from . import reference


def head_mask(mask, B, H, T, name):
    """bool [B, T] or [B, H, T] -> [B, 1 or H, T] (None stays None)."""
    if mask is None:
        return None
    require(mask.dtype == torch.bool, f'{name} must have dtype torch.bool (True = real token), got {mask.dtype}')
    require(tuple(mask.shape) in ((B, T), (B, H, T)),
            f'{name} must have shape {(B, T)} or {(B, H, T)}, got {tuple(mask.shape)}')
    return mask[:, None] if mask.dim() == 2 else mask


def check_qkv(q, k, v):
    require(q.dim() == 4 and k.dim() == 4 and v.dim() == 4,
            f'q, k, v must be [batch, heads, seq, dim_head], got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}')
    B, H, _, D = q.shape
    require(k.shape == v.shape and k.shape[:2] == (B, H) and k.shape[3] == D,
            f'k and v must be [{B}, {H}, seq_kv, {D}] like q, got {tuple(k.shape)} and {tuple(v.shape)}')


def block_attention(q, k, v, route_indices, route_weights, *, bucket_size, kv_bucket_size=None, own_bucket=True,
                    causal=False, n_rotated_heads=0, null_kv=None, q_mask=None, kv_mask=None, scale=None,
                    dropout_p=0.0, backend=None):
    """Each query bucket attends, in one softmax, to its routed key buckets and (with `own_bucket`) its own.

    q: [B, H, Tq, D]; k, v: [B, H, Tk, D]. route_indices / route_weights: [B, H, Nq or 1, K] (1 = the same
    routes for every query bucket, as SortCut), indices into the Nk = Tk / kv_bucket_size key buckets (the own
    bucket of query bucket u is key bucket u); Nk names the learned null bucket of `null_kv = (null_k, null_v)`,
    each [H, D]; -1 names no block. Routed keys and values are multiplied by their weight. `causal` masks keys
    after the query inside its own bucket;
    `n_rotated_heads` trailing heads are in the causal half-head rotated frame (their last bucket holds the
    wrapped-around first tokens, which see only their own earlier tokens). Masks are bool [B, T] or [B, H, T];
    a query with no visible key outputs zeros.
    """
    check_qkv(q, k, v)
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    kv_bucket_size = kv_bucket_size or bucket_size
    check_bucket_multiple(Tq, bucket_size, 'query sequence')
    check_bucket_multiple(Tk, kv_bucket_size, 'key/value sequence')
    Nq, Nk = Tq // bucket_size, Tk // kv_bucket_size
    require(route_indices.shape == route_weights.shape and route_indices.dim() == 4
            and route_indices.shape[:2] == (B, H) and route_indices.shape[2] in (1, Nq),
            f'route_indices and route_weights must both be [{B}, {H}, {Nq} or 1, K], '
            f'got {tuple(route_indices.shape)} and {tuple(route_weights.shape)}')
    require(not own_bucket or Nq <= Nk,
            f'own_bucket needs a key bucket for every query bucket ({Nk} < {Nq}); pass own_bucket=False')
    require(not causal or (bucket_size == kv_bucket_size and Tq == Tk and own_bucket),
            'causal block attention needs equal query and key lengths and bucket sizes, and own_bucket=True')
    require(0 <= n_rotated_heads <= H, f'n_rotated_heads must be in [0, {H}], got {n_rotated_heads}')
    check_dropout(dropout_p)
    name = resolve_backend(backend, q.device)
    scale = D ** -0.5 if scale is None else scale
    idx, w = every_bucket_routes(route_indices, route_weights, Nq, own_bucket)
    qm, km = head_mask(q_mask, B, H, Tq, 'q_mask'), head_mask(kv_mask, B, H, Tk, 'kv_mask')
    n_rotated_heads = n_rotated_heads if causal else 0
    if name != 'reference':
        return _fused(name, q, k, v, idx, w, null_kv, qm, km, bucket_size, kv_bucket_size, causal, n_rotated_heads,
                      scale, dropout_p)

    # the reference computes half precision in fp32: it is the ground truth the kernels are held to
    dtype = q.dtype
    if dtype in (torch.float16, torch.bfloat16):
        q, k, v = q.float(), k.float(), v.float()
        null_kv = None if null_kv is None else tuple(t.float() for t in null_kv)
    # shortcuts that look at the routes' values; torch.compile cannot branch on values, so it takes the general path
    general = torch.compiler.is_compiling()
    unit_weights = not general and not route_weights.requires_grad and bool((route_weights == 1).all())
    has_none = general or bool((route_indices < 0).any())
    null_k, null_v = (None, None) if null_kv is None else (t.reshape(H, D) for t in null_kv)
    # the masks come from a generator seeded on the host: under torch.compile attention dropout breaks the graph
    seed = int(dropout_seed(dropout_p, q.device)) if dropout_p > 0 else 0
    lay = reference.Layout(Nq, bucket_size, Nk, kv_bucket_size, idx.shape[-1], causal, n_rotated_heads,
                           null_kv is not None, has_none, unit_weights, scale, dropout_p, seed)
    out = reference.block_attention(q, k, v, idx.contiguous(), w.to(q.dtype), null_k, null_v, qm, km, lay)
    return out.to(dtype)


def every_bucket_routes(idx, w, n_query_buckets, own_bucket):
    """Routes [B, H, Nq or 1, K] as the kernels read them, [B, H, Nq, K] (SortCut's one set for every query
    bucket), with each query bucket's own bucket appended when `own_bucket`."""
    idx, w = (t.expand(*t.shape[:2], n_query_buckets, -1) for t in (idx, w))
    return with_own_bucket(idx, w) if own_bucket else (idx, w)


def with_own_bucket(idx, w):
    """Routes [B, H, Nq, K] with each query bucket's own key bucket appended last, at weight 1."""
    own = torch.arange(idx.shape[2], device=idx.device).view(1, 1, -1, 1).expand(*idx.shape[:3], 1)
    return torch.cat((idx, own), dim=-1), torch.cat((w, torch.ones_like(w[..., :1])), dim=-1)


def dropout_seed(dropout_p, device, n=1):
    """n seeds in an int32 tensor drawn from torch's generator, so dropout is reproducible under torch.manual_seed;
    the kernels read one on the device (no host sync, so torch.compile keeps one graph). Zeros when unused."""
    if dropout_p == 0:
        return torch.zeros(n, dtype=torch.int32, device=device)
    return torch.randint(0, 2 ** 30, (n,), dtype=torch.int32, device=device)


FUSED_MAX_BLOCK = 128


def check_dropout(dropout_p):
    if not 0 <= dropout_p < 1:  # the message only on failure: under torch.compile dropout_p may be symbolic
        raise ValueError(f'dropout_p must be in [0, 1), got {dropout_p}')


def fused_operands(backend, q, k, v, null_kv, qm, km, bucket_size, kv_bucket_size):
    """What the fused kernels take besides the routes, checked: null_k and null_v as [H, D] in q's dtype (or
    None), the masks from `head_mask` expanded to [B, H, T]."""
    B, H, _, D = q.shape
    require(q.dtype in FUSED_DTYPES and k.dtype == q.dtype and v.dtype == q.dtype,
            f'the {backend} backend takes q, k, v of one dtype among float16, bfloat16, float32; got {q.dtype}, '
            f'{k.dtype}, {v.dtype}')
    require(max(bucket_size, kv_bucket_size, D) <= FUSED_MAX_BLOCK,
            f'the {backend} backend supports bucket sizes and dim_head up to {FUSED_MAX_BLOCK}; got bucket '
            f'{bucket_size}, kv bucket {kv_bucket_size}, dim_head {D}; use backend=\'reference\'')
    null_k, null_v = (None, None) if null_kv is None else (t.reshape(H, D).to(q.dtype).contiguous() for t in null_kv)
    expand = lambda m: None if m is None else m.expand(B, H, -1)
    return null_k, null_v, expand(qm), expand(km)


def fused_routes(idx, w):
    """Routes as the fused kernels take them: int32 indices, fp32 weights, both contiguous."""
    return idx.to(torch.int32).contiguous(), w.float().contiguous()


def _fused(backend, q, k, v, idx, w, null_kv, qm, km, bucket_size, kv_bucket_size, causal, n_rotated_heads, scale,
           dropout_p):
    from . import fused
    null_k, null_v, qm, km = fused_operands(backend, q, k, v, null_kv, qm, km, bucket_size, kv_bucket_size)
    return fused.BlockAttention.apply(q, k, v, *fused_routes(idx, w), null_k, null_v, qm, km, bucket_size,
                                      kv_bucket_size, causal, n_rotated_heads, scale, dropout_p,
                                      dropout_seed(dropout_p, q.device), backend)


def local_routes(n, look_backward, look_forward, device):
    """Routes [n, K] of sliding-window attention over n windows: the neighbours within reach (-1 past the ends)."""
    offsets = [o for o in range(-look_backward, look_forward + 1) if o != 0]
    if not offsets:
        offsets = [0]  # no neighbours: a single route to nothing keeps the layout uniform
    u = torch.arange(n, device=device)[:, None]
    idx = u + torch.tensor(offsets, device=device)
    return torch.where((idx < 0) | (idx >= n) | (idx == u), -1, idx)


def local_attention(q, k, v, *, window_size, causal=False, look_backward=1, look_forward=None, q_mask=None,
                    kv_mask=None, dropout_p=0.0, backend=None):
    """Sliding-window attention by buckets: each window attends to itself, `look_backward` windows back and
    (non-causal) `look_forward` windows ahead. It is block attention with fixed routes of weight 1."""
    look_forward = (0 if causal else 1) if look_forward is None else look_forward
    require(not (causal and look_forward), 'causal local attention cannot look forward; pass look_forward=0')
    B, H, T, _ = q.shape
    check_bucket_multiple(T, window_size, 'sequence')
    idx = local_routes(T // window_size, look_backward, look_forward, q.device).expand(B, H, -1, -1)
    w = torch.ones(idx.shape, dtype=q.dtype, device=q.device)
    return block_attention(q, k, v, idx, w, bucket_size=window_size, causal=causal, q_mask=q_mask, kv_mask=kv_mask,
                           dropout_p=dropout_p, backend=backend)
