// Element conversions and dtype dispatch shared by the kernels.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <stdexcept>

#include "rank1_kernels.h"

namespace rank1 {

template <typename T>
__device__ __forceinline__ float to_float(T value);
template <>
__device__ __forceinline__ float to_float<float>(float value) { return value; }
template <>
__device__ __forceinline__ float to_float<__half>(__half value) { return __half2float(value); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 value) { return __bfloat162float(value); }

template <typename T>
__device__ __forceinline__ T from_float(float value);
template <>
__device__ __forceinline__ float from_float<float>(float value) { return value; }
template <>
__device__ __forceinline__ __half from_float<__half>(float value) { return __float2half_rn(value); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float value) { return __float2bfloat16_rn(value); }

__device__ __forceinline__ float warp_sum(float value) {
  for (int offset = 16; offset > 0; offset /= 2) value += __shfl_down_sync(0xffffffffu, value, offset);
  return value;
}

// Runs the statements with T the element type named by dtype (C++17: no templated lambdas).
#define RANK1_DISPATCH(dtype, ...)                                 \
  switch (dtype) {                                                 \
    case ::rank1::Dtype::kFloat32: {                               \
      using T = float;                                             \
      __VA_ARGS__;                                                 \
      break;                                                       \
    }                                                              \
    case ::rank1::Dtype::kFloat16: {                               \
      using T = __half;                                            \
      __VA_ARGS__;                                                 \
      break;                                                       \
    }                                                              \
    case ::rank1::Dtype::kBFloat16: {                              \
      using T = __nv_bfloat16;                                     \
      __VA_ARGS__;                                                 \
      break;                                                       \
    }                                                              \
    default:                                                       \
      throw std::invalid_argument("rank1: unsupported dtype");     \
  }

inline unsigned int blocks_for(int64_t n, int threads) { return static_cast<unsigned int>((n + threads - 1) / threads); }

inline void check_launch(const char* kernel) {
  cudaError_t status = cudaGetLastError();
  if (status != cudaSuccess) {
    throw std::runtime_error(std::string("rank1: launch of ") + kernel + " failed: " + cudaGetErrorString(status));
  }
}

}  // namespace rank1
