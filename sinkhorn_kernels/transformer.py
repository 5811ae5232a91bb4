"""SinkhornTransformer and SinkhornTransformerLM: the reference's classes, arguments and defaults."""
import functools
import math

import torch
from axial_positional_embedding import AxialPositionalEmbedding
from product_key_memory import PKM
from torch import nn

from ._checks import require
from .attention import SinkhornSelfAttention
from .reversible import layer_drop, run_reversible, run_sequential


class FeedForward(nn.Module):
    def __init__(self, dim, mult=4, dropout=0., glu=False, chunks=1):
        super().__init__()
        self.glu, self.chunks = glu, chunks
        self.w1 = nn.Linear(dim, dim * mult * (2 if glu else 1))
        self.act = nn.GELU()
        self.dropout = nn.Dropout(dropout)
        self.w2 = nn.Linear(dim * mult, dim)

    def _ff(self, x):
        if self.glu:
            x, gate = self.w1(x).chunk(2, dim=-1)
            x = self.act(x) * gate
        else:
            x = self.act(self.w1(x))
        return self.w2(self.dropout(x))

    def forward(self, x):
        # chunking the sequence bounds the hidden activation's memory; the result is the same
        return torch.cat([self._ff(c) for c in x.chunk(self.chunks, dim=1)], dim=1)


class PreNorm(nn.Module):
    def __init__(self, dim, fn):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fn = fn

    def forward(self, x, **kwargs):
        return self.fn(self.norm(x), **kwargs)


class ReZero(nn.Module):
    def __init__(self, dim, fn):
        super().__init__()
        self.g = nn.Parameter(torch.zeros(1))
        self.fn = fn

    def forward(self, x, **kwargs):
        return self.fn(x, **kwargs) * self.g


def shared_if(tied, make):
    """With weight tying every call returns the first module built."""
    return functools.cache(make) if tied else make


class SinkhornTransformer(nn.Module):
    def __init__(self, dim, depth, max_seq_len=None, causal=False, heads=8, dim_head=None, bucket_size=64,
                 kv_bucket_size=None, context_bucket_size=None, non_permutative=False, sinkhorn_iter=5, n_sortcut=0,
                 temperature=0.75, reversible=False, ff_chunks=1, ff_dropout=0., attn_dropout=0.,
                 attn_layer_dropout=0., layer_dropout=0., weight_tie=False, ff_glu=False, use_simple_sort_net=None,
                 receives_context=False, context_n_sortcut=2, n_local_attn_heads=0, use_rezero=False,
                 n_top_buckets=1, pkm_layers=tuple(), pkm_num_keys=128):
        super().__init__()
        require(0 <= layer_dropout < 1, f'layer_dropout must be in [0, 1), got {layer_dropout}')
        kv_bucket_size = kv_bucket_size or bucket_size
        context_bucket_size = context_bucket_size or bucket_size
        self.is_fixed_length = bool(use_simple_sort_net) and not causal
        require(not (self.is_fixed_length and max_seq_len is None),
                'use_simple_sort_net without causal needs max_seq_len (the sequence length is fixed)')
        attn_kwargs = dict(heads=heads, dim_head=dim_head, non_permutative=non_permutative,
                           sinkhorn_iter=sinkhorn_iter, temperature=temperature, attn_dropout=attn_dropout,
                           dropout=attn_layer_dropout, n_top_buckets=n_top_buckets)
        make_attn = shared_if(weight_tie, lambda: SinkhornSelfAttention(
            dim, bucket_size, max_seq_len, causal=causal, kv_bucket_size=kv_bucket_size, n_sortcut=n_sortcut,
            use_simple_sort_net=bool(use_simple_sort_net), n_local_attn_heads=n_local_attn_heads, **attn_kwargs))
        make_ff = shared_if(weight_tie, lambda: FeedForward(dim, dropout=ff_dropout, glu=ff_glu, chunks=ff_chunks))
        make_ctx_attn = shared_if(weight_tie, lambda: SinkhornSelfAttention(
            dim, bucket_size, max_seq_len, context_only=True, kv_bucket_size=context_bucket_size,
            n_sortcut=context_n_sortcut, **attn_kwargs))
        make_ctx_ff = shared_if(weight_tie, lambda: FeedForward(dim, dropout=ff_dropout, glu=ff_glu))
        wrap = (lambda fn: ReZero(dim, fn)) if use_rezero else (lambda fn: PreNorm(dim, fn))

        self.layers = nn.ModuleList()
        self.is_context_layer = []
        for layer in range(1, depth + 1):
            ff = PKM(dim, num_keys=pkm_num_keys) if layer in pkm_layers else make_ff()
            self.layers.append(nn.ModuleList([wrap(make_attn()), wrap(ff)]))
            self.is_context_layer.append(False)
            if receives_context:
                self.layers.append(nn.ModuleList([wrap(make_ctx_attn()), wrap(make_ctx_ff())]))
                self.is_context_layer.append(True)

        self.reversible, self.layer_dropout = reversible, layer_dropout
        self.receives_context, self.max_seq_len = receives_context, max_seq_len
        self.pad_to_bucket_size = math.lcm(bucket_size, kv_bucket_size)
        self.context_bucket_size = context_bucket_size

    def forward(self, x, input_mask=None, context=None, context_mask=None):
        require(not (self.is_fixed_length and x.shape[1] != self.max_seq_len),
                f'with use_simple_sort_net (non-causal) the sequence length must be max_seq_len={self.max_seq_len}, '
                f'got {x.shape[1]}; pad it with sinkhorn_kernels.Autopadder or fix max_seq_len')
        require(context is None or self.receives_context,
                'context was passed but the model was built without receives_context=True')
        require(context is not None or not self.receives_context,
                'this model was built with receives_context=True and needs context=[batch, context_len, dim]')
        main_kwargs = dict(input_mask=input_mask)
        ctx_kwargs = dict(input_mask=input_mask, context=context, context_mask=context_mask)
        pairs = [(tuple(fg), ctx_kwargs if is_ctx else main_kwargs)
                 for fg, is_ctx in zip(self.layers, self.is_context_layer)]
        if self.training and self.layer_dropout > 0:
            pairs = layer_drop(pairs, self.layer_dropout)
        return (run_reversible if self.reversible else run_sequential)(x, pairs)


