"""FairKL (regulariser and eps-SupInfoNCE + FairKL) on every CPU backend against tests/formulas.py's dense
float64 re-derivation of the authors' code: the value and the gradient of the features and the temperature, for
degenerate batches (one class, one bias value, singleton cells, no positives), 2 / 3 / 127 / 129 samples,
temperatures 0.05 and 1, 16-bit inputs in the Triton kernels, and 2-rank gather and ring modes against one
process."""
import pytest
import torch
import torch.distributed as dist

import fused_contrastive as fc
import formulas
from helpers import CPU_BACKENDS, assert_close, runs_here
from test_family import check, randn

F64 = torch.float64


def labels_for(kind: str, n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return {"random": torch.randint(0, 3, (n,), generator=gen), "one": torch.full((n,), 4),
            "distinct": torch.arange(n) * 2 - 3}[kind]


@pytest.mark.parametrize("n", [2, 3, 127, 129])  # outermost: the ids end in "-<backend>-<n>]" (conftest's patterns)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_regulariser_sizes(backend, n):
    if not runs_here(backend, 2 * n):
        pytest.skip("too large for the interpreter")
    features = randn(n, 2, 5, seed=n)
    tau = torch.tensor(0.05 if n % 2 else 1.0, dtype=F64, requires_grad=True)
    y, b = labels_for("random", n, 1), labels_for("random", n, 2)
    kw = dict(temperature=tau, kld=0.8)
    check(backend, lambda: formulas.fairkl(features, y, b, **kw),
          lambda: fc.fairkl_regularizer(features, y, b, backend=backend, **kw),
          {"features": features, "temperature": tau}, f"fairkl n={n}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("kind,bias", [("random", "one"), ("one", "random"), ("one", "one"), ("distinct", "random"),
                                       ("random", "distinct"), ("distinct", "distinct")])
