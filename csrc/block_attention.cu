// Block attention: each query bucket attends, in one online softmax, to its routed key blocks (loaded by index,
// scaled by their routing weight in the kernel) and its own bucket. The semantics, routes and masks are those of
// the Triton kernels. One thread per query row (forward, dQ) or key row (dK/dV); key and query tiles are staged in
// shared memory. dK/dV walk the reverse index (for each key block, the routes that read it): every gradient is
// written once, with no atomics, so results are deterministic.
#include <cuda_runtime.h>
#include <math_constants.h>

#include <stdexcept>

#include "dtypes.cuh"
#include "kernels.h"

namespace sinkhorn_kernels {

namespace {

constexpr int kThreads = 128;  // >= the largest bucket: one thread per row
constexpr int kMaxD = 128;
constexpr int kTile = 32;      // keys (forward, dQ) or queries (dK/dV) per shared-memory tile

struct Strides4 {
  int64_t s[4];
};

__device__ __forceinline__ int64_t offset(const int64_t* s, int64_t b, int64_t h, int64_t t, int64_t d) {
  return b * s[0] + h * s[1] + t * s[2] + d * s[3];
}

// May query row `row` of bucket u see key column `col` of block `blk`, reached through route j?
__device__ bool allowed(const BlockAttentionArgs& a, int64_t b, int64_t h, int64_t u, int64_t j, int64_t blk,
                        int64_t row, int64_t col) {
  if (row >= a.bucket_size || col >= a.kv_bucket_size || blk < 0) return false;
  if (a.q_mask && !a.q_mask[b * a.q_mask_strides[0] + h * a.q_mask_strides[1] + u * a.bucket_size + row]) return false;
  if (a.kv_mask && blk < a.Nk &&
      !a.kv_mask[b * a.kv_mask_strides[0] + h * a.kv_mask_strides[1] + blk * a.kv_bucket_size + col])
    return false;
  if (a.causal) {
    const bool routed = j < a.R - 1;  // causal attention has the own bucket as its last route
    if (!routed && col > row) return false;
    // rotated heads: the last bucket's rows 1.. are the wrapped-around first tokens of the sequence; they see
    // only their own earlier tokens, not the routed blocks nor key 0 (the last token)
    if (h >= a.H - a.n_rotated_heads && u == a.Nq - 1 && row >= 1 && (routed || col == 0)) return false;
  }
  return true;
}

// Element d of row `col` of key/value block `blk` (the null vector for blk == Nk, 0 for -1).
template <typename T>
__device__ __forceinline__ float block_elem(const BlockAttentionArgs& a, const void* x, const int64_t* s,
                                            const void* null, int64_t b, int64_t h, int64_t blk, int64_t col,
                                            int64_t d) {
  if (blk == a.Nk) return to_float(static_cast<const T*>(null)[h * a.dim_head + d]);
  if (blk < 0 || col >= a.kv_bucket_size) return 0.f;
  return to_float(static_cast<const T*>(x)[offset(s, b, h, blk * a.kv_bucket_size + col, d)]);
}

__device__ __forceinline__ float dot(const float* x, const float* y, int64_t D) {
  float acc = 0.f;
  for (int64_t d = 0; d < D; ++d) acc += x[d] * y[d];
  return acc;
}

// Sum over the block's threads in a fixed order (deterministic).
__device__ float block_sum(float x, float* scratch) {
  scratch[threadIdx.x] = x;
  __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) scratch[threadIdx.x] += scratch[threadIdx.x + stride];
    __syncthreads();
  }
  const float total = scratch[0];
  __syncthreads();
  return total;
}

template <typename T>
__device__ void load_key_tile(const BlockAttentionArgs& a, int64_t b, int64_t h, int64_t blk, int64_t c0,
                              float (*ks)[kMaxD], float (*vs)[kMaxD]) {
  const int64_t D = a.dim_head;
  for (int64_t e = threadIdx.x; e < kTile * D; e += blockDim.x) {
    const int64_t cc = e / D, d = e % D;
    ks[cc][d] = block_elem<T>(a, a.k, a.k_strides, a.null_k, b, h, blk, c0 + cc, d);
    vs[cc][d] = block_elem<T>(a, a.v, a.v_strides, a.null_v, b, h, blk, c0 + cc, d);
  }
}

