"""Soft per-pair targets (SCE, CoMatch) on reference and chunked: float64 parity with tests/formulas.py for the
loss and every input's gradient (the teacher / probabilities get none), degenerate batches, temperatures
0.01-1, reductions and weights, the fused kernels' refusal, and bad input."""
import dataclasses

import pytest
import torch

import fused_contrastive as fc
from fused_contrastive import cuda_supcon, dispatch, family, soft_losses
from fused_contrastive.soft_targets import SoftRows

import formulas
from helpers import assert_close

F64 = torch.float64
BACKENDS = ["reference", "chunked"]


def unit(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(*shape, generator=g, dtype=F64), dim=-1)


def probabilities(rows, classes, seed=0, sharp=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(sharp * torch.randn(rows, classes, generator=g, dtype=F64), dim=1)


def check(fn, oracle, inputs: dict, grad_names, **kw):
    """Loss and the gradient of every input in ``grad_names`` against the formula, in float64."""
    a = {n: v.clone().requires_grad_(n in grad_names) if torch.is_tensor(v) else v for n, v in inputs.items()}
    b = {n: v.clone().requires_grad_(n in grad_names) if torch.is_tensor(v) else v for n, v in inputs.items()}
    got, want = fn(**a, **kw), oracle(**b, **{k: v for k, v in kw.items() if k != "backend"})
    assert_close(got, want, F64, "loss")
    scale = torch.linspace(0.5, 1.5, got.numel(), dtype=F64).reshape(got.shape)  # a non-uniform upstream
    (got * scale).sum().backward()
    (want * scale).sum().backward()
    for name in grad_names:
        assert_close(a[name].grad, b[name].grad, F64, f"grad {name}")
    for name, value in a.items():  # the side inputs are constants
        if torch.is_tensor(value) and name not in grad_names:
            assert value.grad is None


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bsz,queue,tau,tau_t,lam", [(8, 0, 0.1, 0.07, 0.5), (6, 5, 0.01, 0.05, 0.2),
                                                      (5, 7, 1.0, 1.0, 1.0), (1, 3, 0.3, 0.1, 0.0), (1, 0, 0.5, 0.1, 0.5)])
@pytest.mark.parametrize("own_teacher", [False, True])
def test_sce(backend, bsz, queue, tau, tau_t, lam, own_teacher):
    inputs = {"query": unit(bsz, 12, seed=1), "key": unit(bsz, 12, seed=2)}
    if queue:
        inputs["queue"] = unit(queue, 12, seed=3)
    if own_teacher:
        inputs["teacher"] = unit(bsz, 7, seed=4)
        if queue:
            inputs["teacher_queue"] = unit(queue, 7, seed=5)
    check(fc.sce_loss, formulas.sce, inputs, ("query", "key"), temperature=tau, teacher_temperature=tau_t, lam=lam,
          backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bsz,bank,tau,threshold,sharp", [(8, 0, 0.2, 0.8, 3.0), (7, 6, 0.01, 0.5, 1.0),
                                                          (6, 4, 1.0, 0.0, 3.0), (5, 0, 0.1, 1.0, 3.0),
                                                          (1, 3, 0.2, 0.3, 3.0), (6, 0, 0.2, 0.9, 50.0)])
