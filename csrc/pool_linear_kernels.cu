// The pool linear's sparse parts: shrink onto the k chosen experts, gated outer-product expand, and their
// gradients. The dense base products (x W^T, dy W) go through cuBLAS in bindings.cpp. fp32 accumulation and a
// fp32 rank intermediate throughout; every reduction has a fixed order, so results are the same run to run.
#include "common.cuh"

namespace rank1 {
namespace {

constexpr int kColumnThreads = 256;  // one output column per thread
constexpr int kSlotChunk = 16;       // expert slots a block (shrink) or a thread (expand, gradients) handles at once
constexpr int kShrinkThreads = 256;
constexpr int kShrinkRows = 32;      // rows of one sample per shrink block: 32 x 16 outputs, 2 per thread
constexpr int kShrinkDepth = 64;     // depth tile of the shrink staged in shared memory
constexpr int kGateThreads = 128;    // 4 warps per sample, each warp one slot at a time
constexpr int kTokenChunk = 32;      // rows of one sample an expand block updates
constexpr int kPartialTokens = 64;   // rows of one sample summed into one expert-gradient partial

__device__ __forceinline__ int64_t min_i64(int64_t a, int64_t b) { return a < b ? a : b; }

// out[row, slot] = in[row] . proj[expert(slot)], one block per (sample, kShrinkRows rows, kSlotChunk slots). Tiles
// of the rows and of the chosen experts are staged in shared memory over the depth, so each expert vector is read
// once per block rather than once per row: for B^T (the backward's dy . B[:, e], read through B's strides) the
// per-row reads would be strided.
template <typename T>
__global__ void shrink_kernel(const T* __restrict__ in, int64_t in_row_stride, const T* __restrict__ proj,
                              int64_t proj_stride_expert, int64_t proj_stride_dim, const int64_t* __restrict__ expert_idx,
                              float* __restrict__ out, int64_t depth, int64_t k, int64_t tokens_per_sample) {
  __shared__ float rows[kShrinkRows][kShrinkDepth + 1];  // +1: neighbouring rows start in different banks
  __shared__ float experts[kSlotChunk][kShrinkDepth + 1];
  __shared__ int64_t expert_start[kSlotChunk];
  constexpr int kOutputsPerThread = kShrinkRows * kSlotChunk / kShrinkThreads;
  const int64_t sample = blockIdx.x;
  const int64_t first_token = static_cast<int64_t>(blockIdx.y) * kShrinkRows;
  const int64_t chunk_start = static_cast<int64_t>(blockIdx.z) * kSlotChunk;
  const int n_rows = static_cast<int>(min_i64(kShrinkRows, tokens_per_sample - first_token));
  const int n_slots = static_cast<int>(min_i64(kSlotChunk, k - chunk_start));
  const int64_t first_row = sample * tokens_per_sample + first_token;
  if (threadIdx.x < n_slots) expert_start[threadIdx.x] = expert_idx[sample * k + chunk_start + threadIdx.x] * proj_stride_expert;
  float acc[kOutputsPerThread];
  for (int j = 0; j < kOutputsPerThread; ++j) acc[j] = 0.f;
  for (int64_t tile = 0; tile < depth; tile += kShrinkDepth) {
    const int width = static_cast<int>(min_i64(kShrinkDepth, depth - tile));
    __syncthreads();  // the previous tile is consumed (and, the first time, expert_start is written)
    for (int i = threadIdx.x; i < n_rows * kShrinkDepth; i += blockDim.x) {
      const int r = i / kShrinkDepth, d = i % kShrinkDepth;
      rows[r][d] = d < width ? to_float(in[(first_row + r) * in_row_stride + tile + d]) : 0.f;
    }
    for (int i = threadIdx.x; i < n_slots * kShrinkDepth; i += blockDim.x) {
      const int s = i / kShrinkDepth, d = i % kShrinkDepth;
      experts[s][d] = d < width ? to_float(proj[expert_start[s] + (tile + d) * proj_stride_dim]) : 0.f;
    }
    __syncthreads();
    for (int j = 0; j < kOutputsPerThread; ++j) {
      const int output = threadIdx.x + j * kShrinkThreads, r = output / kSlotChunk, s = output % kSlotChunk;
      if (r < n_rows && s < n_slots) {
        // A sum per tile, then across tiles: error grows with kShrinkDepth + depth / kShrinkDepth, not with depth.
        float tile_sum = 0.f;
        for (int d = 0; d < width; ++d) tile_sum += rows[r][d] * experts[s][d];
        acc[j] += tile_sum;
      }
    }
  }
  for (int j = 0; j < kOutputsPerThread; ++j) {
    const int output = threadIdx.x + j * kShrinkThreads, r = output / kSlotChunk, s = output % kSlotChunk;
    if (r < n_rows && s < n_slots) out[(first_row + r) * k + chunk_start + s] = acc[j];
  }
}

// One block per (sample, 256 output columns, kTokenChunk tokens): the rows of a sample share its k experts, so
// each thread loads its column of the chosen experts once into registers and applies it to every token of the
// chunk (the per-row coefficients come through shared memory). Reading the expert columns once per block instead
// of once per row matters for B (d_out, r), whose expert columns are strided.
template <typename T>
__global__ void expand_add_kernel(T* __restrict__ y, const float* __restrict__ u, const T* __restrict__ gates,
                                  float scaling, const T* __restrict__ expand, int64_t stride_expert, int64_t stride_out,
                                  const int64_t* __restrict__ expert_idx, int64_t n_out, int64_t k,
                                  int64_t tokens_per_sample) {
  __shared__ float coefficient[kTokenChunk][kSlotChunk];
  const int64_t sample = blockIdx.x;
  const int64_t o = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  const int64_t first_token = static_cast<int64_t>(blockIdx.z) * kTokenChunk;
  const int n_tokens = static_cast<int>(min_i64(kTokenChunk, tokens_per_sample - first_token));
  const int64_t first_row = sample * tokens_per_sample + first_token;
  float acc[kTokenChunk];
  for (int t = 0; t < kTokenChunk; ++t) acc[t] = 0.f;
  for (int64_t chunk_start = 0; chunk_start < k; chunk_start += kSlotChunk) {
    const int n_slots = static_cast<int>(min_i64(kSlotChunk, k - chunk_start));
    float column[kSlotChunk];
    for (int s = 0; s < n_slots; ++s) {
      const int64_t expert = expert_idx[sample * k + chunk_start + s];
      column[s] = o < n_out ? to_float(expand[expert * stride_expert + o * stride_out]) : 0.f;
    }
    __syncthreads();  // the previous chunk's coefficients are no longer read
    for (int i = threadIdx.x; i < n_tokens * n_slots; i += blockDim.x) {
      const int t = i / n_slots, s = i % n_slots;
      const int64_t slot = chunk_start + s;
      coefficient[t][s] = u[(first_row + t) * k + slot] * to_float(gates[sample * k + slot]) * scaling;
    }
    __syncthreads();
    for (int t = 0; t < n_tokens; ++t) {
      for (int s = 0; s < n_slots; ++s) acc[t] += coefficient[t][s] * column[s];
    }
  }
  if (o >= n_out) return;
  for (int t = 0; t < n_tokens; ++t) {
    T* out = y + (first_row + t) * n_out + o;
    *out = from_float<T>(to_float(*out) + acc[t]);
  }
}

template <typename T>
__global__ void gate_grad_kernel(const float* __restrict__ u, const float* __restrict__ v, float scaling,
                                 T* __restrict__ dgates, int64_t k, int64_t tokens_per_sample) {
  const int64_t sample = blockIdx.x;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int64_t slot = warp; slot < k; slot += kGateThreads / 32) {
    float acc = 0.f;
    for (int64_t t = lane; t < tokens_per_sample; t += 32) {
      const int64_t row = sample * tokens_per_sample + t;
      acc += u[row * k + slot] * v[row * k + slot];
    }
    acc = warp_sum(acc);
    if (lane == 0) dgates[sample * k + slot] = from_float<T>(acc * scaling);
  }
}

// partial[(pair, token chunk), c] over the chunk's tokens, one block per (sample, 256 columns, token chunk, slot
// chunk): each thread reads its column of m once per slot chunk and accumulates every slot of the chunk, so m (x or
// dy, the large operand) is read once when k <= kSlotChunk rather than once per slot.
template <typename T>
__global__ void pair_partial_kernel(const float* __restrict__ coef, const T* __restrict__ gates, float scaling,
                                    const T* __restrict__ m, int64_t m_row_stride, float* __restrict__ partial,
                                    int64_t n_cols, int64_t k, int64_t tokens_per_sample, int64_t n_token_chunks) {
  const int64_t sample = blockIdx.x;
  const int64_t c = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  const int64_t token_chunk = blockIdx.z % n_token_chunks;
  const int64_t chunk_start = (blockIdx.z / n_token_chunks) * kSlotChunk;
  if (c >= n_cols) return;
  const int n_slots = static_cast<int>(min_i64(kSlotChunk, k - chunk_start));
  const int64_t first_token = token_chunk * kPartialTokens;
  const int64_t last_token = min_i64(first_token + kPartialTokens, tokens_per_sample);
  float acc[kSlotChunk];
  for (int s = 0; s < kSlotChunk; ++s) acc[s] = 0.f;
  for (int64_t t = first_token; t < last_token; ++t) {
    const int64_t row = sample * tokens_per_sample + t;
    const float value = to_float(m[row * m_row_stride + c]);
    const float* row_coef = coef + row * k + chunk_start;
    for (int s = 0; s < n_slots; ++s) acc[s] += row_coef[s] * value;
  }
  for (int s = 0; s < n_slots; ++s) {
    const int64_t pair = sample * k + chunk_start + s;
    partial[(pair * n_token_chunks + token_chunk) * n_cols + c] = acc[s] * to_float(gates[pair]) * scaling;
  }
}

// out[expert, c] = sum over the (sample, slot) pairs that chose the expert and over their token chunks, in a fixed
// order (no atomics); zero for an expert nobody chose.
template <typename T>
__global__ void scatter_experts_kernel(const float* __restrict__ partial, const int64_t* __restrict__ expert_idx,
                                       int64_t n_pairs, int64_t n_token_chunks, T* __restrict__ out,
                                       int64_t out_stride_expert, int64_t out_stride_col, int64_t n_cols) {
  const int64_t expert = blockIdx.x;
  const int64_t c = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  if (c >= n_cols) return;
  float acc = 0.f;
  for (int64_t pair = 0; pair < n_pairs; ++pair) {
    if (expert_idx[pair] != expert) continue;
    for (int64_t chunk = 0; chunk < n_token_chunks; ++chunk) acc += partial[(pair * n_token_chunks + chunk) * n_cols + c];
  }
  out[expert * out_stride_expert + c * out_stride_col] = from_float<T>(acc);
}

}  // namespace

