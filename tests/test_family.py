"""The contrastive-loss family against the independent float64 formulas in ``formulas.py``:
loss and the gradient of every tensor input, for every CPU backend that supports the loss,
plus pytorch-metric-learning parity where the math is identical, and argument errors."""
import pytest
import torch
import torch.nn.functional as F

import fused_contrastive as fc
import formulas
from helpers import CPU_BACKENDS, assert_close, make_features, runs_here

ALL = ("reference", "chunked", "triton")
# Which backends implement each loss (the implementation owns this table).
SUPPORTED = {
    "eps_supinfonce": ALL,
    "dcl": ALL,
    "info_nce": ALL,
    "clip": ALL,
    "debiased": ALL,
    "bcl": ALL,
    "spread": ALL,
    "supcon_extra_keys": ALL,
}
SIZES = [1, 2, 3, 64, 129]
DIM = 33
F64 = torch.float64


def backends(loss):
    return [b for b in CPU_BACKENDS if b in SUPPORTED[loss]]


def cases(loss, rows, sizes=SIZES):
    """(backend, bsz) pairs; ``rows(bsz)`` is the number of rows the Triton interpreter would see."""
    return [(b, n) for n in sizes for b in backends(loss) if runs_here(b, rows(n))]


def leaf(t):
    return t.detach().clone().to(F64).requires_grad_()


def check(backend, expected_fn, actual_fn, inputs, what="", zero_grads=()):
    """Loss and the gradient of every tensor in ``inputs`` (name -> leaf): backend vs formula.
    An input the loss does not use (grad None) must have an exactly-zero formula gradient. ``zero_grads``:
    inputs whose gradient is zero by the math (the formula's autograd leaves rounding residue there, which
    no relative comparison can take): the backend must give exactly zero."""
    names, leaves = list(inputs), list(inputs.values())
    expected = expected_fn()
    expected_grads = torch.autograd.grad(expected, leaves, allow_unused=True)
    actual = actual_fn()
    assert actual.dim() == 0 and actual.dtype == F64, f"{what}: loss shape {tuple(actual.shape)} dtype {actual.dtype}"
    grads = torch.autograd.grad(actual, leaves, allow_unused=True)
    assert_close(actual, expected, F64, f"{what} [{backend}] loss")
    for name, x, g, e in zip(names, leaves, grads, expected_grads):
        g = torch.zeros_like(x) if g is None else g
        e = torch.zeros_like(x) if e is None else e
        assert g.dtype == x.dtype and g.shape == x.shape, f"{what} [{backend}] grad {name}: {g.dtype} {tuple(g.shape)}"
        if name in zero_grads:
            assert float(e.abs().max()) < 1e-12 and bool((g == 0).all()), f"{what} [{backend}] grad {name}: {g}"
            continue
        assert_close(g, e, F64, f"{what} [{backend}] grad {name}")
    return actual


def labels_of(kind, bsz, seed=0):
    gen = torch.Generator().manual_seed(seed + 17)
    if kind == "random":
        return torch.randint(0, 5, (bsz,), generator=gen)
    if kind == "same":
        return torch.full((bsz,), 3)
    if kind == "distinct":
        return torch.arange(bsz)
    if kind == "none":
        return None
    raise ValueError(kind)


def randn(*shape, seed=0, normalize=True):
    t = torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)
    return leaf(F.normalize(t, dim=-1) if normalize else t)


# ------------------------------------------------------------------------------ eps-SupInfoNCE
def run_eps(backend, features, labels, **kw):
    return check(backend,
                 lambda: formulas.eps_supinfonce(features, labels, **kw),
                 lambda: fc.eps_supinfonce_loss(features, labels, backend=backend, **kw),
                 {"features": features}, f"eps_supinfonce {kw}")


@pytest.mark.parametrize("backend,bsz", cases("eps_supinfonce", lambda n: 2 * n))
@pytest.mark.parametrize("kind", ["random", "same", "distinct", "none"])
@pytest.mark.parametrize("mode", ["all", "one"])
def test_eps_supinfonce_sizes_labels_modes(backend, bsz, kind, mode, small_chunks):
    features = make_features(bsz, 2, DIM, seed=bsz)
    run_eps(backend, features, labels_of(kind, bsz, bsz), epsilon=0.1, temperature=0.1, base_temperature=0.07,
            contrast_mode=mode)


