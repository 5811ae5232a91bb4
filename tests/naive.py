"""A loop-by-loop block attention, independent of the op's chunked implementation: the oracle for its tests."""
import torch


def naive_block_attention(q, k, v, idx, w, bucket_size, kv_bucket_size=None, own_bucket=True, causal=False,
                          n_rotated_heads=0, null_kv=None, q_mask=None, kv_mask=None):
    B, H, Tq, D = q.shape
    kbs = kv_bucket_size or bucket_size
    nq, nk = Tq // bucket_size, k.shape[2] // kbs
    qm = torch.ones(B, Tq, dtype=torch.bool) if q_mask is None else q_mask
    km = torch.ones(B, k.shape[2], dtype=torch.bool) if kv_mask is None else kv_mask
    out = torch.zeros_like(q)
    for b in range(B):
        for h in range(H):
            rotated = causal and h >= H - n_rotated_heads
            for u in range(nq):
                keys, values, allowed = [], [], []
                rows = idx[b, h, u if idx.shape[2] > 1 else 0]
                weights = w[b, h, u if w.shape[2] > 1 else 0]
                for j, weight in zip(rows.tolist(), weights):
                    if j == -1:
                        continue
                    if j == nk:
                        keys.append(weight * null_kv[0][h].reshape(1, D).expand(kbs, D))
                        values.append(weight * null_kv[1][h].reshape(1, D).expand(kbs, D))
                        allowed.append(torch.ones(bucket_size, kbs, dtype=torch.bool))
                    else:
                        sl = slice(j * kbs, (j + 1) * kbs)
                        keys.append(weight * k[b, h, sl])
                        values.append(weight * v[b, h, sl])
                        allowed.append(km[b, sl][None].expand(bucket_size, kbs).clone())
                    if rotated and u == nq - 1:
                        allowed[-1][1:] = False
                if own_bucket:
                    sl = slice(u * kbs, (u + 1) * kbs)
                    keys.append(k[b, h, sl])
                    values.append(v[b, h, sl])
                    a = km[b, sl][None].expand(bucket_size, kbs).clone()
                    if causal:
                        a &= torch.ones(bucket_size, kbs, dtype=torch.bool).tril()
                        if rotated and u == nq - 1:
                            a[1:, 0] = False
                    allowed.append(a)
                qs = slice(u * bucket_size, (u + 1) * bucket_size)
                a = torch.cat(allowed, dim=1) & qm[b, qs][:, None]
                s = q[b, h, qs] @ torch.cat(keys).T * D ** -0.5
                s = s.masked_fill(~a, float('-inf'))
                p = torch.nan_to_num(s.softmax(dim=-1), nan=0.0)
                out[b, h, qs] = p @ torch.cat(values)
    return out