void launch_shrink(Dtype dtype, const void* in, int64_t in_row_stride, const void* proj, int64_t proj_stride_expert,
                   int64_t proj_stride_dim, const int64_t* expert_idx, float* out, int64_t n_rows, int64_t depth,
                   int64_t k, int64_t tokens_per_sample, cudaStream_t stream) {
  if (n_rows == 0 || k == 0) return;
  const dim3 grid(static_cast<unsigned int>(n_rows / tokens_per_sample), blocks_for(tokens_per_sample, kShrinkRows),
                  blocks_for(k, kSlotChunk));
  RANK1_DISPATCH(dtype, {
    shrink_kernel<T><<<grid, kShrinkThreads, 0, stream>>>(
        static_cast<const T*>(in), in_row_stride, static_cast<const T*>(proj), proj_stride_expert, proj_stride_dim,
        expert_idx, out, depth, k, tokens_per_sample);
  });
  check_launch("shrink_kernel");
}

void launch_expand_add(Dtype dtype, void* y, const float* u, const void* gates, float scaling, const void* expand,
                       int64_t expand_stride_expert, int64_t expand_stride_out, const int64_t* expert_idx,
                       int64_t n_rows, int64_t n_out, int64_t k, int64_t tokens_per_sample, cudaStream_t stream) {
  if (n_rows == 0 || n_out == 0 || k == 0) return;
  const dim3 grid(static_cast<unsigned int>(n_rows / tokens_per_sample), blocks_for(n_out, kColumnThreads),
                  blocks_for(tokens_per_sample, kTokenChunk));
  RANK1_DISPATCH(dtype, {
    expand_add_kernel<T><<<grid, kColumnThreads, 0, stream>>>(
        static_cast<T*>(y), u, static_cast<const T*>(gates), scaling, static_cast<const T*>(expand),
        expand_stride_expert, expand_stride_out, expert_idx, n_out, k, tokens_per_sample);
  });
  check_launch("expand_add_kernel");
}