@pytest.mark.parametrize("backend", backends("eps_supinfonce"))
@pytest.mark.parametrize("temperature", [0.01, 0.05, 1.0])
@pytest.mark.parametrize("epsilon", [0.0, 0.5])
@pytest.mark.parametrize("n_views", [1, 3])
def test_eps_supinfonce_temperature_epsilon_views(backend, temperature, epsilon, n_views, small_chunks):
    features = make_features(37, n_views, DIM, seed=n_views)
    labels = torch.arange(37) % 9
    labels[:3] = 100 + torch.arange(3)  # singletons: no positive with one view
    for mode in ("all", "one"):
        run_eps(backend, features, labels, epsilon=epsilon, temperature=temperature, contrast_mode=mode)


@pytest.mark.parametrize("backend", backends("eps_supinfonce"))
def test_eps_supinfonce_no_positive_is_zero(backend):
    features = make_features(6, 1, 5)
    loss = run_eps(backend, features, torch.arange(6), epsilon=0.1, temperature=0.1)
    assert loss.item() == 0.0


def test_eps_supinfonce_formula_finite_at_low_temperature():
    features = make_features(40, 2, 16, seed=1)
    labels = torch.randint(0, 4, (40,), generator=torch.Generator().manual_seed(2))
    for mode in ("all", "one"):
        loss = formulas.eps_supinfonce(features, labels, temperature=0.01, contrast_mode=mode)
        (grad,) = torch.autograd.grad(loss, features)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()


# ------------------------------------------------------------------------------ DCL / DCLW
def run_dcl(backend, features, **kw):
    return check(backend,
                 lambda: formulas.dcl(features, **kw),
                 lambda: fc.dcl_loss(features, backend=backend, **kw),
                 {"features": features}, f"dcl {kw}")


@pytest.mark.parametrize("backend,bsz", cases("dcl", lambda n: 2 * n, [2, 3, 64, 129]))
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("normalize", [True, False])
def test_dcl_sizes(backend, bsz, weighted, normalize, small_chunks):
    features = make_features(bsz, 2, DIM, seed=bsz, normalize=normalize)
    run_dcl(backend, features, temperature=0.1, weighted=weighted)


@pytest.mark.parametrize("backend", backends("dcl"))
@pytest.mark.parametrize("temperature", [0.05, 1.0])
@pytest.mark.parametrize("sigma", [0.5, 2.0])
def test_dcl_temperature_sigma(backend, temperature, sigma):
    features = make_features(29, 2, DIM, seed=4, normalize=False)
    for weighted in (False, True):
        run_dcl(backend, features, temperature=temperature, weighted=weighted, sigma=sigma)


# ------------------------------------------------------------------------------ InfoNCE
def run_info_nce(backend, query, key, **kw):
    return check(backend,
                 lambda: formulas.info_nce(query, key, **kw),
                 lambda: fc.info_nce(query, key, backend=backend, **kw),
                 {"query": query, "key": key}, f"info_nce queue={kw.get('queue') is not None} {kw.get('in_batch_negatives')}")


QUEUE = 50


@pytest.mark.parametrize("backend,bsz", cases("info_nce", lambda n: 2 * n + QUEUE))
@pytest.mark.parametrize("queue_rows", [None, QUEUE])
@pytest.mark.parametrize("in_batch_negatives", [True, False])
def test_info_nce_sizes_queue(backend, bsz, queue_rows, in_batch_negatives, small_chunks):
    query, key = randn(bsz, DIM, seed=bsz), randn(bsz, DIM, seed=bsz + 1000)
    queue = None if queue_rows is None else randn(queue_rows, DIM, seed=7).detach()
    run_info_nce(backend, query, key, temperature=0.1, queue=queue, in_batch_negatives=in_batch_negatives)


@pytest.mark.parametrize("backend,bsz", cases("info_nce", lambda n: 2 * n, [1, 3, 64]))
@pytest.mark.parametrize("in_batch_negatives", [True, False])
@pytest.mark.parametrize("temperature", [0.05, 1.0])
def test_info_nce_symmetric(backend, bsz, in_batch_negatives, temperature, small_chunks):
    query, key = randn(bsz, DIM, seed=bsz), randn(bsz, DIM, seed=bsz + 1000)
    run_info_nce(backend, query, key, temperature=temperature, symmetric=True, in_batch_negatives=in_batch_negatives)


