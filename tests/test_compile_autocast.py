"""torch.compile(fullgraph=True) and autocast give the eager loss and gradients."""
import pytest
import torch

import fused_contrastive as fc
from helpers import CPU_BACKENDS, assert_close, make_features

LABELS = torch.tensor([0, 1, 2, 0, 1, 2, 3, 3, 0, 5, 6])


def loss_and_grads(fn, features, tau):
    features = features.detach().clone().requires_grad_()
    tau = tau.detach().clone().requires_grad_()
    loss = fn(features, tau)
    return (loss, *torch.autograd.grad(loss, (features, tau)))


@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b != "reference"])  # reference: eager only
@pytest.mark.parametrize("mode", ["all", "one"])
def test_compile_fullgraph_matches_eager(backend, mode):
    torch._dynamo.reset()
    features = make_features(11, 2, 6, seed=3)
    tau = torch.tensor(0.2, dtype=torch.float64)

    def fn(f, t):
        return fc.supcon_loss(f * 2.0, LABELS, temperature=t, base_temperature=0.1, contrast_mode=mode,
                              normalize=True, backend=backend)

    eager = loss_and_grads(fn, features, tau)
    compiled = loss_and_grads(torch.compile(fn, fullgraph=True, backend="aot_eager"), features, tau)
    for c, e, what in zip(compiled, eager, ("loss", "features grad", "temperature grad")):
        assert_close(c, e, torch.float64, what)


def test_compile_with_inductor_and_a_module():
    torch._dynamo.reset()
    model = torch.nn.Linear(6, 5)
    criterion = fc.SupConLoss(temperature=0.1, normalize=True)
    x = torch.randn(11, 2, 6)

    def step(inp):
        return criterion(model(inp), LABELS)

    expected = step(x)
    expected_grad = torch.autograd.grad(expected, model.weight)[0]
    loss = torch.compile(step, fullgraph=True)(x)
    grad = torch.autograd.grad(loss, model.weight)[0]
    assert_close(loss, expected, torch.float32, "loss")
    assert_close(grad, expected_grad, torch.float32, "grad")


def test_autocast_keeps_fp32_accumulation():
    model = torch.nn.Linear(16, 8)
    x = torch.randn(40, 2, 16)
    labels = torch.arange(40) % 7
    with torch.autocast("cpu", dtype=torch.bfloat16):
        features = model(x)
        assert features.dtype == torch.bfloat16
        loss = fc.supcon_loss(features, labels, temperature=0.1, normalize=True)
    loss.backward()
    # Same bf16 inputs outside autocast: equal to fp32 rounding only if autocast did not lower the products.
    expected = fc.supcon_loss(features.detach(), labels, temperature=0.1, normalize=True, backend="reference")
    assert loss.dtype == torch.float32 and torch.isfinite(model.weight.grad).all()
    assert_close(loss, expected, torch.float32, "loss")
