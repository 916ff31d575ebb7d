"""The authors' spread, DCLW through its weight, UniCon, SuNCEt, and DCL / debiased / spread with any number of
views and ``normalize=``: every CPU backend against the float64 formulas (loss and every input's gradient),
degenerate batches, temperatures 0.01-1, modules, and the relations the docstrings state."""
import pytest
import torch
import torch.nn.functional as F

import fused_contrastive as fc
import formulas
from helpers import CPU_BACKENDS, assert_close, make_features
from test_family import check, randn

F64 = torch.float64
DIM = 11
LABEL_KINDS = {
    "random": lambda n: torch.arange(n) % 3,
    "one class": lambda n: torch.zeros(n, dtype=torch.long),
    "singletons": lambda n: torch.arange(n) * 2 + 1,
}


def features_of(bsz, n_views, seed=0, normalize=True):
    return make_features(bsz, n_views, DIM, seed=seed, normalize=normalize)


# ------------------------------------------------------------------------------ spread (the authors')
def test_spread_is_the_authors_number():
    """The issue's batch: 4 samples, labels [0, 0, 1, 1], tau 0.5 (authors 0.330162; the old form 0.650029)."""
    torch.manual_seed(0)
    features = F.normalize(torch.randn(4, 2, 8, dtype=F64), dim=-1)
    labels = torch.tensor([0, 0, 1, 1])
    for backend in CPU_BACKENDS:
        assert abs(fc.spread_loss(features, labels, backend=backend).item() - 0.330162) < 1e-6
        assert abs(fc.symmetric_spread_loss(features, labels, backend=backend).item() - 0.650029) < 1e-6
    assert abs(formulas.spread(features, labels).item() - 0.330162) < 1e-6


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("kind", list(LABEL_KINDS))
@pytest.mark.parametrize("n_views,temperature,normalize", [(2, 0.5, False), (3, 0.01, True), (4, 1.0, False)])
@pytest.mark.parametrize("symmetric", [False, True])
def test_spread_forms(backend, kind, n_views, temperature, normalize, symmetric, small_chunks):
    features = features_of(9, n_views, seed=n_views, normalize=not normalize)
    labels = LABEL_KINDS[kind](9)
    formula, loss = (formulas.symmetric_spread, fc.symmetric_spread_loss) if symmetric else (formulas.spread,
                                                                                                fc.spread_loss)
    kw = dict(temperature=temperature, normalize=normalize)
    value = check(backend, lambda: formula(features, labels, **kw),
                  lambda: loss(features, labels, backend=backend, **kw),
                  {"features": features}, f"spread symmetric={symmetric} {kind} V={n_views}")
    if kind == "singletons" and not symmetric:  # the positive is the whole denominator
        assert abs(value.item()) < 1e-12


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("symmetric", [False, True])
def test_spread_bank(backend, symmetric, small_chunks):
    features, bank = features_of(7, 3, seed=3), randn(5, DIM, seed=4)
    labels, bank_labels = torch.arange(7) % 3, torch.tensor([0, 2, 2, 7, 1])
    formula, loss = (formulas.symmetric_spread, fc.symmetric_spread_loss) if symmetric else (formulas.spread,
                                                                                                fc.spread_loss)
    kw = dict(temperature=0.2, extra_keys=bank, extra_key_labels=bank_labels)
    check(backend, lambda: formula(features, labels, **kw), lambda: loss(features, labels, backend=backend, **kw),
          {"features": features, "extra_keys": bank}, f"spread bank symmetric={symmetric}")


# ------------------------------------------------------------------------------ DCL / DCLW
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("weighted,detach_weight", [(False, True), (True, True), (True, False)])
@pytest.mark.parametrize("temperature,normalize", [(0.01, True), (0.1, False), (1.0, True)])
def test_dcl_weight_and_normalize(backend, weighted, detach_weight, temperature, normalize, small_chunks):
    features = features_of(9, 2, seed=5, normalize=False)
    kw = dict(temperature=temperature, weighted=weighted, detach_weight=detach_weight, normalize=normalize, sigma=0.7)
    check(backend, lambda: formulas.dcl(features, **kw), lambda: fc.dcl_loss(features, backend=backend, **kw),
          {"features": features}, f"dcl {kw}")