def test_comatch(backend, bsz, bank, tau, threshold, sharp):
    inputs = {"query": unit(bsz, 12, seed=1), "key": unit(bsz, 12, seed=2), "probs": probabilities(bsz, 3, 6, sharp)}
    if bank:
        inputs["bank"], inputs["bank_probs"] = unit(bank, 12, seed=3), probabilities(bank, 3, 7, sharp)
    check(fc.comatch_loss, formulas.comatch, inputs, ("query", "key"), temperature=tau, threshold=threshold,
          backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("loss", ["sce", "comatch"])
def test_reductions_weights_normalize(backend, reduction, loss):
    """Unnormalised input with normalize=True, per-pair weights (one of them 0), every reduction."""
    weight = torch.tensor([1.0, 0.0, 2.0, 0.5, 1.5], dtype=F64)
    inputs = {"query": 3 * unit(5, 9, seed=1), "key": 0.5 * unit(5, 9, seed=2), "weight": weight}
    if loss == "sce":
        inputs["queue"] = unit(4, 9, seed=3)
        check(fc.sce_loss, formulas.sce, inputs, ("query", "key"), normalize=True, reduction=reduction,
              backend=backend)
    else:
        inputs["probs"] = probabilities(5, 2, 1)
        check(fc.comatch_loss, formulas.comatch, inputs, ("query", "key"), threshold=0.4, normalize=True,
              reduction=reduction, backend=backend)


def test_degenerate_batches():
    """Identical rows everywhere (one 'class'), and a graph whose rows keep only the self-loop, match too."""
    same = unit(1, 8).repeat(6, 1)
    for fn, oracle, extra in [(fc.sce_loss, formulas.sce, {}),
                              (fc.comatch_loss, formulas.comatch, {"probs": probabilities(6, 4, 2)}),
                              (fc.comatch_loss, formulas.comatch, {"probs": torch.eye(6, dtype=F64)})]:
        for backend in BACKENDS:
            check(fn, oracle, {"query": same, "key": unit(6, 8, seed=9), **extra}, ("query", "key"), backend=backend)
    # an identity graph (all singletons) is InfoNCE exactly
    q, k = unit(6, 8, seed=1), unit(6, 8, seed=2)
    assert_close(fc.comatch_loss(q, k, torch.eye(6, dtype=F64), backend="chunked"), fc.info_nce(q, k, temperature=0.2), F64,
                 "eye")
    # lam = 1 is InfoNCE too
    assert_close(fc.sce_loss(q, k, lam=1.0, backend="chunked"), fc.info_nce(q, k), F64, "lam=1")


def test_chunked_tiles_and_temperature_gradient(monkeypatch):
    """Several row blocks (a small tile budget) and a learnable temperature, against reference."""
    import fused_contrastive.chunked as chunked

    monkeypatch.setattr(chunked, "TILE_ELEMENTS", 16)
    monkeypatch.setattr(chunked, "MIN_BLOCK_ROWS", 1)
    q, k, p = unit(9, 6, seed=1), unit(9, 6, seed=2), probabilities(9, 3, 3)
    results = {}
    for backend in BACKENDS:
        tau = torch.tensor(0.3, dtype=F64, requires_grad=True)
        for name, fn in [("sce", lambda: fc.sce_loss(q, k, queue=unit(3, 6, seed=5), temperature=tau,
                                                     backend=backend)),
                         ("comatch", lambda: fc.comatch_loss(q, k, p, temperature=tau, threshold=0.3, backend=backend))]:
            loss = fn()
            (grad,) = torch.autograd.grad(loss, tau)
            results[backend, name] = (loss, grad)
    for name in ("sce", "comatch"):
        for i, what in enumerate(("loss", "grad tau")):
            assert_close(results["chunked", name][i], results["reference", name][i], F64, f"{name} {what}")


def test_fused_backends_refuse():
    q, k = unit(4, 8), unit(4, 8)
    spec = soft_losses._soft_spec(q, k, None, 0.1, False, fc.spec.SoftTarget("teacher", k, k, lam=0.5, tau_t=0.1))
    reasons = dispatch.explain(spec)
    assert "soft per-pair targets" in reasons["triton"], reasons["triton"]  # (the interpreter runs CPU tensors)
    assert "soft per-pair targets" in cuda_supcon.unsupported(spec)  # (why_not first asks for a CUDA device)
    assert reasons["chunked"] is None and reasons["reference"] is None
    with pytest.raises(RuntimeError, match="soft per-pair targets"):
        fc.sce_loss(q, k, backend="triton")


def test_never_materialises_a_target():
    """The chunked path keeps O(N) state: what SoftRows saves for backward is the inputs and two [N] vectors."""
    q, k = unit(6, 8, seed=1).requires_grad_(), unit(6, 8, seed=2)
    spec = soft_losses._soft_spec(q, k, None, 0.1, False, fc.spec.SoftTarget("teacher", k, k, lam=0.5, tau_t=0.1))
    rows = SoftRows.apply(q, k, None, spec)
    node = rows.grad_fn
    shapes = [tuple(t.shape) for t in node.saved_tensors]
    assert shapes == [(6, 8), (6, 8), (6,), (6,)], shapes


@pytest.mark.parametrize("call,match", [
    (lambda q, k, p: fc.sce_loss(q, k, lam=1.5), "lam"),
    (lambda q, k, p: fc.sce_loss(q, k, teacher_temperature=0.0), "teacher_temperature"),
    (lambda q, k, p: fc.sce_loss(q, k, teacher=p[:3]), "teacher"),
    (lambda q, k, p: fc.sce_loss(q, k, teacher=p, queue=q), "teacher_queue"),
    (lambda q, k, p: fc.sce_loss(q, k, teacher_queue=q), "teacher_queue"),
    (lambda q, k, p: fc.sce_loss(q, k, queue=q[:, :3]), "queue"),
    (lambda q, k, p: fc.comatch_loss(q, k, p, threshold=1.2), "threshold"),
    (lambda q, k, p: fc.comatch_loss(q, k, p[:2]), "probs"),
    (lambda q, k, p: fc.comatch_loss(q, k, p.long()), "probs"),
    (lambda q, k, p: fc.comatch_loss(q, k, p, bank=q), "bank_probs"),
    (lambda q, k, p: fc.comatch_loss(q, k, p, bank=q, bank_probs=p[:, :2]), "bank_probs"),
    (lambda q, k, p: fc.comatch_loss(q, k[:3], p), "key"),
    (lambda q, k, p: fc.CoMatchLoss(threshold=-0.1), "threshold"),
    (lambda q, k, p: fc.SCELoss(lam=-1), "lam"),
])
def test_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call(unit(4, 8), unit(4, 8, seed=1), probabilities(4, 3))


def test_modules():
    q, k, p = unit(5, 8, seed=1), unit(5, 8, seed=2), probabilities(5, 3)
    assert_close(fc.SCELoss(lam=0.3)(q, k), fc.sce_loss(q, k, lam=0.3), F64, "SCELoss")
    assert_close(fc.CoMatchLoss(threshold=0.2, reduction="sum")(q, k, p),
                 fc.comatch_loss(q, k, p, threshold=0.2, reduction="sum"), F64, "CoMatchLoss")


def soft_cases(features, labels):
    """(name, loss(query, key, labels, **kw)): the side inputs are functions of the labels (per sample)."""
    gen = torch.Generator().manual_seed(3)
    queue = torch.nn.functional.normalize(torch.randn(5, 6, dtype=F64, generator=gen), dim=-1)
    table = torch.randn(10, 4, dtype=F64, generator=gen)  # a teacher embedding per label
    teacher_queue = torch.randn(5, 4, dtype=F64, generator=gen)
    bank_probs = torch.softmax(torch.randn(5, 10, dtype=F64, generator=gen), dim=1)

    def probs(y):
        return 0.6 * torch.nn.functional.one_hot(y, 10).to(F64) + 0.04

    return [
        ("sce", lambda q, k, y, **kw: fc.sce_loss(q, k, queue=queue, temperature=0.3, **kw)),
        ("sce_teacher", lambda q, k, y, **kw: fc.sce_loss(q, k, table[y], queue=queue, teacher_queue=teacher_queue,
                                                          normalize=True, **kw)),
        ("comatch_bank", lambda q, k, y, **kw: fc.comatch_loss(q, k, probs(y), bank=queue, bank_probs=bank_probs,
                                                               threshold=0.1, **kw)),
    ]


def check_gather(rank, world, lo, hi, features, labels, _):
    """Gather mode: the global loss, and world_size x this rank's slice of the single-process gradients."""
    import torch.distributed as dist
    from test_distributed import assert_rel

    weight = torch.linspace(0.0, 2.0, len(labels), dtype=F64)
    for name, loss_fn in soft_cases(features, labels):
        for backend in BACKENDS:  # (the fused kernels refuse soft targets)
            for options in ({}, dict(reduction="sum", weight=weight), dict(reduction="none")):
                q, k = features[:, 0].clone().requires_grad_(), features[:, 1].clone().requires_grad_()
                ref = loss_fn(q, k, labels, backend="reference", **options)
                upstream = torch.linspace(0.5, 1.5, ref.numel(), dtype=F64).reshape(ref.shape)
                ref_grads = torch.autograd.grad((ref * upstream).sum(), (q, k))
                ql, kl = features[lo:hi, 0].clone().requires_grad_(), features[lo:hi, 1].clone().requires_grad_()
                local_options = {n: v[lo:hi] if n == "weight" else v for n, v in options.items()}
                loss = loss_fn(ql, kl, labels[lo:hi], backend=backend, process_group=dist.group.WORLD,
                               **local_options)
                if options.get("reduction") == "none":
                    ref, upstream = ref[lo:hi], upstream[lo:hi]
                grads = torch.autograd.grad((loss * upstream).sum(), (ql, kl))
                what = f"rank {rank}/{world} {name} {backend} {options.get('reduction', 'mean')}"
                assert_rel(loss.detach(), ref.detach(), what + " loss")
                for g, e in zip(grads, ref_grads):
                    assert_rel(g, world * e[lo:hi], what + " grad", scale=world * e.norm())


@pytest.mark.slow  # (two gloo processes: ~25 s on this machine)
def test_gather_mode_is_exact():
    from test_distributed import spawn

    spawn(check_gather, 2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_denominator_path(backend):
    """A spec whose denominator is restricted (MoCo v1: the positive and the queue only, a -inf bias on the
    other batch keys) takes the tiles' masked path: the teacher's softmax then runs over the queue only."""
    q, k, queue = unit(5, 8, seed=1), unit(5, 8, seed=2), unit(4, 8, seed=3)
    target = fc.spec.SoftTarget("teacher", k, torch.cat([k, queue]), lam=0.3, tau_t=0.2)
    spec = dataclasses.replace(family._info_nce_spec(q.requires_grad_(), k, 0.1, queue, False), soft_target=target)
    got = dispatch.run(spec, backend)
    (got_grad,) = torch.autograd.grad(got, q)
    qq = q.detach().clone().requires_grad_()
    rows = []
    for i in range(5):
        keys = torch.cat([k[i:i + 1], queue])
        log_p = torch.log_softmax(qq[i] @ keys.T / 0.1, 0)
        w = torch.cat([torch.tensor([0.3], dtype=F64), 0.7 * torch.softmax(k[i] @ queue.T / 0.2, 0)])
        rows.append(-(w * log_p).sum())
    want = torch.stack(rows).mean()
    assert_close(got, want, F64, "loss")
    assert_close(got_grad, torch.autograd.grad(want, qq)[0], F64, "grad query")


@pytest.mark.parametrize("loss", ["sce", "comatch", "renyicl", "cacr"])
def test_float32_matches_float64(loss):
    """float32 inputs (float32 accumulation) against float64 on the same values, loss and gradient, tau 0.01."""
    g = torch.Generator().manual_seed(1)
    f = torch.nn.functional.normalize(torch.randn(48, 2, 16, generator=g), dim=-1)
    t = torch.randn(48, 2, 16, generator=g)
    p = torch.softmax(torch.randn(48, 4, generator=g), dim=1)
    calls = {"sce": lambda x: fc.sce_loss(x[:, 0], x[:, 1], temperature=0.01, teacher_temperature=0.05),
             "comatch": lambda x: fc.comatch_loss(x[:, 0], x[:, 1], p, temperature=0.01, threshold=0.3),
             "renyicl": lambda x: fc.renyicl_loss(x, t.to(x.dtype), temperature=0.01),
             "cacr": lambda x: fc.cacr_loss(x, tau_neg=3.0)}
    results = []
    for dtype in (torch.float32, F64):
        x = f.to(dtype).requires_grad_()
        value = calls[loss](x)
        results.append((value, torch.autograd.grad(value, x)[0]))
    assert results[0][0].dtype == torch.float32
    assert_close(results[0][0], results[1][0], torch.float32, "loss")
    assert_close(results[0][1], results[1][1], torch.float32, "grad")
