// Host emulation of the CUDA built-ins that csrc/*.cu use, so that the kernels compile as plain C++ and run on
// CPU memory (tests/cuda_emulation/build.py). It is a test tool, not a backend: slow, and only as faithful as
// the subset of CUDA below.
//
// What it keeps of CUDA's semantics:
//  - every thread of a block is a real std::thread, so __syncthreads and the warp shuffles are real barriers and
//    exchanges (a kernel that relies on an ordering CUDA does not promise can fail here too);
//  - blocks run one after another; `__shared__` arrays are function statics, which is per block under that order,
//    and dynamic shared memory is a fresh buffer per launch, filled with a NaN pattern before every block so that a
//    read before a write shows up in the results;
//  - launch configurations are checked against CUDA's limits (block <= 1024 threads, grid.y/z <= 65535, dynamic
//    shared memory <= 48 KiB without opt-in) and a bad one is reported by cudaGetLastError, as on a GPU;
//  - __half and __nv_bfloat16 are 16-bit storage types converted with round-to-nearest-even, as cuda_fp16.h and
//    cuda_bf16.h do.
// A __syncthreads or shuffle that not every thread reaches (divergence) deadlocks on a GPU; here the wait times
// out and the process aborts with a message.
#pragma once

#include <algorithm>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};
using uint3 = dim3;

inline thread_local uint3 threadIdx;
inline thread_local uint3 blockIdx;
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;

using cudaStream_t = void*;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidConfiguration = 9 };

namespace rank1_emu {

inline thread_local cudaError_t last_error = cudaSuccess;

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "rank1 CUDA emulation: %s\n", what);
  std::fflush(stderr);
  std::abort();
}

// A reusable barrier whose threads may leave for good (a thread that returned from the kernel body), like the
// threads of a CUDA block that exited before a __syncthreads.
class Barrier {
 public:
  void arm(int count) {
    std::lock_guard<std::mutex> lock(mutex_);
    expected_ = count;
    arrived_ = 0;
  }
  void arrive_and_wait(const char* what) {
    std::unique_lock<std::mutex> lock(mutex_);
    const uint64_t generation = generation_;
    if (++arrived_ == expected_) {
      release();
      return;
    }
    if (!released_.wait_for(lock, std::chrono::seconds(60), [&] { return generation_ != generation; })) {
      fail(what);
    }
  }
  void leave() {
    std::lock_guard<std::mutex> lock(mutex_);
    --expected_;
    if (arrived_ > 0 && arrived_ == expected_) release();
  }

 private:
  void release() {
    arrived_ = 0;
    ++generation_;
    released_.notify_all();
  }
  std::mutex mutex_;
  std::condition_variable released_;
  int expected_ = 0, arrived_ = 0;
  uint64_t generation_ = 0;
};

constexpr int kWarpSize = 32;

struct Block {
  explicit Block(int threads) : n_threads(threads), warps((threads + kWarpSize - 1) / kWarpSize) {}
  int n_threads;
  Barrier sync;
  struct Warp {
    Barrier barrier;
    alignas(8) unsigned char lanes[kWarpSize][8];
  };
  std::vector<Warp> warps;
  std::vector<unsigned char> dynamic_shared;
  Barrier block_end;
};

inline thread_local Block* current_block = nullptr;

inline unsigned char* dynamic_shared() { return current_block->dynamic_shared.data(); }

inline int linear_thread() { return threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z); }

template <typename T>
T shuffle(T value, int source_lane_delta, bool down) {
  static_assert(sizeof(T) <= 8, "shuffle of a type wider than 8 bytes");
  Block::Warp& warp = current_block->warps[linear_thread() / kWarpSize];
  const int lane = linear_thread() % kWarpSize;
  std::memcpy(warp.lanes[lane], &value, sizeof(T));
  warp.barrier.arrive_and_wait("a warp shuffle waited 60 s: not every lane of the warp reached it");
  const int source = down ? lane + source_lane_delta : lane - source_lane_delta;
  T result = value;  // out of range: the lane keeps its own value, as __shfl_down_sync/__shfl_up_sync do
  if (source >= 0 && source < kWarpSize) std::memcpy(&result, warp.lanes[source], sizeof(T));
  warp.barrier.arrive_and_wait("a warp shuffle waited 60 s: not every lane of the warp reached it");
  return result;
}

inline bool valid_configuration(dim3 grid, dim3 block, size_t shared_bytes) {
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  return threads >= 1 && threads <= 1024 && block.z <= 64 && grid.x >= 1 && grid.x <= 0x7fffffffu && grid.y >= 1 &&
         grid.y <= 65535 && grid.z >= 1 && grid.z <= 65535 && shared_bytes <= 48 * 1024;
}

