// Torch ops over the CUDA kernels, registered as rank1::cuda_* (the Triton backend's ops are rank1::triton_*).
// Fake (meta) implementations and autograd are registered from Python (rank1_kernels/cuda_backend.py).
#include <Python.h>

#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <deque>
#include <mutex>
#include <utility>
#include <vector>

#include "rank1_kernels.h"

// RANK1_CUDA_EMULATION: the test build (tests/cuda_emulation/) that runs these ops and the kernels on CPU tensors,
// each CUDA thread a host thread. Only the device plumbing differs: which tensors are accepted, the stream, the
// device guard, and the dispatch key the ops are registered under.
#ifdef RANK1_CUDA_EMULATION
#define RANK1_DISPATCH_KEY CPU
#else
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#define RANK1_DISPATCH_KEY CUDA
#endif

namespace rank1 {
namespace {

#ifdef RANK1_CUDA_EMULATION
constexpr auto kDeviceType = at::kCPU;
struct DeviceGuard {
  explicit DeviceGuard(at::Device) {}
};
cudaStream_t current_stream() { return nullptr; }
bool stream_is_capturing() { return false; }
#else
constexpr auto kDeviceType = at::kCUDA;
using DeviceGuard = c10::cuda::CUDAGuard;
cudaStream_t current_stream() { return at::cuda::getCurrentCUDAStream().stream(); }
bool stream_is_capturing() {
  return c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None;
}
#endif

Dtype dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return Dtype::kFloat32;
    case at::kHalf: return Dtype::kFloat16;
    case at::kBFloat16: return Dtype::kBFloat16;
    default: TORCH_CHECK(false, "rank1 CUDA kernels take float32, float16 or bfloat16, got ", t.scalar_type());
  }
}

void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().type() == kDeviceType, "rank1 CUDA kernels: ", name, " must be a CUDA tensor, got ",
              t.device());
}

// The row layout every pool kernel assumes: n_samples * tokens_per_sample rows, sample-major.
void check_rows(const at::Tensor& x, const at::Tensor& idx, int64_t tokens_per_sample) {
  TORCH_CHECK(tokens_per_sample > 0 && x.size(0) == idx.size(0) * tokens_per_sample,
              "rank1 CUDA kernels: x must have idx.size(0) * tokens_per_sample rows (", idx.size(0), " * ",
              tokens_per_sample, "), got ", x.size(0));
}

// The ops are public (torch.ops.rank1.*): check every shape, dtype and device the kernels assume, not only x's, so
// a wrong argument is an error rather than a read past a buffer. Expert indices are not range-checked here: that
// needs their values on the host (a sync); the Python layer checks them when device-sync checks are on.
void check_same(const at::Tensor& t, const at::Tensor& x, const char* name) {
  TORCH_CHECK(t.device() == x.device() && t.scalar_type() == x.scalar_type(), "rank1 CUDA kernels: ", name,
              " must be on x's device and of x's dtype (", x.device(), ", ", x.scalar_type(), "), got ", t.device(),
              ", ", t.scalar_type());
}

