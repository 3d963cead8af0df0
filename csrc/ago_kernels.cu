// The grouped AGO Gram: every pool layer of a model in one launch (one block per layer), forward and backward.
//   G_l = (B_cur * cur_mask)^T (B_prev * prev_mask)   (r_cur, r_prev), fp32, packed per layer
//   loss_l = sum |G_l|^p                               p = 1 (the paper) or 2
// Each Gram entry is one thread's serial dot product and the block reduction has a fixed tree: deterministic.
#include "common.cuh"

namespace rank1 {
namespace {

constexpr int kAgoThreads = 256;

template <typename T>
__global__ void ago_gram_kernel(AgoTables tables, AgoInputs inputs, float* __restrict__ gram, float* __restrict__ losses,
                                int64_t p) {
  __shared__ float partial[kAgoThreads];
  const int64_t layer = blockIdx.x;
  const T* b_cur = static_cast<const T*>(inputs.b_cur) + tables.cur_offset[layer];
  const T* b_prev = static_cast<const T*>(inputs.b_prev) + tables.prev_offset[layer];
  const bool* cur_mask = inputs.cur_mask + tables.cur_mask_offset[layer];
  const bool* prev_mask = inputs.prev_mask + tables.prev_mask_offset[layer];
  const int64_t d_out = tables.d_out[layer], r_cur = tables.r_cur[layer], r_prev = tables.r_prev[layer];
  float* layer_gram = gram + tables.gram_offset[layer];
  float loss = 0.f;
  for (int64_t entry = threadIdx.x; entry < r_cur * r_prev; entry += blockDim.x) {
    const int64_t i = entry / r_prev, j = entry % r_prev;
    float dot = 0.f;
    if (cur_mask[i] && prev_mask[j]) {
      for (int64_t o = 0; o < d_out; ++o) dot += to_float(b_cur[o * r_cur + i]) * to_float(b_prev[o * r_prev + j]);
    }
    layer_gram[entry] = dot;
    loss += p == 1 ? fabsf(dot) : dot * dot;
  }
  partial[threadIdx.x] = loss;
  __syncthreads();
  for (int width = kAgoThreads / 2; width > 0; width /= 2) {
    if (threadIdx.x < width) partial[threadIdx.x] += partial[threadIdx.x + width];
    __syncthreads();
  }
  if (threadIdx.x == 0 && losses != nullptr) losses[layer] = partial[0];
}

__device__ __forceinline__ float loss_slope(float g, int64_t p) {
  if (p == 2) return 2.f * g;
  return g > 0.f ? 1.f : (g < 0.f ? -1.f : 0.f);  // d|g|/dg, 0 at 0 as torch's abs
}

// grid (n_layers, column blocks over d_out): one thread per output row o of the layer's gradients.
template <typename T>
__global__ void ago_grad_kernel(AgoTables tables, AgoInputs inputs, const float* __restrict__ gram,
                                const float* __restrict__ grad, int64_t p, T* __restrict__ d_cur_packed,
                                T* __restrict__ d_prev_packed) {
  const int64_t layer = blockIdx.x;
  const int64_t o = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  const int64_t d_out = tables.d_out[layer];
  if (o >= d_out) return;
  const T* b_cur = static_cast<const T*>(inputs.b_cur) + tables.cur_offset[layer];
  const T* b_prev = static_cast<const T*>(inputs.b_prev) + tables.prev_offset[layer];
  const bool* cur_mask = inputs.cur_mask + tables.cur_mask_offset[layer];
  const bool* prev_mask = inputs.prev_mask + tables.prev_mask_offset[layer];
  const int64_t r_cur = tables.r_cur[layer], r_prev = tables.r_prev[layer];
  const float* layer_gram = gram + tables.gram_offset[layer];
  const float scale = grad[layer];
  T* d_cur = d_cur_packed + tables.cur_offset[layer];
  for (int64_t i = 0; i < r_cur; ++i) {
    float acc = 0.f;
    if (cur_mask[i]) {
      for (int64_t j = 0; j < r_prev; ++j) {
        if (prev_mask[j]) acc += loss_slope(layer_gram[i * r_prev + j], p) * to_float(b_prev[o * r_prev + j]);
      }
    }
    d_cur[o * r_cur + i] = from_float<T>(acc * scale);
  }
  if (d_prev_packed == nullptr) return;
  T* d_prev = d_prev_packed + tables.prev_offset[layer];
  for (int64_t j = 0; j < r_prev; ++j) {
    float acc = 0.f;
    if (prev_mask[j]) {
      for (int64_t i = 0; i < r_cur; ++i) {
        if (cur_mask[i]) acc += loss_slope(layer_gram[i * r_prev + j], p) * to_float(b_cur[o * r_cur + i]);
      }
    }
    d_prev[o * r_prev + j] = from_float<T>(acc * scale);
  }
}

}  // namespace

void launch_ago_forward(Dtype dtype, const AgoTables& tables, const AgoInputs& inputs, float* gram, float* losses,
                        int64_t p, cudaStream_t stream) {
  if (tables.n_layers == 0) return;
  RANK1_DISPATCH(dtype, {
    ago_gram_kernel<T><<<static_cast<unsigned int>(tables.n_layers), kAgoThreads, 0, stream>>>(tables, inputs, gram,
                                                                                                 losses, p);
  });
  check_launch("ago_gram_kernel");
}

void launch_ago_backward(Dtype dtype, const AgoTables& tables, const AgoInputs& inputs, const float* gram,
                         const float* grad, int64_t p, void* d_cur, void* d_prev, int64_t max_d_out,
                         cudaStream_t stream) {
  if (tables.n_layers == 0 || max_d_out == 0) return;
  const dim3 grid(static_cast<unsigned int>(tables.n_layers), blocks_for(max_d_out, kAgoThreads));
  RANK1_DISPATCH(dtype, {
    ago_grad_kernel<T><<<grid, kAgoThreads, 0, stream>>>(tables, inputs, gram, grad, p, static_cast<T*>(d_cur),
                                                         static_cast<T*>(d_prev));
  });
  check_launch("ago_grad_kernel");
}

}  // namespace rank1
