"""Every backend that runs on CPU against the independent float64 oracle: loss and gradient."""
import pytest
import torch

import fused_contrastive as fc
from helpers import CPU_BACKENDS, assert_close, loss_and_grad, make_features, make_labels, runs_here, supcontrast_float64

SIZES = [1, 2, 3, 127, 129, 1000]
LABEL_KINDS = ["random", "same", "distinct", "none", "mask"]


def check(backend, features, labels, mask, dtype=torch.float64, **kw):
    expected, expected_grad = loss_and_grad(lambda f: supcontrast_float64(f, labels, mask, **kw), features)
    actual, grad = loss_and_grad(lambda f: fc.supcon_loss(f, labels, mask, backend=backend, **kw), features)
    assert grad.dtype == features.dtype
    assert_close(actual, expected, dtype, f"{backend} loss")
    assert_close(grad, expected_grad, dtype, f"{backend} grad")
    return actual


@pytest.mark.parametrize("backend,bsz", [(b, n) for b in CPU_BACKENDS for n in SIZES if runs_here(b, 2 * n)])
@pytest.mark.parametrize("kind", LABEL_KINDS)
@pytest.mark.parametrize("mode", ["all", "one"])
def test_sizes_labels_modes(backend, bsz, kind, mode, small_chunks):
    features = make_features(bsz, 2, 33, seed=bsz)
    labels, mask = make_labels(kind, bsz, seed=bsz)
    check(backend, features, labels, mask, temperature=0.1, base_temperature=0.07, contrast_mode=mode)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("temperature", [0.01, 0.05, 0.2, 1.0])
@pytest.mark.parametrize("no_positive", ["zero", "exclude"])
def test_temperatures_and_no_positive(backend, temperature, no_positive):
    features = make_features(61, 3, 257, seed=3)
    labels = torch.arange(61) % 23  # a few singleton classes: anchors with no positive in 'one' mode
    labels[:5] = 100 + torch.arange(5)
    for mode in ("all", "one"):
        check(backend, features, labels, None, temperature=temperature, contrast_mode=mode, no_positive=no_positive)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shape", [(5, 1, 3, 2, 2), (9, 4, 1), (40, 7)])
def test_extra_dims_flat_input_and_one_dim_features(backend, shape):
    features = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5)).requires_grad_()
    labels = torch.arange(shape[0]) % 3
    check(backend, features, labels, None, temperature=0.5)


@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b != "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("temperature", [0.01, 0.07, 1.0])
def test_low_precision(backend, dtype, temperature, small_chunks):
    features = make_features(129, 2, 65, dtype=dtype, seed=11)
    labels, _ = make_labels("random", 129, seed=11)
    expected, expected_grad = loss_and_grad(
        lambda f: supcontrast_float64(f, labels, temperature=temperature), features.detach().double().requires_grad_())
    actual, grad = loss_and_grad(lambda f: fc.supcon_loss(f, labels, temperature=temperature, backend=backend), features)
    assert actual.dtype == torch.float32 and grad.dtype == dtype
    assert_close(actual, expected, dtype, "loss")
    assert_close(grad, expected_grad, dtype, "grad")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("temperature", [0.005, 0.01])
def test_extreme_logits(backend, dtype, temperature, small_chunks):
    """|l_ij| up to 1/tau (normalised) and 100/tau (norm 10): needs the online max, no fixed shift."""
    # Norm-10 features make |l| ~ 1e4: an fp32 logit then carries ~1e-3 absolute error from its own
    # rounding, whatever the algorithm, so that regime is checked in float64 only.
    for scale in (1.0, 10.0) if dtype == torch.float64 else (1.0,):
        features = (make_features(67, 2, 31, seed=12).detach() * scale).to(dtype).requires_grad_()
        labels, _ = make_labels("random", 67, seed=12)
        expected, expected_grad = loss_and_grad(
            lambda f: supcontrast_float64(f, labels, temperature=temperature), features.detach().double().requires_grad_())
        actual, grad = loss_and_grad(lambda f: fc.supcon_loss(f, labels, temperature=temperature, backend=backend), features)
        assert_close(actual, expected, dtype, f"loss (scale {scale})")
        assert_close(grad, expected_grad, dtype, f"grad (scale {scale})")


def test_weighted_asymmetric_mask_matches_supcontrast():
    features = make_features(50, 2, 9, seed=2)
    mask = torch.rand(50, 50, generator=torch.Generator().manual_seed(4)) * (torch.rand(50, 50) < 0.5)
    for backend in CPU_BACKENDS:
        check(backend, features, None, mask, temperature=0.3, contrast_mode="one")