void check_pool_inputs(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& A, const at::Tensor& B,
                       const at::Tensor& idx, const at::Tensor& gates, const std::optional<at::Tensor>& lora_input,
                       int64_t tokens_per_sample) {
  check_cuda(x, "x");
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && A.dim() == 2 && B.dim() == 2 && idx.dim() == 2,
              "rank1 CUDA kernels: x, weight, A, B and idx must be 2-D");
  check_same(weight, x, "weight");
  check_same(A, x, "A");
  check_same(B, x, "B");
  check_same(gates, x, "gates");
  const int64_t d_in = x.size(1), d_out = weight.size(0), r = A.size(0);
  TORCH_CHECK(weight.size(1) == d_in && A.size(1) == d_in && B.size(0) == d_out && B.size(1) == r,
              "rank1 CUDA kernels: expected weight (d_out, d_in), A (r, d_in), B (d_out, r) with d_in = ", d_in,
              " from x; got weight ", weight.sizes(), ", A ", A.sizes(), ", B ", B.sizes());
  TORCH_CHECK(idx.device() == x.device() && idx.scalar_type() == at::kLong,
              "rank1 CUDA kernels: idx must be int64 on x's device, got ", idx.scalar_type(), " on ", idx.device());
  TORCH_CHECK(idx.size(1) <= r, "rank1 CUDA kernels: idx chooses ", idx.size(1), " experts of r = ", r);
  TORCH_CHECK(gates.sizes() == idx.sizes(), "rank1 CUDA kernels: gates must have idx's shape ", idx.sizes(),
              ", got ", gates.sizes());
  if (lora_input.has_value()) {
    check_same(*lora_input, x, "lora_input");
    TORCH_CHECK(lora_input->sizes() == x.sizes(), "rank1 CUDA kernels: lora_input must have x's shape ", x.sizes(),
                ", got ", lora_input->sizes());
  }
  check_rows(x, idx, tokens_per_sample);
}

// out[row, slot] (fp32) = in[row] . proj[expert(row, slot)]; proj addressed by (stride_expert, stride_dim).
at::Tensor shrink(const at::Tensor& in, const at::Tensor& proj, int64_t stride_expert, int64_t stride_dim,
                  const at::Tensor& idx, int64_t tokens_per_sample, cudaStream_t stream) {
  const int64_t k = idx.size(1);
  auto out = at::empty({in.size(0), k}, in.options().dtype(at::kFloat));
  launch_shrink(dtype_of(in), in.data_ptr(), in.stride(0), proj.data_ptr(), stride_expert, stride_dim,
                idx.data_ptr<int64_t>(), out.data_ptr<float>(), in.size(0), in.size(1), k, tokens_per_sample, stream);
  return out;
}

