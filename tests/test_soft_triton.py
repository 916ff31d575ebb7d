"""SCE and CoMatch on the Triton kernels (triton_kernels/soft.py, here under the interpreter) against the float64
reference: the loss and the gradients of query, key and a learnable temperature, for both target kinds; the
spec's denominator rules (self, a bias table); and the per-shard operations ring mode merges."""
import dataclasses

import pytest
import torch

import fused_contrastive as fc
from fused_contrastive import dispatch, soft_losses
from fused_contrastive.distributed import local_rows
from fused_contrastive.spec import DenominatorBias, SoftTarget

from helpers import assert_close

pytest.importorskip("triton")
# CPU tensors: Triton's interpreter runs them (tests/conftest.py sets it where there is no GPU)
runs_here = pytest.mark.skipif(dispatch._triton_why_not(soft_losses._soft_spec(
    torch.zeros(1, 16), torch.zeros(1, 16), None, 0.1, False, SoftTarget("graph", torch.zeros(1, 2), torch.zeros(1, 2))))
    is not None, reason="the Triton kernels cannot run CPU tensors here (no interpreter)")

F64 = torch.float64


def unit(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(*shape, generator=g, dtype=F64), dim=-1)


def probabilities(rows, classes, seed=0, sharp=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(sharp * torch.randn(rows, classes, generator=g, dtype=F64), dim=1)


def run(loss, backend, dtype, tau, q, k, extra, side, side_extra, setting):
    """(loss, grad query, grad key, grad temperature): the features rounded to ``dtype`` (the float64 reference
    sees the same rounded values), the side inputs as given."""
    acc = F64 if backend == "reference" else (F64 if dtype == F64 else torch.float32)
    qq = q.to(dtype).to(acc if backend == "reference" else dtype).requires_grad_()
    kk = k.to(dtype).to(acc if backend == "reference" else dtype).requires_grad_()
    ee = None if extra is None else extra.to(dtype).to(qq.dtype)
    t = torch.tensor(tau, dtype=acc, requires_grad=True)
    if loss == "sce":
        out = fc.sce_loss(qq, kk, side, queue=ee, teacher_queue=side_extra if side is not None else None,
                          temperature=t, lam=setting, backend=backend)
    else:
        out = fc.comatch_loss(qq, kk, side, bank=ee, bank_probs=side_extra, temperature=t, threshold=setting,
                              backend=backend)
    out.backward()
    return out, qq.grad, kk.grad, t.grad


# (loss, N, extra keys, D, side width (None: SCE's default teacher, the keys), dtype, tau, lam / threshold)
CASES = [
    ("sce", 1, 0, 13, None, torch.float32, 0.05, 0.5),
    ("sce", 3, 5, 13, 7, torch.bfloat16, 1.0, 0.0),
    ("sce", 3, 4, 37, None, F64, 0.05, 0.5),  # a side width over one BLOCK_S chunk
    ("sce", 127, 0, 13, 7, torch.float32, 0.05, 1.0),
    ("sce", 129, 9, 37, None, torch.bfloat16, 0.05, 0.5),
    ("sce", 127, 6, 13, None, torch.float16, 1.0, 0.5),
    ("comatch", 1, 3, 13, 5, torch.float32, 1.0, 0.9),
    ("comatch", 3, 0, 13, 5, torch.bfloat16, 0.05, 0.0),
    ("comatch", 5, 4, 13, 37, F64, 0.05, 0.3),
    ("comatch", 127, 6, 13, 5, torch.float32, 0.05, 0.9),
    ("comatch", 129, 0, 13, 5, torch.bfloat16, 1.0, 0.0),
]


@runs_here
@pytest.mark.parametrize("loss,n,n_extra,dim,width,dtype,tau,setting", CASES,
                         ids=[f"{c[0]}-{c[5]}-tau{c[6]}-{c[7]}-{c[1]}" for c in CASES])
def test_triton_matches_reference(loss, n, n_extra, dim, width, dtype, tau, setting):
    q, k = unit(n, dim, seed=1), unit(n, dim, seed=2)
    extra = unit(n_extra, dim, seed=3) if n_extra else None
    side = side_extra = None
    if loss == "comatch":
        side = probabilities(n, width, seed=4)
        side_extra = probabilities(n_extra, width, seed=5) if n_extra else None
    elif width is not None:
        side = unit(n, width, seed=4)
        side_extra = unit(n_extra, width, seed=5) if n_extra else None
    want = run(loss, "reference", dtype, tau, q, k, extra, side, side_extra, setting)
    got = run(loss, "triton", dtype, tau, q, k, extra, side, side_extra, setting)
    for what, a, b in zip(("loss", "grad query", "grad key", "grad temperature"), got, want):
        assert_close(a, b, dtype, what)


def general_spec(kind, n=9, dim=11, width=5, seed=0):
    """A soft-target spec beyond what SCE / CoMatch build: anchors are the keys (each anchor's self excluded),
    three classes of positives, and a bias table (one group's keys out of the other group's denominators,
    log-weights elsewhere)."""
    x = unit(n, dim, seed=seed)
    labels = torch.arange(n) % 3
    side = probabilities(n, width, seed + 1) if kind == "graph" else unit(n, width, seed=seed + 1)
    groups = labels % 2  # (a positive is never out of the denominator)
    bias = DenominatorBias(groups, groups, torch.tensor([0.0, -0.5], dtype=F64),
                           torch.tensor([float("-inf"), 0.3], dtype=F64))
    target = SoftTarget(kind, side, side, lam=0.4, tau_t=0.2, threshold=0.2)
    return fc.spec.ContrastSpec(anchors=x, keys=x, self_offset=0, anchor_labels=labels, key_labels=labels,
                                num_classes=3, mask=None, temperature=0.3, base_temperature=None, no_positive="zero",
                                tau_float=0.3, den_bias=bias, soft_target=target)


@runs_here
@pytest.mark.parametrize("kind", ["teacher", "graph"])
def test_self_and_bias_table(kind):
    """Self excluded and a denominator bias table, as the reference's tile applies them."""
    results = []
    for backend in ("reference", "triton"):
        spec = general_spec(kind)
        x = spec.keys.clone().requires_grad_()
        spec = dataclasses.replace(spec, anchors=x, keys=x)
        out = dispatch.BACKENDS[backend].loss(spec)
        out.backward()
        results.append((out, x.grad))
    for what, a, b in zip(("loss", "grad"), results[1], results[0]):
        assert_close(a, b, F64, f"{kind} {what}")


def assert_close_lse(actual, expected, what):
    """LSEs: -inf in the same places (an empty sum: here the rows without a teacher candidate), close elsewhere."""
    empty = expected == float("-inf")
    assert torch.equal(actual == float("-inf"), empty), f"{what}: -inf at {actual}, expected at {expected}"
    assert_close(actual[~empty], expected[~empty], F64, what)


def shards(spec, cut):
    """The spec's keys split at ``cut`` into two shard specs (labels, bias groups and side rows with them)."""
    out = []
    for lo, hi in ((0, cut), (cut, spec.num_keys)):
        bias = spec.den_bias
        if bias is not None:
            bias = dataclasses.replace(bias, key_groups=bias.key_groups[lo:hi])
        offset = None if spec.self_offset is None else spec.self_offset - lo
        out.append(dataclasses.replace(spec, keys=spec.keys[lo:hi], key_labels=spec.key_labels[lo:hi],
                                       den_bias=bias, self_offset=offset,
                                       soft_target=dataclasses.replace(spec.soft_target,
                                                                       key_side=spec.soft_target.key_side[lo:hi])))
    return out


@runs_here
@pytest.mark.parametrize("kind", ["teacher", "graph"])
def test_shards_merge_to_one(kind):
    """soft_norm, soft_stats and soft_grads over two key shards, merged by the contract's rules (logaddexp or
    sum, dK concatenated), equal one shard holding every key: what ring mode relies on."""
    ring = dispatch.BACKENDS["triton"].ring
    spec = local_rows(general_spec(kind, n=11), 0, 7)  # 7 anchors against 11 keys, reduction "sum"
    parts = shards(spec, 5)
    pos_count = spec.pos_count()
    norm = ring.soft_norm(spec)
    norms = [ring.soft_norm(p) for p in parts]
    if kind == "teacher":  # (group 1 holds one class: its rows have no candidate, their norm is -inf)
        assert_close_lse(torch.logaddexp(*norms), norm, "norm")
        assert (norm == float("-inf")).any() and (norm > float("-inf")).any()
    else:
        assert_close(norms[0] + norms[1], norm, F64, "norm")
    lse, wsum = ring.soft_stats(spec, norm, pos_count)
    stats = [ring.soft_stats(p, norm, pos_count) for p in parts]
    assert_close(torch.logaddexp(stats[0][0], stats[1][0]), lse, F64, "lse")
    assert_close(stats[0][1] + stats[1][1], wsum, F64, "wsum")
    # the one-shard rows are the reference's
    rows = torch.where(pos_count > 0, lse - wsum, 0.0)
    assert_close(rows.sum(), dispatch.BACKENDS["reference"].loss(spec), F64, "rows")
    coef = torch.linspace(-1.0, 2.0, spec.num_anchors, dtype=F64)
    dq, dk = ring.soft_grads(spec, lse, norm, pos_count, coef)
    grads = [ring.soft_grads(p, lse, norm, pos_count, coef) for p in parts]
    assert_close(grads[0][0] + grads[1][0], dq, F64, "dQ")
    assert_close(torch.cat([grads[0][1], grads[1][1]]), dk, F64, "dK")


@runs_here
@pytest.mark.parametrize("loss", ["sce", "comatch"])
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_normalize_reduction_weight(loss, reduction):
    """Unnormalised rows with normalize=True, per-row weights (one 0), reduction "none" (a non-uniform upstream
    gradient per row) and "mean", float64: the Triton rows equal the reference's."""
    weight = torch.tensor([1.0, 0.0, 2.0, 0.5, 1.5], dtype=F64)
    results = []
    for backend in ("reference", "triton"):
        q, k = (3 * unit(5, 9, seed=1)).requires_grad_(), (0.5 * unit(5, 9, seed=2)).requires_grad_()
        kw = dict(normalize=True, reduction=reduction, weight=weight, backend=backend)
        if loss == "sce":
            out = fc.sce_loss(q, k, 2 * unit(5, 3, seed=3), queue=unit(4, 9, seed=4),
                              teacher_queue=unit(4, 3, seed=5), **kw)
        else:
            out = fc.comatch_loss(q, k, probabilities(5, 2, 1), threshold=0.4, **kw)
        (out * torch.linspace(0.5, 1.5, out.numel(), dtype=F64).reshape(out.shape)).sum().backward()
        results.append((out, q.grad, k.grad))
    for what, a, b in zip(("loss", "grad query", "grad key"), results[1], results[0]):
        assert_close(a, b, F64, what)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["80:bfloat16:128:teacher", "90:bfloat16:512:graph:10"])
def test_kernels_compile_without_spills(case):
    """Every shipped config of the four kernels, compiled ahead of time as a launch would (no GPU), in a
    subprocess (this session decorates the kernels for the interpreter); bench/results/
    triton_aot_soft_sm80_sm90.txt has the full table."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    out = subprocess.run([sys.executable, "-m", "fused_contrastive.triton_kernels.soft", case], capture_output=True,
                         text=True, env=env)
    assert out.returncode == 0 and "0 flawed configs" in out.stdout, out.stdout + out.stderr[-3000:]
