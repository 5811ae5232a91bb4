"""Functional ops. Each one dispatches through `backend` (None = automatic, 'reference', 'triton', 'cuda')."""
from .backends import available_backends, set_backend
from .block_attention import block_attention, local_attention
from .routing import topk_routing
from .sinkhorn import gumbel_sinkhorn, sinkhorn_normalize
from .self_attention import sinkhorn_self_attention
from .sinkhorn_attention import attention_sort_scores, sinkhorn_attention

__all__ = ['available_backends', 'set_backend', 'block_attention', 'local_attention', 'topk_routing',
           'gumbel_sinkhorn', 'sinkhorn_normalize', 'attention_sort_scores', 'sinkhorn_attention',
           'sinkhorn_self_attention']
