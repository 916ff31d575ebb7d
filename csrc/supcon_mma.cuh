// SupCon / SimCLR kernels for 16-bit inputs with the logit tile in registers: mma.sync m16n8k16 fed by
// ldmatrix (csrc/warp_mma.cuh), so the masks, the online log-sum-exp and g act on the accumulator
// registers directly and g becomes the next product's A operand without leaving them (the WMMA kernels
// of supcon_kernels.cuh take a round trip through shared memory instead, and remain for fp32).
//
// Same blocks as there: 64 x 64 tiles, 4 warps, warp w owning 16 rows of every tile. Per lane (g = lane / 4,
// t = lane % 4) a tile's 16 x 64 warp slice is s[8][4]: s[nt][i] is row g + 8 (i / 2), column
// 8 nt + 2t + i % 2. Row statistics are per lane over its 16 columns and merged across the 4 lanes of a
// quad at the end (two shuffles).
#pragma once

#include "supcon_kernels.cuh"
#include "warp_mma.cuh"

namespace fused_contrastive {
namespace mma_kernels {

using kernels::anchor_tag;
using kernels::key_tag;
using kernels::kThreads;
using kernels::kTile;
using kernels::kWarpRows;
using kernels::load_rows;
using kernels::positive_weight;
using kernels::safe_lse;
using kernels::shift_of;
using kernels::tile_grad;

constexpr int kNTiles = kTile / 8;  // n8 MMA tiles across a 64-wide tile

// Shared memory: the Q and K tiles (as the WMMA kernels lay them out: ldmatrix reads their padded rows
// without bank conflicts), then the key tags (row-parallel kernels) or the anchors' statistics (dK).
template <typename T, int DF>
struct Layout {
  using Tiles = kernels::Layout<T, DF>;
  static constexpr int kLdX = Tiles::kLdX;
  static constexpr size_t kQ = 0;
  static constexpr size_t kK = Tiles::kK;
  static constexpr size_t kRowStats = Tiles::kS;  // no logit or g tile in shared memory
  static constexpr size_t kKeyTags = kRowStats;
  static constexpr size_t kAnchorTags = kRowStats + Tiles::round128(3 * sizeof(float) * kTile);
  static constexpr size_t kBytes = kAnchorTags + Tiles::round128(sizeof(int64_t) * kTile);
};

// s = A[16 rows, DP] . B[64 rows, DP]^T for one warp; A and B row-major in shared memory, row stride kLdX.
template <typename T, int DF>
__device__ __forceinline__ void warp_scores(float (&s)[kNTiles][4], const T* a, const T* b) {
  constexpr int kLdX = Layout<T, DF>::kLdX;
  const int lane = threadIdx.x % 32, quarter = lane / 8;
#pragma unroll
  for (int nt = 0; nt < kNTiles; ++nt)
#pragma unroll
    for (int i = 0; i < 4; ++i) s[nt][i] = 0.f;
#pragma unroll
  for (int kc = 0; kc < DF; ++kc) {
    uint32_t af[4];
    warp::ldmatrix_x4(af, a + (lane % 16) * kLdX + kc * 16 + (lane / 16) * 8);
#pragma unroll
    for (int np = 0; np < kNTiles / 2; ++np) {  // 16 rows of B: two n8 tiles per ldmatrix
      uint32_t bf[4];
      warp::ldmatrix_x4(bf, b + (np * 16 + (quarter / 2) * 8 + lane % 8) * kLdX + kc * 16 + (quarter % 2) * 8);
      const uint32_t b_even[2] = {bf[0], bf[1]}, b_odd[2] = {bf[2], bf[3]};
      warp::mma_16816<T>(s[2 * np], af, b_even);
      warp::mma_16816<T>(s[2 * np + 1], af, b_odd);
    }
  }
}

// acc[2 DF] (the warp's [16, DP] fp32 accumulator, in n8 tiles) += G . X, with G's [16, 64] slice given as
// s (fp32, rounded here to T) and X [64, DP] row-major in shared memory.
template <typename T, int DF>
__device__ __forceinline__ void warp_accumulate(float (&acc)[2 * DF][4], const float (&s)[kNTiles][4], const T* x) {
  constexpr int kLdX = Layout<T, DF>::kLdX;
  const int lane = threadIdx.x % 32, quarter = lane / 8;
#pragma unroll
  for (int kc = 0; kc < kTile / 16; ++kc) {
    // Two n8 tiles of the accumulator layout are exactly one k16 A fragment.
    const uint32_t gf[4] = {warp::pack2<T>(s[2 * kc][0], s[2 * kc][1]), warp::pack2<T>(s[2 * kc][2], s[2 * kc][3]),
                            warp::pack2<T>(s[2 * kc + 1][0], s[2 * kc + 1][1]),
                            warp::pack2<T>(s[2 * kc + 1][2], s[2 * kc + 1][3])};
#pragma unroll
    for (int dp = 0; dp < DF; ++dp) {  // 16 columns of X: two n8 tiles per transposed ldmatrix
      uint32_t bf[4];
      warp::ldmatrix_x4_trans(bf, x + (kc * 16 + (quarter % 2) * 8 + lane % 8) * kLdX + dp * 16 + (quarter / 2) * 8);
      const uint32_t b_even[2] = {bf[0], bf[1]}, b_odd[2] = {bf[2], bf[3]};
      warp::mma_16816<T>(acc[2 * dp], gf, b_even);
      warp::mma_16816<T>(acc[2 * dp + 1], gf, b_odd);
    }
  }
}

// Rows row0 (= the warp's first + g) and row0 + 8 of out, times inv_tau, straight from the accumulator.
template <typename T, int DF>
__device__ __forceinline__ void warp_store(const float (&acc)[2 * DF][4], T* out, int64_t stride, int row0, int total,
                                           int d, float inv_tau) {
  const int t = threadIdx.x % 4;
#pragma unroll
  for (int dt = 0; dt < 2 * DF; ++dt)
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int row = row0 + 8 * (i / 2), c = dt * 8 + 2 * t + i % 2;
      if (row < total && c < d) out[static_cast<int64_t>(row) * stride + c] = kernels::from_float<T>(acc[dt][i] * inv_tau);
    }
}

template <typename T, int DF>
__device__ __forceinline__ void zero(float (&acc)[2 * DF][4]) {
#pragma unroll
  for (int dt = 0; dt < 2 * DF; ++dt)
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[dt][i] = 0.f;
}

// What the elementwise step needs of a tile row, fixed for the whole kernel: is it in range, and which
// column is its self (-1: none among the columns). Row-parallel kernels: rows are anchors, columns keys,
// self = row + self_offset; dK: rows are keys, columns anchors, self = row - self_offset. A pair (row, col)
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

// Merges a running (max, sum of exp(x - max)) and a sum across the 4 lanes of a quad.
__device__ __forceinline__ void quad_merge(float& m, float& total, float& sum) {
#pragma unroll
  for (int offset = 1; offset < 4; offset *= 2) {
    const float m_other = __shfl_xor_sync(0xffffffffu, m, offset);
    const float total_other = __shfl_xor_sync(0xffffffffu, total, offset);
    sum += __shfl_xor_sync(0xffffffffu, sum, offset);
    const float m_all = fmaxf(m, m_other);
    const float shift = shift_of(m_all);
    total = total * __expf(m - shift) + total_other * __expf(m_other - shift);
    m = m_all;
  }
}

// ----------------------------------------------------------------------------- kernels

template <typename T, int DF>
__global__ void __launch_bounds__(kThreads, 1) supcon_fwd_kernel(const SupConParams p) {
  using L = Layout<T, DF>;
  unsigned char* smem = kernels::shared_base();
  T* q_s = reinterpret_cast<T*>(smem + L::kQ);
  T* k_s = reinterpret_cast<T*>(smem + L::kK);
  int64_t* key_tags = reinterpret_cast<int64_t*>(smem + L::kKeyTags);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int m0 = blockIdx.x * kTile, row0 = m0 + warp * kWarpRows + lane / 4;
  const float inv_tau = *p.inv_tau;
  const int64_t a_tag[2] = {anchor_tag(p, row0), anchor_tag(p, row0 + 8)};
  const TileRow rows[2] = {tile_row(p, row0, true), tile_row(p, row0 + 8, true)};
  load_rows<T, DF>(q_s, static_cast<const T*>(p.q), p.stride_q, m0, p.na, p.d);

  float m_run[2] = {-INFINITY, -INFINITY}, s_run[2] = {0.f, 0.f}, pos_sum[2] = {0.f, 0.f};
  for (int n0 = 0; n0 < p.m; n0 += kTile) {
    __syncthreads();  // every warp is done with the previous K tile (and the Q tile is in place)
    load_rows<T, DF>(k_s, static_cast<const T*>(p.k), p.stride_k, n0, p.m, p.d);
    if (threadIdx.x < kTile) key_tags[threadIdx.x] = key_tag(p, n0 + threadIdx.x);
    __syncthreads();
    float s[kNTiles][4];
    warp_scores<T, DF>(s, q_s + warp * kWarpRows * L::kLdX, k_s);
    // Entries outside the denominator become -inf before the max, not after.
    float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int nt = 0; nt < kNTiles; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int h = i / 2, c = nt * 8 + 2 * (lane % 4) + i % 2;
        const bool valid = in_denominator(rows[h], n0 + c, p.m);
        const float l = s[nt][i] * inv_tau;
        pos_sum[h] += positive_weight(p, valid, a_tag[h], key_tags[c]) * l;
        s[nt][i] = valid ? l : -INFINITY;
        tile_max[h] = fmaxf(tile_max[h], s[nt][i]);
      }
    float shift[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const float m_new = fmaxf(m_run[h], tile_max[h]);
      shift[h] = shift_of(m_new);
      s_run[h] *= __expf(m_run[h] - shift[h]);
      m_run[h] = m_new;
    }
#pragma unroll
    for (int nt = 0; nt < kNTiles; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) s_run[i / 2] += __expf(s[nt][i] - shift[i / 2]);
  }
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    quad_merge(m_run[h], s_run[h], pos_sum[h]);
    const int row = row0 + 8 * h;
    if (lane % 4 == 0 && row < p.na) {
      p.lse[row] = s_run[h] > 0.f ? m_run[h] + __logf(s_run[h]) : -INFINITY;
      p.pos_sum[row] = pos_sum[h];
    }
  }
}

