// The pool linear's sparse parts: shrink onto the k chosen experts, gated outer-product expand, and their
// gradients. The dense base products (x W^T, dy W) go through cuBLAS in bindings.cpp. fp32 accumulation and a
// fp32 rank intermediate throughout; every reduction has a fixed order, so results are the same run to run.
#include "common.cuh"

namespace rank1 {
namespace {

constexpr int kShrinkThreads = 128;  // 4 warps per row, each warp one slot at a time
constexpr int kColumnThreads = 256;  // one output column per thread

template <typename T>
__global__ void shrink_kernel(const T* __restrict__ in, int64_t in_row_stride, const T* __restrict__ proj,
                              int64_t proj_stride_expert, int64_t proj_stride_dim, const int64_t* __restrict__ expert_idx,
                              float* __restrict__ out, int64_t depth, int64_t k, int64_t tokens_per_sample) {
  const int64_t row = blockIdx.x;
  const int64_t sample = row / tokens_per_sample;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const T* row_in = in + row * in_row_stride;
  for (int64_t slot = warp; slot < k; slot += kShrinkThreads / 32) {
    const T* expert = proj + expert_idx[sample * k + slot] * proj_stride_expert;
    float acc = 0.f;
    for (int64_t d = lane; d < depth; d += 32) acc += to_float(row_in[d]) * to_float(expert[d * proj_stride_dim]);
    acc = warp_sum(acc);
    if (lane == 0) out[row * k + slot] = acc;
  }
}

template <typename T>
__global__ void expand_add_kernel(T* __restrict__ y, const float* __restrict__ u, const T* __restrict__ gates,
                                  float scaling, const T* __restrict__ expand, int64_t stride_expert, int64_t stride_out,
                                  const int64_t* __restrict__ expert_idx, int64_t n_out, int64_t k,
                                  int64_t tokens_per_sample) {
  extern __shared__ unsigned char shared[];
  float* coefficient = reinterpret_cast<float*>(shared);
  int64_t* expert = reinterpret_cast<int64_t*>(coefficient + k + (k & 1));  // 8-byte aligned after the floats
  const int64_t row = blockIdx.x;
  const int64_t sample = row / tokens_per_sample;
  for (int64_t slot = threadIdx.x; slot < k; slot += blockDim.x) {
    coefficient[slot] = u[row * k + slot] * to_float(gates[sample * k + slot]) * scaling;
    expert[slot] = expert_idx[sample * k + slot];
  }
  __syncthreads();
  const int64_t o = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  if (o >= n_out) return;
  float acc = to_float(y[row * n_out + o]);
  for (int64_t slot = 0; slot < k; ++slot) acc += coefficient[slot] * to_float(expand[expert[slot] * stride_expert + o * stride_out]);
  y[row * n_out + o] = from_float<T>(acc);
}

template <typename T>
__global__ void gate_grad_kernel(const float* __restrict__ u, const float* __restrict__ v, float scaling,
                                 T* __restrict__ dgates, int64_t k, int64_t tokens_per_sample) {
  const int64_t sample = blockIdx.x;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int64_t slot = warp; slot < k; slot += kShrinkThreads / 32) {
    float acc = 0.f;
    for (int64_t t = lane; t < tokens_per_sample; t += 32) {
      const int64_t row = sample * tokens_per_sample + t;
      acc += u[row * k + slot] * v[row * k + slot];
    }
    acc = warp_sum(acc);
    if (lane == 0) dgates[sample * k + slot] = from_float<T>(acc * scaling);
  }
}

template <typename T>
__global__ void pair_partial_kernel(const float* __restrict__ coef, const T* __restrict__ gates, float scaling,
                                    const T* __restrict__ m, int64_t m_row_stride, float* __restrict__ partial,
                                    int64_t n_cols, int64_t k, int64_t tokens_per_sample) {
  const int64_t pair = blockIdx.x;  // sample * k + slot
  const int64_t sample = pair / k, slot = pair % k;
  const int64_t c = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  if (c >= n_cols) return;
  float acc = 0.f;
  for (int64_t t = 0; t < tokens_per_sample; ++t) {
    const int64_t row = sample * tokens_per_sample + t;
    acc += coef[row * k + slot] * to_float(m[row * m_row_stride + c]);
  }
  partial[pair * n_cols + c] = acc * to_float(gates[pair]) * scaling;
}

template <typename T>
__global__ void scatter_experts_kernel(const float* __restrict__ partial, const int64_t* __restrict__ expert_idx,
                                       int64_t n_pairs, T* __restrict__ out, int64_t out_stride_expert,
                                       int64_t out_stride_col, int64_t n_cols) {
  const int64_t expert = blockIdx.x;
  const int64_t c = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  if (c >= n_cols) return;
  float acc = 0.f;
  for (int64_t pair = 0; pair < n_pairs; ++pair) {
    if (expert_idx[pair] == expert) acc += partial[pair * n_cols + c];
  }
  out[expert * out_stride_expert + c * out_stride_col] = from_float<T>(acc);
}

}  // namespace