std::tuple<at::Tensor, at::Tensor> pool_linear_fwd(const at::Tensor& x_in, const at::Tensor& weight,
                                                   const std::optional<at::Tensor>& bias, const at::Tensor& A_in,
                                                   const at::Tensor& B_in, const at::Tensor& idx_in,
                                                   const at::Tensor& gates_in, double scaling,
                                                   int64_t tokens_per_sample,
                                                   const std::optional<at::Tensor>& lora_input) {
  check_pool_inputs(x_in, weight, A_in, B_in, idx_in, gates_in, lora_input, tokens_per_sample);
  const DeviceGuard guard(x_in.device());
  const auto stream = current_stream();
  const auto x = x_in.contiguous(), A = A_in.contiguous(), B = B_in.contiguous();
  const auto idx = idx_in.contiguous(), gates = gates_in.contiguous();
  const auto source = lora_input.has_value() ? lora_input->contiguous() : x;
  auto y = at::linear(x, weight, bias).contiguous();  // cuBLAS
  // A (r, d_in): expert e, dim d at e * d_in + d.
  auto u = shrink(source, A, A.size(1), 1, idx, tokens_per_sample, stream);
  // B (d_out, r): expert e, output o at o * r + e.
  launch_expand_add(dtype_of(x), y.data_ptr(), u.data_ptr<float>(), gates.data_ptr(), static_cast<float>(scaling),
                    B.data_ptr(), 1, B.size(1), idx.data_ptr<int64_t>(), x.size(0), B.size(0), idx.size(1),
                    tokens_per_sample, stream);
  return {y, u};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> pool_linear_bwd(
    const at::Tensor& grad_y_in, const at::Tensor& x_in, const at::Tensor& weight, const at::Tensor& A_in,
    const at::Tensor& B_in, const at::Tensor& idx_in, const at::Tensor& gates_in, const at::Tensor& u_in,
    double scaling, int64_t tokens_per_sample, const std::optional<at::Tensor>& lora_input, bool need_x,
    bool need_lora_input, bool need_A, bool need_B, bool need_gates) {
  check_pool_inputs(x_in, weight, A_in, B_in, idx_in, gates_in, lora_input, tokens_per_sample);
  check_same(grad_y_in, x_in, "grad_y");
  TORCH_CHECK(!need_lora_input || lora_input.has_value(),
              "rank1 CUDA kernels: need_lora_input without a lora_input (there is no such gradient)");
  TORCH_CHECK(grad_y_in.dim() == 2 && grad_y_in.size(0) == x_in.size(0) && grad_y_in.size(1) == weight.size(0),
              "rank1 CUDA kernels: grad_y must be (rows, d_out) = (", x_in.size(0), ", ", weight.size(0), "), got ",
              grad_y_in.sizes());
  TORCH_CHECK(u_in.device() == x_in.device() && u_in.scalar_type() == at::kFloat && u_in.dim() == 2 &&
                  u_in.size(0) == x_in.size(0) && u_in.size(1) == idx_in.size(1),
              "rank1 CUDA kernels: u must be the forward's float32 (rows, k) = (", x_in.size(0), ", ", idx_in.size(1),
              "), got ", u_in.scalar_type(), " ", u_in.sizes());
  const DeviceGuard guard(grad_y_in.device());
  const auto stream = current_stream();
  const auto dy = grad_y_in.contiguous(), x = x_in.contiguous(), A = A_in.contiguous(), B = B_in.contiguous();
  const auto idx = idx_in.contiguous(), gates = gates_in.contiguous(), u = u_in.contiguous();
  const auto source = lora_input.has_value() ? lora_input->contiguous() : x;
  const int64_t n_rows = x.size(0), d_in = x.size(1), d_out = B.size(0), r = B.size(1), k = idx.size(1);
  const float scale = static_cast<float>(scaling);
  const auto dtype = dtype_of(x);

  // Only the gradients autograd asked for are computed; the others come back as empty tensors. The first pool
  // layer of a frozen model needs no dx, and fixed or detached gates need no dgates.
  // A fresh empty tensor each time: outputs of an op must not alias one another.
  const auto nothing = [&x] { return at::empty({0}, x.options()); };
  const bool rank_grad_in_dx = need_x && !lora_input.has_value();
  const bool need_v = rank_grad_in_dx || need_lora_input || need_A || need_gates;
  // v[row, slot] = dy[row] . B[:, expert]: B^T (r, d_out) read through B's strides.
  const auto v = need_v ? shrink(dy, B, 1, r, idx, tokens_per_sample, stream) : at::Tensor();
  auto dx = need_x ? at::matmul(dy, weight).contiguous() : nothing();  // cuBLAS: the frozen base's input gradient
  auto d_lora_input = need_lora_input ? at::zeros_like(source) : nothing();
  if (rank_grad_in_dx || need_lora_input) {
    at::Tensor& lora_target = need_lora_input ? d_lora_input : dx;
    // d(lora input)[row, d] += sum_slot v * g * s * A[expert, d]: the expand with A^T.
    launch_expand_add(dtype, lora_target.data_ptr(), v.data_ptr<float>(), gates.data_ptr(), scale, A.data_ptr(),
                      d_in, 1, idx.data_ptr<int64_t>(), n_rows, d_in, k, tokens_per_sample, stream);
  }

  auto dgates = need_gates ? at::empty_like(gates) : nothing();
  if (need_gates) {
    launch_gate_grad(dtype, u.data_ptr<float>(), v.data_ptr<float>(), scale, dgates.data_ptr(), idx.size(0), k,
                     tokens_per_sample, stream);
  }

  at::Tensor partial;
  if (need_A || need_B) {
    const int64_t workspace = expert_grad_workspace(idx.size(0), k, tokens_per_sample, std::max(d_in, d_out));
    partial = at::empty({workspace}, x.options().dtype(at::kFloat));
  }
  auto dA = need_A ? at::empty_like(A) : nothing();
  if (need_A) {
    launch_expert_grad(dtype, v.data_ptr<float>(), gates.data_ptr(), scale, source.data_ptr(), d_in,
                       idx.data_ptr<int64_t>(), partial.data_ptr<float>(), dA.data_ptr(), d_in, 1, r, n_rows, d_in, k,
                       tokens_per_sample, stream);
  }
  auto dB = need_B ? at::empty_like(B) : nothing();
  if (need_B) {
    launch_expert_grad(dtype, u.data_ptr<float>(), gates.data_ptr(), scale, dy.data_ptr(), d_out,
                       idx.data_ptr<int64_t>(), partial.data_ptr<float>(), dB.data_ptr(), 1, r, r, n_rows, d_out, k,
                       tokens_per_sample, stream);
  }
  return {dx, d_lora_input, dA, dB, dgates};
}

// The device tables of grouped AGO calls, by content. The tables hold offsets and sizes only, which depend on the
// layers' shapes: a training loop's steps all find the same table, so after the first step no table is copied to
// the device and the op can be captured in a CUDA graph. A model's shapes change only when a task's merge widens
// B_prev, so the cache stays small; it never evicts, because a captured graph (or work pending on another stream)
// keeps reading a table's memory after the call returns.
class AgoTableCache {
 public:
  at::Tensor get(const std::vector<int64_t>& host, const at::Device& device) {
    std::vector<int64_t> key(host);
    key.push_back(device.index());
    std::lock_guard<std::mutex> lock(mutex_);
    for (const auto& entry : entries_) {
      if (entry.first == key) return entry.second;
    }
    // A copy from host memory cannot be captured: it would invalidate the capture with an unspecific CUDA error.
    TORCH_CHECK(!stream_is_capturing(),
                "the grouped AGO loss copies its per-layer table to the GPU on the first call for these layer shapes, "
                "which a CUDA graph capture cannot hold: run one step (forward and backward) before capturing");
    c10::InferenceMode normal_tensor(false);  // the cache outlives an inference_mode block that first fills it
    auto table = at::tensor(host, at::TensorOptions().dtype(at::kLong)).to(device);
    entries_.emplace_back(std::move(key), table);
    return table;
  }

 private:
  std::mutex mutex_;
  std::deque<std::pair<std::vector<int64_t>, at::Tensor>> entries_;
};

AgoTableCache& ago_table_cache() {
  static AgoTableCache cache;
  return cache;
}

// Every layer's matrices, row-major, one after another (a device-side copy; never empty, so the pointer is real).
at::Tensor pack(const std::vector<at::Tensor>& tensors, at::ScalarType dtype) {
  std::vector<at::Tensor> flat;
  for (const auto& t : tensors) flat.push_back(t.to(dtype).reshape({-1}));
  auto packed = at::cat(flat);
  return packed.numel() ? packed : at::zeros({1}, packed.options());
}

struct AgoLayout {
  at::Tensor tables;                             // (kAgoTableColumns, n_layers) int64 on the device
  at::Tensor b_cur, b_prev, cur_mask, prev_mask;  // the packed inputs the tables index
  int64_t gram_size = 0, cur_size = 0, prev_size = 0, max_d_out = 0;  // packed lengths (the gradients too)

  AgoTables view() const {
    const int64_t* base = tables.data_ptr<int64_t>();
    const int64_t n = tables.size(1);
    return {base, base + n, base + 2 * n, base + 3 * n, base + 4 * n, base + 5 * n, base + 6 * n, base + 7 * n, n};
  }
  AgoInputs inputs() const {
    return {b_cur.data_ptr(), b_prev.data_ptr(), cur_mask.data_ptr<bool>(), prev_mask.data_ptr<bool>()};
  }
};

AgoLayout ago_layout(const std::vector<at::Tensor>& b_curs, const std::vector<at::Tensor>& b_prevs,
                     const std::vector<at::Tensor>& cur_masks, const std::vector<at::Tensor>& prev_masks) {
  const int64_t n = static_cast<int64_t>(b_curs.size());
  TORCH_CHECK(n > 0, "rank1 AGO: no layers");
  TORCH_CHECK(b_prevs.size() == b_curs.size() && cur_masks.size() == b_curs.size() && prev_masks.size() == b_curs.size(),
              "rank1 AGO: the four lists must have one entry per layer");
  AgoLayout layout;
  std::vector<int64_t> host(kAgoTableColumns * n);
  int64_t cur_mask_size = 0, prev_mask_size = 0;
  for (int64_t l = 0; l < n; ++l) {
    check_cuda(b_curs[l], "B_cur");
    const auto device = b_curs[0].device();
    TORCH_CHECK(b_curs[l].device() == device && b_prevs[l].device() == device && cur_masks[l].device() == device &&
                    prev_masks[l].device() == device,
                "rank1 AGO: layer ", l, ": every B and mask must be on ", device);
    TORCH_CHECK(b_curs[l].scalar_type() == b_curs[0].scalar_type() && b_prevs[l].scalar_type() == b_curs[0].scalar_type(),
                "rank1 AGO: layer ", l, ": every B must be ", b_curs[0].scalar_type());
    TORCH_CHECK(b_curs[l].dim() == 2 && b_prevs[l].dim() == 2, "rank1 AGO: layer ", l, ": B must be 2-D");
    const int64_t d_out = b_curs[l].size(0), r_cur = b_curs[l].size(1), r_prev = b_prevs[l].size(1);
    TORCH_CHECK(b_prevs[l].size(0) == d_out && cur_masks[l].numel() == r_cur && prev_masks[l].numel() == r_prev,
                "rank1 AGO: layer ", l, " has mismatched shapes");
    host[l] = layout.cur_size;
    host[n + l] = layout.prev_size;
    host[2 * n + l] = cur_mask_size;
    host[3 * n + l] = prev_mask_size;
    host[4 * n + l] = d_out;
    host[5 * n + l] = r_cur;
    host[6 * n + l] = r_prev;
    host[7 * n + l] = layout.gram_size;
    layout.cur_size += d_out * r_cur;
    layout.prev_size += d_out * r_prev;
    cur_mask_size += r_cur;
    prev_mask_size += r_prev;
    layout.gram_size += r_cur * r_prev;
    layout.max_d_out = std::max(layout.max_d_out, d_out);
  }
  const auto dtype = b_curs[0].scalar_type();
  layout.b_cur = pack(b_curs, dtype);
  layout.b_prev = pack(b_prevs, dtype);
  layout.cur_mask = pack(cur_masks, at::kBool);
  layout.prev_mask = pack(prev_masks, at::kBool);
  layout.tables = ago_table_cache().get(host, b_curs[0].device()).view({kAgoTableColumns, n});
  return layout;
}

std::tuple<at::Tensor, at::Tensor> ago_fwd(const std::vector<at::Tensor>& b_curs, const std::vector<at::Tensor>& b_prevs,
                                           const std::vector<at::Tensor>& cur_masks,
                                           const std::vector<at::Tensor>& prev_masks, int64_t p) {
  TORCH_CHECK(!b_curs.empty(), "rank1 AGO: no layers");
  TORCH_CHECK(p == 1 || p == 2, "rank1 AGO: p must be 1 or 2, got ", p);
  const DeviceGuard guard(b_curs[0].device());
  const auto stream = current_stream();
  const auto layout = ago_layout(b_curs, b_prevs, cur_masks, prev_masks);
  const auto fp32 = b_curs[0].options().dtype(at::kFloat);
  auto gram = at::empty({layout.gram_size}, fp32);
  auto losses = at::empty({static_cast<int64_t>(b_curs.size())}, fp32);
  launch_ago_forward(dtype_of(b_curs[0]), layout.view(), layout.inputs(), gram.data_ptr<float>(),
                     losses.data_ptr<float>(), p, stream);
  return {losses, gram};
}

// The gradients of every layer packed into one buffer per side, layer after layer, each (d_out, r) row-major; the
// Python side (cuda_backend._ago_backward) splits them into views.
std::tuple<at::Tensor, at::Tensor> ago_bwd(
    const at::Tensor& grad_in, const at::Tensor& gram_in, const std::vector<at::Tensor>& b_curs,
    const std::vector<at::Tensor>& b_prevs, const std::vector<at::Tensor>& cur_masks,
    const std::vector<at::Tensor>& prev_masks, int64_t p, bool prev_requires_grad) {
  TORCH_CHECK(!b_curs.empty(), "rank1 AGO: no layers");
  TORCH_CHECK(p == 1 || p == 2, "rank1 AGO: p must be 1 or 2, got ", p);
  const DeviceGuard guard(b_curs[0].device());
  const auto stream = current_stream();
  const auto layout = ago_layout(b_curs, b_prevs, cur_masks, prev_masks);
  TORCH_CHECK(grad_in.device() == b_curs[0].device() && grad_in.numel() == static_cast<int64_t>(b_curs.size()),
              "rank1 AGO: grad must hold one value per layer (", b_curs.size(), ") on ", b_curs[0].device(), ", got ",
              grad_in.numel(), " on ", grad_in.device());
  TORCH_CHECK(gram_in.device() == b_curs[0].device() && gram_in.scalar_type() == at::kFloat &&
                  gram_in.numel() == layout.gram_size,
              "rank1 AGO: gram must be the forward's float32 buffer of ", layout.gram_size, " values, got ",
              gram_in.scalar_type(), " with ", gram_in.numel());
  const auto grad = grad_in.to(at::kFloat).contiguous(), gram = gram_in.contiguous();
  auto d_cur = at::empty({layout.cur_size}, b_curs[0].options());
  auto d_prev = at::empty({prev_requires_grad ? layout.prev_size : 0}, b_curs[0].options());
  launch_ago_backward(dtype_of(b_curs[0]), layout.view(), layout.inputs(), gram.data_ptr<float>(),
                      grad.data_ptr<float>(), p, d_cur.data_ptr(), prev_requires_grad ? d_prev.data_ptr() : nullptr,
                      layout.max_d_out, stream);
  return {d_cur, d_prev};
}

}  // namespace
}  // namespace rank1

