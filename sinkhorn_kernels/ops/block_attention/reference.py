"""Block attention in plain PyTorch, with a FlashAttention-style backward.

q, k, v, the output and dq may have any strides whose last is 1 (the fused layer passes views of the
projections' [B, T, 3, H, D] output, writes the output over q and in backward dq over the output's gradient: a
chunk's queries are read before its output is written, its output's gradient before its dq, and never again); a
head's key blocks are read in place as a [Nk, kbs, D] view. dk and dv are accumulated in
[B, H, Tk, D] buffers whose heads are contiguous (index_add into strided rows is an order of magnitude slower).
The caller owns every output buffer, so the fused layer can place them in memory it already holds.
idx, w: [B, H, Nq, K'] routes per query bucket, the own bucket (if any) appended last with weight 1;
idx == Nk names the learned null bucket (null_k / null_v [H, D] repeated over the block), -1 no block.

Each (batch, head) is processed in chunks of query buckets, so gathered blocks and scores exist for one chunk
at a time, and a chunk always holds whole rows: backward recomputes the softmax from the scores, so nothing but
the inputs is saved. Every buffer of a chunk is a view of one workspace (see `Workspace`): the chunk loop makes
no temporaries, so the allocator neither churns nor keeps freed memory, and a chunk small enough to stay in
cache keeps the batched GEMMs near the CPU's peak.
"""
import torch

from ..outputs import carve

# score elements per chunk. CPU: 21 query buckets of 64 x 192 scores, whose buffers stay in the caches (the
# batched GEMMs run ~1.5x faster on them than on chunks four times larger). CUDA, where this backend is the
# ground truth of the GPU tests: larger chunks, since each chunk costs some forty kernel launches
CHUNK_ELEMENTS = 1 << 18
CUDA_CHUNK_ELEMENTS = 1 << 22


