"""Every loss under torch.compile(fullgraph=True) is the one custom op fused_contrastive::contrast: no graph
break, the eager loss and gradients, value errors as ValueError when the graph runs, no gradient work
without grad."""
import copy
import dataclasses

import pytest
import torch
from torch._dynamo.utils import counters

import fused_contrastive as fc
from fused_contrastive import chunked, compiled, dispatch
from helpers import assert_close, make_features

LABELS = torch.tensor([0, 1, 2, 0, 1, 2, 3])
GROUP = object()  # stands for a process group: refused under compile before it is used
MASK = (torch.rand(7, 7, generator=torch.Generator().manual_seed(2)) < 0.4).double() * 1.5


def _inputs():
    features = make_features(7, 2, 5, seed=5)
    query, key = (features[:, v].detach().clone().requires_grad_() for v in (0, 1))
    return dict(features=features, query=query, key=key,
                tau=torch.tensor(0.3, dtype=torch.float64, requires_grad=True),
                scale=torch.tensor(4.0, dtype=torch.float64, requires_grad=True),
                extra=make_features(4, 1, 5, seed=6)[:, 0].detach().requires_grad_(),
                centers=make_features(4, 1, 5, seed=7)[:, 0].detach().requires_grad_())


# name -> (module, call(module, inputs)); every loss with each option family.
CASES = {
    "supcon": (fc.SupConLoss(temperature=0.2, base_temperature=0.1, normalize=True),
               lambda m, t: m(t["features"] * 2.0, LABELS)),
    "supcon_tau": (None, lambda m, t: fc.supcon_loss(t["features"], LABELS, temperature=t["tau"], base_temperature=0.5)),
    "simclr_one": (fc.SupConLoss(contrast_mode="one", no_positive="exclude"), lambda m, t: m(t["features"])),
    "mask_in": (fc.SupConLoss(variant="in"), lambda m, t: m(t["features"], mask=MASK)),
    "extra_keys": (fc.SupConLoss(), lambda m, t: m(t["features"], LABELS, extra_keys=t["extra"],
                                                   extra_key_labels=torch.tensor([0, 3, 9, 9]))),
    "eps": (fc.EpsSupInfoNCELoss(epsilon=0.2, contrast_mode="one"), lambda m, t: m(t["features"], LABELS)),
    "dcl": (fc.DCLLoss(), lambda m, t: m(t["features"])),
    "dclw": (fc.DCLLoss(weighted=True), lambda m, t: m(t["features"])),
    "info_nce": (fc.InfoNCELoss(temperature=0.2), lambda m, t: m(t["query"], t["key"])),
    "info_nce_queue": (fc.InfoNCELoss(in_batch_negatives=False), lambda m, t: m(t["query"], t["key"], queue=t["extra"])),
    "info_nce_symmetric": (fc.InfoNCELoss(symmetric=True), lambda m, t: m(t["query"], t["key"])),
    "clip": (fc.ClipLoss(), lambda m, t: m(t["query"], t["key"], t["scale"])),
    "debiased": (fc.DebiasedContrastiveLoss(), lambda m, t: m(t["features"])),
    "debiased_beta": (fc.DebiasedContrastiveLoss(beta=0.5, tau_plus=0.2), lambda m, t: m(t["features"])),
    "bcl": (fc.BCLLoss(), lambda m, t: m(t["features"], LABELS)),
    "bcl_centers": (fc.BCLLoss(), lambda m, t: m(t["features"], LABELS, class_centers=t["centers"])),
    "spread": (fc.SpreadLoss(), lambda m, t: m(t["features"], LABELS * 2.5)),
    "spread_3views_bank": (fc.SpreadLoss(normalize=True), lambda m, t: m(
        torch.stack([t["features"][:, 0], t["features"][:, 1], t["query"]], 1), LABELS,
        extra_keys=t["extra"], extra_key_labels=torch.tensor([0, 3, 9, 9]))),
    "symmetric_spread": (fc.SymmetricSpreadLoss(), lambda m, t: m(t["features"], LABELS)),
    "dclw_learned": (fc.DCLLoss(weighted=True, detach_weight=False, normalize=True), lambda m, t: m(t["features"])),
    "debiased_3views": (fc.DebiasedContrastiveLoss(beta=0.5), lambda m, t: m(
        torch.stack([t["features"][:, 0], t["features"][:, 1], t["key"]], 1))),
    "unicon": (fc.UniConLoss(contrast_mode="one"), lambda m, t: m(t["features"], torch.cat([t["query"], t["key"]]),
                                                                 LABELS)),
    "suncet": (fc.SuNCEtLoss(), lambda m, t: m(t["features"], LABELS, support=t["extra"],
                                              support_labels=torch.tensor([0, 3, 9, 9]))),
}


def _loss_and_grads(fn, inputs):
    loss = fn(inputs)
    leaves = [v for v in inputs.values() if v.requires_grad]
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    return [loss] + [torch.zeros_like(x) if g is None else g for g, x in zip(grads, leaves)]


def _compiled(fn, backend="aot_eager"):
    torch._dynamo.reset()
    counters.clear()
    return torch.compile(fn, fullgraph=True, backend=backend)


# Every case on chunked; a few on the reference (autograd inside the op) and Triton (slow interpreter).
BACKEND_CASES = [(c, "chunked") for c in CASES] + [(c, b) for b in ("reference", "triton")
                                                    for c in ("supcon_tau", "debiased_beta", "clip")]


