"""Finite where the math is finite: extreme temperatures and norms, 16-bit normalisation, degenerate rows
under a learnable temperature, scalar precision, ring mode at small tau. Each case compares with the
float64 oracle on the same (rounded) inputs."""
import pytest
import torch
import torch.nn.functional as F

import fused_contrastive as fc
import formulas
from fused_contrastive.spec import normalize_backward, normalize_rows
from helpers import assert_close, supcontrast_float64

BACKENDS = ["reference", "chunked"]


def loss_and_grads(fn, *inputs):
    inputs = [x.detach().clone().requires_grad_() for x in inputs]
    loss = fn(*inputs)
    return loss, torch.autograd.grad(loss, inputs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_normalize_zero_row_16bit(backend, dtype):
    """A zero row in fp16 used to be normalised in fp16, where eps = 1e-12 underflows: 0 / 0 = NaN."""
    gen = torch.Generator().manual_seed(0)
    f = F.normalize(torch.randn(4, 2, 8, generator=gen), dim=-1)
    f[1, 0] = 0
    f = f.to(dtype)
    y = torch.tensor([0, 0, 1, 1])
    loss, (grad,) = loss_and_grads(lambda x: fc.supcon_loss(x, y, normalize=True, backend=backend), f)
    exp_loss, (exp_grad,) = loss_and_grads(lambda x: supcontrast_float64(F.normalize(x, dim=-1), y), f.double())
    assert_close(loss, exp_loss, dtype, "loss")
    zero = torch.zeros(4, 2, 1, dtype=torch.bool)
    zero[1, 0] = True
    # F.normalize's gradient at a zero row is dL/dy / eps (~1e12): past fp16's range it must be +-inf, not NaN
    assert_close(torch.where(zero, 0, grad), torch.where(zero, 0, exp_grad), dtype, "grad of the other rows")
    row, exp_row = grad[1, 0].double(), exp_grad[1, 0]
    if dtype == torch.float16:
        assert torch.equal(row, exp_row.to(dtype).double()), "zero row's grad: not the rounded 1e12 (inf)"
    else:
        assert_close(row, exp_row, dtype, "zero row's grad")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("magnitude", [1e-30, 1e20, 1e35])
def test_normalize_extreme_norms_fp32(backend, magnitude):
    """F.normalize's value at every finite norm: |x|^2 overflows fp32 from |x| ~ 1e19 (a 1e20 row was
    treated as a zero vector) and underflows below ~1e-23 (still >= eps 1e-12 is not reached there)."""
    gen = torch.Generator().manual_seed(1)
    f = torch.randn(5, 2, 8, generator=gen, dtype=torch.float64)
    f = (F.normalize(f, dim=-1) * magnitude).float()
    y = torch.tensor([0, 0, 1, 1, 2])
    loss, (grad,) = loss_and_grads(lambda x: fc.supcon_loss(x, y, normalize=True, temperature=0.1,
                                                            backend=backend), f)
    normalize = lambda x: x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(1e-12)  # noqa: E731
    exp_loss, (exp_grad,) = loss_and_grads(lambda x: supcontrast_float64(normalize(x), y, temperature=0.1),
                                           f.double())
    assert_close(loss, exp_loss, torch.float32, "loss")
    assert_close(grad, exp_grad, torch.float32, "grad")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_normalize_rows_and_backward(dtype):
    """normalize_rows / normalize_backward (what the fused kernels call) against F.normalize in float64
    on rows of every scale, including a zero row and rows below eps."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(7, 5, generator=gen, dtype=torch.float64)
    x = x * torch.tensor([1e-30, 1e-13, 0.0, 1.0, 1e20, 1e30, 1e37], dtype=torch.float64)[:, None]
    x = x.to(dtype)
    g = torch.randn(7, 5, generator=gen, dtype=torch.float64)
    x64 = x.double().requires_grad_()
    expected = x64 / torch.linalg.vector_norm(x64, dim=1, keepdim=True).clamp_min(1e-12)
    (expected_grad,) = torch.autograd.grad(expected, x64, g)
    tol = torch.float32 if dtype == torch.float32 else torch.float64
    for i in range(7):  # row by row: the rows' scales differ by 1e67
        assert_close(normalize_rows(x, dtype)[i], expected[i], tol, f"row {i}")
        assert_close(normalize_backward(x, g.to(dtype))[i], expected_grad[i], tol, f"grad row {i}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant, labels, n_views", [("in", [0, 0, 1, 2], 2), ("in", [0, 0, 1, 2], 1),
                                                      ("out", [0], 1)])
def test_learnable_tau_with_base_and_degenerate_rows(backend, variant, labels, n_views):
    """dL/dtau with c = tau / base: a row without positives (L_in) or without keys (L_out) has an infinite
    loss before it is zeroed; the reference multiplied by c before zeroing, so 0 * inf = NaN."""
    gen = torch.Generator().manual_seed(3)
    f = F.normalize(torch.randn(len(labels), n_views, 8, generator=gen, dtype=torch.float64), dim=-1)
    y = torch.tensor(labels)
    tau = torch.tensor(0.1, dtype=torch.float64)
    kw = dict(base_temperature=0.07, variant=variant)
    loss, grads = loss_and_grads(lambda x, t: fc.supcon_loss(x, y, temperature=t, backend=backend, **kw), f, tau)
    exp_loss, exp_grads = loss_and_grads(lambda x, t: supcontrast_float64(x, y, temperature=t, **kw), f, tau)
    assert_close(loss, exp_loss, torch.float64, "loss")
    for name, g, e in zip(("features", "tau"), grads, exp_grads):
        assert_close(g, e, torch.float64, name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_clip_fp32_scale_with_fp64_features(backend):
    """1 / logit_scale was computed in the scale's fp32 (a relative 1e-9 off) before reaching fp64 math."""
    gen = torch.Generator().manual_seed(4)
    image, text = (F.normalize(torch.randn(6, 8, generator=gen, dtype=torch.float64), dim=-1) for _ in range(2))
    scale = torch.tensor(14.3, dtype=torch.float32)
    loss, grads = loss_and_grads(lambda i, t, s: fc.clip_loss(i, t, s, backend=backend), image, text, scale)
    exp_loss, exp_grads = loss_and_grads(lambda i, t, s: formulas.clip(i, t, s.double()), image, text, scale)
    assert_close(loss, exp_loss, torch.float64, "loss")
    for name, g, e in zip(("image", "text", "scale"), grads, exp_grads):
        assert g.dtype == e.dtype
        assert_close(g.double(), e.double(), torch.float32 if name == "scale" else torch.float64, name)


# ----------------------------------------------------------------------------- ring mode, L_in, small tau

def check_ring_numerics(rank, world, lo, hi, features, labels, backends):
    import torch.distributed as dist
    from helpers import relative_error

    f = features[:, :1].float()  # one view: classes 1, 3 and 9 have no positive
    for backend in BACKENDS:
        kw = dict(temperature=0.01, variant="in", backend=backend)
        ref, (ref_grad,) = loss_and_grads(lambda x: supcontrast_float64(x, labels, temperature=0.01,
                                                                        variant="in"), f.double())
        for layout in ("gather", "ring"):
            loss, (grad,) = loss_and_grads(lambda x: fc.supcon_loss(x, labels[lo:hi], process_group=dist.group.WORLD,
                                                                    distributed=layout, **kw), f[lo:hi])
            what = f"rank {rank} {layout} {backend}"
            assert_close(loss, ref, torch.float32, what + " loss")
            assert torch.isfinite(grad).all(), what + " grad not finite"
            # this rank's slice of the global gradient, relative to the whole one's norm
            err = relative_error(grad.double(), world * ref_grad[lo:hi]) * float((world * ref_grad[lo:hi]).norm()) \
                / float((world * ref_grad).norm())
            assert err <= 1e-4, f"{what} grad: relative error {err:.3g}"

    # normalize=True with an fp16 zero row: ring mode normalised in fp16 too (0 / 0 = NaN). It normalises in
    # fp32 and sends the rows rounded to fp16: the oracle takes the same rounded rows.
    f = features.clone()
    f[0, 0] = 0
    f16 = f.half()

    def rounded_unit_rows(x):
        return normalize_rows(x.reshape(-1, x.shape[-1]), torch.float64).half().double().reshape(x.shape)
    ref, (ref_grad,) = loss_and_grads(lambda x: supcontrast_float64(rounded_unit_rows(x), labels), f16.double())
    for backend in BACKENDS:
        loss, (grad,) = loss_and_grads(lambda x: fc.supcon_loss(x, labels[lo:hi], normalize=True, backend=backend,
                                                                process_group=dist.group.WORLD, distributed="ring"),
                                       f16[lo:hi])
        assert_close(loss, ref, torch.float16, f"rank {rank} ring {backend} fp16 zero row: loss")
        rows = slice(1 if lo == 0 else 0, None)  # the zero row's gradient, ~1e12, is +-inf in fp16
        assert_close(grad[rows], world * ref_grad[lo:hi][rows], torch.float16, f"rank {rank} ring {backend} grad")


def test_ring_mode_small_tau_and_fp16_zero_row():
    from test_distributed import spawn

    spawn(check_ring_numerics, 2)