// Walks the routes of query bucket u and their key tiles (staged in ks / vs): on_key(w, key row, value row) for
// every key that row `row` may see, after_route(j) once per route on every thread (it may synchronize).
template <typename T, typename OnKey, typename AfterRoute>
__device__ void visit_routes(const BlockAttentionArgs& a, int64_t b, int64_t h, int64_t u, int64_t row,
                             float (*ks)[kMaxD], float (*vs)[kMaxD], OnKey on_key, AfterRoute after_route) {
  const int64_t route = ((b * a.H + h) * a.Nq + u) * a.R;
  for (int64_t j = 0; j < a.R; ++j) {
    const int64_t blk = a.idx[route + j];
    const float w = a.w[route + j];
    for (int64_t c0 = 0; c0 < a.kv_bucket_size; c0 += kTile) {
      __syncthreads();
      load_key_tile<T>(a, b, h, blk, c0, ks, vs);
      __syncthreads();
      for (int64_t cc = 0; cc < kTile && c0 + cc < a.kv_bucket_size; ++cc)
        if (allowed(a, b, h, u, j, blk, row, c0 + cc)) on_key(w, ks[cc], vs[cc]);
    }
    after_route(route + j);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) forward_kernel(BlockAttentionArgs a, T* out, Strides4 os, float* lse) {
  __shared__ float ks[kTile][kMaxD], vs[kTile][kMaxD];
  const int64_t u = blockIdx.x, bh = blockIdx.y, b = bh / a.H, h = bh % a.H, D = a.dim_head;
  const int64_t row = threadIdx.x;
  const bool active = row < a.bucket_size;
  float q[kMaxD], acc[kMaxD];
  for (int64_t d = 0; d < D; ++d) {
    q[d] = active ? to_float(static_cast<const T*>(a.q)[offset(a.q_strides, b, h, u * a.bucket_size + row, d)]) : 0.f;
    acc[d] = 0.f;
  }
  float run_max = -CUDART_INF_F, run_sum = 0.f;
  visit_routes<T>(a, b, h, u, row, ks, vs, [&](float w, const float* kr, const float* vr) {
    const float s = dot(q, kr, D) * a.scale * w;
    const float new_max = fmaxf(run_max, s);
    const float correction = __expf(run_max - new_max), pe = __expf(s - new_max);
    run_sum = run_sum * correction + pe;
    for (int64_t d = 0; d < D; ++d) acc[d] = acc[d] * correction + pe * w * vr[d];
    run_max = new_max;
  }, [](int64_t) {});
  if (!active) return;
  const int64_t t = u * a.bucket_size + row;
  for (int64_t d = 0; d < D; ++d) out[offset(os.s, b, h, t, d)] = from_float<T>(run_sum > 0.f ? acc[d] / run_sum : 0.f);
  // +inf for rows that see no key: backward's exp(s - lse) is then 0
  lse[bh * a.Nq * a.bucket_size + t] = run_sum > 0.f ? run_max + __logf(run_sum) : CUDART_INF_F;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) dq_kernel(BlockAttentionArgs a, const T* dout, Strides4 dos,
                                                      const float* lse, const float* delta, T* dq, Strides4 dqs,
                                                      float* dw) {
  __shared__ float ks[kTile][kMaxD], vs[kTile][kMaxD];
  __shared__ float scratch[kThreads];
  const int64_t u = blockIdx.x, bh = blockIdx.y, b = bh / a.H, h = bh % a.H, D = a.dim_head;
  const int64_t row = threadIdx.x, t = u * a.bucket_size + row;
  const bool active = row < a.bucket_size;
  float q[kMaxD], dO[kMaxD], g[kMaxD];
  for (int64_t d = 0; d < D; ++d) {
    q[d] = active ? to_float(static_cast<const T*>(a.q)[offset(a.q_strides, b, h, t, d)]) : 0.f;
    dO[d] = active ? to_float(dout[offset(dos.s, b, h, t, d)]) : 0.f;
    g[d] = 0.f;
  }
  const float row_lse = active ? lse[bh * a.Nq * a.bucket_size + t] : CUDART_INF_F;
  const float row_delta = active ? delta[bh * a.Nq * a.bucket_size + t] : 0.f;
  float dw_part = 0.f;
  visit_routes<T>(a, b, h, u, row, ks, vs, [&](float w, const float* kr, const float* vr) {
    const float s_raw = dot(q, kr, D) * a.scale;
    const float p = __expf(w * s_raw - row_lse);
    const float dp_raw = dot(dO, vr, D);  // dO . v before the route weight
    const float ds = p * (w * dp_raw - row_delta);
    for (int64_t d = 0; d < D; ++d) g[d] += ds * w * kr[d];
    // s = w * s_raw and the values are w * v: d/dw = ds * s_raw + p * (dO . v)
    dw_part += ds * s_raw + p * dp_raw;
  }, [&](int64_t route) {
    const float total = block_sum(dw_part, scratch);
    if (threadIdx.x == 0) dw[route] = total;
    dw_part = 0.f;
  });
  if (!active) return;
  for (int64_t d = 0; d < D; ++d) dq[offset(dqs.s, b, h, t, d)] = from_float<T>(g[d] * a.scale);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) dkv_kernel(BlockAttentionArgs a, const T* dout, Strides4 dos,
                                                       const float* lse, const float* delta, const int32_t* readers,
                                                       const int32_t* start, const int32_t* count, T* dk,
                                                       Strides4 dks, T* dv, Strides4 dvs, float* dnull_k,
                                                       float* dnull_v) {
  __shared__ float qs[kTile][kMaxD], dos_tile[kTile][kMaxD];
  __shared__ float lse_tile[kTile], delta_tile[kTile];
  __shared__ float scratch[kThreads];
  const int64_t n = blockIdx.x, bh = blockIdx.y, b = bh / a.H, h = bh % a.H, D = a.dim_head;  // n == Nk: null
  const int64_t col = threadIdx.x;
  const bool active = col < a.kv_bucket_size;
  float k[kMaxD], v[kMaxD], gk[kMaxD], gv[kMaxD];
  for (int64_t d = 0; d < D; ++d) {
    k[d] = active ? block_elem<T>(a, a.k, a.k_strides, a.null_k, b, h, n, col, d) : 0.f;
    v[d] = active ? block_elem<T>(a, a.v, a.v_strides, a.null_v, b, h, n, col, d) : 0.f;
    gk[d] = gv[d] = 0.f;
  }
  const int32_t first = start[bh * (a.Nk + 1) + n], readers_n = count[bh * (a.Nk + 1) + n];
  for (int32_t r = 0; r < readers_n; ++r) {
    const int64_t e = readers[bh * a.Nq * a.R + first + r];
    const int64_t u = e / a.R, j = e % a.R;
    const float w = a.w[bh * a.Nq * a.R + e];
    for (int64_t i0 = 0; i0 < a.bucket_size; i0 += kTile) {
      __syncthreads();
      for (int64_t x = threadIdx.x; x < kTile * D; x += blockDim.x) {
        const int64_t ii = x / D, d = x % D, t = u * a.bucket_size + i0 + ii;
        const bool in = i0 + ii < a.bucket_size;
        qs[ii][d] = in ? to_float(static_cast<const T*>(a.q)[offset(a.q_strides, b, h, t, d)]) : 0.f;
        dos_tile[ii][d] = in ? to_float(dout[offset(dos.s, b, h, t, d)]) : 0.f;
      }
      for (int64_t ii = threadIdx.x; ii < kTile; ii += blockDim.x) {
        const int64_t t = u * a.bucket_size + i0 + ii;
        const bool in = i0 + ii < a.bucket_size;
        lse_tile[ii] = in ? lse[bh * a.Nq * a.bucket_size + t] : CUDART_INF_F;
        delta_tile[ii] = in ? delta[bh * a.Nq * a.bucket_size + t] : 0.f;
      }
      __syncthreads();
      if (!active) continue;
      for (int64_t ii = 0; ii < kTile && i0 + ii < a.bucket_size; ++ii) {
        if (!allowed(a, b, h, u, j, n, i0 + ii, col)) continue;
        const float p = __expf(w * dot(qs[ii], k, D) * a.scale - lse_tile[ii]);
        const float ds = p * (w * dot(dos_tile[ii], v, D) - delta_tile[ii]);
        for (int64_t d = 0; d < D; ++d) {
          gv[d] += p * w * dos_tile[ii][d];
          gk[d] += ds * w * a.scale * qs[ii][d];
        }
      }
    }
  }
  if (n < a.Nk) {
    if (!active) return;
    for (int64_t d = 0; d < D; ++d) {
      dk[offset(dks.s, b, h, n * a.kv_bucket_size + col, d)] = from_float<T>(gk[d]);
      dv[offset(dvs.s, b, h, n * a.kv_bucket_size + col, d)] = from_float<T>(gv[d]);
    }
    return;
  }
  // the null block is one vector repeated over the block: its gradient is the sum over the block's rows
  for (int64_t d = 0; d < D; ++d) {
    const float sk = block_sum(active ? gk[d] : 0.f, scratch);
    const float sv = block_sum(active ? gv[d] : 0.f, scratch);
    if (threadIdx.x == 0) {
      dnull_k[bh * D + d] = sk;
      dnull_v[bh * D + d] = sv;
    }
  }
}

void check_sizes(const BlockAttentionArgs& a) {
  if (a.bucket_size > kThreads || a.kv_bucket_size > kThreads || a.dim_head > kMaxD)
    throw std::invalid_argument("the cuda backend supports bucket sizes and dim_head up to 128");
}

Strides4 strides(const int64_t* s) { return Strides4{{s[0], s[1], s[2], s[3]}}; }

}  // namespace