def test_dcl_weight_gradient_is_there():
    """detach_weight=False changes the gradient (not the loss) on unit features, where both weights are equal."""
    features = features_of(6, 2, seed=2)
    detached = fc.dcl_loss(features, weighted=True, backend="chunked")
    learned = fc.dcl_loss(features, weighted=True, detach_weight=False, backend="chunked")
    assert_close(learned, detached, F64, "loss")
    g_detached, = torch.autograd.grad(detached, features)
    g_learned, = torch.autograd.grad(learned, features)
    assert float((g_learned - g_detached).norm()) > 1e-3 * float(g_detached.norm())


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("n_views", [3, 4])
def test_dcl_views_and_bank(backend, n_views, small_chunks):
    features, bank = features_of(5, n_views, seed=n_views), randn(4, DIM, seed=9)
    kw = dict(temperature=0.2, extra_keys=bank)
    check(backend, lambda: formulas.dcl(features, **kw), lambda: fc.dcl_loss(features, backend=backend, **kw),
          {"features": features, "extra_keys": bank}, f"dcl V={n_views}")


# ------------------------------------------------------------------------------ debiased / hard negatives
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("n_views", [2, 3])
@pytest.mark.parametrize("tau_plus,beta,temperature", [(0.1, 0.0, 0.1), (0.1, 1.0, 0.5), (0.9, 1.0, 1.0)])
def test_debiased_views_normalize(backend, n_views, tau_plus, beta, temperature, small_chunks):
    features, bank = features_of(6, n_views, seed=n_views, normalize=False), randn(3, DIM, seed=8, normalize=False)
    kw = dict(temperature=temperature, tau_plus=tau_plus, beta=beta, normalize=True, extra_keys=bank)
    check(backend, lambda: formulas.debiased(features, **kw),
          lambda: fc.debiased_contrastive_loss(features, backend=backend, **kw),
          {"features": features, "extra_keys": bank}, f"debiased V={n_views} {kw}")


# ------------------------------------------------------------------------------ UniCon
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("kind", list(LABEL_KINDS))
@pytest.mark.parametrize("mode,n_views", [("all", 2), ("one", 2), ("all", 3)])
@pytest.mark.parametrize("temperature,base_temperature,normalize", [(0.01, None, True), (0.1, 0.07, False),
                                                                     (1.0, None, False)])
def test_unicon(backend, kind, mode, n_views, temperature, base_temperature, normalize, small_chunks):
    features = features_of(7, n_views, seed=1)
    universum = randn(7 * n_views, DIM, seed=2, normalize=not normalize)
    labels = LABEL_KINDS[kind](7)
    kw = dict(temperature=temperature, base_temperature=base_temperature, contrast_mode=mode, normalize=normalize)
    value = check(backend, lambda: formulas.unicon(features, universum, labels, **kw),
                  lambda: fc.unicon_loss(features, universum, labels, backend=backend, **kw),
                  {"features": features, "universum": universum}, f"unicon {kind} {kw}")
    if kind == "singletons" and n_views == 1:
        assert value.item() == 0.0
    # the [bsz, n_views, D] layout of the same universum gives the same loss
    grid = universum.detach().reshape(n_views, 7, DIM).transpose(0, 1)
    assert_close(fc.unicon_loss(features, grid, labels, backend=backend, **kw), value, F64, "universum [bsz, V, D]")


def test_unicon_singletons_one_view_is_zero():
    features = features_of(5, 1, seed=3)
    loss = fc.unicon_loss(features, randn(5, DIM, seed=4), torch.arange(5))
    assert loss.item() == 0.0
    loss.backward()
    assert bool((features.grad == 0).all())


# ------------------------------------------------------------------------------ SuNCEt
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("kind", list(LABEL_KINDS))
@pytest.mark.parametrize("mode,n_views,with_support", [("all", 1, False), ("all", 2, True), ("one", 2, True)])
@pytest.mark.parametrize("temperature,normalize", [(0.01, True), (0.1, False), (1.0, True)])
def test_suncet(backend, kind, mode, n_views, with_support, temperature, normalize, small_chunks):
    features = features_of(8, n_views, seed=6, normalize=not normalize)
    labels = LABEL_KINDS[kind](8)
    inputs = {"features": features}
    kw = dict(temperature=temperature, contrast_mode=mode, normalize=normalize)
    if with_support:
        inputs["support"] = kw["support"] = randn(6, DIM, seed=7)
        kw["support_labels"] = torch.tensor([0, 1, 1, 2, 3, 9])
    if kind == "one class" and not with_support:  # every key is a positive: exactly 0 by the math, rounding here
        loss = fc.suncet_loss(features, labels, backend=backend, **kw)
        grad, = torch.autograd.grad(loss, features)
        assert abs(loss.item()) < 1e-12 and float(grad.norm()) < 1e-12
        return
    check(backend, lambda: formulas.suncet(features, labels, **kw),
          lambda: fc.suncet_loss(features, labels, backend=backend, **kw), inputs, f"suncet {kind} {kw}")