void launch_shrink(Dtype dtype, const void* in, int64_t in_row_stride, const void* proj, int64_t proj_stride_expert,
                   int64_t proj_stride_dim, const int64_t* expert_idx, float* out, int64_t n_rows, int64_t depth,
                   int64_t k, int64_t tokens_per_sample, cudaStream_t stream) {
  if (n_rows == 0) return;
  RANK1_DISPATCH(dtype, {
    shrink_kernel<T><<<static_cast<unsigned int>(n_rows), kShrinkThreads, 0, stream>>>(
        static_cast<const T*>(in), in_row_stride, static_cast<const T*>(proj), proj_stride_expert, proj_stride_dim,
        expert_idx, out, depth, k, tokens_per_sample);
  });
  check_launch("shrink_kernel");
}

void launch_expand_add(Dtype dtype, void* y, const float* u, const void* gates, float scaling, const void* expand,
                       int64_t expand_stride_expert, int64_t expand_stride_out, const int64_t* expert_idx,
                       int64_t n_rows, int64_t n_out, int64_t k, int64_t tokens_per_sample, cudaStream_t stream) {
  if (n_rows == 0 || n_out == 0) return;
  const dim3 grid(static_cast<unsigned int>(n_rows), blocks_for(n_out, kColumnThreads));
  const size_t shared = (k + (k & 1)) * sizeof(float) + k * sizeof(int64_t);
  RANK1_DISPATCH(dtype, {
    expand_add_kernel<T><<<grid, kColumnThreads, shared, stream>>>(
        static_cast<T*>(y), u, static_cast<const T*>(gates), scaling, static_cast<const T*>(expand),
        expand_stride_expert, expand_stride_out, expert_idx, n_out, k, tokens_per_sample);
  });
  check_launch("expand_add_kernel");
}

void launch_gate_grad(Dtype dtype, const float* u, const float* v, float scaling, void* dgates, int64_t n_samples,
                      int64_t k, int64_t tokens_per_sample, cudaStream_t stream) {
  if (n_samples == 0) return;
  RANK1_DISPATCH(dtype, {
    gate_grad_kernel<T><<<static_cast<unsigned int>(n_samples), kShrinkThreads, 0, stream>>>(
        u, v, scaling, static_cast<T*>(dgates), k, tokens_per_sample);
  });
  check_launch("gate_grad_kernel");
}

void launch_expert_grad(Dtype dtype, const float* coef, const void* gates, float scaling, const void* m,
                        int64_t m_row_stride, const int64_t* expert_idx, float* partial, void* out,
                        int64_t out_stride_expert, int64_t out_stride_col, int64_t n_experts, int64_t n_rows,
                        int64_t n_cols, int64_t k, int64_t tokens_per_sample, cudaStream_t stream) {
  if (n_cols == 0 || n_experts == 0) return;
  const int64_t n_pairs = tokens_per_sample > 0 ? (n_rows / tokens_per_sample) * k : 0;
  RANK1_DISPATCH(dtype, {
    if (n_pairs > 0) {
      const dim3 grid(static_cast<unsigned int>(n_pairs), blocks_for(n_cols, kColumnThreads));
      pair_partial_kernel<T><<<grid, kColumnThreads, 0, stream>>>(coef, static_cast<const T*>(gates), scaling,
                                                                    static_cast<const T*>(m), m_row_stride, partial,
                                                                    n_cols, k, tokens_per_sample);
    }
    const dim3 grid(static_cast<unsigned int>(n_experts), blocks_for(n_cols, kColumnThreads));
    scatter_experts_kernel<T><<<grid, kColumnThreads, 0, stream>>>(partial, expert_idx, n_pairs, static_cast<T*>(out),
                                                                   out_stride_expert, out_stride_col, n_cols);
  });
  check_launch("expert gradient kernels");
}

}  // namespace rank1
