"""On a CUDA GPU: the fused backends at full sizes in fp32/bf16/fp16 against the float64 oracle.

Skipped without a GPU (CI has none); `bench/gpu_suite.sh` runs them on a lent GPU.
"""
import pytest
import torch

import fused_contrastive as fc
from helpers import assert_close, loss_and_grad, make_features, make_labels, supcontrast_float64

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
GPU_BACKENDS = ["chunked", "triton"]


def on_gpu(backend, bsz, n_views, dim, dtype, kind, mode="all", temperature=0.1, seed=0):
    features = make_features(bsz, n_views, dim, dtype=torch.float64, seed=seed).detach()
    labels, mask = make_labels(kind, bsz, seed=seed)
    x = features.to(dtype)
    expected, expected_grad = loss_and_grad(
        lambda f: supcontrast_float64(f, labels, mask, temperature=temperature, contrast_mode=mode),
        x.double().requires_grad_())
    x = x.cuda().requires_grad_()
    lab = None if labels is None else labels.cuda()
    msk = None if mask is None else mask.cuda()
    reason = fc.explain_backends(x, lab, msk, contrast_mode=mode)[backend]
    if reason is not None:
        pytest.skip(reason)
    actual, grad = loss_and_grad(
        lambda f: fc.supcon_loss(f, lab, msk, temperature=temperature, contrast_mode=mode, backend=backend), x)
    assert grad.dtype == dtype
    assert_close(actual.cpu(), expected, dtype, f"{backend} loss")
    assert_close(grad.cpu(), expected_grad, dtype, f"{backend} grad")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("bsz", [1, 2, 3, 127, 129, 1000])
@pytest.mark.parametrize("kind", ["random", "same", "distinct", "none", "mask"])
@pytest.mark.parametrize("mode", ["all", "one"])
def test_parity_sizes(backend, bsz, kind, mode):
    on_gpu(backend, bsz, 2, 33, torch.float32, kind, mode)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dim", [1, 64, 128, 255, 512])
def test_parity_dtypes_dims(backend, dtype, dim):
    on_gpu(backend, 1500, 2, dim, dtype, "random", seed=dim)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("temperature", [0.01, 0.02, 0.05])
def test_low_temperature_low_precision_is_finite_and_exact(backend, dtype, temperature):
    on_gpu(backend, 2048, 2, 128, dtype, "random", temperature=temperature)


def test_triton_backward_is_deterministic():
    features = make_features(3000, 2, 128, dtype=torch.bfloat16).detach().cuda()
    labels = torch.randint(0, 50, (3000,), device="cuda")
    grads = []
    for _ in range(2):
        f = features.clone().requires_grad_()
        fc.supcon_loss(f, labels, backend="triton").backward()
        grads.append(f.grad)
    assert torch.equal(grads[0], grads[1])


def test_auto_picks_triton_on_cuda():
    reasons = fc.explain_backends(torch.zeros(4, 2, 8, device="cuda"), torch.arange(4, device="cuda"))
    assert reasons["triton"] is None
