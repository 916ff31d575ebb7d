// The PTX operations of csrc/warp_mma.cuh on the CPU threads of tests/emulate/cuda_emulation.h.
// ldmatrix, mma.sync m16n8k16: every lane publishes its operands, the warp meets at a barrier, and each
// lane computes exactly the registers the PTX ISA assigns to it, so a kernel that gets a fragment layout
// wrong computes a wrong number here too. cp.async: the copies are queued per thread and land only when
// cp_async_wait lets their group complete, so a kernel that reads a buffer before waiting for it (or
// before the __syncthreads after everyone's wait) reads the poisoned or stale bytes it would risk on a GPU.
#pragma once

#include <cstdint>
#include <cstring>
#include <deque>
#include <string>
#include <vector>

namespace fused_contrastive {
namespace warp {

namespace detail {

inline std::uint32_t halves(std::uint16_t lo, std::uint16_t hi) { return lo | (static_cast<std::uint32_t>(hi) << 16); }

inline void ldmatrix(std::uint32_t (&r)[4], const void* row, bool trans) {
  auto* block = emulation::block;
  const unsigned t = threadIdx.x, base = t & ~31u, l = t & 31u;
  if (reinterpret_cast<std::uintptr_t>(row) % 16 != 0) emulation::fail("ldmatrix: row address not 16-byte aligned");
  block->address[t] = reinterpret_cast<std::uintptr_t>(row);
  __syncwarp();
  for (unsigned m = 0; m < 4; ++m) {
    const auto row_of = [&](unsigned i) {
      return reinterpret_cast<const std::uint16_t*>(block->address[base + m * 8 + i]);
    };
    if (!trans) {
      const std::uint16_t* p = row_of(l / 4);
      r[m] = halves(p[2 * (l % 4)], p[2 * (l % 4) + 1]);
    } else {
      r[m] = halves(row_of(2 * (l % 4))[l / 4], row_of(2 * (l % 4) + 1)[l / 4]);
    }
  }
  __syncwarp();
}

template <typename T>
float element(std::uint32_t reg, unsigned half) {
  const std::uint16_t bits = static_cast<std::uint16_t>(half ? reg >> 16 : reg & 0xFFFFu);
  T value;
  std::memcpy(&value, &bits, 2);
  return nvcuda::wmma::as_float(value);
}

}  // namespace detail

struct Copy {
  void* dst;
  const void* src;
  int size, src_bytes;
};
inline thread_local std::vector<Copy> open_group;
inline thread_local std::deque<std::vector<Copy>> committed;

inline void cp_async(void* dst, const void* src, int size, int src_bytes) {
  if (reinterpret_cast<std::uintptr_t>(dst) % size != 0 || reinterpret_cast<std::uintptr_t>(src) % size != 0)
    emulation::fail("cp.async: " + std::to_string(size) + "-byte copy not " + std::to_string(size) + "-byte aligned");
  if (src_bytes != 0 && src_bytes != size) emulation::fail("cp.async: src_bytes neither 0 nor the copy size");
  open_group.push_back({dst, src, size, src_bytes});
}
inline void cp_async_16(void* dst, const void* src, int src_bytes) { cp_async(dst, src, 16, src_bytes); }
inline void cp_async_8(void* dst, const void* src, int src_bytes) { cp_async(dst, src, 8, src_bytes); }
inline void cp_async_4(void* dst, const void* src, int src_bytes) { cp_async(dst, src, 4, src_bytes); }
inline void cp_async_commit() {
  committed.push_back(std::move(open_group));
  open_group.clear();
}
template <int pending>
void cp_async_wait() {
  while (committed.size() > static_cast<std::size_t>(pending)) {
    for (const Copy& c : committed.front()) {
      std::memset(c.dst, 0, c.size);
      std::memcpy(c.dst, c.src, c.src_bytes);
    }
    committed.pop_front();
  }
}

inline void ldmatrix_x4(std::uint32_t (&r)[4], const void* row) { detail::ldmatrix(r, row, false); }
inline void ldmatrix_x4_trans(std::uint32_t (&r)[4], const void* row) { detail::ldmatrix(r, row, true); }

template <typename T>
void mma_16816(float (&d)[4], const std::uint32_t (&a)[4], const std::uint32_t (&b)[2]) {
  auto* block = emulation::block;
  const unsigned t = threadIdx.x, base = t & ~31u, l = t & 31u;
  block->fragment[t] = {a[0], a[1], a[2], a[3], b[0], b[1]};
  __syncwarp();
  // A(row, k) sits in lane (row % 8) * 4 + (k % 8) / 2, register (row >= 8) + 2 (k >= 8), half k % 2;
  // B(k, n) in lane n * 4 + (k % 8) / 2, register 4 + (k >= 8), half k % 2.
  const auto A = [&](unsigned row, unsigned k) {
    return detail::element<T>(block->fragment[base + (row % 8) * 4 + (k % 8) / 2][(row >= 8) + 2 * (k >= 8)], k % 2);
  };
  const auto B = [&](unsigned k, unsigned n) {
    return detail::element<T>(block->fragment[base + n * 4 + (k % 8) / 2][4 + (k >= 8)], k % 2);
  };
  float out[4];
  for (unsigned i = 0; i < 4; ++i) {
    const unsigned row = l / 4 + 8 * (i / 2), col = 2 * (l % 4) + i % 2;
    float sum = d[i];
    for (unsigned k = 0; k < 16; ++k) sum += A(row, k) * B(k, col);
    out[i] = sum;
  }
  __syncwarp();
  for (unsigned i = 0; i < 4; ++i) d[i] = out[i];
}

}  // namespace warp
}  // namespace fused_contrastive