@pytest.mark.parametrize("backend", backends("info_nce"))
@pytest.mark.parametrize("temperature", [0.05, 1.0])
def test_info_nce_temperature_unnormalized_and_queue_gets_no_grad(backend, temperature):
    query, key = randn(21, DIM, seed=1, normalize=False), randn(21, DIM, seed=2, normalize=False)
    queue = randn(13, DIM, seed=3)  # requires grad: must receive none
    check(backend,
          lambda: formulas.info_nce(query, key, temperature=temperature, queue=queue),
          lambda: fc.info_nce(query, key, temperature=temperature, queue=queue, backend=backend),
          {"query": query, "key": key, "queue": queue}, "info_nce queue grad")


# ------------------------------------------------------------------------------ CLIP
def scale_of(kind, value=1 / 0.07):
    if kind == "float":
        return value
    return torch.tensor(value, dtype=F64, requires_grad=kind == "tensor_grad")


def bias_of(kind, value=-10.0):
    if kind is None or kind == "float":
        return None if kind is None else value
    return torch.tensor(value, dtype=F64, requires_grad=True)


def run_clip(backend, image, text, logit_scale, logit_bias=None):
    inputs = {"image": image, "text": text}
    for name, x in (("logit_scale", logit_scale), ("logit_bias", logit_bias)):
        if isinstance(x, torch.Tensor) and x.requires_grad:
            inputs[name] = x
    return check(backend,
                 lambda: formulas.clip(image, text, logit_scale, logit_bias=logit_bias),
                 lambda: fc.clip_loss(image, text, logit_scale, logit_bias=logit_bias, backend=backend),
                 inputs, "clip", zero_grads=("logit_bias",))  # softmax is shift-invariant


@pytest.mark.parametrize("backend,bsz", cases("clip", lambda n: 2 * n))
@pytest.mark.parametrize("scale_kind,bias_kind", [("float", None), ("tensor", "float"), ("tensor_grad", None),
                                                  ("tensor_grad", "tensor_grad"), ("float", "tensor_grad")])
def test_clip_sizes_scale_bias(backend, bsz, scale_kind, bias_kind, small_chunks):
    image, text = randn(bsz, DIM, seed=bsz), randn(bsz, DIM, seed=bsz + 1000)
    run_clip(backend, image, text, scale_of(scale_kind), bias_of(bias_kind))


@pytest.mark.parametrize("backend", backends("clip"))
@pytest.mark.parametrize("scale", [1.0, 20.0, 100.0])
def test_clip_bias_leaves_loss_unchanged(backend, scale):
    image, text = randn(17, DIM, seed=1), randn(17, DIM, seed=2)
    plain = run_clip(backend, image, text, scale_of("tensor_grad", scale))
    for bias in (-10.0, torch.tensor(3.5, dtype=F64, requires_grad=True)):
        biased = run_clip(backend, image, text, scale_of("tensor_grad", scale), bias)
        assert_close(biased, plain, F64, "loss with logit_bias")


# ------------------------------------------------------------------------------ debiased / hard negatives
TAU_BETA = [(0.1, 0.0), (0.0, 0.0), (0.1, 1.0), (0.5, 0.5), (0.9, 1.0)]  # (0.9, 1.0): floor active on some rows


def run_debiased(backend, features, **kw):
    return check(backend,
                 lambda: formulas.debiased(features, **kw),
                 lambda: fc.debiased_contrastive_loss(features, backend=backend, **kw),
                 {"features": features}, f"debiased {kw}")


@pytest.mark.parametrize("backend,bsz", cases("debiased", lambda n: 2 * n, [2, 3, 64, 129]))
@pytest.mark.parametrize("tau_plus,beta", [(0.1, 0.0), (0.1, 1.0)])
def test_debiased_sizes(backend, bsz, tau_plus, beta, small_chunks):
    features = make_features(bsz, 2, DIM, seed=bsz)
    run_debiased(backend, features, temperature=0.5, tau_plus=tau_plus, beta=beta)


