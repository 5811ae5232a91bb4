"""The attention sort net's summaries of q and k (the input of its routing) and their vector-Jacobian product:
`reference` in PyTorch, `triton` in two launches each way, `fused` its custom ops."""
from . import reference


def sort_summaries(q, k, *, bucket_size, kv_bucket_size, causal, n_sortcut=0, q_mask=None, kv_mask=None,
                   backend='reference'):
    """`reference.sort_summaries` on `backend` ('triton': its kernels; any other backend: PyTorch). Masks as the
    fused kernels take them: [B, H, T] or None."""
    if backend == 'triton':
        from . import fused
        return fused.sort_summaries(q, k, q_mask, kv_mask, bucket_size, kv_bucket_size, causal, n_sortcut)
    return reference.sort_summaries(q, k, bucket_size=bucket_size, kv_bucket_size=kv_bucket_size, causal=causal,
                                    n_sortcut=n_sortcut, q_mask=q_mask, kv_mask=kv_mask)


def add_sort_summaries_vjp(d_sq, d_sk, dq, dk, *, bucket_size, kv_bucket_size, causal, n_sortcut=0, q_mask=None,
                           kv_mask=None, backend='reference'):
    """`reference.add_sort_summaries_vjp` (into dq and dk, in place) on `backend`, as `sort_summaries`."""
    if backend == 'triton':
        from . import fused
        return fused.add_sort_summaries_vjp(d_sq, d_sk, dq, dk, q_mask, kv_mask, bucket_size, kv_bucket_size, causal,
                                            n_sortcut)
    return reference.add_sort_summaries_vjp(d_sq, d_sk, dq, dk, bucket_size=bucket_size,
                                            kv_bucket_size=kv_bucket_size, causal=causal, n_sortcut=n_sortcut,
                                            q_mask=q_mask, kv_mask=kv_mask)