// An importable module with no Python API of its own: `import rank1_kernels._C` runs the registrations below.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY_FRAGMENT(rank1, m) {
  m.def(
      "cuda_pool_linear_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor A, Tensor B, Tensor idx, Tensor gates, "
      "float scaling, int tokens_per_sample, Tensor? lora_input) -> (Tensor, Tensor)");
  m.def(
      "cuda_pool_linear_bwd(Tensor grad_y, Tensor x, Tensor weight, Tensor A, Tensor B, Tensor idx, Tensor gates, "
      "Tensor u, float scaling, int tokens_per_sample, Tensor? lora_input, bool need_x, bool need_lora_input, "
      "bool need_A, bool need_B, bool need_gates) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("cuda_ago_fwd(Tensor[] B_curs, Tensor[] B_prevs, Tensor[] cur_masks, Tensor[] prev_masks, int p) -> (Tensor, Tensor)");
  m.def(
      "cuda_ago_bwd(Tensor grad, Tensor gram, Tensor[] B_curs, Tensor[] B_prevs, Tensor[] cur_masks, "
      "Tensor[] prev_masks, int p, bool prev_requires_grad) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(rank1, RANK1_DISPATCH_KEY, m) {
  m.impl("cuda_pool_linear_fwd", &rank1::pool_linear_fwd);
  m.impl("cuda_pool_linear_bwd", &rank1::pool_linear_bwd);
  m.impl("cuda_ago_fwd", &rank1::ago_fwd);
  m.impl("cuda_ago_bwd", &rank1::ago_bwd);
}
