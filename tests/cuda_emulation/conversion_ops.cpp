// Test-only ops over the emulator's 16-bit conversions (include/rank1_cuda_emulation.h), so that they can be
// checked against torch's own: the kernels round every fp16/bf16 output through them, and a one-ulp error there
// would hide under the tolerance rule's floor.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "rank1_cuda_emulation.h"

namespace {

template <uint16_t (*Convert)(float)>
at::Tensor to_bits(const at::Tensor& values) {
  TORCH_CHECK(values.scalar_type() == at::kFloat, "float32 input expected");
  const auto in = values.contiguous();
  auto out = at::empty(in.sizes(), in.options().dtype(at::kShort));
  const float* source = in.data_ptr<float>();
  int16_t* target = out.data_ptr<int16_t>();
  for (int64_t i = 0; i < in.numel(); ++i) target[i] = static_cast<int16_t>(Convert(source[i]));
  return out;
}

template <float (*Convert)(uint16_t)>
at::Tensor from_bits(const at::Tensor& bits) {
  TORCH_CHECK(bits.scalar_type() == at::kShort, "int16 bit patterns expected");
  const auto in = bits.contiguous();
  auto out = at::empty(in.sizes(), in.options().dtype(at::kFloat));
  const int16_t* source = in.data_ptr<int16_t>();
  float* target = out.data_ptr<float>();
  for (int64_t i = 0; i < in.numel(); ++i) target[i] = Convert(static_cast<uint16_t>(source[i]));
  return out;
}

}  // namespace

TORCH_LIBRARY(rank1_emu, m) {
  m.def("float_to_half_bits(Tensor values) -> Tensor");
  m.def("half_bits_to_float(Tensor bits) -> Tensor");
  m.def("float_to_bfloat16_bits(Tensor values) -> Tensor");
  m.def("bfloat16_bits_to_float(Tensor bits) -> Tensor");
}

TORCH_LIBRARY_IMPL(rank1_emu, CPU, m) {
  m.impl("float_to_half_bits", &to_bits<rank1_emu::float_to_half_bits>);
  m.impl("half_bits_to_float", &from_bits<rank1_emu::half_bits_to_float>);
  m.impl("float_to_bfloat16_bits", &to_bits<rank1_emu::float_to_bfloat16_bits>);
  m.impl("bfloat16_bits_to_float", &from_bits<rank1_emu::bfloat16_bits_to_float>);
}
