// Launchers and the template instantiations of the SupCon kernels: per input dtype, three padded
// feature widths (d <= 64, 128, 256; fp32 stops at 128, where two fp32 tiles fill shared memory) and
// three positive rules (labels, byte mask, fp32 mask); for fp16 / bf16 both the register-tile (mma.sync)
// and the WMMA kernels.
#include "supcon_kernels.cuh"
#include "supcon_mma.cuh"

namespace fused_contrastive {

namespace {

using kernels::Layout;
using kernels::kThreads;
using kernels::kTile;
using kernels::Rule;

using Kernel = void (*)(const SupConParams);

template <typename T, int DF, Rule R>
void pick_kernel(int kernel, bool wmma, Kernel* fn, size_t* bytes) {
  if constexpr (sizeof(T) == 2) {
    if (!wmma) {
      *fn = kernel == 0   ? mma_kernels::supcon_fwd_kernel<T, DF, R>
            : kernel == 1 ? mma_kernels::supcon_bwd_dq_kernel<T, DF, R>
                          : mma_kernels::supcon_bwd_dk_kernel<T, DF, R>;
      *bytes = mma_kernels::Layout<T, DF>::kBytes;
      return;
    }
  }
  *fn = kernel == 0   ? kernels::supcon_fwd_kernel<T, DF, R>
        : kernel == 1 ? kernels::supcon_bwd_dq_kernel<T, DF, R>
                      : kernels::supcon_bwd_dk_kernel<T, DF, R>;
  *bytes = Layout<T, DF>::kBytes;
}

template <typename T, int DF>
void pick_kernel(int kernel, bool wmma, Rule rule, Kernel* fn, size_t* bytes) {
  switch (rule) {
    case Rule::kLabels: pick_kernel<T, DF, Rule::kLabels>(kernel, wmma, fn, bytes); break;
    case Rule::kMaskBytes: pick_kernel<T, DF, Rule::kMaskBytes>(kernel, wmma, fn, bytes); break;
    case Rule::kMaskFloats: pick_kernel<T, DF, Rule::kMaskFloats>(kernel, wmma, fn, bytes); break;
  }
}

// (kernel, shared bytes) for a dtype, feature width and rule; kernel is nullptr when d is too wide.
template <typename T>
void select(int kernel, bool wmma, int d, Rule rule, Kernel* fn, size_t* bytes) {
  *fn = nullptr;
  *bytes = 0;
  if (d <= 64) {
    pick_kernel<T, 4>(kernel, wmma, rule, fn, bytes);
  } else if (d <= 128) {
    pick_kernel<T, 8>(kernel, wmma, rule, fn, bytes);
  } else if constexpr (sizeof(T) == 2) {  // fp32 at d = 256 would not fit two tiles in shared memory
    if (d <= 256) pick_kernel<T, 16>(kernel, wmma, rule, fn, bytes);
  }
}

void select(int kernel, DType dtype, bool wmma, int d, Rule rule, Kernel* fn, size_t* bytes) {
  switch (dtype) {
    case DType::kFloat32: select<float>(kernel, true, d, rule, fn, bytes); break;
    case DType::kFloat16: select<__half>(kernel, wmma, d, rule, fn, bytes); break;
    case DType::kBFloat16: select<__nv_bfloat16>(kernel, wmma, d, rule, fn, bytes); break;
  }
}

Rule rule_of(const SupConParams& p) {
  if (p.mask == nullptr) return Rule::kLabels;
  return p.mask_bytes ? Rule::kMaskBytes : Rule::kMaskFloats;
}

cudaError_t launch(int kernel, const SupConParams& p, DType dtype, int rows, cudaStream_t stream) {
  Kernel fn;
  size_t bytes;
  select(kernel, dtype, p.wmma, p.d, rule_of(p), &fn, &bytes);
  if (fn == nullptr) return cudaErrorInvalidValue;  // the API checks d against max_dim first
  if (rows == 0) return cudaSuccess;
  // Above 48 KiB a kernel must opt in to dynamic shared memory; setting it on every launch costs little.
  cudaError_t err = cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
  if (err != cudaSuccess) return err;
  const unsigned blocks = (rows + kTile - 1) / kTile;
#ifdef FUSED_CONTRASTIVE_EMULATION  // tests/emulate/: the same kernels, each block's threads run on the CPU
  return emulation::launch(fn, blocks, kThreads, bytes, p);
#else
  fn<<<blocks, kThreads, bytes, stream>>>(p);
  return cudaGetLastError();
#endif
}

}  // namespace

int max_dim(DType dtype) { return dtype == DType::kFloat32 ? 128 : 256; }

size_t shared_bytes(int kernel, DType dtype, int d) {
  Kernel fn;
  size_t wmma_bytes, mma_bytes;
  select(kernel, dtype, true, d, Rule::kLabels, &fn, &wmma_bytes);  // the rule does not change the layout
  select(kernel, dtype, false, d, Rule::kLabels, &fn, &mma_bytes);
  return wmma_bytes > mma_bytes ? wmma_bytes : mma_bytes;
}

cudaError_t supcon_forward(const SupConParams& p, DType dtype, cudaStream_t stream) {
  return launch(0, p, dtype, p.na, stream);
}

cudaError_t supcon_backward_dq(const SupConParams& p, DType dtype, cudaStream_t stream) {
  return launch(1, p, dtype, p.na, stream);
}

cudaError_t supcon_backward_dk(const SupConParams& p, DType dtype, cudaStream_t stream) {
  return launch(2, p, dtype, p.m, stream);
}

}  // namespace fused_contrastive
