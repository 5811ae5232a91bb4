"""The fused block attention as torch.library custom ops (fake implementations for torch.compile), one pair for
every fused backend (`backend` names the module that launches the kernels, 'triton' or 'cuda'), and the
autograd Function around them."""
import torch

from ..backends import kernel_module
from ..library import kernel_op


def kernels(backend):
    return kernel_module(__package__, backend)


@kernel_op('block_attention_fwd')
def block_attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor, w: torch.Tensor,
                        null_k: torch.Tensor | None, null_v: torch.Tensor | None, q_mask: torch.Tensor | None,
                        kv_mask: torch.Tensor | None, bucket_size: int, kv_bucket_size: int, causal: bool,
                        n_rotated_heads: int, scale: float, dropout_p: float, seed: torch.Tensor, backend: str
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    return kernels(backend).forward(q, k, v, idx, w, null_k, null_v, q_mask, kv_mask, bucket_size, kv_bucket_size,
                                    causal, n_rotated_heads, scale, dropout_p, seed)


@block_attention_fwd.register_fake
def _(q, k, v, idx, w, null_k, null_v, q_mask, kv_mask, bucket_size, kv_bucket_size, causal, n_rotated_heads,
      scale, dropout_p, seed, backend):
    B, H, T, D = q.shape
    return q.new_empty(B, T, H, D).transpose(1, 2), q.new_empty(B, H, T, dtype=torch.float32)


@kernel_op('block_attention_bwd')
def block_attention_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                        lse: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, null_k: torch.Tensor | None,
                        null_v: torch.Tensor | None, q_mask: torch.Tensor | None, kv_mask: torch.Tensor | None,
                        bucket_size: int, kv_bucket_size: int, causal: bool, n_rotated_heads: int, scale: float,
                        dropout_p: float, seed: torch.Tensor, backend: str
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    dq, dk, dv, dw, dnull = kernels(backend).backward(dout, q, k, v, out, lse, idx, w, null_k, null_v, q_mask,
                                                      kv_mask, bucket_size, kv_bucket_size, causal, n_rotated_heads,
                                                      scale, dropout_p, seed)
    if dnull is None:  # custom ops return tensors only: an empty null gradient
        dnull = q.new_empty(0, dtype=torch.float32)
    return dq, dk, dv, dw, dnull


@block_attention_bwd.register_fake
def _(dout, q, k, v, out, lse, idx, w, null_k, null_v, q_mask, kv_mask, bucket_size, kv_bucket_size, causal,
      n_rotated_heads, scale, dropout_p, seed, backend):
    B, H, _, D = q.shape
    null_shape = (2, B, H, D) if null_k is not None else (0,)
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(w),
            q.new_empty(null_shape, dtype=torch.float32))


def null_grads(dnull, null_k, null_v):
    """The null key's and value's gradients from the kernels' per-batch ones, dnull [2, B, H, D] (None without a
    null bucket)."""
    if null_k is None:
        return None, None
    dnk, dnv = dnull.sum(1)
    return dnk.to(null_k.dtype), dnv.to(null_v.dtype)


class BlockAttention(torch.autograd.Function):
    """`block_attention_fwd`'s output, differentiable in q, k, v, the route weights and the null bucket; the
    arguments are the op's."""

    @staticmethod
    def forward(ctx, q, k, v, idx, w, null_k, null_v, q_mask, kv_mask, bucket_size, kv_bucket_size, causal,
                n_rotated_heads, scale, dropout_p, seed, backend):
        ctx.options = (bucket_size, kv_bucket_size, causal, n_rotated_heads, scale, dropout_p)
        ctx.backend = backend
        out, lse = block_attention_fwd(q, k, v, idx, w, null_k, null_v, q_mask, kv_mask, *ctx.options, seed, backend)
        ctx.save_for_backward(q, k, v, idx, w, null_k, null_v, q_mask, kv_mask, seed, out, lse)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, idx, w, null_k, null_v, q_mask, kv_mask, seed, out, lse = ctx.saved_tensors
        # the kernels read dout by its strides: the permuted gradient of the output projection needs no copy
        dq, dk, dv, dw, dnull = block_attention_bwd(dout, q, k, v, out, lse, idx, w, null_k, null_v, q_mask,
                                                       kv_mask, *ctx.options, seed, ctx.backend)
        # none for idx, the masks, the options, seed and backend
        return (dq, dk, dv, None, dw, *null_grads(dnull, null_k, null_v), None, None,
                *(None,) * (len(ctx.options) + 2))
