"""SinkhornSelfAttention: projections, local-attention heads and Sinkhorn heads over the functional ops."""
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from . import ops
from ._checks import check_bucket_multiple, check_mask, require
from .ops.backends import FUSED_DTYPES, resolve_backend
from .ops import self_attention_fused as fused_layer
from .ops.self_attention import head_groups
from .ops.summaries.reference import causal_first_means


class SimpleSortNet(nn.Module):
    """The paper's learned sort net: per head, bucket sums of q and k through a matrix of fixed bucket count."""

    def __init__(self, heads, bucket_size, max_buckets, dim_head):
        super().__init__()
        self.bucket_size = bucket_size
        self.weight = nn.Parameter(torch.randn(1, heads, 2 * dim_head, max_buckets))

    def forward(self, q, k, q_mask, kv_mask):
        n = q.shape[2] // self.bucket_size
        sums = lambda t: rearrange(t, 'b h (n s) d -> b h n s d', n=n).sum(dim=3)
        return F.relu(torch.cat((sums(q), sums(k)), dim=-1) @ self.weight[0])


class CausalSimpleSortNet(nn.Module):
    """Learned causal sort net: each bucket's first key and the running key mean there, through a matrix
    whose leading `n_null` columns score the null buckets."""

    def __init__(self, heads, bucket_size, max_buckets, n_null, dim_head):
        super().__init__()
        self.bucket_size, self.n_null = bucket_size, n_null
        self.weight = nn.Parameter(torch.randn(1, heads, 2 * dim_head, max_buckets + n_null))

    def forward(self, q, k, q_mask, kv_mask):
        n = k.shape[2] // self.bucket_size
        running_mean = causal_first_means(k, kv_mask, self.bucket_size)
        first = torch.cat((running_mean, k[:, :, ::self.bucket_size]), dim=-1)
        return F.leaky_relu(first @ self.weight[0])[..., :n + self.n_null]