@pytest.mark.parametrize("backend", backends("debiased"))
@pytest.mark.parametrize("temperature", [0.1, 0.5, 1.0])
@pytest.mark.parametrize("tau_plus,beta", TAU_BETA)
def test_debiased_temperature_tau_beta(backend, temperature, tau_plus, beta, small_chunks):
    features = make_features(37, 2, DIM, seed=2)
    run_debiased(backend, features, temperature=temperature, tau_plus=tau_plus, beta=beta)


# ------------------------------------------------------------------------------ BCL
def run_bcl(backend, features, labels, class_centers=None, **kw):
    inputs = {"features": features}
    if class_centers is not None:
        inputs["class_centers"] = class_centers
    return check(backend,
                 lambda: formulas.bcl(features, labels, class_centers=class_centers, **kw),
                 lambda: fc.bcl_loss(features, labels, class_centers=class_centers, backend=backend, **kw),
                 inputs, f"bcl centers={class_centers is not None}")


def centers_for(labels, seed=0, spare=2):
    """C = max label + 1 + spare: some centres have no sample in the batch."""
    return randn(int(labels.max()) + 1 + spare, DIM, seed=seed + 300)


@pytest.mark.parametrize("backend,bsz", cases("bcl", lambda n: 2 * n + n + 2))
@pytest.mark.parametrize("kind", ["random", "same", "distinct"])
@pytest.mark.parametrize("with_centers", [False, True])
def test_bcl_sizes_labels_centers(backend, bsz, kind, with_centers, small_chunks):
    features = make_features(bsz, 2, DIM, seed=bsz)
    labels = labels_of(kind, bsz, bsz)
    centers = centers_for(labels, bsz) if with_centers else None
    run_bcl(backend, features, labels, centers, temperature=0.1)


@pytest.mark.parametrize("backend", backends("bcl"))
@pytest.mark.parametrize("temperature", [0.05, 1.0])
def test_bcl_temperatures(backend, temperature, small_chunks):
    features = make_features(41, 2, DIM, seed=3)
    labels = labels_of("random", 41, 3)
    run_bcl(backend, features, labels * 7 - 3, None, temperature=temperature)  # arbitrary label values
    run_bcl(backend, features, labels, centers_for(labels, 3), temperature=temperature)


# ------------------------------------------------------------------------------ spread
def run_spread(backend, features, labels, **kw):
    return check(backend,
                 lambda: formulas.spread(features, labels, **kw),
                 lambda: fc.spread_loss(features, labels, backend=backend, **kw),
                 {"features": features}, "spread")


@pytest.mark.parametrize("backend,bsz", cases("spread", lambda n: 2 * n))
@pytest.mark.parametrize("kind", ["random", "same", "distinct"])
def test_spread_sizes_labels(backend, bsz, kind, small_chunks):
    features = make_features(bsz, 2, DIM, seed=bsz)
    loss = run_spread(backend, features, labels_of(kind, bsz, bsz), temperature=0.5)
    if kind == "distinct":  # the positive is the whole denominator
        assert abs(loss.item()) < 1e-12


@pytest.mark.parametrize("backend", backends("spread"))
@pytest.mark.parametrize("temperature", [0.05, 1.0])
def test_spread_temperatures(backend, temperature, small_chunks):
    features = make_features(41, 2, DIM, seed=5, normalize=False)
    run_spread(backend, features, labels_of("random", 41, 5), temperature=temperature)


# ------------------------------------------------------------------------------ SupCon with extra keys
EXTRA = 11


def run_extra(backend, features, labels, extra_keys, extra_key_labels, **kw):
    return check(backend,
                 lambda: formulas.supcon_extra_keys(features, labels, extra_keys, extra_key_labels, **kw),
                 lambda: fc.supcon_loss(features, labels, extra_keys=extra_keys, extra_key_labels=extra_key_labels,
                                        backend=backend, **kw),
                 {"features": features, "extra_keys": extra_keys}, f"supcon extra keys {kw}")


def extra_labels_of(kind, seed=0):
    gen = torch.Generator().manual_seed(seed + 99)
    if kind == "distinct":  # never a positive: with one view no anchor has a positive
        return -1000 - torch.arange(EXTRA)
    if kind == "same":
        return torch.tensor([3, 3, 3, 8, 8, 3, 3, 9, 3, 3, 3])
    return torch.randint(0, 7, (EXTRA,), generator=gen)  # some labels absent from the batch


