"""Sparse Sinkhorn attention (Tay et al., ICML 2020): a drop-in for sinkhorn-transformer with fused kernels."""
from . import ops
from .attention import SinkhornSelfAttention
from .autopadder import Autopadder
from .autoregressive import AutoregressiveWrapper
from .ops import available_backends, set_backend, sinkhorn_attention
from .transformer import SinkhornTransformer, SinkhornTransformerLM
from .weights import load_reference_weights

__version__ = '0.1.0'

__all__ = ['ops', 'SinkhornSelfAttention', 'SinkhornTransformer', 'SinkhornTransformerLM', 'Autopadder',
           'AutoregressiveWrapper', 'available_backends', 'set_backend', 'sinkhorn_attention',
           'load_reference_weights']