// kernel<<<grid, block, shared_bytes, stream>>>(args) is rewritten by build.py to
// launch(grid, block, shared_bytes, stream, [&] { kernel(args); }).
template <typename Body>
void launch(dim3 grid, dim3 block, size_t shared_bytes, cudaStream_t, Body body) {
  if (!valid_configuration(grid, block, shared_bytes)) {
    last_error = cudaErrorInvalidConfiguration;
    return;
  }
  const int n_threads = static_cast<int>(block.x * block.y * block.z);
  Block state(n_threads);
  state.dynamic_shared.resize(shared_bytes + 16);
  auto arm_block = [&] {
    state.sync.arm(n_threads);
    for (size_t w = 0; w < state.warps.size(); ++w) {
      state.warps[w].barrier.arm(std::min(kWarpSize, n_threads - static_cast<int>(w) * kWarpSize));
    }
    std::memset(state.dynamic_shared.data(), 0xff, state.dynamic_shared.size());  // NaN for floats
  };
  state.block_end.arm(n_threads);
  arm_block();
  auto worker = [&](int t) {
    current_block = &state;
    blockDim = block;
    gridDim = grid;
    threadIdx = uint3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
    for (unsigned int z = 0; z < grid.z; ++z) {
      for (unsigned int y = 0; y < grid.y; ++y) {
        for (unsigned int x = 0; x < grid.x; ++x) {
          blockIdx = uint3(x, y, z);
          body();
          state.sync.leave();
          state.warps[t / kWarpSize].barrier.leave();
          state.block_end.arrive_and_wait("a block's threads did not all finish within 60 s");
          if (t == 0) arm_block();
          state.block_end.arrive_and_wait("a block's threads did not all finish within 60 s");
        }
      }
    }
    current_block = nullptr;
  };
  std::vector<std::thread> threads;
  threads.reserve(n_threads);
  for (int t = 0; t < n_threads; ++t) threads.emplace_back(worker, t);
  for (auto& thread : threads) thread.join();
}

// ---- 16-bit floating types, round-to-nearest-even like the CUDA headers ----

inline uint16_t float_to_half_bits(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, 4);
  const uint16_t sign = static_cast<uint16_t>((bits >> 16) & 0x8000u);
  const uint32_t magnitude = bits & 0x7fffffffu;
  if (magnitude > 0x7f800000u) return sign | 0x7e00u;  // NaN
  if (magnitude >= 0x477ff000u) return sign | 0x7c00u;  // >= 65520 rounds to infinity
  if (magnitude < 0x38800000u) {                        // below 2^-14: a subnormal half (or zero)
    float absolute;
    std::memcpy(&absolute, &magnitude, 4);
    return sign | static_cast<uint16_t>(std::nearbyint(absolute * 16777216.0f));  // units of 2^-24, exact scaling
  }
  uint32_t half = ((((magnitude >> 23) - 127 + 15) << 10) | ((magnitude & 0x7fffffu) >> 13));
  const uint32_t rest = magnitude & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (half & 1u))) ++half;  // a carry into the exponent is still right
  return sign | static_cast<uint16_t>(half);
}

inline float half_bits_to_float(uint16_t half) {
  const uint32_t sign = uint32_t(half & 0x8000u) << 16;
  const uint32_t exponent = (half >> 10) & 0x1fu, mantissa = half & 0x3ffu;
  uint32_t bits;
  if (exponent == 0) {
    const float value = static_cast<float>(mantissa) * (1.0f / 16777216.0f);
    std::memcpy(&bits, &value, 4);
    bits |= sign;
  } else if (exponent == 31) {
    bits = sign | 0x7f800000u | (mantissa << 13);
  } else {
    bits = sign | ((exponent - 15 + 127) << 23) | (mantissa << 13);
  }
  float value;
  std::memcpy(&value, &bits, 4);
  return value;
}

inline uint16_t float_to_bfloat16_bits(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, 4);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40u);  // quiet NaN
  return static_cast<uint16_t>((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

inline float bfloat16_bits_to_float(uint16_t bf16) {
  const uint32_t bits = uint32_t(bf16) << 16;
  float value;
  std::memcpy(&value, &bits, 4);
  return value;
}

}  // namespace rank1_emu

struct __half {
  uint16_t bits;
};
struct __nv_bfloat16 {
  uint16_t bits;
};

inline float __half2float(__half value) { return rank1_emu::half_bits_to_float(value.bits); }
inline __half __float2half_rn(float value) { return {rank1_emu::float_to_half_bits(value)}; }
inline float __bfloat162float(__nv_bfloat16 value) { return rank1_emu::bfloat16_bits_to_float(value.bits); }
inline __nv_bfloat16 __float2bfloat16_rn(float value) { return {rank1_emu::float_to_bfloat16_bits(value)}; }

template <typename T>
T __shfl_down_sync(unsigned int mask, T value, unsigned int delta, int width = rank1_emu::kWarpSize) {
  if (mask != 0xffffffffu || width != rank1_emu::kWarpSize) rank1_emu::fail("only full-warp shuffles are emulated");
  return rank1_emu::shuffle(value, static_cast<int>(delta), true);
}

template <typename T>
T __shfl_xor_sync(unsigned int mask, T value, int lane_mask, int width = rank1_emu::kWarpSize) {
  if (mask != 0xffffffffu || width != rank1_emu::kWarpSize) rank1_emu::fail("only full-warp shuffles are emulated");
  // Lane l reads lane l ^ lane_mask: the same exchange as a shuffle by a per-lane signed delta.
  const int lane = rank1_emu::linear_thread() % rank1_emu::kWarpSize;
  return rank1_emu::shuffle(value, (lane ^ lane_mask) - lane, true);
}

inline void __syncthreads() {
  rank1_emu::current_block->sync.arrive_and_wait("__syncthreads waited 60 s: not every thread of the block reached it");
}

inline cudaError_t cudaGetLastError() {
  const cudaError_t error = rank1_emu::last_error;
  rank1_emu::last_error = cudaSuccess;
  return error;
}

inline const char* cudaGetErrorString(cudaError_t error) {
  return error == cudaSuccess ? "no error" : "invalid configuration argument (emulated launch check)";
}