@pytest.mark.parametrize("temperature,kld,normalize,views", [(0.05, 1.0, False, 1), (1.0, 0.0, True, 2)])
def test_regulariser_degenerate(backend, kind, bias, temperature, kld, normalize, views, small_chunks):
    """One class / one bias value (empty groups), singleton cells, distinct labels with one view (no positive
    but self): groups without pairs or without variance are exact, never NaN."""
    features = randn(9, views, 4, seed=3, normalize=not normalize)
    y, b = labels_for(kind, 9, 5), labels_for(bias, 9, 6)
    tau = torch.tensor(temperature, dtype=F64, requires_grad=True)
    kw = dict(temperature=tau, kld=kld, normalize=normalize)
    check(backend, lambda: formulas.fairkl(features, y, b, **kw),
          lambda: fc.fairkl_regularizer(features, y, b, backend=backend, **kw),
          {"features": features, "temperature": tau}, f"fairkl {kind} {bias}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_loss_is_eps_plus_regulariser(backend, reduction):
    features, y = randn(7, 2, 6, seed=8), labels_for("random", 7, 3)
    b = labels_for("random", 7, 4)
    weight = torch.rand(7, dtype=F64, generator=torch.Generator().manual_seed(0))
    tau = torch.tensor(0.3, dtype=F64, requires_grad=True)

    def expected():  # the eps-SupInfoNCE part's reductions and weights are checked against formulas elsewhere
        eps = fc.eps_supinfonce_loss(features, y, epsilon=0.2, temperature=tau, backend="reference",
                                     reduction=reduction, weight=weight)
        return eps + 0.5 * formulas.fairkl(features, y, b, temperature=tau, kld=0.7)

    check(backend, expected, lambda: fc.fairkl_loss(features, y, b, epsilon=0.2, temperature=tau, fairkl_weight=0.5,
                                                    kld=0.7, backend=backend, reduction=reduction, weight=weight),
          {"features": features, "temperature": tau}, f"fairkl_loss {reduction}")


@pytest.mark.skipif("triton" not in CPU_BACKENDS, reason="Triton's interpreter is off")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_triton_low_precision(dtype):
    """16-bit rows in the kernels' products (the gradient tile scaled into [-1, 1] first): against the float64
    formula on the same rounded inputs, within the tolerance table."""
    features = randn(33, 2, 8, seed=4).detach().to(dtype).requires_grad_()
    y, b = labels_for("random", 33, 7), labels_for("random", 33, 8)
    rounded = features.detach().to(F64).requires_grad_()
    expected = formulas.fairkl(rounded, y, b, temperature=0.1)
    actual = fc.fairkl_regularizer(features, y, b, temperature=0.1, backend="triton")
    assert actual.dtype == torch.float32
    assert_close(actual, expected, dtype, f"fairkl triton {dtype}")
    (grad,) = torch.autograd.grad(actual, features)
    assert grad.dtype == dtype
    assert_close(grad, torch.autograd.grad(expected, rounded)[0], dtype, f"fairkl triton {dtype} grad")


def test_bad_input_and_modules():
    features, y = randn(4, 2, 3, seed=1), torch.tensor([0, 1, 0, 1])
    for bad in (torch.tensor([0, 1, 0]), torch.tensor([0.0, float("nan"), 1.0, 1.0]), "abc"):
        for fn in (fc.fairkl_regularizer, fc.fairkl_loss):
            with pytest.raises(ValueError, match="bias_labels"):
                fn(features, y, bad)
    with pytest.raises(ValueError, match="distributed"):
        fc.fairkl_loss(features, y, y, distributed="scatter")
    with pytest.raises(ValueError, match="reduction"):
        fc.fairkl_loss(features, y, y, reduction="none")
    with pytest.raises(RuntimeError, match="no CUDA kernel"):
        fc.fairkl_regularizer(features, y, y, backend="cuda")
    module = fc.FairKLLoss(fairkl_weight=0.5, kld=0.2, distributed="ring")
    assert_close(module(features, y, torch.tensor([1, 1, 0, 0])),
                 formulas.eps_supinfonce(features, y) + 0.5 * formulas.fairkl(features, y, torch.tensor([1, 1, 0, 0]),
                                                                            temperature=0.1, kld=0.2),
                 F64, "FairKLLoss")


# ------------------------------------------------------------------------------ gather and ring, one spawn
def check_ranks(rank, world, lo, hi, features, labels, backends):
    from test_distributed import assert_rel

    bias = torch.tensor([0, 1, 1, 0, 0, 1, 1, 1])
    cases = [("regulariser", lambda f, y, b, t, **kw: fc.fairkl_regularizer(f, y, b, temperature=t, kld=0.6, **kw)),
             ("loss", lambda f, y, b, t, **kw: fc.fairkl_loss(f, y, b, epsilon=0.2, temperature=t, fairkl_weight=0.7,
                                                             normalize=True, **kw))]
    for name, fn in cases:
        f_ref = features.clone().requires_grad_()
        tau_ref = torch.tensor(0.4, dtype=F64, requires_grad=True)
        ref = fn(f_ref, labels, bias, tau_ref, backend="reference")
        ref_f, ref_tau = torch.autograd.grad(ref, (f_ref, tau_ref))
        for backend in backends:
            for mode in ("gather", "ring"):
                local = features[lo:hi].clone().requires_grad_()
                tau = torch.tensor(0.4, dtype=F64, requires_grad=True)
                loss = fn(local, labels[lo:hi], bias[lo:hi], tau, backend=backend, process_group=dist.group.WORLD,
                          distributed=mode)
                grad_f, grad_tau = torch.autograd.grad(loss, (local, tau))
                what = f"rank {rank}/{world} fairkl {name} {backend} {mode}"
                assert_rel(loss.detach(), ref.detach(), what + " loss")
                assert_rel(grad_f, world * ref_f[lo:hi], what + " features grad", scale=world * ref_f.norm())
                dist.all_reduce(grad_tau)
                assert_rel(grad_tau / world, ref_tau, what + " temperature grad (DDP average)")


def test_gather_and_ring_on_two_ranks():
    from test_distributed import spawn

    spawn(check_ranks, 2)


@pytest.mark.slow  # ptxas over every shipped config (about a minute); no GPU needed
@pytest.mark.parametrize("case", ["90:bfloat16:128", "80:float16:64"])
def test_kernels_compile_without_spills(case):
    import os
    import subprocess
    import sys

    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    out = subprocess.run([sys.executable, "-m", "fused_contrastive.triton_kernels.fairkl", case], capture_output=True,
                         text=True, env=env)
    assert out.returncode == 0 and "0 flawed configs" in out.stdout, out.stdout + out.stderr[-3000:]
