// SupCon / SimCLR (the general loss with a_ij from labels or a dense mask) as CUDA kernels on tensor
// cores through the WMMA API (mma.sync on sm_80 and sm_90).
//
// Every kernel is instantiated per positive rule (Rule: labels, byte mask, fp32 mask), so the per-pair
// step holds only its own rule, and a mask's row and column are found once per row and per streamed column
// (the tags below), never by a division per pair.
//
// Three kernels, as in the Triton backend: forward (row-parallel: running max, sum-exp and pos_sum per
// anchor, saves lse), dQ (row-parallel) and dK (column-parallel), both recomputing each logit tile from
// lse. No atomics: the backward is bit-deterministic.
//
// Block shape: 64 anchors x 64 keys per tile, 4 warps; warp w owns 16 rows of every tile (anchors in the
// forward and dQ, keys in dK), so the elementwise step between the two products needs only __syncwarp.
// A logit tile goes tensor cores -> shared memory (fp32) -> elementwise by lanes with known (row, col) ->
// shared memory (g in the input dtype) -> tensor cores. The WMMA accumulator layout is opaque, which is
// why the tile takes that round trip through shared memory instead of staying in registers.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <cfloat>
#include <cstdint>

#include "supcon_params.h"
#include "warp_mma.cuh"

namespace fused_contrastive {
namespace kernels {

namespace wmma = nvcuda::wmma;

constexpr int kTile = 64;  // BLOCK_M = BLOCK_N
constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kWarpRows = kTile / kWarps;  // 16: one WMMA tile high
// The fp32 logit tile's row stride: +4 floats against bank conflicts; 32-byte row starts stay aligned.
constexpr int kLdS = kTile + 4;

// ----------------------------------------------------------------------------- per-dtype arithmetic

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// 16x16 products on tensor cores, one K-step at a time (an A fragment loaded once, reused). 16-bit inputs:
// m16n16k16 with fp32 accumulation.
// fp32 inputs: three tf32 products (big*big + big*small + small*big, the "3xTF32" split) keep fp32
// accuracy on tensor cores, as the Triton backend's tf32x3.
template <typename T>
struct Mma {
  static constexpr int kStep = 16;
  static constexpr int kPad = 8;  // 16 bytes of row padding: WMMA needs ldm % 8 == 0 for 16-bit types
  using Acc = wmma::fragment<wmma::accumulator, 16, 16, kStep, float>;
  using FragA = wmma::fragment<wmma::matrix_a, 16, 16, kStep, T, wmma::row_major>;

  static __device__ __forceinline__ void load_a(FragA& fa, const T* a, unsigned lda) {
    wmma::load_matrix_sync(fa, a, lda);
  }

  template <typename LayoutB>
  static __device__ __forceinline__ void mma(Acc& acc, const FragA& fa, const T* b, unsigned ldb) {
    wmma::fragment<wmma::matrix_b, 16, 16, kStep, T, LayoutB> fb;
    wmma::load_matrix_sync(fb, b, ldb);
    wmma::mma_sync(acc, fa, fb, acc);
  }
};

template <>
struct Mma<float> {
  static constexpr int kStep = 8;
  static constexpr int kPad = 4;  // ldm % 4 == 0 for fp32
  using Acc = wmma::fragment<wmma::accumulator, 16, 16, kStep, float>;
  using Tf32A = wmma::fragment<wmma::matrix_a, 16, 16, kStep, wmma::precision::tf32, wmma::row_major>;
  struct FragA {
    Tf32A big, small;
  };

  template <typename Frag>
  static __device__ __forceinline__ void split(Frag& big, Frag& small) {
#pragma unroll
    for (int t = 0; t < big.num_elements; ++t) {
      const float x = big.x[t];
      const float hi = wmma::__float_to_tf32(x);
      big.x[t] = hi;
      small.x[t] = wmma::__float_to_tf32(x - hi);
    }
  }

  static __device__ __forceinline__ void load_a(FragA& fa, const float* a, unsigned lda) {
    wmma::load_matrix_sync(fa.big, a, lda);
    split(fa.big, fa.small);
  }

