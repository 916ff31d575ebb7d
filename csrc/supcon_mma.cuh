// SupCon / SimCLR kernels for 16-bit inputs with the logit tile in registers: mma.sync m16n8k16 fed by
// ldmatrix (csrc/warp_mma.cuh), so the masks, the online log-sum-exp and g act on the accumulator
// registers directly and g becomes the next product's A operand without leaving them (the WMMA kernels
// of supcon_kernels.cuh take a round trip through shared memory instead, and remain for fp32).
//
// Same blocks as there: 64 x 64 tiles, 4 warps, warp w owning 16 rows of every tile; the streamed tile
// (keys, or anchors in dK) is double-buffered, the next one arriving by cp.async during this one.
// Per lane (g = lane / 4, t = lane % 4) a tile's 16 x 64 warp slice is s[8][4]: s[nt][e] is row
// g + 8 (e / 2), column 8 nt + 2t + e % 2. Row statistics are per lane over its 16 columns and merged
// across the 4 lanes of a quad at the end (two shuffles).
#pragma once

#include "supcon_kernels.cuh"

namespace fused_contrastive {
namespace mma_kernels {

using kernels::anchor_tag;
using kernels::in_denominator;
using kernels::key_tag;
using kernels::kThreads;
using kernels::kTile;
using kernels::kWarpRows;
using kernels::load_rows;
using kernels::positive_weight;
using kernels::Rule;
using kernels::safe_lse;
using kernels::shift_of;
using kernels::tile_grad;
using kernels::tile_row;
using kernels::TileRow;

constexpr int kNTiles = kTile / 8;  // n8 MMA tiles across a 64-wide tile

// Shared memory: the block's fixed tile (Q in the row-parallel kernels, K in dK), two buffers for the
// streamed tile (the next one arrives by cp.async while this one is computed), and beside each buffer
// its rows' metadata (key tags; in dK the anchors' lse, coef, pos_scale and tags). Tiles are laid out as
// the WMMA kernels lay them out: ldmatrix reads their padded rows without bank conflicts.
template <typename T, int DF>
struct Layout {
  using Tiles = kernels::Layout<T, DF>;
  static constexpr int kLdX = Tiles::kLdX;
  static constexpr size_t kTileBytes = Tiles::round128(sizeof(T) * kTile * kLdX);
  static constexpr size_t kStatsBytes = Tiles::round128(3 * sizeof(float) * kTile);
  static constexpr size_t kSideBytes = kStatsBytes + Tiles::round128(sizeof(int64_t) * kTile);
  static constexpr size_t kFixed = 0;
  static constexpr size_t kStream = kTileBytes;
  static constexpr size_t kSide = kStream + 2 * kTileBytes;
  static constexpr size_t kBytes = kSide + 2 * kSideBytes;
};

template <typename T, int DF>
struct Smem {
  using L = Layout<T, DF>;
  unsigned char* base;
  __device__ __forceinline__ T* fixed() const { return reinterpret_cast<T*>(base + L::kFixed); }
  __device__ __forceinline__ T* stream(int b) const {
    return reinterpret_cast<T*>(base + L::kStream + b * L::kTileBytes);
  }
  __device__ __forceinline__ float* stats(int b) const {  // lse, coef, pos_scale: kTile each
    return reinterpret_cast<float*>(base + L::kSide + b * L::kSideBytes);
  }
  __device__ __forceinline__ int64_t* tags(int b) const {
    return reinterpret_cast<int64_t*>(base + L::kSide + b * L::kSideBytes + L::kStatsBytes);
  }
};

// A streamed column's tag into shared memory: under labels a cp.async of its 8-byte label (zero past the
// end, where every pair is out of the denominator), under a mask its mask row offset or column, computed.
// Either way it lands with the tile's group, so no thread waits on a global load before the barrier.
template <Rule R, bool kKey>
__device__ __forceinline__ void stage_tag(const SupConParams& p, int64_t* dst, int index) {
  if constexpr (R == Rule::kLabels) {
    const int64_t* labels = kKey ? p.key_labels : p.anchor_labels;
    const bool ok = index < (kKey ? p.m : p.na);
    warp::cp_async_8(dst, ok ? labels + index : labels, ok ? 8 : 0);
  } else {
    *dst = kKey ? key_tag<R>(p, index) : anchor_tag<R>(p, index);
  }
}

// Starts key tile i (row-parallel kernels) into buffer i % 2, with its key tags, as one cp.async group.
template <typename T, int DF, Rule R>
__device__ __forceinline__ void issue_keys(const SupConParams& p, const Smem<T, DF>& sm, int i) {
  load_rows<T, DF, true>(sm.stream(i & 1), static_cast<const T*>(p.k), p.stride_k, i * kTile, p.m, p.d);
  if (threadIdx.x < kTile) stage_tag<R, true>(p, sm.tags(i & 1) + threadIdx.x, i * kTile + threadIdx.x);
  warp::cp_async_commit();
}

// Starts anchor tile i (dK) into buffer i % 2, with the anchors' backward statistics and tags (zero past
// the last anchor: coef 0 there, and those columns are out of the denominator anyway).
template <typename T, int DF, Rule R>
__device__ __forceinline__ void issue_anchors(const SupConParams& p, const Smem<T, DF>& sm, int i) {
  load_rows<T, DF, true>(sm.stream(i & 1), static_cast<const T*>(p.q), p.stride_q, i * kTile, p.na, p.d);
  if (threadIdx.x < kTile) {
    const int row = i * kTile + threadIdx.x;
    const bool ok = row < p.na;
    float* stats = sm.stats(i & 1);
    warp::cp_async_4(stats + threadIdx.x, ok ? p.lse + row : p.lse, ok ? 4 : 0);
    warp::cp_async_4(stats + kTile + threadIdx.x, ok ? p.coef + row : p.coef, ok ? 4 : 0);
    warp::cp_async_4(stats + 2 * kTile + threadIdx.x, ok ? p.pos_scale + row : p.pos_scale, ok ? 4 : 0);
    stage_tag<R, false>(p, sm.tags(i & 1) + threadIdx.x, row);
  }
  warp::cp_async_commit();
}

// Before tile i: tile i + 1 goes out (if there is one), tile i is waited for by every thread.
template <typename T, int DF, Rule R, bool kKeys>
__device__ __forceinline__ void advance(const SupConParams& p, const Smem<T, DF>& sm, int i, int tiles) {
  if (i + 1 < tiles) {
    if constexpr (kKeys) issue_keys<T, DF, R>(p, sm, i + 1);
    else issue_anchors<T, DF, R>(p, sm, i + 1);
    warp::cp_async_wait<1>();
  } else {
    warp::cp_async_wait<0>();
  }
  __syncthreads();
}

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

// Rows row0 (= the warp's first + g) and row0 + 8 of out, times factor[0] and factor[1], straight from the
// accumulator.
template <typename T, int DF>
__device__ __forceinline__ void warp_store(const float (&acc)[2 * DF][4], T* out, int64_t stride, int row0, int total,
                                           int d, const float (&factor)[2]) {
  const int t = threadIdx.x % 4;
#pragma unroll
  for (int dt = 0; dt < 2 * DF; ++dt)
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int row = row0 + 8 * (i / 2), c = dt * 8 + 2 * t + i % 2;
      if (row < total && c < d)
        out[static_cast<int64_t>(row) * stride + c] = kernels::from_float<T>(acc[dt][i] * factor[i / 2]);
    }
}

template <typename T, int DF>
__device__ __forceinline__ void zero(float (&acc)[2 * DF][4]) {
#pragma unroll
  for (int dt = 0; dt < 2 * DF; ++dt)
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[dt][i] = 0.f;
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

template <typename T, int DF, Rule R>
__global__ void __launch_bounds__(kThreads, 1) supcon_fwd_kernel(const SupConParams p) {
  using L = Layout<T, DF>;
  const Smem<T, DF> sm{kernels::shared_base()};
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int m0 = blockIdx.x * kTile, row0 = m0 + warp * kWarpRows + lane / 4;
  const float inv_tau = *p.inv_tau;
  const int64_t a_tag[2] = {anchor_tag<R>(p, row0), anchor_tag<R>(p, row0 + 8)};
  const TileRow rows[2] = {tile_row(p, row0, true), tile_row(p, row0 + 8, true)};
  load_rows<T, DF>(sm.fixed(), static_cast<const T*>(p.q), p.stride_q, m0, p.na, p.d);
  const int tiles = (p.m + kTile - 1) / kTile;
  if (tiles > 0) issue_keys<T, DF, R>(p, sm, 0);

  float m_run[2] = {-INFINITY, -INFINITY}, s_run[2] = {0.f, 0.f}, pos_sum[2] = {0.f, 0.f};
  for (int i = 0; i < tiles; ++i) {
    advance<T, DF, R, true>(p, sm, i, tiles);
    const int n0 = i * kTile;
    const int64_t* key_tags = sm.tags(i & 1);
    float s[kNTiles][4];
    warp_scores<T, DF>(s, sm.fixed() + warp * kWarpRows * L::kLdX, sm.stream(i & 1));
    // Entries outside the denominator become -inf before the max, not after.
    float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int nt = 0; nt < kNTiles; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int h = e / 2, c = nt * 8 + 2 * (lane % 4) + e % 2;
        const bool valid = in_denominator(rows[h], n0 + c, p.m);
        const float l = s[nt][e] * inv_tau;
        pos_sum[h] += positive_weight<R>(p, valid, a_tag[h], key_tags[c]) * l;
        s[nt][e] = valid ? l : -INFINITY;
        tile_max[h] = fmaxf(tile_max[h], s[nt][e]);
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
      for (int e = 0; e < 4; ++e) s_run[e / 2] += __expf(s[nt][e] - shift[e / 2]);
    __syncthreads();  // every warp is done with buffer i % 2 before it is refilled
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

// The two backward kernels in one body. kAnchorRows: rows are anchors, the streamed tiles keys, and the
// result dQ (row-parallel); otherwise rows are keys, the streamed tiles anchors with their statistics,
// and the result dK (column-parallel). Either way the warp's 16 rows accumulate [16, D] in registers.
// What goes into the product is g times a power of two (kernels::pow2_scale), undone in fp32 at the store:
// dQ leaves coef_i out of g and scales each anchor row by about m; dK scales every g by about na m.
template <typename T, int DF, Rule R, bool kAnchorRows>
__device__ __forceinline__ void backward(const SupConParams& p) {
  using L = Layout<T, DF>;
  const Smem<T, DF> sm{kernels::shared_base()};
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int b0 = blockIdx.x * kTile, row0 = b0 + warp * kWarpRows + lane / 4;
  const int rows_total = kAnchorRows ? p.na : p.m, columns = kAnchorRows ? p.m : p.na;
  const float inv_tau = *p.inv_tau;
  const float a_max = kernels::max_weight(p);
  const float product_scale = kAnchorRows ? 1.f : kernels::dk_scale(p);
  // What is fixed per row: its tag and denominator facts; for anchor rows also their backward factors.
  int64_t row_tag[2];
  TileRow rows[2];
  float lse_safe[2] = {0.f, 0.f}, row_scale[2] = {1.f, 1.f}, pos_part[2] = {0.f, 0.f};
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int row = row0 + 8 * h;
    row_tag[h] = kAnchorRows ? anchor_tag<R>(p, row) : key_tag<R>(p, row);
    rows[h] = tile_row(p, row, kAnchorRows);
    if constexpr (kAnchorRows) {
      lse_safe[h] = safe_lse(p, row);
      const float pos_scale = row < p.na ? p.pos_scale[row] : 0.f;
      row_scale[h] = kernels::dq_row_scale(p, a_max, pos_scale);
      pos_part[h] = row_scale[h] * pos_scale;
    }
  }
  load_rows<T, DF>(sm.fixed(), static_cast<const T*>(kAnchorRows ? p.q : p.k), kAnchorRows ? p.stride_q : p.stride_k,
                   b0, rows_total, p.d);
  const int tiles = (columns + kTile - 1) / kTile;
  if (tiles > 0) {
    if constexpr (kAnchorRows) issue_keys<T, DF, R>(p, sm, 0);
    else issue_anchors<T, DF, R>(p, sm, 0);
  }

  float acc[2 * DF][4];
  zero<T, DF>(acc);
  for (int i = 0; i < tiles; ++i) {
    advance<T, DF, R, kAnchorRows>(p, sm, i, tiles);
    const int c0 = i * kTile;
    const int64_t* tags = sm.tags(i & 1);
    const float* stats = sm.stats(i & 1);  // dK: the streamed anchors' lse, coef, pos_scale
    const T* streamed = sm.stream(i & 1);
    float s[kNTiles][4];
    warp_scores<T, DF>(s, sm.fixed() + warp * kWarpRows * L::kLdX, streamed);
#pragma unroll
    for (int nt = 0; nt < kNTiles; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int h = e / 2, c = nt * 8 + 2 * (lane % 4) + e % 2;
        const bool valid = in_denominator(rows[h], c0 + c, columns);
        const float l = s[nt][e] * inv_tau;
        if constexpr (kAnchorRows) {
          const float a = positive_weight<R>(p, valid, row_tag[h], tags[c]);
          s[nt][e] = tile_grad(valid, l, lse_safe[h], row_scale[h], a, pos_part[h]);
        } else {
          const float a = positive_weight<R>(p, valid, tags[c], row_tag[h]);
          const float scale = stats[kTile + c] * product_scale;
          s[nt][e] = tile_grad(valid, l, stats[c], scale, a, scale * stats[2 * kTile + c]);
        }
      }
    warp_accumulate<T, DF>(acc, s, streamed);
    __syncthreads();  // every warp is done with buffer i % 2 before it is refilled
  }
  // The factors that undo the scaling (and apply dQ's coef_i), read only now: fewer registers in the loop.
  float out_factor[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int row = row0 + 8 * h;
    out_factor[h] = !kAnchorRows ? inv_tau / product_scale : row < p.na ? p.coef[row] * inv_tau / row_scale[h] : 0.f;
  }
  warp_store<T, DF>(acc, static_cast<T*>(kAnchorRows ? p.dq : p.dk), kAnchorRows ? p.stride_dq : p.stride_dk, row0,
                    rows_total, p.d, out_factor);
}

template <typename T, int DF, Rule R>
__global__ void __launch_bounds__(kThreads, 1) supcon_bwd_dq_kernel(const SupConParams p) {
  backward<T, DF, R, true>(p);
}

template <typename T, int DF, Rule R>
__global__ void __launch_bounds__(kThreads, 1) supcon_bwd_dk_kernel(const SupConParams p) {
  backward<T, DF, R, false>(p);
}

}  // namespace mma_kernels
}  // namespace fused_contrastive
