// Runs csrc/'s CUDA kernels on the CPU, unchanged, so that their indexing, masking, tiling, online
// statistics and synchronisation are tested where there is no GPU. Force-included (-include) before the
// kernel sources, with tests/emulate/ ahead of the toolkit on the include path (for the WMMA stand-in).
//
// Each block runs as kThreads std::threads sharing one shared-memory buffer; __syncthreads and __syncwarp
// are barriers, __shfl_xor_sync goes through a per-block exchange array. The stand-in WMMA (mma.h here)
// gives every lane the whole tile and lets only lane 0 store, so a missing barrier before a read of stored
// data shows up as a wrong number, and it checks the 32-byte alignment and ldm rules of the real API.
// Not emulated: fragment register layouts (the kernels only touch fragments elementwise), timing, and
// out-of-bounds global accesses (run compute-sanitizer on a GPU for those).
#pragma once

#include <cuda_runtime_api.h>
#include <vector_types.h>

#include <array>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <math.h>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace emulation {

struct Block {
  explicit Block(unsigned threads) : all(threads), shuffle(threads), address(threads), fragment(threads) {
    for (unsigned w = 0; w < threads / 32; ++w) warps.emplace_back(std::make_unique<std::barrier<>>(32));
  }
  std::barrier<> all;
  std::vector<std::unique_ptr<std::barrier<>>> warps;
  std::vector<float> shuffle;
  // What lanes hand to a warp-collective operation (ldmatrix row addresses, mma fragments).
  std::vector<std::uintptr_t> address;
  std::vector<std::array<std::uint32_t, 6>> fragment;
};

inline thread_local uint3 thread_idx;
inline thread_local uint3 block_idx;
inline thread_local Block* block = nullptr;

// The first violation of a hardware rule (alignment, leading dimension) any thread saw in this launch.
inline std::mutex error_lock;
inline std::string error;
inline void fail(const std::string& what) {
  std::lock_guard<std::mutex> hold(error_lock);
  if (error.empty()) error = what;
}

// Shared memory of the block being run (blocks run one after another); poisoned with 0xFF bytes (NaN in
// every float type) before each block, so a read of something no thread wrote shows.
alignas(128) inline unsigned char shared_memory[1 << 18];

template <typename Params>
cudaError_t launch(void (*kernel)(const Params), unsigned blocks, unsigned threads, size_t bytes, const Params& p) {
  if (bytes > sizeof(shared_memory)) return cudaErrorInvalidValue;
  error.clear();
  for (unsigned b = 0; b < blocks; ++b) {
    std::memset(shared_memory, 0xFF, bytes);
    Block state(threads);
    std::vector<std::thread> pool;
    pool.reserve(threads);
    for (unsigned t = 0; t < threads; ++t)
      pool.emplace_back([&, t] {
        thread_idx = uint3{t, 0, 0};
        block_idx = uint3{b, 0, 0};
        block = &state;
        kernel(p);
      });
    for (auto& th : pool) th.join();
    if (!error.empty()) return cudaErrorMisalignedAddress;
  }
  return cudaSuccess;
}

}  // namespace emulation

#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif
#define threadIdx (::emulation::thread_idx)
#define blockIdx (::emulation::block_idx)

inline void __syncthreads() { emulation::block->all.arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) { emulation::block->warps[threadIdx.x / 32]->arrive_and_wait(); }

inline float __shfl_xor_sync(unsigned, float value, int lane_mask) {
  const unsigned t = threadIdx.x;
  emulation::block->shuffle[t] = value;
  __syncwarp();
  const float other = emulation::block->shuffle[(t & ~31u) | ((t & 31u) ^ static_cast<unsigned>(lane_mask))];
  __syncwarp();
  return other;
}

inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }

template <typename T>
cudaError_t cudaFuncSetAttribute(T*, cudaFuncAttribute, int) {
  return cudaSuccess;
}
inline const char* emulated_error_string(cudaError_t) { return emulation::error.c_str(); }
#define cudaGetErrorString emulated_error_string
