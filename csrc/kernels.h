// Host entry points of the CUDA kernels. They take device pointers, sizes, strides (in elements), a dtype code
// and the CUDA stream; nothing here knows about torch, so one build serves every torch version.
#pragma once
#include <cstdint>

namespace sinkhorn_kernels {

// Sinkhorn normalization of G matrices [n, m] (x contiguous, dtype), n_iters >= 1. Outputs: p [G, n, m] in x's
// dtype, fp32 row offsets a [G, n_iters, n] and column offsets b [G, n_iters + 1, m] (b[:, 0] = 0).
void sinkhorn_forward(const void* x, void* p, float* a, float* b, int64_t G, int64_t n, int64_t m, int64_t n_iters,
                      int dtype, uintptr_t stream);
// dp (P's gradient) and dx [G, n, m] in x's dtype; ga, gb: fp32 scratch shaped as a and b.
void sinkhorn_backward(const void* x, const void* dp, void* dx, const float* a, const float* b, float* ga, float* gb,
                       int64_t G, int64_t n, int64_t m, int64_t n_iters, int dtype, uintptr_t stream);

// Block attention over routes idx / w [B, H, Nq, R] (int32 / fp32, contiguous; own bucket last when present;
// idx == Nk is the null bucket, -1 no block). Tensors are [B, H, T, D] with the given strides (4 each);
// masks are bool [B, H, T] with strides (b, h) and unit stride along T, or null.
struct BlockAttentionArgs {
  const void *q, *k, *v, *null_k, *null_v;
  const int32_t* idx;
  const float* w;
  const bool *q_mask, *kv_mask;
  int64_t q_strides[4], k_strides[4], v_strides[4];
  int64_t q_mask_strides[2], kv_mask_strides[2];
  int64_t B, H, Nq, Nk, R, bucket_size, kv_bucket_size, dim_head, n_rotated_heads;
  bool causal;
  float scale;
  int dtype;
  uintptr_t stream;
};

// out: [B, H, Tq, D] with out_strides, dtype; lse fp32 [B, H, Tq] (+inf for rows that see no key).
void block_attention_forward(const BlockAttentionArgs& args, void* out, const int64_t* out_strides, float* lse);
// dout with dout_strides; delta = rowsum(dout * out) fp32 [B, H, Tq]; readers / start / count: the reverse index
// (for every key block, the routes that read it). dq, dk, dv with their strides (dtype); dw fp32 [B, H, Nq, R];
// dnull_k / dnull_v fp32 [B, H, D] when there is a null bucket.
void block_attention_backward(const BlockAttentionArgs& args, const void* dout, const int64_t* dout_strides,
                              const float* lse, const float* delta, const int32_t* readers, const int32_t* start,
                              const int32_t* count, void* dq, const int64_t* dq_strides, void* dk,
                              const int64_t* dk_strides, void* dv, const int64_t* dv_strides, float* dw,
                              float* dnull_k, float* dnull_v);

}  // namespace sinkhorn_kernels