class SinkhornSelfAttention(nn.Module):
    def __init__(self, dim, bucket_size, max_seq_len, heads=8, dim_head=None, kv_bucket_size=None, causal=False,
                 non_permutative=True, sinkhorn_iter=5, n_sortcut=0, temperature=0.75, attn_dropout=0.,
                 dropout=0., context_only=False, use_simple_sort_net=False, n_local_attn_heads=0, n_top_buckets=1):
        super().__init__()
        require(dim_head or dim % heads == 0,
                f'dim {dim} is not divisible by heads {heads}; pass dim_head or change heads')
        require(not (causal and n_sortcut > 0), 'SortCut (n_sortcut > 0) only works without causal; set n_sortcut=0')
        require(not (causal and context_only), 'a context-only (cross) attention layer cannot be causal')
        require(0 <= n_local_attn_heads <= heads,
                f'n_local_attn_heads ({n_local_attn_heads}) must be between 0 and heads ({heads})')
        require(not (context_only and n_local_attn_heads), 'context-only attention has no local heads; pass 0')
        require(not causal or kv_bucket_size in (None, bucket_size),
                'causal attention needs kv_bucket_size == bucket_size (or None)')
        self.heads, self.dim_head = heads, dim_head or dim // heads
        self.bucket_size, self.kv_bucket_size = bucket_size, kv_bucket_size or bucket_size
        self.causal, self.context_only, self.n_local = causal, context_only, n_local_attn_heads
        self.non_permutative, self.sinkhorn_iter, self.n_sortcut = non_permutative, sinkhorn_iter, n_sortcut
        self.temperature, self.n_top_buckets, self.attn_dropout = temperature, n_top_buckets, attn_dropout
        inner = self.dim_head * heads
        self.to_q = nn.Linear(dim, inner, bias=False)
        # context keys/values are projected too (the reference feeds the raw context to the attention)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim)
        self.dropout = nn.Dropout(dropout)

        sink_heads = heads - n_local_attn_heads
        self.sort_net = None
        if use_simple_sort_net and sink_heads:
            require(max_seq_len, 'use_simple_sort_net needs max_seq_len (its matrix has one column per bucket)')
            if causal:
                self.sort_net = CausalSimpleSortNet(sink_heads, bucket_size, max_seq_len // bucket_size,
                                                    n_top_buckets, self.dim_head)
            else:
                self.sort_net = SimpleSortNet(sink_heads, self.kv_bucket_size, max_seq_len // self.kv_bucket_size,
                                              self.dim_head)
        if causal and sink_heads:
            self.null_keys = nn.Parameter(torch.randn(sink_heads, 1, self.dim_head))
            self.null_values = nn.Parameter(torch.randn(sink_heads, 1, self.dim_head))

    def _runs_fused(self, x):
        """Whether the layer runs as one op, `ops.sinkhorn_self_attention`, which saves memory: self-attention with
        the attention sort net and top-k routing, on the reference backend in float32 or float64, on a fused
        backend in the dtypes its kernels take where it saves memory (`self_attention_fused.saves_memory`). Not
        under torch.compile, which traces the composed ops instead (the op manages its own buffers in eager
        code)."""
        if (self.context_only or self.sort_net is not None or not (self.non_permutative or self.causal)
                or torch.compiler.is_compiling()):
            return False
        if resolve_backend(None, x.device) == 'reference':
            return x.dtype in (torch.float32, torch.float64)
        groups = head_groups(self.heads, self.n_local, self.causal, self.bucket_size)
        return x.dtype in FUSED_DTYPES and fused_layer.saves_memory(x, self.heads, self.dim_head, groups)

    def forward(self, x, input_mask=None, context=None, context_mask=None):
        b, t, d = x.shape
        check_bucket_multiple(t, self.bucket_size)
        input_mask = check_mask(input_mask, b, t, 'input_mask')
        if self.context_only:
            require(context is not None, 'this cross-attention layer needs context=[batch, context_len, dim]')
            require(context.dim() == 3 and context.shape[0] == b and context.shape[2] == d,
                    f'context must be [batch={b}, context_len, dim={d}], got {tuple(context.shape)}')
            check_bucket_multiple(context.shape[1], self.kv_bucket_size, 'context')
            context_mask = check_mask(context_mask, b, context.shape[1], 'context_mask')
            kv_input, kv_mask = context, context_mask
        else:
            check_bucket_multiple(t, self.kv_bucket_size, 'key/value sequence')
            kv_input, kv_mask = x, input_mask

        dropout_p = self.attn_dropout if self.training else 0.
        if self._runs_fused(x):
            null_kv = (self.null_keys, self.null_values) if self.causal and self.n_local < self.heads else None
            return self.dropout(ops.sinkhorn_self_attention(
                x, self.to_q.weight, self.to_kv.weight, self.to_out.weight, self.to_out.bias, heads=self.heads,
                dim_head=self.dim_head, bucket_size=self.bucket_size, kv_bucket_size=self.kv_bucket_size,
                causal=self.causal, n_top_buckets=self.n_top_buckets, n_sortcut=self.n_sortcut,
                temperature=self.temperature, n_local_heads=self.n_local, null_kv=null_kv, input_mask=input_mask,
                dropout_p=dropout_p))

        split = lambda t_: rearrange(t_, 'b n (h d) -> b h n d', h=self.heads)
        q = split(self.to_q(x))
        # two products instead of one and a chunk: backward then needs no concatenated copy of dk and dv
        k, v = (split(F.linear(kv_input, w)) for w in self.to_kv.weight.chunk(2))
        l = self.n_local
        outs = []
        if l:
            outs.append(ops.local_attention(q[:, :l], k[:, :l], v[:, :l], window_size=self.bucket_size,
                                            causal=self.causal, q_mask=input_mask, kv_mask=kv_mask,
                                            dropout_p=dropout_p))
        if l < self.heads:
            null_kv = (self.null_keys, self.null_values) if self.causal else None
            outs.append(ops.sinkhorn_attention(
                q[:, l:], k[:, l:], v[:, l:], bucket_size=self.bucket_size, kv_bucket_size=self.kv_bucket_size,
                n_top_buckets=self.n_top_buckets, causal=self.causal, n_sortcut=self.n_sortcut,
                # the reference ignores non_permutative=False when causal: causal routing is always top-k
                non_permutative=self.non_permutative or self.causal, sinkhorn_iter=self.sinkhorn_iter,
                temperature=self.temperature, gumbel_noise=self.training, q_mask=input_mask, kv_mask=kv_mask,
                null_kv=null_kv, dropout_p=dropout_p, sort_net=self.sort_net))
        out = rearrange(outs[0] if len(outs) == 1 else torch.cat(outs, dim=1), 'b h n d -> b n (h d)')
        return self.dropout(self.to_out(out))
