// The torch-facing side of the SupCon kernels: every argument check, then a SupConParams for the
// launchers in supcon.cu. Bound with pybind11 as fused_contrastive._C (or the JIT-built module).
#include <torch/extension.h>

#include <optional>
#include <tuple>

#include "supcon_params.h"

namespace fc = fused_contrastive;

#ifdef FUSED_CONTRASTIVE_EMULATION
// tests/emulate/ builds this file with the kernels run by CPU threads: there the tensors live on the CPU.
namespace {
constexpr bool kOnCuda = false;
struct DeviceGuard {
  explicit DeviceGuard(c10::Device) {}
};
cudaStream_t current_stream() { return nullptr; }
}  // namespace
#else
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
namespace {
constexpr bool kOnCuda = true;
using DeviceGuard = c10::cuda::CUDAGuard;
cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream(); }
}  // namespace
#endif

namespace {

fc::DType dtype_of(const at::Tensor& x, const char* name) {
  switch (x.scalar_type()) {
    case at::kFloat: return fc::DType::kFloat32;
    case at::kHalf: return fc::DType::kFloat16;
    case at::kBFloat16: return fc::DType::kBFloat16;
    default: TORCH_CHECK(false, name, " must be float32, float16 or bfloat16, got ", x.scalar_type());
  }
  return fc::DType::kFloat32;  // unreachable
}

void check_cuda(const at::Tensor& x, const at::Tensor& like, const char* name) {
  TORCH_CHECK(x.is_cuda() == kOnCuda, name, " must be a ", kOnCuda ? "CUDA" : "CPU (emulation)", " tensor, got one on ",
              x.device());
  TORCH_CHECK(x.device() == like.device(), name, " must be on ", like.device(), " like the keys, got ", x.device());
}

void check_vector(const at::Tensor& x, const at::Tensor& keys, const char* name, at::ScalarType dtype, int64_t length) {
  check_cuda(x, keys, name);
  TORCH_CHECK(x.scalar_type() == dtype, name, " must be ", dtype, ", got ", x.scalar_type());
  TORCH_CHECK(x.dim() == 1 && x.size(0) == length && x.is_contiguous(), name, " must be a contiguous vector of length ",
              length, ", got shape ", x.sizes());
}

// Q and K and the positive rule, checked once for the forward and the backward alike.
fc::SupConParams make_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& inv_tau,
                             const std::optional<at::Tensor>& anchor_labels,
                             const std::optional<at::Tensor>& key_labels, const std::optional<at::Tensor>& mask,
                             std::optional<int64_t> self_offset, fc::DType* dtype) {
  check_cuda(k, k, "keys");
  check_cuda(q, k, "anchors");
  TORCH_CHECK(q.dim() == 2 && k.dim() == 2, "anchors and keys must be 2-D [rows, D], got ", q.sizes(), " and ",
              k.sizes());
  TORCH_CHECK(q.size(1) == k.size(1), "anchors and keys must have the same D, got ", q.size(1), " and ", k.size(1));
  TORCH_CHECK(q.scalar_type() == k.scalar_type(), "anchors and keys must share a dtype, got ", q.scalar_type(),
              " and ", k.scalar_type());
  TORCH_CHECK(q.stride(1) == 1 && k.stride(1) == 1, "anchors and keys must have unit stride along D");
  *dtype = dtype_of(k, "keys");
  const int64_t d = k.size(1);
  TORCH_CHECK(d >= 1 && d <= fc::max_dim(*dtype), "feature dimension D must be in [1, ", fc::max_dim(*dtype), "] for ",
              k.scalar_type(), " inputs, got ", d);
  TORCH_CHECK(q.size(0) < (int64_t{1} << 31) && k.size(0) < (int64_t{1} << 31), "at most 2^31 - 1 anchors and keys");
  check_vector(inv_tau, k, "inv_tau", at::kFloat, 1);
  TORCH_CHECK(mask.has_value() != (anchor_labels.has_value() && key_labels.has_value()),
              "pass either a mask or both anchor_labels and key_labels");

  fc::SupConParams p;
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.stride_q = q.stride(0);
  p.stride_k = k.stride(0);
  p.na = static_cast<int>(q.size(0));
  p.m = static_cast<int>(k.size(0));
  p.d = static_cast<int>(d);
  p.inv_tau = inv_tau.data_ptr<float>();
  if (mask.has_value()) {
    const at::Tensor& mk = *mask;
    check_cuda(mk, k, "mask");
    const bool bytes = mk.scalar_type() == at::kByte || mk.scalar_type() == at::kBool;
    TORCH_CHECK((bytes || mk.scalar_type() == at::kFloat) && mk.dim() == 2 && mk.stride(1) == 1 && mk.size(0) > 0 &&
                    mk.size(1) > 0,
                "mask must be a non-empty 2-D uint8 (0/1), bool or float32 tensor with unit column stride, got ",
                mk.scalar_type(), " ", mk.sizes(), " with strides ", mk.strides());
    TORCH_CHECK((mk.size(0) - 1) * mk.stride(0) + mk.size(1) < (int64_t{1} << 31),
                "mask must span fewer than 2^31 elements, got shape ", mk.sizes(), " with strides ", mk.strides());
    p.mask = mk.data_ptr();
    p.mask_bytes = bytes;
    p.mask_rows = static_cast<int>(mk.size(0));
    p.mask_cols = static_cast<int>(mk.size(1));
    p.stride_mask = mk.stride(0);
  } else {
    check_vector(*anchor_labels, k, "anchor_labels", at::kLong, q.size(0));
    check_vector(*key_labels, k, "key_labels", at::kLong, k.size(0));
    p.anchor_labels = anchor_labels->data_ptr<int64_t>();
    p.key_labels = key_labels->data_ptr<int64_t>();
  }
  p.has_self = self_offset.has_value();
  p.self_offset = self_offset.value_or(0);
  return p;
}