def test_suncet_is_l_in_without_log_count():
    features, labels = features_of(10, 2, seed=1), torch.arange(10) % 4
    l_in = fc.supcon_loss(features, labels, temperature=0.2, variant="in")
    suncet = fc.suncet_loss(features, labels, temperature=0.2)
    counts = torch.tensor([float((labels == y).sum() * 2 - 1) for y in labels.repeat(2)], dtype=F64)
    assert_close(suncet, l_in - torch.log(counts).mean(), F64, "L_in - mean log |P_i|")
    assert_close(torch.autograd.grad(suncet, features)[0], torch.autograd.grad(l_in, features)[0], F64, "grad")


# ------------------------------------------------------------------------------ modules and errors
MODULES = [
    (fc.SpreadLoss, fc.spread_loss, dict(temperature=0.3, normalize=True), lambda f, u, y: ((f, y), {})),
    (fc.SymmetricSpreadLoss, fc.symmetric_spread_loss, dict(temperature=0.3), lambda f, u, y: ((f, y), {})),
    (fc.DCLLoss, fc.dcl_loss, dict(weighted=True, detach_weight=False), lambda f, u, y: ((f,), {})),
    (fc.DebiasedContrastiveLoss, fc.debiased_contrastive_loss, dict(normalize=True), lambda f, u, y: ((f,), {})),
    (fc.UniConLoss, fc.unicon_loss, dict(temperature=0.2, base_temperature=0.1), lambda f, u, y: ((f, u, y), {})),
    (fc.SuNCEtLoss, fc.suncet_loss, dict(contrast_mode="one", normalize=True),
     lambda f, u, y: ((f, y), dict(support=u[:3], support_labels=y[:3]))),
]


@pytest.mark.parametrize("module,fn,settings,call", MODULES, ids=[m[0].__name__ for m in MODULES])
def test_modules_match_functions(module, fn, settings, call):
    features, universum, labels = features_of(6, 2, seed=2), randn(12, DIM, seed=3), torch.arange(6) % 2
    args, kwargs = call(features, universum, labels)
    assert_close(module(**settings)(*args, **kwargs), fn(*args, **kwargs, **settings), F64, module.__name__)
    bad = "normalize" if "normalize" in module.__init__.__code__.co_varnames else "temperature"
    with pytest.raises(ValueError, match=bad):
        module(**{bad: "yes" if bad == "normalize" else 0.0})


ERRORS = [
    ("dclw three views", lambda: fc.dcl_loss(torch.randn(4, 3, 8), weighted=True), "features"),
    ("dcl one view", lambda: fc.dcl_loss(torch.randn(4, 1, 8)), "features"),
    ("dcl detach_weight", lambda: fc.dcl_loss(torch.randn(4, 2, 8), detach_weight="no"), "detach_weight"),
    ("spread one view", lambda: fc.spread_loss(torch.randn(4, 1, 8), torch.arange(4)), "features"),
    ("debiased normalize", lambda: fc.debiased_contrastive_loss(torch.randn(4, 2, 8), normalize=None), "normalize"),
    ("unicon universum rows", lambda: fc.unicon_loss(torch.randn(4, 2, 8), torch.randn(4, 8), torch.arange(4)),
     "universum"),
    ("unicon universum dtype", lambda: fc.unicon_loss(torch.randn(4, 2, 8), torch.randn(8, 8, dtype=F64),
                                                      torch.arange(4)), "universum"),
    ("unicon labels", lambda: fc.unicon_loss(torch.randn(4, 2, 8), torch.randn(8, 8), None), "labels"),
    ("suncet support_labels", lambda: fc.suncet_loss(torch.randn(4, 2, 8), torch.arange(4),
                                                     support=torch.randn(3, 8)), "support_labels"),
    ("suncet support D", lambda: fc.suncet_loss(torch.randn(4, 2, 8), torch.arange(4), support=torch.randn(3, 7),
                                                support_labels=torch.arange(3)), "support"),
    ("suncet labels", lambda: fc.suncet_loss(torch.randn(4, 2, 8), None), "labels"),
]


