// Element types of the kernels' inputs: fp32, fp16, bf16, all computed in fp32.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdexcept>
#include <string>

namespace sinkhorn_kernels {

enum class DType : int { Float32 = 0, Float16 = 1, BFloat16 = 2 };

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16(x); }

// Calls fn with a value of the element type named by `dtype`.
template <typename Fn> void dispatch(int dtype, Fn&& fn) {
  switch (static_cast<DType>(dtype)) {
    case DType::Float32: fn(float{}); break;
    case DType::Float16: fn(__half{}); break;
    case DType::BFloat16: fn(__nv_bfloat16{}); break;
    default: throw std::invalid_argument("unsupported dtype code " + std::to_string(dtype) + " (0 fp32, 1 fp16, 2 bf16)");
  }
}

void check_launch(const char* what);

}  // namespace sinkhorn_kernels
