// A CPU stand-in for the subset of CUDA's WMMA API (<mma.h>) that csrc/ uses, for tests/emulate/.
// Every lane holds the whole tile (num_elements = rows x cols; the kernels only touch fragments
// elementwise, so the real per-lane layout does not matter to them); loads read memory lane by lane, a
// store is written by lane 0 alone, and each call checks the rules the hardware faults on: 256-bit
// aligned pointers and a leading dimension that is a multiple of 16 bytes.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
namespace precision {
struct tf32 {};
}  // namespace precision
enum layout_t { mem_row_major, mem_col_major };

template <typename T> struct element { using type = T; };
template <> struct element<precision::tf32> { using type = float; };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static constexpr int rows = std::is_same_v<Use, matrix_b> ? K : M;
  static constexpr int cols = std::is_same_v<Use, matrix_a> ? K : N;
  static constexpr int num_elements = rows * cols;
  using layout = Layout;
  typename element<T>::type x[num_elements];
};

inline float as_float(float v) { return v; }
inline float as_float(__half v) { return __half2float(v); }
inline float as_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename E>
inline void check(const E* p, unsigned ldm, const char* what) {
  if (reinterpret_cast<std::uintptr_t>(p) % 32 != 0)
    emulation::fail(std::string(what) + ": pointer not 256-bit aligned");
  if ((ldm * sizeof(E)) % 16 != 0) emulation::fail(std::string(what) + ": ldm not a multiple of 16 bytes");
}

template <typename Use, int M, int N, int K, typename T, typename Layout, typename E>
inline void load_matrix_sync(fragment<Use, M, N, K, T, Layout>& f, const E* p, unsigned ldm) {
  using F = fragment<Use, M, N, K, T, Layout>;
  check(p, ldm, "load_matrix_sync");
  for (int r = 0; r < F::rows; ++r)
    for (int c = 0; c < F::cols; ++c)
      f.x[r * F::cols + c] = std::is_same_v<Layout, col_major> ? p[c * ldm + r] : p[r * ldm + c];
}

template <int M, int N, int K>
inline void store_matrix_sync(float* p, const fragment<accumulator, M, N, K, float>& f, unsigned ldm, layout_t layout) {
  check(p, ldm, "store_matrix_sync");
  if (threadIdx.x % 32 != 0) return;  // one lane writes: readers must wait at a barrier, as on the GPU
  for (int r = 0; r < M; ++r)
    for (int c = 0; c < N; ++c) (layout == mem_row_major ? p[r * ldm + c] : p[c * ldm + r]) = f.x[r * N + c];
}

template <typename F>
inline void fill_fragment(F& f, float value) {
  for (int t = 0; t < F::num_elements; ++t) f.x[t] = value;
}

// d = a b + c in fp32 (the tensor cores multiply exactly and accumulate in fp32).
template <int M, int N, int K, typename T, typename LA, typename LB>
inline void mma_sync(fragment<accumulator, M, N, K, float>& d, const fragment<matrix_a, M, N, K, T, LA>& a,
                     const fragment<matrix_b, M, N, K, T, LB>& b, const fragment<accumulator, M, N, K, float>& c) {
  float out[M * N];
  for (int r = 0; r < M; ++r)
    for (int col = 0; col < N; ++col) {
      float sum = c.x[r * N + col];
      for (int k = 0; k < K; ++k) sum += as_float(a.x[r * K + k]) * as_float(b.x[k * N + col]);
      out[r * N + col] = sum;
    }
  std::memcpy(d.x, out, sizeof(out));
}

// Round to tf32 (10 mantissa bits, to nearest, ties away from zero: cvt.rna.tf32.f32).
inline float __float_to_tf32(float x) {
  if (!std::isfinite(x)) return x;
  std::uint32_t bits;
  std::memcpy(&bits, &x, 4);
  bits = (bits + 0x1000u) & 0xFFFFE000u;
  std::memcpy(&x, &bits, 4);
  return x;
}

}  // namespace wmma
}  // namespace nvcuda
