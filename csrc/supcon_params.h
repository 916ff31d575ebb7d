// What the SupCon kernels read and write, as plain pointers and sizes: no torch header here, so the
// kernel translation units compile with nvcc alone (`make cuda-check`, CPU-only torch is enough).
// Notation: anchors Q [na, d], keys K [m, d], l_ij = q_i . k_j * inv_tau.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

namespace fused_contrastive {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

struct SupConParams {
  const void* q = nullptr;  // [na, d], unit stride along d
  const void* k = nullptr;  // [m, d]
  int64_t stride_q = 0, stride_k = 0;  // row strides, in elements
  int na = 0, m = 0, d = 0;
  const float* inv_tau = nullptr;  // one device scalar: a learnable temperature needs no host read

  // Positive rule, exactly one of the two: labels (a_ij = [anchor_labels[i] == key_labels[j]]) or a dense
  // [mask_rows, mask_cols] mask read at (i % mask_rows, j % mask_cols): bytes (a 0/1 mask: a_ij = 1 where the
  // byte is not 0) or fp32 weights (>= 0). Self is never a positive.
  const int64_t* anchor_labels = nullptr;
  const int64_t* key_labels = nullptr;
  const void* mask = nullptr;
  bool mask_bytes = false;
  int mask_rows = 1, mask_cols = 1;
  int64_t stride_mask = 0;

  bool has_self = false;  // key i + self_offset is anchor i's self: out of its denominator and positives
  int64_t self_offset = 0;

  // Forward writes lse and pos_sum (sum_j a_ij l_ij) per anchor; the backward reads lse, coef and
  // pos_scale and writes g_ij = coef_i (exp(l_ij - lse_i) - a_ij pos_scale_i) times K (dq) or Q (dk).
  float* lse = nullptr;
  float* pos_sum = nullptr;
  const float* coef = nullptr;
  const float* pos_scale = nullptr;
  void* dq = nullptr;  // [na, d] in the input dtype, unit stride along d
  void* dk = nullptr;  // [m, d]
  int64_t stride_dq = 0, stride_dk = 0;

  // g goes into the tensor-core product in the input dtype, where coef_i e^(l - lse) ~ 1/(na m) is below
  // fp16's subnormals at realistic sizes. So g is scaled by a power of two before that cast and unscaled
  // in fp32 after the product. dQ: coef_i leaves g (applied to row i's accumulator) and row i's scale is
  // 2^dq_scale_log2 (about m) capped so that its largest |g| stays below 2^15. dK: one scale for the whole
  // product, 2^dk_scale_log2 (about na m) capped by g_bound, a device scalar >= max_ij |g_ij| that the
  // binding computes from the per-row factors without reading it on the host. a_max (device scalar, or
  // nullptr for 1) bounds the positive weights.
  int dq_scale_log2 = 0, dk_scale_log2 = 0;
  const float* g_bound = nullptr;
  const float* a_max = nullptr;

  // 16-bit inputs run the register-tile kernels (supcon_mma.cuh) unless this asks for the WMMA ones
  // (supcon_kernels.cuh, which fp32 always uses): both stay so that a benchmark can compare them.
  bool wmma = false;
};

// Largest feature dimension per input dtype: whole padded rows of one 64-row tile of Q and of K sit in
// shared memory, and the backward's [64, d] accumulators in registers.
int max_dim(DType dtype);
// Dynamic shared memory one block of the given kernel needs ("fwd", "dq" or "dk" by index 0/1/2): the
// larger of the two kernel families' figures.
size_t shared_bytes(int kernel, DType dtype, int d);

// Launchers: they return the first CUDA error (launch or attribute), cudaSuccess otherwise.
cudaError_t supcon_forward(const SupConParams& p, DType dtype, cudaStream_t stream);
cudaError_t supcon_backward_dq(const SupConParams& p, DType dtype, cudaStream_t stream);
cudaError_t supcon_backward_dk(const SupConParams& p, DType dtype, cudaStream_t stream);

}  // namespace fused_contrastive
