"""Soft per-pair targets (SCE, CoMatch) on reference and chunked: float64 parity with tests/formulas.py for the
loss and every input's gradient (the teacher / probabilities get none), degenerate batches, temperatures
0.01-1, reductions and weights, the fused kernels' refusal, and bad input."""
import dataclasses
import functools

import pytest
import torch

import fused_contrastive as fc
from fused_contrastive import cuda_supcon, dispatch, family, reference, soft_losses, soft_targets
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


def test_cuda_backend_refuses():
    """The CUDA kernels refuse soft targets (the Triton ones run them: tests/test_soft_triton.py)."""
    q, k = unit(4, 8), unit(4, 8)
    spec = soft_losses._soft_spec(q, k, None, 0.1, False, fc.spec.SoftTarget("teacher", k, k, lam=0.5, tau_t=0.1))
    reasons = dispatch.explain(spec)
    assert "soft per-pair targets" in cuda_supcon.unsupported(spec)  # (why_not first asks for a CUDA device)
    assert reasons["chunked"] is None and reasons["reference"] is None


def test_never_materialises_a_target():
    """The chunked path keeps O(N) state: what SoftRows saves for backward is the inputs and three [N] vectors
    (the LSE, the target's normaliser, the positive count)."""
    q, k = unit(6, 8, seed=1).requires_grad_(), unit(6, 8, seed=2)
    spec = soft_losses._soft_spec(q, k, None, 0.1, False, fc.spec.SoftTarget("teacher", k, k, lam=0.5, tau_t=0.1))
    rows = SoftRows.apply(q, k, None, spec)
    node = rows.grad_fn
    shapes = [tuple(t.shape) for t in node.saved_tensors]
    assert shapes == [(6, 8), (6, 8), (6,), (6,), (6,)], shapes


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
    (lambda q, k, p: fc.sce_loss(q, k, distributed="all"), "distributed"),
    (lambda q, k, p: fc.comatch_loss(q, k, p, distributed="ring2"), "distributed"),
    (lambda q, k, p: fc.CoMatchLoss(distributed=None), "distributed"),
])
def test_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call(unit(4, 8), unit(4, 8, seed=1), probabilities(4, 3))


def test_modules():
    q, k, p = unit(5, 8, seed=1), unit(5, 8, seed=2), probabilities(5, 3)
    assert_close(fc.SCELoss(lam=0.3)(q, k), fc.sce_loss(q, k, lam=0.3), F64, "SCELoss")
    assert_close(fc.CoMatchLoss(threshold=0.2, reduction="sum")(q, k, p),
                 fc.comatch_loss(q, k, p, threshold=0.2, reduction="sum"), F64, "CoMatchLoss")


SHARD_OPS = {"chunked": (soft_targets.soft_norm, soft_targets.soft_stats, soft_targets.soft_grads),
             "reference": (soft_targets.dense_soft_norm, soft_targets.dense_soft_stats, soft_targets.dense_soft_grads)}


def shard_specs(spec, bounds):
    """The spec's keys cut at ``bounds`` (key row ranges), each shard with its key labels and key side rows."""
    target = spec.soft_target
    return [dataclasses.replace(spec, keys=spec.keys[a:b], key_labels=spec.key_labels[a:b],
                                soft_target=dataclasses.replace(target, key_side=target.key_side[a:b]))
            for a, b in bounds]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind,option", [("teacher", 0.0), ("teacher", 0.5), ("teacher", 1.0), ("graph", 0.3),
                                         ("graph", 1.0)])  # (lam; threshold: 1.0 keeps only the self-loop)
def test_per_shard_contract(backend, kind, option):
    """The per-shard operations over uneven key shards (the queue last, as the ring's extra keys), merged as ring
    mode merges them (the normaliser first, then lse and wsum given it), give the one-process rows and the
    gradients of query, keys and temperature; a merge with each shard's own normaliser is caught."""
    norm_op, stats_op, grads_op = SHARD_OPS[backend]
    q, k, queue = unit(7, 8, seed=1), unit(7, 8, seed=2), unit(4, 8, seed=3)
    side = probabilities(11, 3, 4) if kind == "graph" else unit(11, 5, seed=4)
    target = (fc.spec.SoftTarget("graph", side[:7], side, threshold=option) if kind == "graph"
              else fc.spec.SoftTarget("teacher", side[:7], side, lam=option, tau_t=0.2))
    tau = torch.tensor(0.3, dtype=F64, requires_grad=True)
    qq = q.clone().requires_grad_()
    keys = torch.cat([k, queue]).requires_grad_()
    spec = dataclasses.replace(family._info_nce_spec(qq, keys, tau, None, True), soft_target=target)
    spec = dataclasses.replace(spec, key_labels=torch.cat([torch.arange(7), torch.full((4,), 7)]), num_classes=8)
    want = reference.per_row(spec)[0]
    coef = torch.linspace(0.5, 1.5, 7, dtype=F64)
    want_grads = torch.autograd.grad((coef * want).sum(), (qq, keys, tau))

    shards = shard_specs(dataclasses.replace(spec, anchors=q, keys=keys.detach()), [(0, 3), (3, 4), (4, 7), (7, 11)])
    pos_count = spec.pos_count()
    merge = torch.logaddexp if kind == "teacher" else torch.add
    norm = functools.reduce(merge, [norm_op(s) for s in shards])
    stats = [stats_op(s, norm, pos_count) for s in shards]
    lse = functools.reduce(torch.logaddexp, [st[0] for st in stats])
    got = lse - sum(st[1] for st in stats)
    assert_close(got, want, F64, "rows")
    grads = [grads_op(s, lse, norm, pos_count, coef) for s in shards]
    dQ = sum(g[0] for g in grads)
    assert_close(dQ, want_grads[0], F64, "grad query")
    assert_close(torch.cat([g[1] for g in grads]), want_grads[1], F64, "grad keys")
    assert_close(-(q * dQ).sum() / 0.3, want_grads[2], F64, "grad temperature")
    if option == 1.0:
        return  # (lam = 1, or only the self-loop: one shard holds the whole target, its own normaliser is right)
    own = [stats_op(s, norm_op(s), pos_count) for s in shards]  # each shard's own normaliser: wrong
    wrong = functools.reduce(torch.logaddexp, [st[0] for st in own]) - sum(st[1] for st in own)
    with pytest.raises(AssertionError, match="relative error"):
        assert_close(wrong, want, F64, "per-shard normalisers")


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