// ceil(log2(n)) for n >= 1, 0 for n = 0.
int ceil_log2(int64_t n) {
  int k = 0;
  while (k < 62 && (int64_t{1} << k) < n) ++k;
  return k;
}

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "fused_contrastive CUDA ", what, " failed: ", cudaGetErrorString(err));
}

// (lse, pos_sum) per anchor, fp32.
std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& inv_tau,
                                           const std::optional<at::Tensor>& anchor_labels,
                                           const std::optional<at::Tensor>& key_labels,
                                           const std::optional<at::Tensor>& mask, std::optional<int64_t> self_offset,
                                           bool wmma) {
  fc::DType dtype;
  fc::SupConParams p = make_params(q, k, inv_tau, anchor_labels, key_labels, mask, self_offset, &dtype);
  p.wmma = wmma;
  const DeviceGuard guard(k.device());
  auto opts = k.options().dtype(at::kFloat);
  at::Tensor lse = at::empty({q.size(0)}, opts);
  at::Tensor pos_sum = at::empty({q.size(0)}, opts);
  p.lse = lse.data_ptr<float>();
  p.pos_sum = pos_sum.data_ptr<float>();
  check_launch(fc::supcon_forward(p, dtype, current_stream()), "forward");
  return {lse, pos_sum};
}

