"""Property tests (hypothesis): chunked == reference on arbitrary small inputs, and invariances."""
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fused_contrastive as fc

from helpers import assert_close, assert_close_rounded, rounding_allowance


@st.composite
def problems(draw):
    bsz = draw(st.integers(1, 24))
    n_views = draw(st.integers(1, 3))
    dim = draw(st.integers(1, 17))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    features = torch.randn(bsz, n_views, dim, generator=gen, dtype=torch.float64)
    if draw(st.booleans()):
        features = torch.nn.functional.normalize(features, dim=-1)
    kind = draw(st.sampled_from(["labels", "none", "mask"]))
    num_classes = draw(st.integers(1, bsz))
    labels = torch.randint(0, num_classes, (bsz,), generator=gen) if kind == "labels" else None
    mask = (torch.rand(bsz, bsz, generator=gen) < draw(st.floats(0, 1))).double() if kind == "mask" else None
    kwargs = dict(
        temperature=draw(st.floats(0.01, 2.0)),
        contrast_mode=draw(st.sampled_from(["all", "one"])),
        no_positive=draw(st.sampled_from(["zero", "exclude"])),
    )
    return features, labels, mask, kwargs


def loss_grad(features, labels, mask, backend, **kw):
    f = features.clone().requires_grad_()
    loss = fc.supcon_loss(f, labels, mask, backend=backend, **kw)
    return loss, torch.autograd.grad(loss, f)[0]


@settings(max_examples=60, deadline=None)
@given(problems())
def test_chunked_equals_reference(problem):
    features, labels, mask, kw = problem
    ref_loss, ref_grad = loss_grad(features, labels, mask, "reference", **kw)
    loss, grad = loss_grad(features, labels, mask, "chunked", **kw)
    # Where the true value is 0 (one sample's identical views: g = softmax - 1 = 0), both backends return
    # rounding residue that no relative comparison can take: an absolute error within the logits' rounding.
    loss_allowance, grad_allowance = rounding_allowance([features], kw["temperature"], 1.0, torch.float64, False)
    rows = features.shape[0] * features.shape[1]
    assert_close_rounded(loss, ref_loss, torch.float64, loss_allowance, "loss")
    assert_close_rounded(grad, ref_grad, torch.float64, grad_allowance * rows ** 0.5 / rows, "grad")


@settings(max_examples=30, deadline=None)
@given(problems(), st.integers(0, 2**31 - 1))
def test_permutation_and_label_renaming_invariance_and_nonnegativity(problem, seed):
    features, labels, mask, kw = problem
    bsz = features.shape[0]
    perm = torch.randperm(bsz, generator=torch.Generator().manual_seed(seed))
    base = fc.supcon_loss(features, labels, mask, **kw)
    p_labels = None if labels is None else labels[perm] * 7 + 3
    p_mask = None if mask is None else mask[perm][:, perm]
    permuted = fc.supcon_loss(features[perm], p_labels, p_mask, **kw)
    assert_close(permuted, base, torch.float64, "permuted")
    # LSE over A_i >= max over A_i >= mean over P_i (P_i is inside A_i): every row's loss is >= 0.
    assert base.item() >= -1e-12
