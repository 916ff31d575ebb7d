"""PaCo / GPaCo and TSC: every CPU backend against the float64 formulas (loss and the gradient of the features,
centers, key and temperature), alpha / beta / gamma away from 1, label smoothing, logit offsets, temperatures
0.01-1, degenerate batches, reductions and weights, the module forms, and PaCo at alpha = beta = gamma = 1 as
SupCon with labelled centers."""
import pytest
import torch
import torch.nn.functional as F

import fused_contrastive as fc
import formulas
from helpers import CPU_BACKENDS, assert_close
from test_family import check, randn

F64 = torch.float64
DIM = 6
LABELS = {"random": torch.tensor([0, 1, 2, 0, 1, 0, 3]), "one class": torch.zeros(7, dtype=torch.long),
          "singletons": torch.arange(7)}
OFFSETS = torch.log(torch.tensor([0.3, 0.25, 0.2, 0.1, 0.05, 0.05, 0.05], dtype=F64))
PACO = [dict(),
        dict(alpha=0.05, beta=0.7, gamma=0.3, supervised_temperature=0.9, base_temperature=0.07),
        dict(alpha=2.0, label_smoothing=0.2, logit_offsets=OFFSETS),
        dict(alpha=0.5, beta=0.0, gamma=0.0),
        dict(alpha=0.0, gamma=2.0, label_smoothing=0.1, contrast_mode="all", normalize=True)]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("kind", list(LABELS))