void block_attention_forward(const BlockAttentionArgs& args, void* out, const int64_t* out_strides, float* lse) {
  check_sizes(args);
  dispatch(args.dtype, [&](auto tag) {
    using T = decltype(tag);
    forward_kernel<T><<<dim3(args.Nq, args.B * args.H), kThreads, 0, reinterpret_cast<cudaStream_t>(args.stream)>>>(
        args, static_cast<T*>(out), strides(out_strides), lse);
  });
  check_launch("block_attention_forward");
}

void block_attention_backward(const BlockAttentionArgs& args, const void* dout, const int64_t* dout_strides,
                              const float* lse, const float* delta, const int32_t* readers, const int32_t* start,
                              const int32_t* count, void* dq, const int64_t* dq_strides, void* dk,
                              const int64_t* dk_strides, void* dv, const int64_t* dv_strides, float* dw,
                              float* dnull_k, float* dnull_v) {
  check_sizes(args);
  const auto stream = reinterpret_cast<cudaStream_t>(args.stream);
  const int64_t key_blocks = args.Nk + (args.null_k ? 1 : 0);
  dispatch(args.dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* d_out = static_cast<const T*>(dout);
    dq_kernel<T><<<dim3(args.Nq, args.B * args.H), kThreads, 0, stream>>>(
        args, d_out, strides(dout_strides), lse, delta, static_cast<T*>(dq), strides(dq_strides), dw);
    dkv_kernel<T><<<dim3(key_blocks, args.B * args.H), kThreads, 0, stream>>>(
        args, d_out, strides(dout_strides), lse, delta, readers, start, count, static_cast<T*>(dk),
        strides(dk_strides), static_cast<T*>(dv), strides(dv_strides), dnull_k, dnull_v);
  });
  check_launch("block_attention_backward");
}

}  // namespace sinkhorn_kernels