@pytest.mark.parametrize("backend,bsz", cases("supcon_extra_keys", lambda n: 2 * n + EXTRA))
@pytest.mark.parametrize("n_views", [1, 2])
@pytest.mark.parametrize("kind", ["random", "same", "distinct"])
@pytest.mark.parametrize("mode", ["all", "one"])
def test_supcon_extra_keys_sizes(backend, bsz, n_views, kind, mode, small_chunks):
    if n_views == 1 and mode == "one":
        pytest.skip("with one view 'one' is 'all'")
    features = make_features(bsz, n_views, DIM, seed=bsz)
    extra = randn(EXTRA, DIM, seed=bsz + 500)
    loss = run_extra(backend, features, labels_of(kind, bsz, bsz), extra, extra_labels_of(kind, bsz),
                     temperature=0.1, base_temperature=0.07, contrast_mode=mode)
    if kind == "distinct" and n_views == 1:
        assert loss.item() == 0.0


@pytest.mark.parametrize("backend", backends("supcon_extra_keys"))
@pytest.mark.parametrize("temperature", [0.05, 1.0])
@pytest.mark.parametrize("base_temperature", [None, 0.07])
def test_supcon_extra_keys_temperatures(backend, temperature, base_temperature, small_chunks):
    features = make_features(30, 2, DIM, seed=6)
    extra = randn(40, DIM, seed=7, normalize=False)
    labels = labels_of("random", 30, 6)
    extra_labels = torch.randint(0, 7, (40,), generator=torch.Generator().manual_seed(8))
    for mode in ("all", "one"):
        run_extra(backend, features, labels, extra, extra_labels, temperature=temperature,
                  base_temperature=base_temperature, contrast_mode=mode)


# ------------------------------------------------------------------------------ pytorch-metric-learning parity
def pml_ntxent(embeddings, labels, temperature, **kw):
    pml = pytest.importorskip("pytorch_metric_learning")
    from pytorch_metric_learning.losses import NTXentLoss

    assert pml.__version__
    return NTXentLoss(temperature=temperature)(embeddings, labels, **kw)


def ntxent_of_views(features, temperature):
    """pml's NT-Xent on the 2B view rows, labels = sample ids (one positive per anchor)."""
    bsz = features.shape[0]
    return pml_ntxent(torch.cat(torch.unbind(features, 1)), torch.arange(bsz).repeat(2), temperature)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("bsz", [2, 3, 64])
@pytest.mark.parametrize("temperature", [0.05, 0.5])
def test_supcon_two_views_distinct_matches_pml_ntxent(backend, bsz, temperature):
    # pml averages over positive pairs, each with its own denominator: equal to SupCon only with
    # exactly one positive per anchor (2 views, no labels). pml normalises: so do we, first.
    raw = make_features(bsz, 2, DIM, seed=bsz, normalize=False)
    check(backend,
          lambda: ntxent_of_views(raw, temperature),
          lambda: fc.supcon_loss(F.normalize(raw, dim=-1), temperature=temperature, base_temperature=temperature,
                                 backend=backend),
          {"features": raw}, "supcon vs pml NTXent")


