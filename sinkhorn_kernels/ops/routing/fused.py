"""The Triton top-k routing kernels as torch.library custom ops (fake implementations for torch.compile). Their
gradient is taken by the caller: `topk_attention` runs `topk_routes_bwd` in its own backward."""
import torch

from ..library import kernel_op
from . import triton as kernels


@kernel_op('topk_routes_fwd')
def topk_routes_fwd(scores: torch.Tensor, k: int, temperature: float, causal: bool, n_null: int,
                    n_query_buckets: int, own_bucket: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return kernels.forward(scores, k, temperature, causal, n_null, n_query_buckets, own_bucket)


@topk_routes_fwd.register_fake
def _(scores, k, temperature, causal, n_null, n_query_buckets, own_bucket):
    shape = (*scores.shape[:2], n_query_buckets, k + own_bucket)
    return scores.new_empty(shape, dtype=torch.int32), scores.new_empty(shape, dtype=torch.float32)


@kernel_op('topk_routes_bwd')
def topk_routes_bwd(scores: torch.Tensor, d_weights: torch.Tensor, k: int, temperature: float, causal: bool,
                    n_null: int, scale: float) -> torch.Tensor:
    return kernels.backward(scores, d_weights, k, temperature, causal, n_null, scale)


@topk_routes_bwd.register_fake
def _(scores, d_weights, k, temperature, causal, n_null, scale):
    return scores.new_empty(scores.shape)
