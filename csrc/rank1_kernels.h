// Launchers of the rank1_kernels CUDA kernels. Plain C++ types only, so the .cu files compile without torch's
// headers (fast, and checkable by nvcc alone); csrc/bindings.cpp wraps them as torch ops.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

namespace rank1 {

// The element types the kernels take; accumulation is always fp32.
enum class Dtype { kFloat32, kFloat16, kBFloat16 };

// Rows are sample-major: row r belongs to sample r / tokens_per_sample. expert_idx is (n_samples, k) int64.

// out[row, slot] = sum_d in[row, d] * proj[expert(row, slot) * proj_stride_expert + d * proj_stride_dim]  (fp32)
// in: (n_rows, depth) rows of stride in_row_stride, unit column stride; n_rows a multiple of tokens_per_sample (> 0).
void launch_shrink(Dtype dtype, const void* in, int64_t in_row_stride, const void* proj, int64_t proj_stride_expert,
                   int64_t proj_stride_dim, const int64_t* expert_idx, float* out, int64_t n_rows, int64_t depth,
                   int64_t k, int64_t tokens_per_sample, cudaStream_t stream);

// y[row, o] += sum_slot u[row, slot] * gates[sample, slot] * scaling * expand[expert * stride_expert + o * stride_out]
// y: (n_rows, n_out) contiguous, updated in place with one rounding; u: (n_rows, k) fp32; gates: (n_samples, k).
// n_rows is a multiple of tokens_per_sample (> 0).
void launch_expand_add(Dtype dtype, void* y, const float* u, const void* gates, float scaling, const void* expand,
                       int64_t expand_stride_expert, int64_t expand_stride_out, const int64_t* expert_idx,
                       int64_t n_rows, int64_t n_out, int64_t k, int64_t tokens_per_sample, cudaStream_t stream);

// dgates[sample, slot] = scaling * sum over the sample's rows of u[row, slot] * v[row, slot]  (fixed order)
void launch_gate_grad(Dtype dtype, const float* u, const float* v, float scaling, void* dgates, int64_t n_samples,
                      int64_t k, int64_t tokens_per_sample, cudaStream_t stream);

// Gradient of A (expert rows) or B (expert columns), deterministic, no atomics:
//   partial[(sample * k + slot, chunk), c] = gates[sample, slot] * scaling * sum over the chunk's rows of
//                                            coef[row, slot] * m[row, c]        (the sample's rows in chunks of 64)
//   out[expert, c] = sum over (sample, slot) choosing expert and over chunks of partial, in a fixed order; 0 for
//                    unchosen experts.
// m: (n_rows, n_cols) of row stride m_row_stride; out addressed as out[expert * out_stride_expert + c * out_stride_col];
// partial: fp32 workspace of expert_grad_workspace(...) elements.
int64_t expert_grad_workspace(int64_t n_samples, int64_t k, int64_t tokens_per_sample, int64_t n_cols);
void launch_expert_grad(Dtype dtype, const float* coef, const void* gates, float scaling, const void* m,
                        int64_t m_row_stride, const int64_t* expert_idx, float* partial, void* out,
                        int64_t out_stride_expert, int64_t out_stride_col, int64_t n_experts, int64_t n_rows,
                        int64_t n_cols, int64_t k, int64_t tokens_per_sample, cudaStream_t stream);

// The grouped AGO Gram: for each layer l, G_l = (B_cur * cur_mask)^T (B_prev * prev_mask), (r_cur, r_prev), fp32.
// The layers' B_cur (d_out, r_cur), B_prev (d_out, r_prev) and bool masks are packed one after another, row-major,
// into four buffers; the tables (device, int64, n_layers entries each) give every layer's offsets into them, its
// sizes, and its offset into the packed gram. They depend on the layers' shapes only, so a caller can keep them on
// the device from step to step (no host-to-device copy per call). The gradients are packed like B_cur and B_prev.
struct AgoTables {
  const int64_t* cur_offset;
  const int64_t* prev_offset;
  const int64_t* cur_mask_offset;
  const int64_t* prev_mask_offset;
  const int64_t* d_out;
  const int64_t* r_cur;
  const int64_t* r_prev;
  const int64_t* gram_offset;
  int64_t n_layers;
};
constexpr int kAgoTableColumns = 8;

struct AgoInputs {
  const void* b_cur;  // packed B_cur, B's dtype
  const void* b_prev;
  const bool* cur_mask;
  const bool* prev_mask;
};

// gram: packed fp32 buffer; losses[l] = sum |G_l|^p  (p = 1 or 2), reduced in a fixed order.
void launch_ago_forward(Dtype dtype, const AgoTables& tables, const AgoInputs& inputs, float* gram, float* losses,
                        int64_t p, cudaStream_t stream);

// d_cur (packed like B_cur) = grad[l] * cur_mask * dloss/dG_l (B_prev * prev_mask)^T, and likewise d_prev (packed
// like B_prev) when non-null; B's dtype.
void launch_ago_backward(Dtype dtype, const AgoTables& tables, const AgoInputs& inputs, const float* gram,
                         const float* grad, int64_t p, void* d_cur, void* d_prev, int64_t max_d_out,
                         cudaStream_t stream);

}  // namespace rank1
