// Sinkhorn normalization, one thread block per matrix, all iterations in one launch. An iterate is
// x - a_t[i] - b_t[j] for the row and column log-sum-exp offsets, so only those vectors are iterated (the same
// scheme as the Triton kernel); backward rebuilds each iterate, P among them, from x and the vectors. P and dx are
// in x's type; every buffer is written whole, so none needs zeroing first.
#include <cuda_runtime.h>
#include <math_constants.h>

#include "dtypes.cuh"
#include "kernels.h"

namespace sinkhorn_kernels {

namespace {

constexpr int kThreads = 256;

// out[o] = logsumexp_i (x[o * s_out + i * s_in] - off[i]): row offsets with (s_out, s_in) = (m, 1), column offsets
// with (1, m), the same reduction on the transposed matrix.
template <typename T>
__device__ void lse_along(const T* x, int64_t s_out, int64_t s_in, int64_t n_out, int64_t n_in, const float* off,
                          float* out) {
  for (int64_t o = threadIdx.x; o < n_out; o += blockDim.x) {
    float run_max = -CUDART_INF_F, run_sum = 0.f;
    for (int64_t i = 0; i < n_in; ++i) {
      const float z = to_float(x[o * s_out + i * s_in]) - off[i];
      const float new_max = fmaxf(run_max, z);
      run_sum = run_sum * __expf(run_max - new_max) + __expf(z - new_max);
      run_max = new_max;
    }
    out[o] = run_max + __logf(run_sum);
  }
}

// out[o] = (accumulate ? out[o] : 0) - sum_i w * exp(x[o * s_out + i * s_in] - own[o] - other[i]), along rows or
// (transposed) columns, with the weight w the matrix dp laid out as x where given, else the vector g[i].
template <typename T>
__device__ void exp_sums(const T* x, const T* dp, const float* g, int64_t s_out, int64_t s_in, int64_t n_out,
                         int64_t n_in, const float* own, const float* other, float* out, bool accumulate) {
  for (int64_t o = threadIdx.x; o < n_out; o += blockDim.x) {
    float acc = 0.f;
    for (int64_t i = 0; i < n_in; ++i) {
      const int64_t e = o * s_out + i * s_in;
      acc += (dp ? to_float(dp[e]) : g[i]) * __expf(to_float(x[e]) - own[o] - other[i]);
    }
    out[o] = (accumulate ? out[o] : 0.f) - acc;
  }
}

template <typename T>
__global__ void sinkhorn_forward_kernel(const T* __restrict__ x, T* __restrict__ p, float* __restrict__ A,
                                        float* __restrict__ Bv, int64_t n, int64_t m, int64_t iters) {
  const int64_t g = blockIdx.x;
  x += g * n * m;
  p += g * n * m;
  A += g * iters * n;
  Bv += g * (iters + 1) * m;
  for (int64_t j = threadIdx.x; j < m; j += blockDim.x) Bv[j] = 0.f;  // b_0
  __syncthreads();
  for (int64_t t = 0; t < iters; ++t) {
    lse_along(x, m, 1, n, m, Bv + t * m, A + t * n);  // a_{t+1}[i] = logsumexp_j (x[i, j] - b_t[j])
    __syncthreads();
    lse_along(x, 1, m, m, n, A + t * n, Bv + (t + 1) * m);  // b_{t+1}[j] = logsumexp_i (x[i, j] - a_{t+1}[i])
    __syncthreads();
  }
  const float* a = A + (iters - 1) * n;
  const float* b = Bv + iters * m;
  for (int64_t e = threadIdx.x; e < n * m; e += blockDim.x) {
    p[e] = from_float<T>(__expf(to_float(x[e]) - a[e / m] - b[e % m]));
  }
}

template <typename T>
__global__ void sinkhorn_backward_kernel(const T* __restrict__ x, const T* __restrict__ dp, T* __restrict__ dx,
                                         const float* __restrict__ A, const float* __restrict__ Bv,
                                         float* __restrict__ GA, float* __restrict__ GB, int64_t n, int64_t m,
                                         int64_t iters) {
  const int64_t g = blockIdx.x;
  x += g * n * m;
  dp += g * n * m;
  dx += g * n * m;
  A += g * iters * n;
  GA += g * iters * n;
  Bv += g * (iters + 1) * m;
  GB += g * (iters + 1) * m;
  const float* a_last = A + (iters - 1) * n;
  const float* b_last = Bv + iters * m;
  // P = exp(x - a_T - b_T): dP * P sends -rowsum to a_T and -colsum to b_T
  exp_sums(x, dp, nullptr, m, 1, n, m, a_last, b_last, GA + (iters - 1) * n, false);
  exp_sums(x, dp, nullptr, 1, m, m, n, b_last, a_last, GB + iters * m, false);
  __syncthreads();
  for (int64_t t = iters - 1; t >= 0; --t) {
    // column step: b_{t+1} = colLSE(x - a_{t+1}) sends -sum_j gb[j] C[i, j] to a_{t+1} (a_T has dP * P's)
    exp_sums<T>(x, nullptr, GB + (t + 1) * m, m, 1, n, m, A + t * n, Bv + (t + 1) * m, GA + t * n, t == iters - 1);
    __syncthreads();
    // row step: a_{t+1} = rowLSE(x - b_t) sends -sum_i ga[i] R[i, j] to b_t, unless t = 0 (b_0 is constant)
    if (t > 0) exp_sums<T>(x, nullptr, GA + t * n, 1, m, m, n, Bv + t * m, A + t * n, GB + t * m, false);
    __syncthreads();
  }
  // dx = dP * P + sum_t (gb_{t+1}[j] C_{t+1} + ga_{t+1}[i] R_{t+1}), where P is the last C
  for (int64_t e = threadIdx.x; e < n * m; e += blockDim.x) {
    const int64_t i = e / m, j = e % m;
    const float xe = to_float(x[e]);
    float acc = 0.f, c = 0.f;
    for (int64_t t = 0; t < iters; ++t) {
      c = __expf(xe - A[t * n + i] - Bv[(t + 1) * m + j]);
      acc += GB[(t + 1) * m + j] * c + GA[t * n + i] * __expf(xe - A[t * n + i] - Bv[t * m + j]);
    }
    dx[e] = from_float<T>(acc + to_float(dp[e]) * c);
  }
}

}  // namespace

void check_launch(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(err));
}

void sinkhorn_forward(const void* x, void* p, float* a, float* b, int64_t G, int64_t n, int64_t m, int64_t n_iters,
                      int dtype, uintptr_t stream) {
  dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    sinkhorn_forward_kernel<T><<<G, kThreads, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
        static_cast<const T*>(x), static_cast<T*>(p), a, b, n, m, n_iters);
  });
  check_launch("sinkhorn_forward");
}

void sinkhorn_backward(const void* x, const void* dp, void* dx, const float* a, const float* b, float* ga, float* gb,
                       int64_t G, int64_t n, int64_t m, int64_t n_iters, int dtype, uintptr_t stream) {
  dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    sinkhorn_backward_kernel<T><<<G, kThreads, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
        static_cast<const T*>(x), static_cast<const T*>(dp), static_cast<T*>(dx), a, b, ga, gb, n, m, n_iters);
  });
  check_launch("sinkhorn_backward");
}

}  // namespace sinkhorn_kernels