@pytest.mark.parametrize("bsz", [2, 5, 40])
@pytest.mark.parametrize("temperature", [0.1, 0.5, 1.0])
def test_formulas_match_pml_ntxent_where_identical(bsz, temperature):
    raw = make_features(bsz, 2, DIM, seed=bsz, normalize=False)
    unit = F.normalize(raw, dim=-1)
    expected = ntxent_of_views(raw, temperature)
    same = torch.zeros(bsz, dtype=torch.long)
    identical = {
        # one positive per anchor and the denominator = positive + all negatives
        "eps_supinfonce(epsilon=0)": formulas.eps_supinfonce(unit, epsilon=0.0, temperature=temperature),
        # without debiasing and hardness, the floor Nn*exp(-1/t) is inactive on unit vectors
        "debiased(tau_plus=0, beta=0)": formulas.debiased(unit, temperature=temperature, tau_plus=0.0, beta=0.0),
        # one class: the denominator is every other row
        "symmetric_spread(one class)": formulas.symmetric_spread(unit, same, temperature=temperature),
    }
    (expected_grad,) = torch.autograd.grad(expected, raw)
    for name, value in identical.items():
        (grad,) = torch.autograd.grad(value, raw, retain_graph=True)
        assert_close(value, expected, F64, name)
        assert_close(grad, expected_grad, F64, f"{name} grad")
    # InfoNCE (in-batch) = NT-Xent of queries against a separate reference set (no self pair)
    query, key = raw[:, 0], raw[:, 1]
    ids = torch.arange(bsz)
    pml_value = pml_ntxent(query, ids, temperature, ref_emb=key, ref_labels=ids.clone())
    ours = formulas.info_nce(F.normalize(query, dim=-1), F.normalize(key, dim=-1), temperature=temperature)
    assert_close(ours, pml_value, F64, "info_nce vs pml NTXent(ref_emb)")
    assert_close(torch.autograd.grad(ours, raw)[0], torch.autograd.grad(pml_value, raw)[0], F64, "info_nce grad")


def test_formulas_clip_is_symmetric_info_nce():
    image, text = randn(9, DIM, seed=1), randn(9, DIM, seed=2)
    for temperature in (0.05, 1.0):
        assert_close(formulas.clip(image, text, 1 / temperature),
                     formulas.info_nce(image, text, temperature=temperature, symmetric=True), F64, "clip")


# ------------------------------------------------------------------------------ argument errors
def _f(*shape):
    return torch.randn(*shape, dtype=F64)


ERRORS = [
    ("dclw features [B,3,D]", lambda: fc.dcl_loss(_f(4, 3, 8), weighted=True), "features"),
    ("dcl features [B,D]", lambda: fc.dcl_loss(_f(4, 8)), "features"),
    ("info_nce shape mismatch", lambda: fc.info_nce(_f(4, 8), _f(5, 8)), "query|key"),
    ("info_nce dim mismatch", lambda: fc.info_nce(_f(4, 8), _f(4, 9)), "query|key"),
    ("clip logit_scale 0", lambda: fc.clip_loss(_f(4, 8), _f(4, 8), 0.0), "logit_scale"),
    ("clip logit_scale < 0", lambda: fc.clip_loss(_f(4, 8), _f(4, 8), -1.0), "logit_scale"),
    ("clip logit_scale tensor < 0", lambda: fc.clip_loss(_f(4, 8), _f(4, 8), torch.tensor(-2.0, dtype=F64)),
     "logit_scale"),
    ("debiased tau_plus < 0", lambda: fc.debiased_contrastive_loss(_f(4, 2, 8), tau_plus=-0.1), "tau_plus"),
    ("debiased tau_plus = 1", lambda: fc.debiased_contrastive_loss(_f(4, 2, 8), tau_plus=1.0), "tau_plus"),
    ("debiased tau_plus > 1", lambda: fc.debiased_contrastive_loss(_f(4, 2, 8), tau_plus=1.5), "tau_plus"),
    ("bcl label = C", lambda: fc.bcl_loss(_f(4, 2, 8), torch.tensor([0, 1, 2, 3]), class_centers=_f(3, 8)), "labels"),
    ("bcl label < 0", lambda: fc.bcl_loss(_f(4, 2, 8), torch.tensor([0, -1, 2, 1]), class_centers=_f(3, 8)), "labels"),
    ("spread labels length", lambda: fc.spread_loss(_f(4, 2, 8), torch.tensor([0, 1, 2])), "labels"),
    ("supcon extra_keys D", lambda: fc.supcon_loss(_f(4, 2, 8), torch.arange(4), extra_keys=_f(3, 9),
                                                   extra_key_labels=torch.arange(3)), "extra_keys"),
    ("supcon extra_key_labels missing", lambda: fc.supcon_loss(_f(4, 2, 8), torch.arange(4), extra_keys=_f(3, 8)),
     "extra_key_labels"),
]


@pytest.mark.parametrize("name,call,match", ERRORS, ids=[e[0] for e in ERRORS])
def test_argument_errors(name, call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_dcl_needs_two_samples():
    with pytest.raises(ValueError):
        fc.dcl_loss(_f(1, 2, 8))