def test_module_matches_functional_and_supcontrast_defaults():
    features = make_features(32, 2, 16, seed=9)
    labels = torch.arange(32) % 5
    loss = fc.SupConLoss()(features, labels)  # temperature 0.07, base 0.07, 'all'
    expected = supcontrast_float64(features, labels, temperature=0.07, base_temperature=0.07)
    assert_close(loss, expected, torch.float64, "module")
    scaled = fc.SupConLoss(temperature=0.1, base_temperature=0.07, backend="reference")(features, labels)
    assert_close(scaled, supcontrast_float64(features, labels, temperature=0.1, base_temperature=0.07), torch.float64, "scale")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_no_positive_anchors_are_exactly_zero(backend):
    features = make_features(6, 1, 4)
    labels = torch.arange(6)  # one view, distinct labels: no anchor has a positive
    for no_positive in ("zero", "exclude"):
        loss, grad = loss_and_grad(lambda f: fc.supcon_loss(f, labels, no_positive=no_positive, backend=backend), features)
        assert loss.item() == 0.0 and torch.count_nonzero(grad) == 0
    single = make_features(1, 1, 3)
    loss, grad = loss_and_grad(lambda f: fc.supcon_loss(f, backend=backend), single)  # no key at all
    assert loss.item() == 0.0 and torch.isfinite(grad).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_exclude_averages_over_anchors_with_positives(backend):
    features = make_features(10, 1, 5, seed=1)
    labels = torch.tensor([0, 0, 1, 2, 3, 4, 5, 6, 7, 8])  # only anchors 0 and 1 have a positive
    zero = fc.supcon_loss(features, labels, backend=backend, no_positive="zero")
    exclude = fc.supcon_loss(features, labels, backend=backend, no_positive="exclude")
    assert_close(exclude, zero * 10 / 2, torch.float64, "exclude vs zero")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("base_temperature", [None, 0.07])
def test_temperature_tensor_gradient(backend, base_temperature):
    features = make_features(23, 2, 7, seed=8)
    labels = torch.arange(23) % 4
    tau = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
    loss = fc.supcon_loss(features, labels, temperature=tau, base_temperature=base_temperature, backend=backend)
    grads = torch.autograd.grad(loss, (features, tau))
    tau_ref = tau.detach().clone().requires_grad_()
    expected = supcontrast_float64(features, labels, temperature=tau_ref, base_temperature=base_temperature)
    expected_grads = torch.autograd.grad(expected, (features, tau_ref))
    assert_close(loss, expected, torch.float64, "loss")
    for g, e, name in zip(grads, expected_grads, ("features", "temperature")):
        assert_close(g, e, torch.float64, name)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("mode", ["all", "one"])
@pytest.mark.parametrize("tensor_temperature", [False, True])
def test_normalize_option_equals_normalizing_first(backend, mode, tensor_temperature):
    gen = torch.Generator().manual_seed(21)
    raw = torch.randn(45, 2, 19, dtype=torch.float64, generator=gen) * torch.rand(45, 2, 1, generator=gen) * 5
    features = raw.requires_grad_()
    labels, _ = make_labels("random", 45, seed=21)
    tau = torch.tensor(0.15, dtype=torch.float64, requires_grad=True) if tensor_temperature else 0.15
    inputs = (features, tau) if tensor_temperature else (features,)

    def expected_fn(f):
        return supcontrast_float64(torch.nn.functional.normalize(f, dim=-1), labels, temperature=tau,
                                   base_temperature=0.1, contrast_mode=mode)

    def actual_fn(f):
        return fc.supcon_loss(f, labels, temperature=tau, base_temperature=0.1, contrast_mode=mode,
                              normalize=True, backend=backend)

    expected = expected_fn(features)
    expected_grads = torch.autograd.grad(expected, inputs)
    actual = actual_fn(features)
    grads = torch.autograd.grad(actual, inputs)
    assert_close(actual, expected, torch.float64, "loss")
    for g, e in zip(grads, expected_grads):
        assert_close(g, e, torch.float64, "grad")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("kind", ["random", "none", "mask", "distinct"])
@pytest.mark.parametrize("mode", ["all", "one"])
@pytest.mark.parametrize("temperature", [0.01, 0.3])
def test_variant_in(backend, kind, mode, temperature, small_chunks):
    bsz = 41
    features = make_features(bsz, 2, 13, seed=5)
    labels, mask = make_labels(kind, bsz, seed=5)
    if mask is not None:  # weighted, asymmetric: L_in weights each positive's probability
        mask = mask * torch.rand(bsz, bsz, generator=torch.Generator().manual_seed(6))
    check(backend, features, labels, mask, temperature=temperature, base_temperature=0.07, contrast_mode=mode,
          variant="in", no_positive="exclude")
