"""On a CUDA GPU: the fused backends at full sizes in fp32/bf16/fp16 against the float64 oracle.

Skipped without a GPU (CI has none); `bench/gpu_suite.sh` runs them on a lent GPU.
"""
import pytest
import torch

import fused_contrastive as fc
from helpers import assert_close, loss_and_grad, make_features, make_labels, supcontrast_float64

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
GPU_BACKENDS = ["chunked", "triton", "cuda"]


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


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_fused_backward_is_deterministic(backend):
    features = make_features(3000, 2, 128, dtype=torch.bfloat16).detach().cuda()
    labels = torch.randint(0, 50, (3000,), device="cuda")
    grads = []
    for _ in range(2):
        f = features.clone().requires_grad_()
        fc.supcon_loss(f, labels, backend=backend).backward()
        grads.append(f.grad)
    assert torch.equal(grads[0], grads[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_learnable_temperature_and_normalize(dtype):
    x64 = make_features(777, 2, 96, dtype=torch.float64, normalize=False, seed=3).detach()
    labels = torch.randint(0, 9, (777,))
    x = x64.to(dtype)
    results = []
    for backend, device in (("reference", "cpu"), ("cuda", "cuda")):
        f = (x.double() if backend == "reference" else x).to(device).requires_grad_()
        tau = torch.tensor(0.2, dtype=torch.float64 if backend == "reference" else torch.float32, device=device,
                           requires_grad=True)
        loss = fc.supcon_loss(f, labels.to(device), temperature=tau, normalize=True, base_temperature=0.07,
                              backend=backend)
        results.append((loss, *torch.autograd.grad(loss, (f, tau))))
    for (exp, actual), what in zip(zip(results[0], results[1]), ("loss", "features grad", "tau grad")):
        assert_close(actual.cpu(), exp, dtype, f"cuda {what}")


def test_auto_picks_triton_on_cuda():
    reasons = fc.explain_backends(torch.zeros(4, 2, 8, device="cuda"), torch.arange(4, device="cuda"))
    assert reasons["triton"] is None


def _family_calls(bsz, dim, seed=0):
    """(name, fn(tensors, backend), float64 tensors requiring grad) for every other loss of the family."""
    gen = torch.Generator().manual_seed(seed)
    unit = lambda *shape: torch.nn.functional.normalize(torch.randn(*shape, generator=gen, dtype=torch.float64), dim=-1)  # noqa: E731
    labels = torch.randint(0, 7, (bsz,), generator=gen)
    feats, queue, centers = unit(bsz, 2, dim), unit(bsz // 2 + 1, dim), unit(7, dim)
    return [
        ("eps_supinfonce", lambda t, b: fc.eps_supinfonce_loss(t[0], labels.to(t[0].device), backend=b), [feats]),
        ("dclw", lambda t, b: fc.dcl_loss(t[0], weighted=True, backend=b), [feats]),
        ("info_nce_queue", lambda t, b: fc.info_nce(t[0], t[1], queue=queue.to(t[0]), backend=b),
         [feats[:, 0], feats[:, 1]]),
        ("clip", lambda t, b: fc.clip_loss(t[0], t[1], 14.0, backend=b), [feats[:, 0], feats[:, 1]]),
        ("debiased", lambda t, b: fc.debiased_contrastive_loss(t[0], backend=b), [feats]),
        ("bcl_centers", lambda t, b: fc.bcl_loss(t[0], labels.to(t[0].device), class_centers=t[1], backend=b),
         [feats, centers]),
        ("spread", lambda t, b: fc.spread_loss(t[0], labels.to(t[0].device), backend=b), [feats]),
        ("supcon_extra_keys", lambda t, b: fc.supcon_loss(t[0], labels.to(t[0].device), extra_keys=t[1],
                                                           extra_key_labels=labels[: len(queue)].to(t[0].device),
                                                           backend=b), [feats, queue]),
        ("symmetric_spread", lambda t, b: fc.symmetric_spread_loss(t[0], labels.to(t[0].device), backend=b), [feats]),
        ("dclw_learned", lambda t, b: fc.dcl_loss(t[0], weighted=True, detach_weight=False, normalize=True,
                                                  backend=b), [feats]),
        ("unicon", lambda t, b: fc.unicon_loss(t[0], t[1], labels.to(t[0].device), backend=b),
         [feats, unit(2 * bsz, dim)]),
        ("suncet_support", lambda t, b: fc.suncet_loss(t[0], labels.to(t[0].device), support=t[1],
                                                       support_labels=labels[: len(queue)].to(t[0].device),
                                                       backend=b), [feats, queue]),
    ]


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype,dim", [(torch.float32, 33), (torch.bfloat16, 128), (torch.float16, 255)])
@pytest.mark.parametrize("case", range(12))
def test_family_parity(backend, dtype, dim, case):
    name, fn, tensors = _family_calls(1023, dim, seed=case)[case]
    rounded = [t.to(dtype) for t in tensors]
    expected_in = [t.double().requires_grad_() for t in rounded]
    expected = fn(expected_in, "reference")
    expected_grads = torch.autograd.grad(expected, expected_in)
    actual_in = [t.cuda().requires_grad_() for t in rounded]
    try:
        actual = fn(actual_in, backend)
    except RuntimeError as err:  # the CUDA kernels cover SupCon L_out only: dispatch says so
        if "cannot run this input" in str(err) and backend == "cuda":
            pytest.skip(str(err))
        raise
    grads = torch.autograd.grad(actual, actual_in)
    assert_close(actual.cpu(), expected, dtype, f"{name} {backend} loss")
    for g, e in zip(grads, expected_grads):
        assert g.dtype == dtype
        assert_close(g.cpu(), e, dtype, f"{name} {backend} grad")