class Layout:
    """The static description of one call, shared by forward and backward."""

    def __init__(self, Nq, bs, Nk, kbs, n_routes, causal, n_rotated_heads, has_null, has_none, unit_weights, scale,
                 dropout_p, seed):
        self.Nq, self.bs, self.Nk, self.kbs, self.n_routes = Nq, bs, Nk, kbs, n_routes
        self.causal, self.n_rotated_heads = causal, n_rotated_heads
        self.has_null, self.has_none = has_null, has_none  # some route is the null bucket / no block
        self.unit_weights = unit_weights  # every weight is 1 and needs no gradient: skip the multiplies
        self.scale, self.dropout_p, self.seed = scale, dropout_p, seed
        # the softmax scale goes where a multiply is made anyway: into the keys' weights, or else into q
        self.q_scale, self.k_scale = (scale, 1.0) if unit_weights else (1.0, scale)

    def chunk_buckets(self, device):
        elements = CUDA_CHUNK_ELEMENTS if device.type == 'cuda' else CHUNK_ELEMENTS
        return max(1, min(self.Nq, elements // (self.bs * self.n_routes * self.kbs)))

    def chunks(self, device):
        step = self.chunk_buckets(device)
        for c0 in range(0, self.Nq, step):
            yield c0, min(self.Nq, c0 + step)

    def dropout_keep(self, shape, chunk, device):
        gen = torch.Generator(device=device).manual_seed(self.seed + chunk)
        return torch.rand(shape, generator=gen, device=device) >= self.dropout_p


class Workspace:
    """The buffers of a chunk of one head, [c, rows, cols] each, carved from one allocation and cut to every chunk.

    q: the scaled queries where q takes the softmax scale (forward: then the output); k, v: gathered key / value
    blocks, weighted in place unless backward needs the raw blocks for the route weights' gradient (then kw, vw
    hold the weighted blocks); s: the scores, then the probabilities. Backward also has dp (probability, then
    score gradient) and dq; the weighted blocks' gradients overwrite kw and vw once those are read for the last
    time (the output gradient is read in place).
    `flat`: memory to carve them from (at least `numel` elements), else allocated here."""

    def __init__(self, lay, like, backward=False, raw_blocks=False, flat=None):
        specs = self._specs(lay, like.shape[-1], backward, raw_blocks, like.device)
        if flat is None:
            flat = like.new_empty(self.numel(lay, like.shape[-1], backward, raw_blocks, like.device))
        flats = carve(flat, [(c * r * w,) for _, c, r, w in specs])
        self.buffers = [(name, buf, r, w) for (name, _, r, w), buf in zip(specs, flats)]

    @staticmethod
    def _specs(lay, D, backward, raw_blocks, device):
        c, L = lay.chunk_buckets(device), lay.n_routes * lay.kbs
        names = [('q', lay.bs, D), ('k', L, D), ('v', L, D), ('s', lay.bs, L)]
        if raw_blocks:
            names += [('kw', L, D), ('vw', L, D)]
        if backward:
            names += [('dp', lay.bs, L), ('dq', lay.bs, D)]
        return [(name, c, r, w) for name, r, w in names]

    @classmethod
    def numel(cls, lay, D, backward=False, raw_blocks=False, device=torch.device('cpu')):
        return sum(c * r * w for _, c, r, w in cls._specs(lay, D, backward, raw_blocks, device))

    def cut(self, c):
        """The buffers of a chunk of c query buckets."""
        return _Chunk(**{name: buf[:c * r * w].view(c, r, w) for name, buf, r, w in self.buffers})


class _Chunk:
    """A chunk's buffers by name (a plain class: torch.compile traces it); kw, vw are k, v where the raw blocks are
    not kept."""

    def __init__(self, q, k, v, s, kw=None, vw=None, dp=None, dq=None):
        self.q, self.k, self.v, self.s = q, k, v, s
        self.queries = None  # set by `probabilities`: the queries the scores were made of, q or a view of the input
        self.kw, self.vw = k if kw is None else kw, v if vw is None else vw
        self.dp, self.dq = dp, dq
        self.rows = None  # set by `probabilities`


def new_like_layout(t):
    """An empty [B, H, T, D] tensor stored as [B, T, H, D], like the projections' output."""
    B, H, T, D = t.shape
    return t.new_empty(B, T, H, D).transpose(1, 2)


def block_rows(lay, idx):
    """Row of every route of idx [c, K'] in a head's [Nk, kbs, D] blocks (the null bucket and no block: any)."""
    return idx.clamp(0, lay.Nk - 1).flatten()


def gather(lay, blocks, null, idx, rows, out):
    """Blocks [Nk, kbs, D] (any strides) at idx [c, K'] (`rows` = block_rows) into out [c, K', kbs, D]
    (contiguous); the null bucket is `null` [D] repeated, no block is zeros."""
    torch.index_select(blocks, 0, rows, out=out.view(-1, lay.kbs, blocks.shape[-1]))
    if lay.has_null:
        torch.where((idx == lay.Nk)[..., None, None], null.to(out.dtype), out, out=out)
    if lay.has_none:
        out.masked_fill_((idx < 0)[..., None, None], 0)


def block_dots(a, b):
    """<a, b> per block of [c, K', kbs, D] tensors (a product and a sum run faster than batched GEMVs)."""
    return torch.linalg.vecdot(a.flatten(-2), b.flatten(-2))


def mask_scores(lay, s, idx, q_mask, kv_mask, rotated, c0, c1):
    """Masks the scores [c, bs, K' * kbs] of query buckets c0..c1 of one (batch, head) in place; returns whether
    any may be masked. idx [c, K']; masks [T] or None; `rotated`: the head is in the rotated causal frame."""
    bs, kbs = lay.bs, lay.kbs
    masked = False
    if kv_mask is not None or lay.has_none:
        allowed = (idx >= 0)[..., None].expand(*idx.shape, kbs)
        if kv_mask is not None:
            real = kv_mask.view(lay.Nk, kbs)[idx.clamp(0, lay.Nk - 1)]
            allowed = allowed & (real | (idx == lay.Nk)[..., None])
        s.masked_fill_(~allowed.flatten(1)[:, None, :], float('-inf'))
        masked = True
    if q_mask is not None:
        s.masked_fill_(~q_mask[c0 * bs:c1 * bs].view(c1 - c0, bs, 1), float('-inf'))
        masked = True
    if lay.causal:
        s[..., -kbs:].masked_fill_(torch.ones(bs, kbs, dtype=torch.bool, device=s.device).triu(1), float('-inf'))
        if rotated and c1 == lay.Nq:
            # rotated heads: the last bucket's rows 1.. are the wrapped-around first tokens of the sequence;
            # they see only their own earlier tokens, not the routed blocks nor key 0 (the last token)
            s[-1, 1:, :s.shape[-1] - kbs + 1] = float('-inf')
    return masked


class _Head:
    """One (batch, head) of the inputs: [T, D] rows of q, key / value blocks [Nk, kbs, D], its routes, masks and
    null bucket."""

    def __init__(self, lay, b, h, H, q, k, v, idx, w, null_k, null_v, q_mask, kv_mask):
        D = q.shape[-1]
        per_head = lambda m: None if m is None else m[b, h if m.shape[1] > 1 else 0]
        self.q = q[b, h]
        self.k, self.v = k[b, h].view(lay.Nk, lay.kbs, D), v[b, h].view(lay.Nk, lay.kbs, D)
        self.idx, self.w = idx[b, h], w[b, h]
        self.null_k, self.null_v = (None if t is None else t[h] for t in (null_k, null_v))
        self.q_mask, self.kv_mask = per_head(q_mask), per_head(kv_mask)
        self.rotated = h >= H - lay.n_rotated_heads


def heads(lay, q, *inputs):
    """The (batch, head) pairs of a call, numbered, each with its chunks: (n, b, h, head, c0, c1), n counting
    chunks over the whole call (dropout draws one mask per chunk)."""
    B, H = q.shape[:2]
    n = 0
    for b in range(B):
        for h in range(H):
            head = _Head(lay, b, h, H, q, *inputs)
            for c0, c1 in lay.chunks(q.device):
                yield n, b, h, head, c0, c1
                n += 1


def probabilities(lay, ws, head, c0, c1):
    """The softmax of query buckets c0..c1 of one head over their routes, in the chunk's cut of the workspace:
    b.queries the queries times lay.q_scale, b.k / b.v the gathered blocks (b.kw / b.vw weighted, keys times
    lay.k_scale), b.s the probabilities [c, bs, K' * kbs]; b.rows the routed blocks' rows."""
    bs, c = lay.bs, c1 - c0
    b = ws.cut(c)
    idx, w = head.idx[c0:c1], head.w[c0:c1]
    b.rows = block_rows(lay, idx)
    b.queries = head.q[c0 * bs:c1 * bs].view(b.q.shape)
    if lay.q_scale != 1:
        b.queries = torch.mul(b.queries, lay.q_scale, out=b.q)
    for blocks, null, raw, weighted, scale in ((head.k, head.null_k, b.k, b.kw, lay.k_scale),
                                               (head.v, head.null_v, b.v, b.vw, 1.0)):
        raw, weighted = raw.view(*idx.shape, lay.kbs, -1), weighted.view(*idx.shape, lay.kbs, -1)
        gather(lay, blocks, null, idx, b.rows, raw)
        if weighted is not raw or not lay.unit_weights:
            torch.mul(raw, (w * scale)[..., None, None], out=weighted)
    torch.bmm(b.queries, b.kw.transpose(1, 2), out=b.s)
    if mask_scores(lay, b.s, idx, head.q_mask, head.kv_mask, head.rotated, c0, c1):
        dead = b.s.amax(dim=-1, keepdim=True) == float('-inf')  # no visible key: attend to nothing
        torch.softmax(b.s, -1, out=b.s)
        b.s.masked_fill_(dead, 0)
    else:
        torch.softmax(b.s, -1, out=b.s)
    return b


def dropped(lay, p, n):
    """The probabilities after attention dropout of chunk n (scaled to keep their sum's expectation), and the
    kept mask (None without dropout)."""
    if lay.dropout_p == 0:
        return p, None
    keep = lay.dropout_keep(p.shape, n, p.device)
    return p * keep / (1 - lay.dropout_p), keep


def forward(lay, q, k, v, idx, w, null_k, null_v, q_mask, kv_mask, out, ws=None):
    """Writes the attention output into `out` [B, H, Tq, D] (which may be q)."""
    ws = ws or Workspace(lay, q)
    bs = lay.bs
    for n, b_, h, head, c0, c1 in heads(lay, q, k, v, idx, w, null_k, null_v, q_mask, kv_mask):
        b = probabilities(lay, ws, head, c0, c1)
        torch.bmm(dropped(lay, b.s, n)[0], b.vw, out=b.q)  # the queries are read: the output goes in q's buffer
        out[b_, h, c0 * bs:c1 * bs] = b.q.view(-1, b.q.shape[-1])


def backward(lay, need_w, q, k, v, idx, w, null_k, null_v, q_mask, kv_mask, dout, dq, dk, dv, ws=None):
    """Writes dq (which may be q or dout: a chunk's are read before its dq is written) and adds into dk, dv
    ([B, H, Tk, D], each head's [Tk, D] contiguous). Returns the gradients of the route weights (if `need_w`) and
    of the null bucket."""
    bs, kbs, Nk, D = lay.bs, lay.kbs, lay.Nk, q.shape[-1]
    dw = torch.zeros_like(w) if need_w else None
    dnull_k = torch.zeros_like(null_k) if null_k is not None else None
    dnull_v = torch.zeros_like(null_v) if null_v is not None else None
    ws = ws or Workspace(lay, q, backward=True, raw_blocks=need_w)
    for n, b_, h, head, c0, c1 in heads(lay, q, k, v, idx, w, null_k, null_v, q_mask, kv_mask):
        b = probabilities(lay, ws, head, c0, c1)
        idx_c, w_c = head.idx[c0:c1], head.w[c0:c1]
        blocks = lambda t: t.view(*idx_c.shape, kbs, D)
        p = b.s
        p_kept, keep = dropped(lay, p, n)
        do = dout[b_, h, c0 * bs:c1 * bs].view(b.q.shape)
        torch.bmm(do, b.vw.transpose(1, 2), out=b.dp)
        # the weighted values and keys are read for the last time below: their gradients take their place
        torch.bmm(p_kept.transpose(1, 2), do, out=b.vw)
        if keep is not None:
            b.dp.mul_(keep).div_(1 - lay.dropout_p)
        ds = torch._softmax_backward_data(b.dp, p, -1, p.dtype, grad_input=b.dp)
        torch.bmm(ds, b.kw, out=b.dq)
        torch.bmm(ds.transpose(1, 2), b.queries, out=b.kw)
        if lay.q_scale != 1:
            b.dq.mul_(lay.q_scale)
        dq[b_, h, c0 * bs:c1 * bs] = b.dq.view(-1, D)  # after the last reads of q and dout, which dq may be
        dk_w, dv_w = blocks(b.kw), blocks(b.vw)
        if dw is not None:
            dw[b_, h, c0:c1] = lay.k_scale * block_dots(dk_w, blocks(b.k)) + block_dots(dv_w, blocks(b.v))
        if not lay.unit_weights:
            dk_w.mul_((w_c * lay.k_scale)[..., None, None])
            dv_w.mul_(w_c[..., None, None])
        if lay.has_null:
            is_null = (idx_c == Nk).to(dk_w.dtype)
            dnull_k[h] += torch.einsum('cjsd,cj->d', dk_w, is_null)
            dnull_v[h] += torch.einsum('cjsd,cj->d', dv_w, is_null)
        if lay.has_null or lay.has_none:
            real = ((idx_c >= 0) & (idx_c < Nk))[..., None, None]
            dk_w.mul_(real)
            dv_w.mul_(real)
        dk[b_, h].view(Nk, kbs, D).index_add_(0, b.rows, b.kw.view(-1, kbs, D))
        dv[b_, h].view(Nk, kbs, D).index_add_(0, b.rows, b.vw.view(-1, kbs, D))
    return dw, dnull_k, dnull_v


class BlockAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, idx, w, null_k, null_v, q_mask, kv_mask, lay):
        ctx.save_for_backward(q, k, v, idx, w, null_k, null_v, q_mask, kv_mask)
        ctx.lay = lay
        out = new_like_layout(q)
        forward(lay, q, k, v, idx, w, null_k, null_v, q_mask, kv_mask, out)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, idx, w, null_k, null_v, q_mask, kv_mask = ctx.saved_tensors
        dq = new_like_layout(q)
        dk, dv = (torch.zeros(t.shape, dtype=t.dtype, device=t.device) for t in (k, v))
        dw, dnk, dnv = backward(ctx.lay, ctx.needs_input_grad[4], q, k, v, idx, w, null_k, null_v, q_mask, kv_mask,
                                dout, dq, dk, dv)
        return dq, dk, dv, None, dw, dnk, dnv, None, None, None


def block_attention(q, k, v, idx, w, null_k, null_v, q_mask, kv_mask, lay):
    return BlockAttentionFunction.apply(q, k, v, idx, w, null_k, null_v, q_mask, kv_mask, lay)