void launch_gate_grad(Dtype dtype, const float* u, const float* v, float scaling, void* dgates, int64_t n_samples,
                      int64_t k, int64_t tokens_per_sample, cudaStream_t stream) {
  if (n_samples == 0) return;
  RANK1_DISPATCH(dtype, {
    gate_grad_kernel<T><<<static_cast<unsigned int>(n_samples), kGateThreads, 0, stream>>>(
        u, v, scaling, static_cast<T*>(dgates), k, tokens_per_sample);
  });
  check_launch("gate_grad_kernel");
}

int64_t expert_grad_workspace(int64_t n_samples, int64_t k, int64_t tokens_per_sample, int64_t n_cols) {
  return n_samples * k * ((tokens_per_sample + kPartialTokens - 1) / kPartialTokens) * n_cols;
}

void launch_expert_grad(Dtype dtype, const float* coef, const void* gates, float scaling, const void* m,
                        int64_t m_row_stride, const int64_t* expert_idx, float* partial, void* out,
                        int64_t out_stride_expert, int64_t out_stride_col, int64_t n_experts, int64_t n_rows,
                        int64_t n_cols, int64_t k, int64_t tokens_per_sample, cudaStream_t stream) {
  if (n_cols == 0 || n_experts == 0) return;
  const int64_t n_samples = tokens_per_sample > 0 ? n_rows / tokens_per_sample : 0;
  const int64_t n_pairs = n_samples * k;
  const int64_t n_token_chunks = (tokens_per_sample + kPartialTokens - 1) / kPartialTokens;
  RANK1_DISPATCH(dtype, {
    if (n_pairs > 0) {
      const int64_t slot_chunks = (k + kSlotChunk - 1) / kSlotChunk;
      const dim3 grid(static_cast<unsigned int>(n_samples), blocks_for(n_cols, kColumnThreads),
                      static_cast<unsigned int>(n_token_chunks * slot_chunks));
      pair_partial_kernel<T><<<grid, kColumnThreads, 0, stream>>>(coef, static_cast<const T*>(gates), scaling,
                                                                    static_cast<const T*>(m), m_row_stride, partial,
                                                                    n_cols, k, tokens_per_sample, n_token_chunks);
    }
    const dim3 grid(static_cast<unsigned int>(n_experts), blocks_for(n_cols, kColumnThreads));
    scatter_experts_kernel<T><<<grid, kColumnThreads, 0, stream>>>(partial, expert_idx, n_pairs, n_token_chunks,
                                                                   static_cast<T*>(out), out_stride_expert,
                                                                   out_stride_col, n_cols);
  });
  check_launch("expert gradient kernels");
}

}  // namespace rank1