  template <typename LayoutB>
  static __device__ __forceinline__ void mma(Acc& acc, const FragA& fa, const float* b, unsigned ldb) {
    wmma::fragment<wmma::matrix_b, 16, 16, kStep, wmma::precision::tf32, LayoutB> b_big, b_small;
    wmma::load_matrix_sync(b_big, b, ldb);
    split(b_big, b_small);
    // Small terms first: they are the least significant, so they round least in the running sum.
    wmma::mma_sync(acc, fa.small, b_big, acc);
    wmma::mma_sync(acc, fa.big, b_small, acc);
    wmma::mma_sync(acc, fa.big, b_big, acc);
  }
};

// Shared-memory layout of one block: Q tile, K tile (each [64, DP + pad] in the input dtype), the fp32
// logit tile S [64, kLdS], g [64, 64 + pad] in the input dtype, and per-row statistics for dK.
template <typename T, int DF>
struct Layout {
  static constexpr int kDP = 16 * DF;  // d padded to whole WMMA tiles
  static constexpr int kLdX = kDP + Mma<T>::kPad;
  static constexpr int kLdG = kTile + Mma<T>::kPad;
  static constexpr size_t round128(size_t bytes) { return (bytes + 127) / 128 * 128; }
  static constexpr size_t kQ = 0;
  static constexpr size_t kK = kQ + round128(sizeof(T) * kTile * kLdX);
  static constexpr size_t kS = kK + round128(sizeof(T) * kTile * kLdX);
  static constexpr size_t kG = kS + round128(sizeof(float) * kTile * kLdS);
  static constexpr size_t kRowStats = kG + round128(sizeof(T) * kTile * kLdG);
  // dK's per-anchor statistics: lse, coef, pos_scale (fp32) and the anchor tag (int64)
  static constexpr size_t kAnchorTags = kRowStats + round128(3 * sizeof(float) * kTile);
  static constexpr size_t kBytes = kAnchorTags + round128(sizeof(int64_t) * kTile);
  // Key tags (labels, or key indices under a mask) of the K tile in the row-parallel kernels
  static constexpr size_t kKeyTags = kRowStats;
};

// ----------------------------------------------------------------------------- tile helpers

// The block's dynamic shared memory (launchers size it from Layout::kBytes).
__device__ __forceinline__ unsigned char* shared_base() {
#ifdef FUSED_CONTRASTIVE_EMULATION  // tests/emulate/: one CPU buffer stands in for it
  return emulation::shared_memory;
#else
  extern __shared__ __align__(128) unsigned char smem[];
  return smem;
#endif
}

// Rows [start, start + 64) of X into a [64, DP] shared tile, zero past the last row and past d (the
// padding is free: zeros add nothing to a dot product). 16-byte copies when d, the row stride and the base
// pointer allow them (the usual case: D a multiple of 8 for 16-bit inputs, of 4 for fp32), else one
// element at a time. kAsync: the 16-byte copies go by cp.async (in flight until the caller commits and
// waits for them); element copies are always done at once.
template <typename T, int DF, bool kAsync = false>
__device__ __forceinline__ void load_rows(T* dst, const T* src, int64_t stride, int start, int total, int d) {
  constexpr int kDP = Layout<T, DF>::kDP;
  constexpr int kLdX = Layout<T, DF>::kLdX;
  constexpr int kVec = 16 / sizeof(T);
  const bool vector = d % kVec == 0 && stride % kVec == 0 && reinterpret_cast<uintptr_t>(src) % 16 == 0;
  if (vector) {
    for (int idx = threadIdx.x; idx < kTile * kDP / kVec; idx += kThreads) {
      const int r = idx / (kDP / kVec), c = idx % (kDP / kVec) * kVec;
      const int row = start + r;
      const bool ok = row < total && c < d;
      if constexpr (kAsync) {
        warp::cp_async_16(dst + r * kLdX + c, ok ? src + static_cast<int64_t>(row) * stride + c : src, ok ? 16 : 0);
      } else {
        uint4 v = make_uint4(0, 0, 0, 0);
        if (ok) v = *reinterpret_cast<const uint4*>(src + static_cast<int64_t>(row) * stride + c);
        *reinterpret_cast<uint4*>(dst + r * kLdX + c) = v;
      }
    }
    return;
  }
  for (int idx = threadIdx.x; idx < kTile * kDP; idx += kThreads) {
    const int r = idx / kDP, c = idx % kDP;
    const int row = start + r;
    T v = from_float<T>(0.f);
    if (row < total && c < d) v = src[static_cast<int64_t>(row) * stride + c];
    dst[r * kLdX + c] = v;
  }
}

// C[16, 64] (fp32, row stride kLdS) = A[16, DP] . B[64, DP]^T for one warp: its 16 rows of A against all
// 64 rows of B; both row-major with row stride kLdX (B read as a column-major DP x 64 matrix).
template <typename T, int DF>
__device__ __forceinline__ void warp_logits(const T* a, const T* b, float* c) {
  using M = Mma<T>;
  constexpr int kLdX = Layout<T, DF>::kLdX;
#pragma unroll
  for (int ct = 0; ct < kTile / 16; ++ct) {
    typename M::Acc acc;
    wmma::fill_fragment(acc, 0.f);
#pragma unroll 4
    for (int kk = 0; kk < Layout<T, DF>::kDP; kk += M::kStep) {
      typename M::FragA fa;
      M::load_a(fa, a + kk, kLdX);
      M::template mma<wmma::col_major>(acc, fa, b + ct * 16 * kLdX + kk, kLdX);
    }
    wmma::store_matrix_sync(c + ct * 16, acc, kLdS, wmma::mem_row_major);
  }
}

// acc[DF] (a [16, DP] fp32 accumulator) += G[16, 64] . X[64, DP] for one warp; G row stride kLdG, X kLdX.
template <typename T, int DF>
__device__ __forceinline__ void warp_accumulate(typename Mma<T>::Acc (&acc)[DF], const T* g, const T* x) {
  using M = Mma<T>;
  constexpr int kLdX = Layout<T, DF>::kLdX;
  constexpr int kLdG = Layout<T, DF>::kLdG;
  // One g fragment per K-step, reused across the DF output fragments. At DF = 16 the accumulator alone holds
  // 128 registers: unrolling the K-steps as well would spill.
  constexpr int kUnroll = DF < 16 ? kTile / M::kStep : 1;
#pragma unroll kUnroll
  for (int kk = 0; kk < kTile; kk += M::kStep) {
    typename M::FragA fa;
    M::load_a(fa, g + kk, kLdG);
#pragma unroll
    for (int dn = 0; dn < DF; ++dn) M::template mma<wmma::row_major>(acc[dn], fa, x + kk * kLdX + dn * 16, kLdX);
  }
}

// Writes a warp's [16, DP] accumulator, row r times factor(r), into rows [row0, row0 + 16) of out (input
// dtype), staging each 16x16 piece through the warp's own rows of the logit tile.
template <typename T, int DF, typename Factor>
__device__ __forceinline__ void warp_store(typename Mma<T>::Acc (&acc)[DF], float* scratch, T* out, int64_t stride,
                                           int row0, int total, int d, Factor factor) {
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int dn = 0; dn < DF; ++dn) {
    wmma::store_matrix_sync(scratch, acc[dn], kLdS, wmma::mem_row_major);
    __syncwarp();
#pragma unroll
    for (int t = 0; t < 8; ++t) {
      const int idx = lane + 32 * t;
      const int r = idx / 16, c = dn * 16 + idx % 16;
      const int row = row0 + r;
      if (row < total && c < d)
        out[static_cast<int64_t>(row) * stride + c] = from_float<T>(scratch[r * kLdS + idx % 16] * factor(row));
    }
    __syncwarp();
  }
}

// Which a_ij the kernels compute, a template argument of every kernel.
enum class Rule : int { kLabels = 0, kMaskBytes = 1, kMaskFloats = 2 };

// The tags that decide a_ij, computed once per row of a kernel and once per streamed column of a tile:
// under labels the labels themselves; under a mask the anchor's offset of its mask row,
// (i % mask_rows) * stride_mask, and the key's mask column j % mask_cols, so that a pair's weight is one
// load at the tags' sum. Rows and columns past the end wrap like the others: their mask reads stay in range.
template <Rule R>
__device__ __forceinline__ int64_t anchor_tag(const SupConParams& p, int row) {
  if constexpr (R == Rule::kLabels) return row < p.na ? p.anchor_labels[row] : -2;
  else return static_cast<int64_t>(row % p.mask_rows) * p.stride_mask;
}
template <Rule R>
__device__ __forceinline__ int64_t key_tag(const SupConParams& p, int col) {
  if constexpr (R == Rule::kLabels) return col < p.m ? p.key_labels[col] : -1;
  else return col % p.mask_cols;
}

// What the elementwise step needs of a tile row, fixed for the whole kernel: is it in range, and which
// column is its self (-1: none among the columns). Row-parallel kernels (forward, dQ): rows are anchors,
// columns keys, self = row + self_offset; dK: rows are keys, columns anchors, self = row - self_offset. A pair (row, col)
// is in the denominator when the row is in range, col < columns and col != self.
struct TileRow {
  bool ok;
  int self;
};

__device__ __forceinline__ TileRow tile_row(const SupConParams& p, int row, bool anchors_are_rows) {
  const int rows = anchors_are_rows ? p.na : p.m, columns = anchors_are_rows ? p.m : p.na;
  const int64_t self = anchors_are_rows ? row + p.self_offset : row - p.self_offset;
  return {row < rows, p.has_self && self >= 0 && self < columns ? static_cast<int>(self) : -1};
}

__device__ __forceinline__ bool in_denominator(const TileRow& r, int col, int columns) {
  return r.ok && col < columns && col != r.self;
}

// a_ij for a pair in the denominator (0 elsewhere): 1 on equal labels, 1 on a nonzero mask byte, or the
// mask's weight.
template <Rule R>
__device__ __forceinline__ float positive_weight(const SupConParams& p, bool valid, int64_t a_tag, int64_t k_tag) {
  if constexpr (R == Rule::kLabels) {
    return valid && a_tag == k_tag ? 1.f : 0.f;
  } else {
    // The binding keeps a mask below 2^31 elements: a 32-bit offset, fewer registers per load in flight
    // (the DF = 16 backward would spill otherwise).
    const int32_t offset = static_cast<int32_t>(a_tag) + static_cast<int32_t>(k_tag);
    // Bytes: min(byte, 1) rather than byte != 0 (the same for a 0/1 mask): the compare cost registers.
    const float w = R == Rule::kMaskBytes
                        ? fminf(static_cast<float>(static_cast<const uint8_t*>(p.mask)[offset]), 1.f)
                        : static_cast<const float*>(p.mask)[offset];
    return valid ? w : 0.f;
  }
}

// exp(x - m) with the shift of a row that has seen no finite logit yet taken as 0, so exp(-inf - 0) = 0
// and never exp(-inf + inf) = NaN.
__device__ __forceinline__ float shift_of(float m) { return m == -INFINITY ? 0.f : m; }

// What the two row-parallel kernels (forward, dQ) share: the block's shared tiles, its 64 anchors loaded
// once, and the lane's place. Two lanes per row: lane pair (2r, 2r + 1) of warp w takes row 16w + r,
// 32 columns of each key tile apiece.
template <typename T, int DF, Rule R>
struct RowParallel {
  using L = Layout<T, DF>;
  T* q_s;
  T* k_s;
  float* s_s;
  T* g_s;
  int64_t* key_tags;
  int warp, lane, m0, r_local, row, c0;
  int64_t a_tag;
  TileRow facts;
  float inv_tau;

