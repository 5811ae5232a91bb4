"""Route bookkeeping and backward buffers shared by the fused backends."""
import torch

from ..outputs import new_output


def reverse_index(idx, Nk):
    """For every (batch x head, key block n in 0..Nk): the flat route numbers u * R + j that read block n,
    as (readers [BH, Nq * R] sorted by block, start [BH, Nk + 1], count [BH, Nk + 1])."""
    BH = idx.shape[0] * idx.shape[1]
    flat = idx.reshape(BH, -1).long()
    target = torch.where(flat < 0, Nk + 1, flat)  # routes to no block sort last and are never read
    order = torch.argsort(target * flat.shape[1] + torch.arange(flat.shape[1], device=idx.device), dim=1)
    count = torch.zeros(BH, Nk + 2, dtype=torch.int64, device=idx.device)
    count.scatter_add_(1, target, torch.ones_like(target))
    start = count.cumsum(dim=1) - count
    as_i32 = lambda t: t[:, :Nk + 1].to(torch.int32).contiguous()
    return order.to(torch.int32).contiguous(), as_i32(start), as_i32(count)


class BackwardBuffers:
    """What both fused backward passes need: delta = rowsum(dout * out) fp32 [B, H, T], the reverse index
    (`reverse_index`; with `by_kernels` these two are only allocated, for the backend's kernels to write), and the
    gradients to fill (dq, dk, dv like their inputs, or the caller's `grads`; dw fp32 like the routes; dnull fp32
    [2, B, H, D] or None, the null key's and value's, also as its halves dnull_k, dnull_v)."""

    def __init__(self, dout, q, k, v, out, idx, null_k, kv_bucket_size, by_kernels=False, grads=None):
        B, H, T, D = q.shape
        Nk = k.shape[2] // kv_bucket_size
        if by_kernels:
            new_i32 = lambda *shape: new_output(torch.empty(*shape, device=q.device, dtype=torch.int32))
            self.delta = new_output(torch.empty(B, H, T, device=q.device, dtype=torch.float32))
            self.readers = new_i32(B * H, idx[0, 0].numel())
            self.start, self.count = new_i32(B * H, Nk + 1), new_i32(B * H, Nk + 1)
        else:
            self.delta = (dout.float() * out.float()).sum(-1).contiguous()
            self.readers, self.start, self.count = reverse_index(idx, Nk)
        self.dq, self.dk, self.dv = grads or [new_output(torch.empty_like(t)) for t in (q, k, v)]
        self.dw = new_output(torch.empty(idx.shape, device=q.device, dtype=torch.float32))
        self.dnull = None if null_k is None else new_output(torch.empty(2, B, H, D, device=q.device,
                                                                        dtype=torch.float32))
        self.dnull_k, self.dnull_v = (None, None) if self.dnull is None else self.dnull

    def grads(self):
        return self.dq, self.dk, self.dv, self.dw, self.dnull


def new_attention_output(q):
    """out [B, H, T, D] stored as [B, T, H, D] (what the projections give), and lse fp32 [B, H, T]."""
    B, H, T, D = q.shape
    out = new_output(q.new_empty(B, T, H, D).transpose(1, 2))
    return out, new_output(torch.empty(B, H, T, device=q.device, dtype=torch.float32))
