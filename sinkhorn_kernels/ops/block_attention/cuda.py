"""Block attention through the CUDA extension (csrc/block_attention.cu): the semantics of the Triton kernels."""
from ..cuda_extension import dtype_code, load, stream
from .routes import BackwardBuffers, new_attention_output


def _args(q, k, v, idx, w, null_k, null_v, q_mask, kv_mask, bs, kbs, causal, n_rotated_heads, scale):
    B, H, Tq, D = q.shape
    pointer = lambda t: 0 if t is None else t.data_ptr()
    mask_strides = lambda m: [0, 0] if m is None else [m.stride(0), m.stride(1)]
    return dict(q=q.data_ptr(), k=k.data_ptr(), v=v.data_ptr(), null_k=pointer(null_k), null_v=pointer(null_v),
                idx=idx.data_ptr(), w=w.data_ptr(), q_mask=pointer(q_mask), kv_mask=pointer(kv_mask),
                q_strides=list(q.stride()), k_strides=list(k.stride()), v_strides=list(v.stride()),
                q_mask_strides=mask_strides(q_mask), kv_mask_strides=mask_strides(kv_mask), B=B, H=H, Nq=Tq // bs,
                Nk=k.shape[2] // kbs, R=idx.shape[-1], bucket_size=bs, kv_bucket_size=kbs, dim_head=D,
                n_rotated_heads=n_rotated_heads if causal else 0, causal=causal, scale=scale, dtype=dtype_code(q),
                stream=stream(q))


def _no_dropout(dropout_p):
    if dropout_p > 0:
        raise ValueError("attention dropout is not implemented in the cuda backend yet; pass dropout_p=0 "
                         "(attn_dropout=0) or use backend='triton' or 'reference'")


def forward(q, k, v, idx, w, null_k, null_v, q_mask, kv_mask, bs, kbs, causal, n_rotated_heads, scale, dropout_p,
            seed):
    _no_dropout(dropout_p)
    out, lse = new_attention_output(q)
    load().block_attention_forward(
        _args(q, k, v, idx, w, null_k, null_v, q_mask, kv_mask, bs, kbs, causal, n_rotated_heads, scale),
        out.data_ptr(), list(out.stride()), lse.data_ptr())
    return out, lse


def backward(dout, q, k, v, out, lse, idx, w, null_k, null_v, q_mask, kv_mask, bs, kbs, causal, n_rotated_heads,
             scale, dropout_p, seed, grads=None):
    """As the triton backend's `backward`."""
    _no_dropout(dropout_p)
    buf = BackwardBuffers(dout, q, k, v, out, idx, null_k, kbs, grads=grads)
    pointer = lambda t: 0 if t is None else t.data_ptr()
    load().block_attention_backward(
        _args(q, k, v, idx, w, null_k, null_v, q_mask, kv_mask, bs, kbs, causal, n_rotated_heads, scale),
        dout.data_ptr(), list(dout.stride()), lse.data_ptr(), buf.delta.data_ptr(), buf.readers.data_ptr(),
        buf.start.data_ptr(), buf.count.data_ptr(), buf.dq.data_ptr(), list(buf.dq.stride()), buf.dk.data_ptr(),
        list(buf.dk.stride()), buf.dv.data_ptr(), list(buf.dv.stride()), buf.dw.data_ptr(), pointer(buf.dnull_k),
        pointer(buf.dnull_v))
    return buf.grads()
