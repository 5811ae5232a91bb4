"""Block attention in plain PyTorch, with a FlashAttention-style backward.

q, the output and dq may have any strides (the projections give [B, T, H, D] memory, and the fused layer
writes dq over q: a chunk's queries are read before its dq is written and never again); k and v are
contiguous [B, H, T, D], so that every key block is one contiguous row to gather. The caller owns every
output buffer, so the fused layer can place them in memory it already holds.
idx, w: [B, H, Nq, K'] routes per query bucket, the own bucket (if any) appended last with weight 1;
idx == Nk names the learned null bucket (null_k / null_v [H, D] repeated over the block), -1 no block.
The key/value gradients are accumulated in [B, H, Tk, D] buffers, where one index_add covers all heads.

Query buckets are processed in chunks, so gathered blocks and scores exist for one chunk at a time, and a
chunk always holds whole rows: backward recomputes the softmax from the scores, so nothing but the inputs is
saved.
"""
import torch

# score elements per chunk: the working set stays a few MB while the batched GEMMs stay large
CHUNK_ELEMENTS = 1 << 20


class Layout:
    """The static description of one call, shared by forward and backward."""

    def __init__(self, Nq, bs, Nk, kbs, n_routes, causal, n_rotated_heads, has_null, has_none, unit_weights, scale,
                 dropout_p, seed):
        self.Nq, self.bs, self.Nk, self.kbs, self.n_routes = Nq, bs, Nk, kbs, n_routes
        self.causal, self.n_rotated_heads = causal, n_rotated_heads
        self.has_null, self.has_none = has_null, has_none  # some route is the null bucket / no block
        self.unit_weights = unit_weights  # every weight is 1 and needs no gradient: skip the multiplies
        self.scale, self.dropout_p, self.seed = scale, dropout_p, seed

    def chunks(self, B, H):
        step = max(1, CHUNK_ELEMENTS // (B * H * self.bs * self.n_routes * self.kbs))
        for n, c0 in enumerate(range(0, self.Nq, step)):
            yield n, c0, min(self.Nq, c0 + step)

    def dropout_keep(self, shape, chunk, device):
        gen = torch.Generator(device=device).manual_seed(self.seed + chunk)
        return torch.rand(shape, generator=gen, device=device) >= self.dropout_p


def new_like_layout(t):
    """An empty [B, H, T, D] tensor stored as [B, T, H, D], like the projections' output."""
    B, H, T, D = t.shape
    return t.new_empty(B, T, H, D).transpose(1, 2)


def block_rows(lay, idx):
    """Row of every routed (batch, head, key bucket) in a [B * H * Nk, kbs, D] view: [B * H * c * K']."""
    B, H = idx.shape[:2]
    base = (torch.arange(B * H, device=idx.device) * lay.Nk).view(B, H, 1, 1)
    return (base + idx.clamp(0, lay.Nk - 1)).flatten()


def gather(lay, x, null, idx):
    """Blocks of x [B, H, Tk, D] (contiguous) at idx [B, H, c, K'] -> [B, H, c, K', kbs, D]."""
    B, H, _, D = x.shape
    g = x.view(-1, lay.kbs, D).index_select(0, block_rows(lay, idx)).view(*idx.shape, lay.kbs, D)
    if lay.has_null:
        g = torch.where((idx == lay.Nk)[..., None, None], null.view(1, H, 1, 1, 1, -1).to(g.dtype), g)
    if lay.has_none:
        g = g.masked_fill_((idx < 0)[..., None, None], 0)
    return g


def weighted(lay, g, w):
    """Gathered blocks [B, H, c, K', kbs, D] times their route weights, flattened to [B, H, c, L, D]."""
    return (g if lay.unit_weights else g * w[..., None, None]).flatten(3, 4)


def block_dots(a, b):
    """<a, b> per block of [B, H, c, K', kbs, D] tensors (a product and a sum run faster than batched GEMVs)."""
    return torch.linalg.vecdot(a.flatten(-2), b.flatten(-2))


def scores(lay, q, k, null_k, idx, w, q_mask, kv_mask, c0, c1):
    """Scaled scores of query buckets c0..c1 against their routes, masked: [B, H, c, bs, L]; plus the raw and
    weighted gathered keys and the scaled queries, which backward reuses."""
    bs, kbs = lay.bs, lay.kbs
    qc = q[:, :, c0 * bs:c1 * bs].unflatten(2, (c1 - c0, bs)) * lay.scale
    idx_c, w_c = idx[:, :, c0:c1], w[:, :, c0:c1]
    k_raw = gather(lay, k, null_k, idx_c)
    k_w = weighted(lay, k_raw, w_c)
    s = qc @ k_w.transpose(-1, -2)
    masked = False
    if kv_mask is not None or lay.has_none:
        allowed = (idx_c >= 0)[..., None].expand(*idx_c.shape, kbs)
        if kv_mask is not None:
            B, H = q.shape[:2]
            b = torch.arange(B, device=q.device).view(B, 1, 1, 1)
            h = torch.arange(kv_mask.shape[1], device=q.device).view(1, -1, 1, 1)
            km = kv_mask.unflatten(2, (lay.Nk, kbs))[b, h, idx_c.clamp(0, lay.Nk - 1)]
            allowed = allowed & (km | (idx_c == lay.Nk)[..., None])
        s.masked_fill_(~allowed.flatten(3)[:, :, :, None, :], float('-inf'))
        masked = True
    if q_mask is not None:
        s.masked_fill_(~q_mask[:, :, c0 * bs:c1 * bs].unflatten(2, (c1 - c0, bs))[..., None], float('-inf'))
        masked = True
    if lay.causal:
        own = s[..., -kbs:]
        own.masked_fill_(torch.ones(bs, kbs, dtype=torch.bool, device=s.device).triu(1), float('-inf'))
        if lay.n_rotated_heads and c1 == lay.Nq:
            # rotated heads: the last bucket's rows 1.. are the wrapped-around first tokens of the sequence;
            # they see only their own earlier tokens, not the routed blocks nor key 0 (the last token)
            s[:, -lay.n_rotated_heads:, -1, 1:, :s.shape[-1] - kbs + 1] = float('-inf')
    return s, masked, qc, k_raw, k_w


def probabilities(s, masked):
    p = torch.softmax(s, dim=-1)
    if masked:
        p = p.masked_fill_((s == float('-inf')).all(dim=-1, keepdim=True), 0)  # no visible key: attend to nothing
    return p


def forward(lay, q, k, v, idx, w, null_k, null_v, q_mask, kv_mask, out):
    """Writes the attention output into `out` [B, H, Tq, D]."""
    B, H = q.shape[:2]
    for n, c0, c1 in lay.chunks(B, H):
        s, masked, _, _, _ = scores(lay, q, k, null_k, idx, w, q_mask, kv_mask, c0, c1)
        p = probabilities(s, masked)
        if lay.dropout_p > 0:
            p = p * lay.dropout_keep(p.shape, n, p.device) / (1 - lay.dropout_p)
        v_w = weighted(lay, gather(lay, v, null_v, idx[:, :, c0:c1]), w[:, :, c0:c1])
        out[:, :, c0 * lay.bs:c1 * lay.bs] = (p @ v_w).flatten(2, 3)


def backward(lay, need_w, q, k, v, idx, w, null_k, null_v, q_mask, kv_mask, dout, dq, dk, dv):
    """Writes dq (which may be q itself) and adds into dk, dv (contiguous [B, H, Tk, D]); returns the gradients
    of the route weights (if `need_w`) and of the null bucket."""
    B, H = q.shape[:2]
    bs, kbs, Nk = lay.bs, lay.kbs, lay.Nk
    dw = torch.zeros_like(w) if need_w else None
    dnull_k = torch.zeros_like(null_k) if null_k is not None else None
    dnull_v = torch.zeros_like(null_v) if null_v is not None else None
    for n, c0, c1 in lay.chunks(B, H):
        c = c1 - c0
        s, masked, qc, k_raw, k_w = scores(lay, q, k, null_k, idx, w, q_mask, kv_mask, c0, c1)
        p = probabilities(s, masked)
        idx_c, w_c = idx[:, :, c0:c1], w[:, :, c0:c1]
        v_raw = gather(lay, v, null_v, idx_c)
        v_w = weighted(lay, v_raw, w_c)
        doc = dout[:, :, c0 * bs:c1 * bs].unflatten(2, (c, bs)).contiguous()
        dp = doc @ v_w.transpose(-1, -2)
        if lay.dropout_p > 0:
            keep = lay.dropout_keep(p.shape, n, p.device)
            dv_w = (p * keep).transpose(-1, -2) @ doc / (1 - lay.dropout_p)
            dp = dp * keep / (1 - lay.dropout_p)
        else:
            dv_w = p.transpose(-1, -2) @ doc
        ds = torch._softmax_backward_data(dp, p, -1, p.dtype)
        dq[:, :, c0 * bs:c1 * bs] = (ds @ k_w).mul_(lay.scale).flatten(2, 3)
        dk_w = (ds.transpose(-1, -2) @ qc).unflatten(3, (-1, kbs))
        dv_w = dv_w.unflatten(3, (-1, kbs))
        if dw is not None:
            dw[:, :, c0:c1] = block_dots(dk_w, k_raw) + block_dots(dv_w, v_raw)
        if not lay.unit_weights:
            dk_w, dv_w = dk_w.mul_(w_c[..., None, None]), dv_w.mul_(w_c[..., None, None])
        if lay.has_null:
            is_null = (idx_c == Nk).to(dk_w.dtype)
            dnull_k += torch.einsum('bhcjsd,bhcj->hd', dk_w, is_null)
            dnull_v += torch.einsum('bhcjsd,bhcj->hd', dv_w, is_null)
        if lay.has_null or lay.has_none:
            real = ((idx_c >= 0) & (idx_c < Nk))[..., None, None]
            dk_w, dv_w = dk_w * real, dv_w * real
        rows = block_rows(lay, idx_c)
        dk.view(-1, kbs, k.shape[3]).index_add_(0, rows, dk_w.flatten(0, 3))
        dv.view(-1, kbs, v.shape[3]).index_add_(0, rows, dv_w.flatten(0, 3))
    return dw, dnull_k, dnull_v


class BlockAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, idx, w, null_k, null_v, q_mask, kv_mask, lay):
        k, v = k.contiguous(), v.contiguous()
        ctx.save_for_backward(q, k, v, idx, w, null_k, null_v, q_mask, kv_mask)
        ctx.lay = lay
        out = new_like_layout(q)
        forward(lay, q, k, v, idx, w, null_k, null_v, q_mask, kv_mask, out)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, idx, w, null_k, null_v, q_mask, kv_mask = ctx.saved_tensors
        dq, dk, dv = new_like_layout(q), torch.zeros_like(k), torch.zeros_like(v)
        dw, dnk, dnv = backward(ctx.lay, ctx.needs_input_grad[4], q, k, v, idx, w, null_k, null_v, q_mask, kv_mask,
                                dout, dq, dk, dv)
        return dq, dk, dv, None, dw, dnk, dnv, None, None, None


def block_attention(q, k, v, idx, w, null_k, null_v, q_mask, kv_mask, lay):
    return BlockAttentionFunction.apply(q, k, v, idx, w, null_k, null_v, q_mask, kv_mask, lay)