// (dQ, dK) in the input dtype for g_ij = coef_i (exp(l_ij - lse_i) - a_ij pos_scale_i); a side that is not
// asked for comes back as None.
std::tuple<std::optional<at::Tensor>, std::optional<at::Tensor>> backward(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& inv_tau, const std::optional<at::Tensor>& anchor_labels,
    const std::optional<at::Tensor>& key_labels, const std::optional<at::Tensor>& mask,
    std::optional<int64_t> self_offset, const at::Tensor& lse, const at::Tensor& coef, const at::Tensor& pos_scale,
    bool need_dq, bool need_dk, bool wmma) {
  fc::DType dtype;
  fc::SupConParams p = make_params(q, k, inv_tau, anchor_labels, key_labels, mask, self_offset, &dtype);
  p.wmma = wmma;
  check_vector(lse, k, "lse", at::kFloat, q.size(0));
  check_vector(coef, k, "coef", at::kFloat, q.size(0));
  check_vector(pos_scale, k, "pos_scale", at::kFloat, q.size(0));
  const DeviceGuard guard(k.device());
  p.lse = const_cast<float*>(lse.data_ptr<float>());  // read-only in the backward kernels
  p.coef = coef.data_ptr<float>();
  p.pos_scale = pos_scale.data_ptr<float>();
  // What the kernels scale g by before its 16-bit cast (supcon_params.h): the targets m and na m from the
  // sizes, and the bounds as device scalars (reductions queued on the stream: nothing is read on the host).
  p.dq_scale_log2 = ceil_log2(k.size(0));
  p.dk_scale_log2 = ceil_log2(q.size(0) * k.size(0));
  at::Tensor a_max;  // undefined: labels or a byte mask, weights at most 1
  if (mask.has_value() && !p.mask_bytes) {
    a_max = mask->amax().reshape({1});
    p.a_max = a_max.data_ptr<float>();
  }
  at::Tensor g_bound = at::zeros({1}, lse.options());
  if (need_dk && q.size(0) > 0) {
    at::Tensor weight_bound = pos_scale.abs();
    if (a_max.defined()) weight_bound = weight_bound * a_max;
    g_bound = (coef.abs() * (weight_bound + 1)).amax().reshape({1});
  }
  p.g_bound = g_bound.data_ptr<float>();
  cudaStream_t stream = current_stream();
  std::optional<at::Tensor> dq, dk;
  if (need_dq) {
    dq = at::empty({q.size(0), q.size(1)}, q.options());
    p.dq = dq->data_ptr();
    p.stride_dq = dq->stride(0);
    check_launch(fc::supcon_backward_dq(p, dtype, stream), "backward (dQ)");
  }
  if (need_dk) {
    dk = at::empty({k.size(0), k.size(1)}, k.options());
    p.dk = dk->data_ptr();
    p.stride_dk = dk->stride(0);
    check_launch(fc::supcon_backward_dk(p, dtype, stream), "backward (dK)");
  }
  return {dq, dk};
}

int64_t max_dim(const std::string& dtype) {
  if (dtype == "float32") return fc::max_dim(fc::DType::kFloat32);
  if (dtype == "float16") return fc::max_dim(fc::DType::kFloat16);
  if (dtype == "bfloat16") return fc::max_dim(fc::DType::kBFloat16);
  TORCH_CHECK(false, "dtype must be float32, float16 or bfloat16, got ", dtype);
  return 0;
}

int64_t shared_bytes(int64_t kernel, const std::string& dtype, int64_t d) {
  const fc::DType t = dtype == "float32" ? fc::DType::kFloat32
                      : dtype == "float16" ? fc::DType::kFloat16 : fc::DType::kBFloat16;
  return static_cast<int64_t>(fc::shared_bytes(static_cast<int>(kernel), t, static_cast<int>(d)));
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fused_contrastive's CUDA kernels for SupCon / SimCLR (L_out; labels or a dense mask)";
  m.def("forward", &forward, "(lse, pos_sum) per anchor", py::arg("anchors"), py::arg("keys"), py::arg("inv_tau"),
        py::arg("anchor_labels"), py::arg("key_labels"), py::arg("mask"), py::arg("self_offset"),
        py::arg("wmma") = false);
  m.def("backward", &backward, "(dQ, dK) from the saved per-row statistics", py::arg("anchors"), py::arg("keys"),
        py::arg("inv_tau"), py::arg("anchor_labels"), py::arg("key_labels"), py::arg("mask"), py::arg("self_offset"),
        py::arg("lse"), py::arg("coef"), py::arg("pos_scale"), py::arg("need_dq"), py::arg("need_dk"),
        py::arg("wmma") = false);
  m.def("max_dim", &max_dim, "largest feature dimension for an input dtype", py::arg("dtype"));
  m.def("shared_bytes", &shared_bytes, "dynamic shared memory of one block (kernel 0 fwd, 1 dQ, 2 dK)",
        py::arg("kernel"), py::arg("dtype"), py::arg("d"));
}
