"""reduction="mean" | "sum" | "none" and per-anchor weights on every loss and backend.

The expected values are float64 formulas applied to the reference backend's unweighted per-row losses
(reduction="none"), whose plain mean is first checked against the independent re-derivations in
formulas.py: "sum" sum_i w_i L_i, "none" w_i L_i, "mean" sum_i w_i L_i / sum_{i counted} w_i (0 when that
is 0). Loss and the gradient of every input (features, learnable temperature / logit scale, class centers,
weights), "none" differentiated with a random per-row gradient; torch.compile(fullgraph=True) and opcheck.
"""
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

import fused_contrastive as fc
import formulas
from fused_contrastive import compiled
from fused_contrastive.losses import supcon_spec
from helpers import CPU_BACKENDS, assert_close, make_features, runs_here, supcontrast_float64

F64 = torch.float64


def _inputs(bsz: int, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed + 1)
    classes = max(2, (bsz + 1) // 2)  # two classes at bsz = 3: a pair and a singleton
    return dict(f=make_features(bsz, 2, 6, seed=seed).detach().requires_grad_(),
                y=torch.arange(bsz) % classes,
                tau=torch.tensor(0.3, dtype=F64, requires_grad=True),
                scale=torch.tensor(5.0, dtype=F64, requires_grad=True),
                centers=F.normalize(torch.randn(classes, 6, dtype=F64, generator=gen), dim=-1).requires_grad_(),
                queue=F.normalize(torch.randn(4, 6, dtype=F64, generator=gen), dim=-1))


def _singletons(t):  # anchors whose label no other sample has: no positive in a one-view batch
    y = t["y"]
    return (y[:, None] == y[None, :]).sum(1) > 1


# name -> (loss(t, **kw), weight shape(bsz), "none" layout(bsz), counted anchors(t) or None: all,
#          independent float64 mean(t) or None, smallest batch)
CASES = {
    "supcon": (lambda t, **kw: fc.supcon_loss(t["f"], t["y"], temperature=t["tau"], base_temperature=0.5, **kw),
               lambda b: (b, 2), lambda b: (b, 2), None,
               lambda t: supcontrast_float64(t["f"], t["y"], temperature=t["tau"], base_temperature=0.5), 1),
    "supcon_exclude_flat": (lambda t, **kw: fc.supcon_loss(t["f"][:, 0], t["y"], temperature=t["tau"],
                                                           no_positive="exclude", **kw),
                            lambda b: (b,), lambda b: (b, 1), lambda t: _singletons(t)[:, None], None, 1),
    "supcon_in_one": (lambda t, **kw: fc.supcon_loss(t["f"], t["y"], temperature=t["tau"], variant="in",
                                                     contrast_mode="one", **kw),
                      lambda b: (b,), lambda b: (b,), None, None, 1),
    "eps": (lambda t, **kw: fc.eps_supinfonce_loss(t["f"], t["y"], epsilon=0.2, temperature=t["tau"], **kw),
            lambda b: (b, 2), lambda b: (b, 2), None,
            lambda t: formulas.eps_supinfonce(t["f"], t["y"], epsilon=0.2, temperature=t["tau"]), 1),
    "dclw": (lambda t, **kw: fc.dcl_loss(t["f"], temperature=t["tau"], weighted=True, **kw),
             lambda b: (b,), lambda b: (b, 2), None,
             lambda t: formulas.dcl(t["f"], temperature=t["tau"], weighted=True), 2),
    "info_nce_symmetric": (lambda t, **kw: fc.info_nce(t["f"][:, 0], t["f"][:, 1], temperature=t["tau"],
                                                       symmetric=True, **kw),
                           lambda b: (b,), lambda b: (b,), None,
                           lambda t: formulas.info_nce(t["f"][:, 0], t["f"][:, 1], temperature=t["tau"],
                                                       symmetric=True), 1),
    "info_nce_queue": (lambda t, **kw: fc.info_nce(t["f"][:, 0], t["f"][:, 1], temperature=t["tau"],
                                                   queue=t["queue"], in_batch_negatives=False, **kw),
                       lambda b: (b,), lambda b: (b,), None,
                       lambda t: formulas.info_nce(t["f"][:, 0], t["f"][:, 1], temperature=t["tau"],
                                                   queue=t["queue"], in_batch_negatives=False), 1),
    "clip": (lambda t, **kw: fc.clip_loss(t["f"][:, 0], t["f"][:, 1], t["scale"], **kw),
             lambda b: (b,), lambda b: (b,), None, lambda t: formulas.clip(t["f"][:, 0], t["f"][:, 1], t["scale"]), 1),
    "debiased_beta": (lambda t, **kw: fc.debiased_contrastive_loss(t["f"], temperature=t["tau"], beta=0.5, **kw),
                      lambda b: (b, 2), lambda b: (b, 2), None,
                      lambda t: formulas.debiased(t["f"], temperature=t["tau"], beta=0.5), 2),
    "bcl_centers": (lambda t, **kw: fc.bcl_loss(t["f"], t["y"], temperature=t["tau"], class_centers=t["centers"], **kw),
                    lambda b: (b,), lambda b: (b, 2), None,
                    lambda t: formulas.bcl(t["f"], t["y"], temperature=t["tau"], class_centers=t["centers"]), 1),
    "spread": (lambda t, **kw: fc.spread_loss(t["f"], t["y"], temperature=t["tau"], **kw),
               lambda b: (b,), lambda b: (b,), None, lambda t: formulas.spread(t["f"], t["y"], temperature=t["tau"]), 1),
    "symmetric_spread": (lambda t, **kw: fc.symmetric_spread_loss(t["f"], t["y"], temperature=t["tau"], **kw),
                         lambda b: (b, 2), lambda b: (b, 2), None,
                         lambda t: formulas.symmetric_spread(t["f"], t["y"], temperature=t["tau"]), 1),
    "dclw_learned": (lambda t, **kw: fc.dcl_loss(t["f"], temperature=t["tau"], weighted=True, detach_weight=False,
                                                 **kw),
                     lambda b: (b,), lambda b: (b, 2), None,
                     lambda t: formulas.dcl(t["f"], temperature=t["tau"], weighted=True, detach_weight=False), 2),
    "unicon": (lambda t, **kw: fc.unicon_loss(t["f"], t["f"].detach().flip(0), t["y"], temperature=t["tau"], **kw),
               lambda b: (b, 2), lambda b: (b, 2), None,
               lambda t: formulas.unicon(t["f"], t["f"].detach().flip(0).transpose(0, 1).reshape(-1, 6), t["y"],
                                         temperature=t["tau"]), 1),
    "suncet": (lambda t, **kw: fc.suncet_loss(t["f"], t["y"], temperature=t["tau"], **kw),
               lambda b: (b, 2), lambda b: (b, 2), None, lambda t: formulas.suncet(t["f"], t["y"], temperature=t["tau"]),
               1),
}
LEAVES = ("f", "tau", "scale", "centers")


def _weight(kind: str, shape: tuple, seed: int = 3):
    if kind == "none":
        return None
    if kind == "zero":
        return torch.zeros(shape, dtype=F64, requires_grad=True)
    w = torch.rand(shape, dtype=F64, generator=torch.Generator().manual_seed(seed)) * 2
    w.view(-1)[::3] = 0  # some anchors weigh nothing
    return w.requires_grad_()


def expected_result(case: str, t: dict, reduction: str, weight, divisor_of=None):
    """The float64 formula on the reference backend's unweighted rows (autograd attached)."""
    loss, _, layout, counted, _, _ = CASES[case]
    rows = loss(t, backend="reference", reduction="none")
    bsz = t["f"].shape[0]
    assert rows.shape == layout(bsz), f"{case}: 'none' layout {tuple(rows.shape)} != {layout(bsz)}"
    w = torch.ones(layout(bsz), dtype=F64) if weight is None else weight.reshape(weight.shape + (1,) * (
        len(layout(bsz)) - weight.dim())).expand(layout(bsz))
    if reduction == "none":
        return w * rows
    if reduction == "sum":
        return (w * rows).sum()
    keep = torch.ones(layout(bsz), dtype=F64) if counted is None else counted(t).to(F64).expand(layout(bsz))
    total = (w * keep).sum() if divisor_of is None else divisor_of(w, keep)
    return (w * rows).sum() / torch.where(total > 0, total, torch.ones_like(total))


def _result_and_grads(fn, t: dict, weight, reduction: str):
    out = fn(t, weight)
    leaves = [t[k] for k in LEAVES] + ([weight] if weight is not None else [])
    upstream = torch.randn(out.shape, dtype=F64, generator=torch.Generator().manual_seed(9))
    scalar = (out * upstream).sum() if reduction == "none" else out
    grads = torch.autograd.grad(scalar, leaves, allow_unused=True)
    return [out] + [torch.zeros_like(x) if g is None else g for g, x in zip(grads, leaves)]


def check(case: str, backend: str, reduction: str, weight_kind: str, bsz: int, divisor_of=None):
    loss, weight_shape, _, _, _, min_bsz = CASES[case]
    if bsz < min_bsz:
        pytest.skip(f"{case} needs a batch of {min_bsz}")
    t = _inputs(bsz)
    weight = _weight(weight_kind, weight_shape(bsz))
    got = _result_and_grads(lambda t, w: loss(t, backend=backend, reduction=reduction, weight=w), t, weight, reduction)
    want = _result_and_grads(lambda t, w: expected_result(case, t, reduction, w, divisor_of), t, weight, reduction)
    names = ["result"] + [f"grad {k}" for k in LEAVES] + ["grad weight"]
    for name, g, e in zip(names, got, want):
        assert_close(g, e, F64, f"{case} {backend} {reduction} weight={weight_kind} bsz={bsz} {name}")


OPTIONS = [("mean", "none"), ("mean", "random"), ("mean", "zero"), ("sum", "random"), ("none", "none"),
           ("none", "random")]


@pytest.mark.parametrize("reduction,weight_kind", OPTIONS)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_reductions_and_weights(case, backend, reduction, weight_kind):
    check(case, backend, reduction, weight_kind, 3)


@pytest.mark.parametrize("bsz", [1, 129])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_batch_sizes(case, backend, reduction, bsz, small_chunks):  # chunked: many 7-row blocks
    if not runs_here(backend, 2 * bsz) or (backend == "triton" and bsz > 3 and case not in ("supcon", "clip")):
        pytest.skip("the Triton interpreter runs the large batch for two losses only")
    check(case, backend, reduction, "random", bsz)


@pytest.mark.parametrize("case", [c for c in CASES if CASES[c][4] is not None])
def test_reference_rows_match_the_independent_formulas(case):
    """Ties the oracle's rows to formulas.py: their plain mean is the formula's loss (loss and gradients)."""
    loss, _, _, _, formula, _ = CASES[case]
    t = _inputs(5)
    got = _result_and_grads(lambda t, w: loss(t, backend="reference", reduction="none").mean(), t, None, "mean")
    want = _result_and_grads(lambda t, w: formula(t), t, None, "mean")
    for g, e in zip(got, want):
        assert_close(g, e, F64, f"{case} rows' mean")


def test_wrong_divisor_is_caught():
    """The check is sharp: dividing the weighted sum by the count of anchors instead of the weights fails."""
    with pytest.raises(AssertionError, match="relative error"):
        check("supcon", "chunked", "mean", "random", 3, divisor_of=lambda w, keep: keep.sum())


@pytest.mark.parametrize("case", ["supcon", "eps", "clip", "debiased_beta", "bcl_centers"])
@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize("backend", ["chunked", "reference", "triton"])
def test_compiled_fullgraph(case, reduction, backend):
    if backend not in CPU_BACKENDS or (backend != "chunked" and case not in ("supcon", "debiased_beta")):
        pytest.skip("chunked runs every case, the others two")
    loss, weight_shape, _, _, _, _ = CASES[case]
    t = _inputs(4)
    weight = _weight("random", weight_shape(4))

    def fn(t, w):
        return loss(t, backend=backend, reduction=reduction, weight=w)

    eager = _result_and_grads(fn, t, weight, reduction)
    torch._dynamo.reset()
    counters.clear()
    got = _result_and_grads(torch.compile(fn, fullgraph=True, backend="aot_eager"), t, weight, reduction)
    assert not counters["graph_break"], dict(counters["graph_break"])
    for i, (g, e) in enumerate(zip(got, eager)):
        assert_close(g, e, F64, f"compiled {case} {backend} {reduction} output {i}")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("variant", ["out", "in"])
def test_opcheck(reduction, variant):
    t = _inputs(4)
    spec = supcon_spec(t["f"], t["y"], temperature=t["tau"], base_temperature=0.5, variant=variant)
    weight = _weight("random", (spec.num_anchors,))
    spec = dataclasses.replace(spec, reduction=reduction, row_weight=weight)
    args = compiled.op_arguments(spec, "chunked")
    torch.library.opcheck(compiled.contrast, args)
    if reduction == "none":  # the backward op itself is not differentiated again (no double backward)
        plain = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
        torch.library.opcheck(compiled.contrast_backward, (torch.randn(spec.num_anchors, dtype=F64), *plain))


def test_weight_one_is_the_unweighted_loss():
    t = _inputs(6)
    for backend in ("chunked", "reference"):
        plain = fc.supcon_loss(t["f"], t["y"], backend=backend)
        ones = fc.supcon_loss(t["f"], t["y"], backend=backend, weight=torch.ones(6, 2, dtype=F64))
        assert_close(ones, plain, F64, backend)
        rows = fc.supcon_loss(t["f"], t["y"], backend=backend, reduction="none")
        assert_close(rows.mean(), plain, F64, backend + " none's mean")


def test_modules_take_reduction_and_weight():
    t = _inputs(4)
    weight = torch.rand(4, dtype=F64)
    module = fc.DCLLoss(temperature=0.2, reduction="sum")
    assert "reduction='sum'" in repr(module)
    assert_close(module(t["f"], weight=weight), fc.dcl_loss(t["f"], temperature=0.2, reduction="sum", weight=weight),
                 F64, "DCLLoss")
    rows = fc.ClipLoss(logit_scale=5.0, reduction="none")(t["f"][:, 0], t["f"][:, 1], weight=weight)
    assert rows.shape == (4,)
    assert fc.SupConLoss(reduction="none")(t["f"], t["y"], weight=weight).shape == (4, 2)