template <typename T, int DF>
__global__ void __launch_bounds__(kThreads, 1) supcon_bwd_dq_kernel(const SupConParams p) {
  using L = Layout<T, DF>;
  unsigned char* smem = kernels::shared_base();
  T* q_s = reinterpret_cast<T*>(smem + L::kQ);
  T* k_s = reinterpret_cast<T*>(smem + L::kK);
  int64_t* key_tags = reinterpret_cast<int64_t*>(smem + L::kKeyTags);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int m0 = blockIdx.x * kTile, row0 = m0 + warp * kWarpRows + lane / 4;
  const float inv_tau = *p.inv_tau;
  int64_t a_tag[2];
  TileRow rows[2];
  float lse_safe[2], coef[2], pos_scale[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int row = row0 + 8 * h;
    a_tag[h] = anchor_tag(p, row);
    rows[h] = tile_row(p, row, true);
    lse_safe[h] = safe_lse(p, row);
    coef[h] = row < p.na ? p.coef[row] : 0.f;
    pos_scale[h] = row < p.na ? p.pos_scale[row] : 0.f;
  }
  load_rows<T, DF>(q_s, static_cast<const T*>(p.q), p.stride_q, m0, p.na, p.d);

  float acc[2 * DF][4];
  zero<T, DF>(acc);
  for (int n0 = 0; n0 < p.m; n0 += kTile) {
    __syncthreads();
    load_rows<T, DF>(k_s, static_cast<const T*>(p.k), p.stride_k, n0, p.m, p.d);
    if (threadIdx.x < kTile) key_tags[threadIdx.x] = key_tag(p, n0 + threadIdx.x);
    __syncthreads();
    float s[kNTiles][4];
    warp_scores<T, DF>(s, q_s + warp * kWarpRows * L::kLdX, k_s);
#pragma unroll
    for (int nt = 0; nt < kNTiles; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int h = i / 2, c = nt * 8 + 2 * (lane % 4) + i % 2;
        const bool valid = in_denominator(rows[h], n0 + c, p.m);
        const float a = positive_weight(p, valid, a_tag[h], key_tags[c]);
        s[nt][i] = tile_grad(valid, s[nt][i] * inv_tau, lse_safe[h], coef[h], a, pos_scale[h]);
      }
    warp_accumulate<T, DF>(acc, s, k_s);
  }
  warp_store<T, DF>(acc, static_cast<T*>(p.dq), p.stride_dq, row0, p.na, p.d, inv_tau);
}