class SinkhornTransformerLM(nn.Module):
    def __init__(self, num_tokens, dim, max_seq_len, depth, heads=8, dim_head=None, bucket_size=64,
                 kv_bucket_size=None, context_bucket_size=None, causal=False, non_permutative=True, sinkhorn_iter=5,
                 n_sortcut=0, temperature=0.75, reversible=False, ff_chunks=1, ff_glu=False, return_embeddings=False,
                 ff_dropout=0., attn_dropout=0., attn_layer_dropout=0., layer_dropout=0., emb_dropout=0.,
                 weight_tie=False, emb_dim=None, use_simple_sort_net=None, receives_context=False,
                 context_n_sortcut=0, n_local_attn_heads=0, use_rezero=False, n_top_buckets=2, pkm_layers=tuple(),
                 pkm_num_keys=128):
        super().__init__()
        require(max_seq_len % bucket_size == 0,
                f'max_seq_len {max_seq_len} must be a multiple of bucket_size {bucket_size}')
        emb_dim = emb_dim or dim
        self.max_seq_len = max_seq_len
        self.token_emb = nn.Embedding(num_tokens, emb_dim)
        self.pos_emb = AxialPositionalEmbedding(emb_dim, axial_shape=(max_seq_len // bucket_size, bucket_size))
        self.emb_dropout = nn.Dropout(emb_dropout)
        self.transformer = SinkhornTransformer(
            dim, depth, max_seq_len=max_seq_len, causal=causal, heads=heads, dim_head=dim_head,
            bucket_size=bucket_size, kv_bucket_size=kv_bucket_size, context_bucket_size=context_bucket_size,
            non_permutative=non_permutative, sinkhorn_iter=sinkhorn_iter, n_sortcut=n_sortcut,
            temperature=temperature, reversible=reversible, ff_chunks=ff_chunks, ff_dropout=ff_dropout,
            attn_dropout=attn_dropout, attn_layer_dropout=attn_layer_dropout, layer_dropout=layer_dropout,
            weight_tie=weight_tie, ff_glu=ff_glu, use_simple_sort_net=use_simple_sort_net,
            receives_context=receives_context, context_n_sortcut=context_n_sortcut,
            n_local_attn_heads=n_local_attn_heads, use_rezero=use_rezero, n_top_buckets=n_top_buckets,
            pkm_layers=pkm_layers, pkm_num_keys=pkm_num_keys)
        projected = emb_dim != dim
        self.project_in = nn.Linear(emb_dim, dim) if projected else nn.Identity()
        self.project_out = nn.Linear(dim, emb_dim) if projected and not return_embeddings else nn.Identity()
        # returned embeddings stay at the transformer's width (the reference normalizes at emb_dim and crashes)
        self.norm = nn.LayerNorm(dim if projected and return_embeddings else emb_dim)
        self.to_logits = nn.Identity() if return_embeddings else nn.Linear(emb_dim, num_tokens)

    def forward(self, x, input_mask=None, context=None, context_mask=None):
        require(x.dim() == 2 and not x.is_floating_point(),
                f'x must be [batch, seq_len] token ids, got {tuple(x.shape)} {x.dtype}')
        require(x.shape[1] <= self.max_seq_len,
                f'sequence length {x.shape[1]} exceeds max_seq_len {self.max_seq_len}; truncate or build a longer '
                'model')
        x = self.token_emb(x)
        x = self.emb_dropout(x + self.pos_emb(x))
        x = self.transformer(self.project_in(x), input_mask=input_mask, context=context, context_mask=context_mask)
        return self.to_logits(self.norm(self.project_out(x)))