@pytest.mark.parametrize("name,call,match", ERRORS, ids=[e[0] for e in ERRORS])
def test_argument_errors(name, call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ------------------------------------------------------------------------------ normalize= on the other losses
def _unit(x):
    return F.normalize(x, dim=-1)


NORMALIZED = {  # name -> (formula on normalised inputs, loss with normalize=True), both of (features, other, labels)
    "eps_supinfonce": (lambda f, o, y: formulas.eps_supinfonce(_unit(f), y, epsilon=0.2, extra_keys=_unit(o),
                                                               extra_key_labels=y[:5]),
                       lambda f, o, y, **kw: fc.eps_supinfonce_loss(f, y, epsilon=0.2, extra_keys=o,
                                                                    extra_key_labels=y[:5], **kw)),
    "bcl": (lambda f, o, y: formulas.bcl(_unit(f), y, class_centers=_unit(o)),
            lambda f, o, y, **kw: fc.bcl_loss(f, y, class_centers=o, **kw)),
    "info_nce_queue": (lambda f, o, y: formulas.info_nce(_unit(f[:, 0]), _unit(f[:, 1]), queue=_unit(o)),
                       lambda f, o, y, **kw: fc.info_nce(f[:, 0], f[:, 1], queue=o, **kw)),
    "info_nce_symmetric": (lambda f, o, y: formulas.info_nce(_unit(f[:, 0]), _unit(f[:, 1]), symmetric=True),
                           lambda f, o, y, **kw: fc.info_nce(f[:, 0], f[:, 1], symmetric=True, **kw)),
    "clip": (lambda f, o, y: formulas.clip(_unit(f[:, 0]), _unit(f[:, 1]), 20.0),
             lambda f, o, y, **kw: fc.clip_loss(f[:, 0], f[:, 1], 20.0, **kw)),
}


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name", list(NORMALIZED))
def test_normalize_on_every_loss(backend, name, small_chunks):
    features, other, labels = features_of(8, 2, seed=4, normalize=False), randn(5, DIM, seed=5, normalize=False), \
        torch.arange(8) % 5
    formula, loss = NORMALIZED[name]
    inputs = {"features": features} if name.startswith("info_nce") else {"features": features, "other": other}
    check(backend, lambda: formula(features, other, labels),
          lambda: loss(features, other, labels, normalize=True, backend=backend), inputs, f"{name} normalize")


# ------------------------------------------------------------------------------ reduction= and weight=
REDUCED = {  # name -> (loss(features, weight=None, reduction=...), shape of "none" for features [bsz, 3, D])
    "spread": (lambda f, **kw: fc.spread_loss(f, torch.arange(f.shape[0]) % 2, temperature=0.3, **kw), 3),
    "symmetric_spread": (lambda f, **kw: fc.symmetric_spread_loss(f, torch.arange(f.shape[0]) % 2, **kw), 3),
    "dcl": (lambda f, **kw: fc.dcl_loss(f, normalize=True, **kw), 3),
    "dclw_learned": (lambda f, **kw: fc.dcl_loss(f[:, :2], weighted=True, detach_weight=False, **kw), 2),
    "debiased": (lambda f, **kw: fc.debiased_contrastive_loss(f, beta=0.5, **kw), 6),
    "unicon": (lambda f, **kw: fc.unicon_loss(f, f.flip(0).detach(), torch.arange(f.shape[0]) % 2, **kw), 3),
    "suncet": (lambda f, **kw: fc.suncet_loss(f, torch.arange(f.shape[0]) % 3, **kw), 3),
}


@pytest.mark.parametrize("backend", ["reference", "chunked"])
@pytest.mark.parametrize("name", list(REDUCED))
def test_reductions_and_weights(backend, name):
    """"none" has one column per anchor view (or pair of views), its mean is "mean"; weights w: "sum" is
    sum_i w_i L_i, "mean" that over sum_i w_i, with the gradients to match (w = 0 rows get none)."""
    loss, columns = REDUCED[name]
    features = features_of(6, 3, seed=9, normalize=False)
    rows = loss(features, reduction="none", backend=backend)
    assert rows.shape == (6, columns)
    mean = loss(features, backend=backend)
    assert_close(rows.mean(), mean, F64, f"{name} none.mean()")
    assert_close(torch.autograd.grad(rows.mean(), features)[0], torch.autograd.grad(mean, features)[0], F64,
                 f"{name} none.mean() grad")
    w = torch.tensor([0.0, 1.0, 2.5, 0.5, 1.0, 3.0], dtype=F64)
    weighted_rows = loss(features, reduction="none", weight=w, backend=backend)
    assert_close(weighted_rows, rows * w[:, None], F64, f"{name} weighted rows")
    total = loss(features, reduction="sum", weight=w, backend=backend)
    assert_close(total, weighted_rows.sum(), F64, f"{name} sum")
    weighted_mean = loss(features, weight=w, backend=backend)
    assert_close(weighted_mean, weighted_rows.sum() / (w.sum() * columns), F64, f"{name} weighted mean")
    assert_close(torch.autograd.grad(total, features)[0], torch.autograd.grad(weighted_rows.sum(), features)[0], F64,
                 f"{name} sum grad")