@pytest.mark.parametrize("case", range(len(PACO)))
@pytest.mark.parametrize("temperature,bank", [(0.01, False), (0.2, True), (1.0, False)])
def test_paco(backend, kind, case, temperature, bank, small_chunks):
    kw = dict(PACO[case], temperature=torch.tensor(temperature, dtype=F64, requires_grad=True))
    features, centers = randn(7, 2, DIM, seed=case), randn(7, DIM, seed=9, normalize=False)
    inputs = {"features": features, "class_centers": centers, "temperature": kw["temperature"]}
    if bank:
        kw.update(extra_keys=randn(4, DIM, seed=3), extra_key_labels=torch.tensor([1, 6, 0, 0]))
        inputs["extra_keys"] = kw["extra_keys"]
    if "logit_offsets" in kw:  # offsets with a learned temperature need a supervised one
        kw["supervised_temperature"] = 0.5
    check(backend, lambda: formulas.paco(features, LABELS[kind], centers, **kw),
          lambda: fc.paco_loss(features, LABELS[kind], centers, backend=backend, **kw), inputs, f"paco {kind} {case}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_paco_at_ones_is_supcon_with_centers(backend):
    features, centers, labels = randn(7, 2, DIM, seed=1), randn(7, DIM, seed=2), LABELS["random"]
    paco = fc.paco_loss(features, labels, centers, temperature=0.1, backend=backend)
    supcon = fc.supcon_loss(features, labels, temperature=0.1, contrast_mode="one", extra_keys=centers,
                            extra_key_labels=torch.arange(7), backend=backend)
    assert_close(paco, supcon, F64, "paco at alpha = beta = gamma = 1")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_paco_reduction_and_module(reduction):
    features, centers, labels = randn(7, 2, DIM, seed=4), randn(7, DIM, seed=5), LABELS["random"]
    weight = torch.rand(7, dtype=F64, generator=torch.Generator().manual_seed(0))
    kw = dict(alpha=0.3, beta=0.8, gamma=0.5, label_smoothing=0.1, temperature=0.2)
    rows = formulas.paco(features, labels, centers, rows=True, **kw) * weight
    expected = {"mean": rows.sum() / weight.sum(), "sum": rows.sum(), "none": rows}[reduction]
    module = fc.PaCoLoss(torch.nn.Parameter(centers.detach().clone()), reduction=reduction, **kw)
    assert_close(module(features, labels, weight=weight), expected, F64, f"paco {reduction}")
    assert "class_centers" in dict(module.named_parameters())


def test_paco_bad_input():
    features, centers = randn(7, 2, DIM), randn(7, DIM)
    with pytest.raises(ValueError, match="labels"):
        fc.paco_loss(features, LABELS["random"] + 7, centers)
    with pytest.raises(ValueError, match="alpha and beta"):
        fc.paco_loss(features, LABELS["random"], centers, alpha=0.0, beta=0.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        fc.paco_loss(features, LABELS["random"], centers, label_smoothing=1.5)
    with pytest.raises(ValueError, match="logit_offsets"):
        fc.paco_loss(features, LABELS["random"], centers, logit_offsets=torch.zeros(3, dtype=F64))
    with pytest.raises(ValueError, match="class_centers"):
        fc.paco_loss(features, LABELS["random"], torch.zeros(7, DIM + 1, dtype=F64))


TSC = [dict(), dict(queue=True), dict(queue=True, targets=True, target_weight=0.3),
       dict(targets=True, target_weight=2.0, normalize=False)]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", range(len(TSC)))
@pytest.mark.parametrize("temperature", [0.01, 0.1, 1.0])
@pytest.mark.parametrize("kind", ["random", "singletons"])
def test_tsc(backend, case, temperature, kind, small_chunks):
    kw = dict(TSC[case], temperature=torch.tensor(temperature, dtype=F64, requires_grad=True))
    query, key = randn(7, DIM, seed=case, normalize=False), randn(7, DIM, seed=case + 10, normalize=False)
    if kw.pop("queue", False):
        kw.update(queue=randn(9, DIM, seed=3), queue_labels=torch.tensor([0, 0, 1, 2, 3, 3, 1, 8, 2]))
    if kw.pop("targets", False):
        kw.update(targets=randn(5, DIM, seed=4), target_labels=torch.tensor([0, 1, 2, 3, 3]))
    inputs = {"query": query, "key": key, "temperature": kw["temperature"]}
    labels = LABELS[kind]
    if case == 0:  # the own key alone: the loss is exactly 0 for every row
        assert float(fc.tsc_loss(query, key, labels, backend=backend, **kw).abs()) < 1e-12
        return
    check(backend, lambda: formulas.tsc(query, key, labels, **kw),
          lambda: fc.tsc_loss(query, key, labels, backend=backend, **kw), inputs, f"tsc {case} {kind}")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_tsc_reduction_and_module(reduction):
    query, key, labels = randn(7, DIM, seed=1), randn(7, DIM, seed=2), LABELS["random"]
    kw = dict(queue=randn(6, DIM, seed=3), queue_labels=torch.tensor([0, 1, 1, 2, 3, 0]),
              targets=randn(4, DIM, seed=4), target_labels=torch.arange(4))
    weight = torch.rand(7, dtype=F64, generator=torch.Generator().manual_seed(0))
    rows = formulas.tsc(query, key, labels, target_weight=0.5, rows=True, **kw) * weight
    expected = {"mean": rows.sum() / weight.sum(), "sum": rows.sum(), "none": rows}[reduction]
    module = fc.TSCLoss(target_weight=0.5, reduction=reduction)
    assert_close(module(query, key, labels, weight=weight, **kw), expected, F64, f"tsc {reduction}")
    with pytest.raises(ValueError, match="queue_labels"):
        fc.tsc_loss(query, key, labels, queue=kw["queue"])


# ------------------------------------------------------------------------------ eps-SupInfoNCE L_in, Eq. 18
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("kind", list(LABELS) + ["simclr"])
@pytest.mark.parametrize("which", ["in", "eq18"])
@pytest.mark.parametrize("temperature,epsilon,mode,bank", [(0.01, 0.5, "all", False), (0.2, 0.0, "one", True),
                                                            (1.0, 1.5, "all", True)])
def test_eps_forms(backend, kind, which, temperature, epsilon, mode, bank, small_chunks):
    features = randn(7, 2, DIM, seed=2)
    labels = None if kind == "simclr" else LABELS[kind]
    kw = dict(temperature=torch.tensor(temperature, dtype=F64, requires_grad=True), epsilon=epsilon,
              contrast_mode=mode, base_temperature=0.07)
    inputs = {"features": features, "temperature": kw["temperature"]}
    if bank and labels is not None:
        kw.update(extra_keys=randn(3, DIM, seed=5), extra_key_labels=torch.tensor([0, 3, 9]))
        inputs["extra_keys"] = kw["extra_keys"]
    if which == "in":
        expected = lambda: formulas.eps_supinfonce_in(features, labels, **kw)
        actual = lambda: fc.eps_supinfonce_loss(features, labels, form="in", backend=backend, **kw)
    else:
        expected = lambda: formulas.epsilon_supcon(features, labels, **kw)
        actual = lambda: fc.epsilon_supcon_loss(features, labels, backend=backend, **kw)
    if which == "in" and kind == "one class" and "extra_keys" not in kw:
        # no negatives: the loss is a constant of the features (their gradient zero)
        loss = actual()
        assert_close(loss, expected(), F64, f"eps in one class [{backend}]")
        grad_f, grad_t = torch.autograd.grad(loss, [features, kw["temperature"]])
        assert float(grad_f.abs().max()) < 1e-10  # c = tau / base_tau still depends on tau
        assert_close(grad_t, torch.autograd.grad(expected(), kw["temperature"])[0], F64, "eps in one class tau")
        return
    check(backend, expected, actual, inputs, f"eps {which} {kind}")


def test_eq18_at_zero_epsilon_is_supcon():
    features, labels = randn(7, 2, DIM, seed=3), LABELS["random"]
    assert_close(fc.epsilon_supcon_loss(features, labels, epsilon=0.0, temperature=0.1),
                 fc.supcon_loss(features, labels, temperature=0.1), F64, "Eq. 18 at epsilon 0")


# ------------------------------------------------------------------------------ FairKL
@pytest.mark.parametrize("kind", list(LABELS))
@pytest.mark.parametrize("bias", ["random", "one", "distinct"])
@pytest.mark.parametrize("temperature,kld,normalize", [(0.01, 1.0, False), (0.5, 0.3, True), (1.0, 0.0, False)])
def test_fairkl(kind, bias, temperature, kld, normalize):
    features = randn(7, 2, DIM, seed=6, normalize=not normalize)
    bias_labels = {"random": torch.tensor([0, 1, 1, 0, 2, 2, 0]), "one": torch.zeros(7, dtype=torch.long),
                   "distinct": torch.arange(7)}[bias]
    tau = torch.tensor(temperature, dtype=F64, requires_grad=True)
    kw = dict(temperature=tau, kld=kld, normalize=normalize)
    check("dense-free", lambda: formulas.fairkl(features, LABELS[kind], bias_labels, **kw),
          lambda: fc.fairkl_regularizer(features, LABELS[kind], bias_labels, **kw),
          {"features": features, "temperature": tau}, f"fairkl {kind} {bias}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_fairkl_loss_is_eps_plus_regulariser(backend):
    features, labels, bias_labels = randn(7, 2, DIM, seed=8), LABELS["random"], torch.tensor([0, 1, 1, 0, 1, 0, 0])
    kw = dict(epsilon=0.2, temperature=0.3)
    check(backend, lambda: formulas.eps_supinfonce(features, labels, **kw)
          + 0.5 * formulas.fairkl(features, labels, bias_labels, temperature=0.3, kld=0.7),
          lambda: fc.fairkl_loss(features, labels, bias_labels, fairkl_weight=0.5, kld=0.7, backend=backend, **kw),
          {"features": features}, "fairkl_loss")
    with pytest.raises(ValueError, match="reduction"):
        fc.fairkl_loss(features, labels, bias_labels, reduction="none")


def test_eps_fairkl_modules():
    features, labels, bias_labels = randn(7, 2, DIM, seed=9), LABELS["random"], torch.tensor([0, 1, 1, 0, 1, 0, 0])
    assert_close(fc.EpsilonSupConLoss(epsilon=0.3)(features, labels),
                 formulas.epsilon_supcon(features, labels, epsilon=0.3), F64, "EpsilonSupConLoss")
    assert_close(fc.EpsSupInfoNCELoss(epsilon=0.3, form="in")(features, labels),
                 formulas.eps_supinfonce_in(features, labels, epsilon=0.3), F64, "EpsSupInfoNCELoss in")
    assert_close(fc.FairKLLoss(fairkl_weight=0.5, kld=0.2)(features, labels, bias_labels),
                 formulas.eps_supinfonce(features, labels) + 0.5 * formulas.fairkl(features, labels, bias_labels,
                                                                                    temperature=0.1, kld=0.2),
                 F64, "FairKLLoss")
