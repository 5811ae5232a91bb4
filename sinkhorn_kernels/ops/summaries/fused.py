"""The Triton summary kernels as torch.library custom ops (fake implementations for torch.compile). Their
gradient is taken by the caller: `topk_attention` runs `add_sort_summaries_vjp` in its own backward."""
import torch

from ..library import kernel_op
from . import triton as kernels


@kernel_op('sort_summaries')
def sort_summaries(q: torch.Tensor, k: torch.Tensor, q_mask: torch.Tensor | None, kv_mask: torch.Tensor | None,
                   bucket_size: int, kv_bucket_size: int, causal: bool, n_sortcut: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    return kernels.forward(q, k, q_mask, kv_mask, bucket_size, kv_bucket_size, causal, n_sortcut)


@sort_summaries.register_fake
def _(q, k, q_mask, kv_mask, bucket_size, kv_bucket_size, causal, n_sortcut):
    B, H, T, D = q.shape
    n_query = 1 if n_sortcut and not causal else T // bucket_size
    return q.new_empty(B, H, n_query, D), k.new_empty(B, H, k.shape[2] // kv_bucket_size, D)


@kernel_op('add_sort_summaries_vjp', mutates_args=('dq', 'dk'))
def add_sort_summaries_vjp(d_sq: torch.Tensor, d_sk: torch.Tensor, dq: torch.Tensor, dk: torch.Tensor,
                           q_mask: torch.Tensor | None, kv_mask: torch.Tensor | None, bucket_size: int,
                           kv_bucket_size: int, causal: bool, n_sortcut: int) -> None:
    kernels.add_vjp(d_sq, d_sk, dq, dk, q_mask, kv_mask, bucket_size, kv_bucket_size, causal, n_sortcut)


@add_sort_summaries_vjp.register_fake
def _(d_sq, d_sk, dq, dk, q_mask, kv_mask, bucket_size, kv_bucket_size, causal, n_sortcut):
    return None