  __device__ __forceinline__ explicit RowParallel(const SupConParams& p) {
    unsigned char* smem = shared_base();
    q_s = reinterpret_cast<T*>(smem + L::kQ);
    k_s = reinterpret_cast<T*>(smem + L::kK);
    s_s = reinterpret_cast<float*>(smem + L::kS);
    g_s = reinterpret_cast<T*>(smem + L::kG);
    key_tags = reinterpret_cast<int64_t*>(smem + L::kKeyTags);
    warp = threadIdx.x / 32;
    lane = threadIdx.x % 32;
    m0 = blockIdx.x * kTile;
    r_local = warp * kWarpRows + lane / 2;
    row = m0 + r_local;
    c0 = (lane & 1) * (kTile / 2);
    a_tag = anchor_tag<R>(p, row);
    facts = tile_row(p, row, true);
    inv_tau = *p.inv_tau;
    load_rows<T, DF>(q_s, static_cast<const T*>(p.q), p.stride_q, m0, p.na, p.d);
  }

  // Key tile [n0, n0 + 64) into shared memory and this warp's 16 rows of its logits (unscaled) into s_s;
  // returns the lane's row of them.
  __device__ __forceinline__ const float* logits(const SupConParams& p, int n0) {
    __syncthreads();  // every warp is done with the previous K tile (and the Q tile is in place)
    load_rows<T, DF>(k_s, static_cast<const T*>(p.k), p.stride_k, n0, p.m, p.d);
    if (threadIdx.x < kTile) key_tags[threadIdx.x] = key_tag<R>(p, n0 + threadIdx.x);
    __syncthreads();
    warp_logits<T, DF>(q_s + warp * kWarpRows * L::kLdX, k_s, s_s + warp * kWarpRows * kLdS);
    __syncwarp();
    return s_s + r_local * kLdS;
  }
};

// ----------------------------------------------------------------------------- forward

template <typename T, int DF, Rule R>
__global__ void __launch_bounds__(kThreads, 1) supcon_fwd_kernel(const SupConParams p) {
  RowParallel<T, DF, R> t(p);
  // Each lane keeps its own running (max, sum-exp, pos_sum), merged with its partner at the end.
  float m_run = -INFINITY, s_run = 0.f, pos_sum = 0.f;

  for (int n0 = 0; n0 < p.m; n0 += kTile) {
    const float* s_row = t.logits(p, n0);
    // Columns outside the denominator are -inf before the max, not after.
    float tile_max = -INFINITY;
#pragma unroll 4
    for (int c = t.c0; c < t.c0 + kTile / 2; ++c) {
      const int col = n0 + c;
      const bool valid = in_denominator(t.facts, col, p.m);
      const float l = s_row[c] * t.inv_tau;
      if (valid) tile_max = fmaxf(tile_max, l);
      pos_sum += positive_weight<R>(p, valid, t.a_tag, t.key_tags[c]) * l;
    }
    const float m_new = fmaxf(m_run, tile_max);
    const float shift = shift_of(m_new);
    float tile_sum = 0.f;
#pragma unroll 4
    for (int c = t.c0; c < t.c0 + kTile / 2; ++c)
      if (in_denominator(t.facts, n0 + c, p.m)) tile_sum += __expf(s_row[c] * t.inv_tau - shift);
    s_run = s_run * __expf(m_run - shift) + tile_sum;
    m_run = m_new;
  }

  const float m_other = __shfl_xor_sync(0xffffffffu, m_run, 1);
  const float s_other = __shfl_xor_sync(0xffffffffu, s_run, 1);
  const float pos_other = __shfl_xor_sync(0xffffffffu, pos_sum, 1);
  const float m_all = fmaxf(m_run, m_other);
  const float shift = shift_of(m_all);
  const float s_all = s_run * __expf(m_run - shift) + s_other * __expf(m_other - shift);
  if ((t.lane & 1) == 0 && t.row < p.na) {
    p.lse[t.row] = s_all > 0.f ? m_all + __logf(s_all) : -INFINITY;
    p.pos_sum[t.row] = pos_sum + pos_other;
  }
}

// ----------------------------------------------------------------------------- backward

// scale * exp(l_ij - lse_i) - a_ij pos_part_i on the denominator, 0 elsewhere, pos_part_i = scale *
// pos_scale_i: the backward's g_ij (r_i c G_i folded into coef_i, w_i / Z_i into pos_scale_i) up to the
// per-row or per-product factor `scale`, which is what the tensor cores get (pow2_scale below).
__device__ __forceinline__ float tile_grad(bool valid, float l, float lse, float scale, float a, float pos_part) {
  // valid is false on every pair of a row whose lse is -inf (its denominator is empty): exp(+inf) is
  // selected away there, never multiplied.
  const float softmax = valid ? __expf(l - lse) : 0.f;
  return scale * softmax - a * pos_part;
}

__device__ __forceinline__ float safe_lse(const SupConParams& p, int row) {
  if (row >= p.na) return 0.f;
  const float lse = p.lse[row];
  return lse == -INFINITY ? 0.f : lse;  // a row without keys: every g of it is 0 anyway
}

// 2^k, k = min(k_target, the largest k with 2^k * bound < 2^15); exact in fp32. bound >= |every g it
// scales|: the scaled g stays a factor 2 below fp16's largest value (65504) whatever the rounding of the
// exp, and 2^k_target lifts a typical g of size 1/m (dQ, coef left out) or 1/(na m) (dK) to about 1, far
// from fp16's subnormals. bound 0 (every g is 0), inf or NaN: the target alone.
__device__ __forceinline__ float pow2_scale(float bound, int k_target) {
  int k = k_target;
  if (bound > 0.f && bound <= FLT_MAX) {
    int e;
    frexpf(bound, &e);  // bound in [2^(e - 1), 2^e)
    k = k < 15 - e ? k : 15 - e;
  }
  return ldexpf(1.f, k > -100 ? k : -100);
}

// The largest positive weight (1 under labels and byte masks).
__device__ __forceinline__ float max_weight(const SupConParams& p) { return p.a_max != nullptr ? *p.a_max : 1.f; }

// dQ's scale of anchor row i's g (coef_i left out: it multiplies the accumulator after the product):
// |exp(l - lse) - a pos_scale| <= 1 + a_max |pos_scale|.
__device__ __forceinline__ float dq_row_scale(const SupConParams& p, float a_max, float pos_scale) {
  return pow2_scale(1.f + a_max * fabsf(pos_scale), p.dq_scale_log2);
}

// dK's one scale of every g of the product (columns of g are anchors, each with its own coef).
__device__ __forceinline__ float dk_scale(const SupConParams& p) { return pow2_scale(*p.g_bound, p.dk_scale_log2); }

template <typename T, int DF, Rule R>
__global__ void __launch_bounds__(kThreads, 1) supcon_bwd_dq_kernel(const SupConParams p) {
  RowParallel<T, DF, R> t(p);
  const float lse_safe = safe_lse(p, t.row);
  const float pos_scale = t.row < p.na ? p.pos_scale[t.row] : 0.f;
  const float a_max = max_weight(p);
  const float row_scale = dq_row_scale(p, a_max, pos_scale);
  const float pos_part = row_scale * pos_scale;

  typename Mma<T>::Acc acc[DF];
#pragma unroll
  for (int dn = 0; dn < DF; ++dn) wmma::fill_fragment(acc[dn], 0.f);

  for (int n0 = 0; n0 < p.m; n0 += kTile) {
    const float* s_row = t.logits(p, n0);
    T* g_row = t.g_s + t.r_local * Layout<T, DF>::kLdG;
#pragma unroll 4
    for (int c = t.c0; c < t.c0 + kTile / 2; ++c) {
      const bool valid = in_denominator(t.facts, n0 + c, p.m);
      const float a = positive_weight<R>(p, valid, t.a_tag, t.key_tags[c]);
      g_row[c] = from_float<T>(tile_grad(valid, s_row[c] * t.inv_tau, lse_safe, row_scale, a, pos_part));
    }
    __syncwarp();
    warp_accumulate<T, DF>(acc, t.g_s + t.warp * kWarpRows * Layout<T, DF>::kLdG, t.k_s);
  }
  const float inv_tau = t.inv_tau;
  warp_store<T, DF>(acc, t.s_s + t.warp * kWarpRows * kLdS, static_cast<T*>(p.dq), p.stride_dq,
                    t.m0 + t.warp * kWarpRows, p.na, p.d,
                    [&](int row) { return p.coef[row] * inv_tau / dq_row_scale(p, a_max, p.pos_scale[row]); });
}

template <typename T, int DF, Rule R>
__global__ void __launch_bounds__(kThreads, 1) supcon_bwd_dk_kernel(const SupConParams p) {
  using L = Layout<T, DF>;
  unsigned char* smem = shared_base();
  T* q_s = reinterpret_cast<T*>(smem + L::kQ);
  T* k_s = reinterpret_cast<T*>(smem + L::kK);
  float* s_s = reinterpret_cast<float*>(smem + L::kS);
  T* g_s = reinterpret_cast<T*>(smem + L::kG);
  float* lse_s = reinterpret_cast<float*>(smem + L::kRowStats);
  float* coef_s = lse_s + kTile;
  float* pos_scale_s = coef_s + kTile;
  int64_t* anchor_tags = reinterpret_cast<int64_t*>(smem + L::kAnchorTags);

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int n0 = blockIdx.x * kTile;
  const float inv_tau = *p.inv_tau;
  const float scale = dk_scale(p);
  load_rows<T, DF>(k_s, static_cast<const T*>(p.k), p.stride_k, n0, p.m, p.d);

  // Transposed roles: lane pair (2j, 2j + 1) of warp w takes key 16w + j against 32 anchors each.
  const int j_local = warp * kWarpRows + lane / 2;
  const int col = n0 + j_local;
  const int r0 = (lane & 1) * (kTile / 2);
  const int64_t k_tag = key_tag<R>(p, col);
  const TileRow key = tile_row(p, col, false);

  typename Mma<T>::Acc acc[DF];
#pragma unroll
  for (int dn = 0; dn < DF; ++dn) wmma::fill_fragment(acc[dn], 0.f);

  for (int m0 = 0; m0 < p.na; m0 += kTile) {
    __syncthreads();
    load_rows<T, DF>(q_s, static_cast<const T*>(p.q), p.stride_q, m0, p.na, p.d);
    if (threadIdx.x < kTile) {
      const int row = m0 + threadIdx.x;
      const bool ok = row < p.na;
      lse_s[threadIdx.x] = safe_lse(p, row);
      coef_s[threadIdx.x] = ok ? p.coef[row] * scale : 0.f;
      pos_scale_s[threadIdx.x] = ok ? p.coef[row] * scale * p.pos_scale[row] : 0.f;  // the positive part
      anchor_tags[threadIdx.x] = anchor_tag<R>(p, row);
    }
    __syncthreads();
    // S^T for the warp's 16 keys against the 64 anchors: the same product with the operands swapped.
    warp_logits<T, DF>(k_s + warp * kWarpRows * L::kLdX, q_s, s_s + warp * kWarpRows * kLdS);
    __syncwarp();
    const float* s_row = s_s + j_local * kLdS;
    T* g_row = g_s + j_local * L::kLdG;
#pragma unroll 4
    for (int r = r0; r < r0 + kTile / 2; ++r) {
      const bool valid = in_denominator(key, m0 + r, p.na);
      const float a = positive_weight<R>(p, valid, anchor_tags[r], k_tag);
      g_row[r] = from_float<T>(tile_grad(valid, s_row[r] * inv_tau, lse_s[r], coef_s[r], a, pos_scale_s[r]));
    }
    __syncwarp();
    warp_accumulate<T, DF>(acc, g_s + warp * kWarpRows * L::kLdG, q_s);
  }
  const float unscale = inv_tau / scale;
  warp_store<T, DF>(acc, s_s + warp * kWarpRows * kLdS, static_cast<T*>(p.dk), p.stride_dk, n0 + warp * kWarpRows,
                    p.m, p.d, [=](int) { return unscale; });
}

}  // namespace kernels
}  // namespace fused_contrastive