@pytest.mark.parametrize("case,backend", BACKEND_CASES)
def test_every_loss_compiles_whole(case, backend):
    module, call = CASES[case]
    if isinstance(module, fc.SupConLoss):
        module = copy.copy(module)
        module.backend = backend
    elif module is not None:
        module = type(module)(**{**module.kwargs, "backend": backend})

    def fn(t):
        if module is None:
            return fc.supcon_loss(t["features"], LABELS, temperature=t["tau"], base_temperature=0.5, backend=backend)
        return call(module, t)

    inputs = _inputs()
    eager = _loss_and_grads(fn, inputs)
    got = _loss_and_grads(_compiled(fn), inputs)
    assert not counters["graph_break"], dict(counters["graph_break"])
    for i, (g, e) in enumerate(zip(got, eager)):
        assert_close(g, e, torch.float64, f"{case} {'loss' if i == 0 else f'grad {i}'}")


def test_inductor_clip():
    inputs = _inputs()
    fn = lambda t: fc.clip_loss(t["query"].float(), t["key"].float(), t["scale"].float())  # noqa: E731
    eager = _loss_and_grads(fn, inputs)
    got = _loss_and_grads(_compiled(fn, "inductor"), inputs)
    for g, e in zip(got, eager):
        assert_close(g, e, torch.float32, "clip under inductor")


@pytest.mark.parametrize("case", ["supcon_tau", "mask_in", "info_nce_queue", "debiased_beta", "bcl"])
def test_opcheck(case, monkeypatch):
    specs = []
    monkeypatch.setattr(compiled, "run", lambda spec, backend="auto", names=None: specs.append(spec) or spec.keys.sum())
    _, call = CASES[case]
    t = _inputs()
    if case == "supcon_tau":
        fc.supcon_loss(t["features"], LABELS, temperature=t["tau"])
    else:
        call(CASES[case][0], t)
    for spec in specs:
        torch.library.opcheck(compiled.contrast, compiled.op_arguments(spec, "chunked"))


@pytest.mark.parametrize("bad", ["nan_labels", "mask", "temperature", "logit_scale", "bcl_labels", "finite",
                                 "contrast_mode", "process_group"])
def test_value_errors_under_compile(bad, monkeypatch):
    f = make_features(7, 2, 5).detach()
    calls = {
        "nan_labels": (lambda x: fc.supcon_loss(x, LABELS.double().index_fill(0, torch.tensor([2]), float("nan"))),
                       "labels must not contain NaN"),
        "mask": (lambda x: fc.supcon_loss(x, mask=-MASK), "mask must hold finite, non-negative"),
        "temperature": (lambda x: fc.supcon_loss(x, LABELS, temperature=torch.tensor(-0.5)), "temperature must be"),
        "logit_scale": (lambda x: fc.clip_loss(x[:, 0], x[:, 1], torch.tensor(0.0)), "logit_scale must be"),
        "bcl_labels": (lambda x: fc.bcl_loss(x, LABELS + 3, class_centers=x[:4, 0]), r"labels must be integers in \[0, C\)"),
        "finite": (lambda x: fc.dcl_loss(x * float("inf")), "features must be finite"),
        # Found while tracing: the graph raises them when it runs (not Dynamo's "Observed exception").
        "contrast_mode": (lambda x: fc.eps_supinfonce_loss(x, contrast_mode="both"), "contrast_mode must be one of"),
        "process_group": (lambda x: fc.spread_loss(x, LABELS, process_group=GROUP), "process_group cannot be combined"),
    }
    if bad == "finite":
        monkeypatch.setenv(compiled.CHECK_FINITE_ENV, "1")
    fn, message = calls[bad]
    compiled_fn = _compiled(fn)
    with pytest.raises(ValueError, match=message):
        compiled_fn(f)


@pytest.mark.parametrize("mode", ["eager", "compiled"])
@pytest.mark.parametrize("grad", ["no_grad", "no_input_requires_grad"])
def test_forward_only_does_no_gradient_work(mode, grad, monkeypatch):
    """Neither the backend's gradient path nor a gradient tile runs when nothing needs a gradient."""
    want = []
    original = chunked._forward

    def spy(spec, Q, K, tau, want_grad):
        want.append(want_grad)
        return original(spec, Q, K, tau, want_grad)

    def no_grads(spec):
        raise AssertionError("loss_and_grads called for a forward without gradients")

    monkeypatch.setattr(chunked, "_forward", spy)
    monkeypatch.setitem(dispatch.BACKENDS, "chunked",
                        dataclasses.replace(dispatch.BACKENDS["chunked"], loss_and_grads=no_grads))
    features = make_features(7, 2, 5)
    features = features if grad == "no_grad" else features.detach()

    def fn(x):
        return (fc.supcon_loss(x, LABELS, backend="chunked") + fc.eps_supinfonce_loss(x, LABELS, backend="chunked")
                + fc.info_nce(x[:, 0], x[:, 1], backend="chunked"))

    fn = fn if mode == "eager" else _compiled(fn)
    with torch.set_grad_enabled(grad != "no_grad"):
        loss = fn(features)
    expected = (fc.supcon_loss(features, LABELS, backend="reference")
                + fc.eps_supinfonce_loss(features, LABELS, backend="reference")
                + fc.info_nce(features[:, 0], features[:, 1], backend="reference"))
    assert_close(loss, expected, torch.float64, "forward-only loss")
    assert want and not any(want), want


@pytest.mark.parametrize("labels", [[3, -1, 3, 7, -1], [True, False, True], [0.5, -0.0, 0.0, 2.5, 0.5], [4]])
def test_sort_based_class_ids_are_unique_inverse(labels):
    from fused_contrastive.losses import dense_ids

    labels = torch.tensor(labels)
    ids, count = dense_ids(labels)
    unique, inverse = torch.unique(labels, return_inverse=True)
    assert torch.equal(ids, inverse) and count == unique.numel()