template <typename T, int DF>
__global__ void __launch_bounds__(kThreads, 1) supcon_bwd_dk_kernel(const SupConParams p) {
  using L = Layout<T, DF>;
  unsigned char* smem = kernels::shared_base();
  T* q_s = reinterpret_cast<T*>(smem + L::kQ);
  T* k_s = reinterpret_cast<T*>(smem + L::kK);
  float* lse_s = reinterpret_cast<float*>(smem + L::kRowStats);
  float* coef_s = lse_s + kTile;
  float* pos_scale_s = coef_s + kTile;
  int64_t* anchor_tags = reinterpret_cast<int64_t*>(smem + L::kAnchorTags);
  // Transposed roles: the warp's rows are keys (col0 = the warp's first key + g, and col0 + 8), its
  // columns anchors.
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int n0 = blockIdx.x * kTile, col0 = n0 + warp * kWarpRows + lane / 4;
  const float inv_tau = *p.inv_tau;
  const int64_t k_tag[2] = {key_tag(p, col0), key_tag(p, col0 + 8)};
  const TileRow keys[2] = {tile_row(p, col0, false), tile_row(p, col0 + 8, false)};
  load_rows<T, DF>(k_s, static_cast<const T*>(p.k), p.stride_k, n0, p.m, p.d);

  float acc[2 * DF][4];
  zero<T, DF>(acc);
  for (int m0 = 0; m0 < p.na; m0 += kTile) {
    __syncthreads();
    load_rows<T, DF>(q_s, static_cast<const T*>(p.q), p.stride_q, m0, p.na, p.d);
    if (threadIdx.x < kTile) {
      const int row = m0 + threadIdx.x;
      const bool ok = row < p.na;
      lse_s[threadIdx.x] = safe_lse(p, row);
      coef_s[threadIdx.x] = ok ? p.coef[row] : 0.f;
      pos_scale_s[threadIdx.x] = ok ? p.pos_scale[row] : 0.f;
      anchor_tags[threadIdx.x] = anchor_tag(p, row);
    }
    __syncthreads();
    float s[kNTiles][4];
    warp_scores<T, DF>(s, k_s + warp * kWarpRows * L::kLdX, q_s);
#pragma unroll
    for (int nt = 0; nt < kNTiles; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int h = i / 2, r = nt * 8 + 2 * (lane % 4) + i % 2;
        const bool valid = in_denominator(keys[h], m0 + r, p.na);
        const float a = positive_weight(p, valid, anchor_tags[r], k_tag[h]);
        s[nt][i] = tile_grad(valid, s[nt][i] * inv_tau, lse_s[r], coef_s[r], a, pos_scale_s[r]);
      }
    warp_accumulate<T, DF>(acc, s, q_s);
  }
  warp_store<T, DF>(acc, static_cast<T*>(p.dk), p.stride_dk, col0, p.m, p.d, inv_tau);
}

}  // namespace mma_kernels
}  // namespace fused_contrastive
