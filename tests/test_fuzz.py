"""Property-based fuzz of the whole family against the independent float64 formulas (tests/formulas.py and
helpers.supcontrast_float64): loss, the gradient of every input, finiteness; over losses x CPU backends x
dtypes x temperatures down to 0.005 x degenerate labels (one class, all distinct, no positives) x
non-contiguous inputs. 16-bit and fp32 inputs are compared with the oracle on the same rounded inputs,
by the helpers' tolerance table. Deterministic (derandomize) with a fixed number of examples."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fused_contrastive as fc
import formulas
from helpers import assert_close, assert_close_rounded, rounding_allowance, supcontrast_float64

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
TEMPERATURES = st.one_of(st.sampled_from([0.005, 0.01, 0.07, 1.0]), st.floats(0.005, 1.0))
LABEL_KINDS = ["random", "one_class", "distinct", "none"]
FUZZ = dict(derandomize=True, deadline=None, database=None, suppress_health_check=list(HealthCheck))


def fuzz_settings(examples):
    return settings(max_examples=examples, **FUZZ)


def tensor(draw, shape, dtype, normalize=True):
    """A float64-drawn tensor rounded to ``dtype``, non-contiguous when drawn so (a strided or permuted view)."""
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    layout = draw(st.sampled_from(["contiguous", "strided", "permuted"]))
    x = torch.randn(*shape, generator=gen, dtype=torch.float64)
    if normalize:
        x = F.normalize(x, dim=-1)
    x = x.to(dtype)
    if layout == "strided":  # every other element of a wider buffer
        buffer = torch.zeros(*shape[:-1], 2 * shape[-1], dtype=dtype)
        buffer[..., ::2] = x
        x = buffer[..., ::2]
    elif layout == "permuted":  # stored with its dimensions reversed
        order = list(reversed(range(len(shape))))
        x = x.permute(*order).contiguous().permute(*order)
    return x


def labels_of(draw, kind, bsz):
    if kind == "none":
        return None
    if kind == "one_class":
        return torch.full((bsz,), 3)
    if kind == "distinct":
        return torch.arange(bsz) * 2 - 1
    return torch.tensor(draw(st.lists(st.integers(0, max(0, bsz // 2)), min_size=bsz, max_size=bsz)))


def tau_of(draw, dtype, learnable=True, skip=()):
    """(temperature as the package takes it, its value for the formula): a learnable tensor or a float."""
    tau = draw(TEMPERATURES)
    if "learnable_tau_16bit" in skip and dtype in (torch.float16, torch.bfloat16):
        learnable = False
    if learnable and draw(st.booleans()):
        t = torch.tensor(tau, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
        return t, float(t)
    return tau, tau


def check(backend, dtype, package_fn, formula_fn, inputs, what, tau: float, c: float = 1.0, normalized=False):
    """package_fn(*leaves) vs formula_fn(*float64 leaves of the same values): loss and every gradient."""
    what = f"{what} [{backend} {dtype}]"
    leaves = [x.detach().requires_grad_() for x in inputs]  # keeps a non-contiguous layout
    oracle = [x.detach().to(torch.float64).requires_grad_() for x in inputs]
    expected = formula_fn(*oracle)
    expected_grads = torch.autograd.grad(expected, oracle, allow_unused=True)
    loss = package_fn(*leaves, backend=backend)
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    loss_allowance, grad_allowance = rounding_allowance(inputs, tau, c, dtype, normalized)
    # the loss is computed in the accumulation dtype: fp32 (or fp64) whatever the input
    assert_close_rounded(loss.to(torch.float64), expected, dtype, loss_allowance, what + " loss")
    for i, (x, g, e) in enumerate(zip(leaves, grads, expected_grads)):
        g = torch.zeros_like(x) if g is None else g
        e = torch.zeros_like(x, dtype=torch.float64) if e is None else e
        assert g.dtype == x.dtype and g.shape == x.shape, f"{what} grad {i}: {g.dtype} {tuple(g.shape)}"
        # A row's gradient is 1/rows of the mean's. The 0-dim leaf is a temperature, dL/dtau = -(1/tau) sum g l
        # (+ L / tau through c), or CLIP's scale s, dL/ds = sum g x.y: sums of logit-sized terms.
        rows = x.numel() // x.shape[-1] if x.dim() >= 2 else 1
        square_max = 1.0 if normalized else float(inputs[0].detach().double().norm(dim=-1).max()) ** 2
        if x.dim() >= 2:
            allowance = grad_allowance * rows ** 0.5 / rows
        elif what.startswith("clip"):
            allowance = loss_allowance * (1 + square_max)
        else:
            allowance = loss_allowance * (1 + square_max / tau) / tau
        # a gradient is returned in its leaf's dtype: an fp32 scale's, with fp64 features, is rounded to fp32
        tol_dtype = torch.float32 if dtype == torch.float64 and x.dtype == torch.float32 else dtype
        assert_close_rounded(g, e, tol_dtype, allowance, f"{what} grad {i} of shape {tuple(x.shape)}")


# ----------------------------------------------------------------------------- problems

@st.composite
def supcon_problems(draw, max_rows=24, skip=()):
    """SupCon L_out / L_in, SimCLR (no labels), a dense mask, epsilon-SupInfoNCE."""
    dtype = draw(st.sampled_from(DTYPES))
    loss = draw(st.sampled_from([x for x in ("supcon_out", "supcon_in", "mask", "eps_supinfonce") if x not in skip]))
    n_views = draw(st.integers(1, 3))
    bsz = draw(st.integers(1, max(1, max_rows // n_views)))
    dim = draw(st.integers(1, 8))
    kind = draw(st.sampled_from(LABEL_KINDS))
    features = tensor(draw, (bsz, n_views, dim), dtype, normalize=draw(st.booleans()) or dtype == torch.float16)
    # normalize=True inside the loss (SupCon, SimCLR, mask): rows of any finite scale, a zero row (not in fp16:
    # F.normalize's gradient there, dL/dy / 1e-12, is past fp16's range, so +-inf is the right answer)
    normalize = loss != "eps_supinfonce" and draw(st.booleans())
    if normalize:
        wide = dtype in (torch.float32, torch.float64) and "extreme_norms" not in skip
        features = features * draw(st.sampled_from([1.0, 1e-30, 1e20] if wide else [1.0, 1e-3]))
        if dtype != torch.float16 and draw(st.booleans()):
            features[draw(st.integers(0, bsz - 1)), draw(st.integers(0, n_views - 1))] = 0
    labels = labels_of(draw, kind, bsz)
    tau, tau_value = tau_of(draw, dtype, skip=skip)
    base = draw(st.sampled_from([None, 0.07]))
    mode = draw(st.sampled_from(["all", "one"]))
    name = f"{loss} bsz={bsz} views={n_views} D={dim} labels={kind} tau={tau_value:.4g} base={base} mode={mode}"
    inputs = [features] + ([tau] if isinstance(tau, torch.Tensor) else [])
    if loss == "eps_supinfonce":
        eps = draw(st.sampled_from([0.0, 0.1, 0.5]))

        def package(f, *t, backend):
            return fc.eps_supinfonce_loss(f, labels, epsilon=eps, temperature=t[0] if t else tau,
                                          base_temperature=base, contrast_mode=mode, backend=backend)

        def formula(f, *t):
            return formulas.eps_supinfonce(f, labels, epsilon=eps, temperature=t[0] if t else tau_value,
                                           base_temperature=base, contrast_mode=mode)
        return dtype, package, formula, inputs, name + f" eps={eps}", tau_value, (tau_value / base if base else 1.0)
    mask = None
    if loss == "mask":
        gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
        labels, mask = None, (torch.rand(bsz, bsz, generator=gen) < draw(st.sampled_from([0.0, 0.3, 1.0]))).float()
    kw = dict(base_temperature=base, contrast_mode=mode, variant="in" if loss == "supcon_in" else "out",
              no_positive=draw(st.sampled_from(["zero", "exclude"])))

    def package(f, *t, backend):
        return fc.supcon_loss(f, labels, mask, temperature=t[0] if t else tau, normalize=normalize, backend=backend,
                              **kw)

    def formula(f, *t):
        f = f / torch.linalg.vector_norm(f, dim=-1, keepdim=True).clamp_min(1e-12) if normalize else f
        return supcontrast_float64(f, labels, mask, temperature=t[0] if t else tau_value, **kw)
    name += f" {kw['no_positive']} normalize={normalize} |x|max={float(features.double().norm(dim=-1).max()):.3g}"
    return dtype, package, formula, inputs, name, tau_value, (tau_value / base if base else 1.0), normalize


@st.composite
def pair_problems(draw, max_rows=24, skip=()):
    """InfoNCE (queue, no in-batch negatives, symmetric) and CLIP (learnable logit scale)."""
    dtype = draw(st.sampled_from(DTYPES))
    loss = draw(st.sampled_from([x for x in ("info_nce", "info_nce_queue", "info_nce_symmetric", "clip") if x not in skip]))
    bsz = draw(st.integers(1, max_rows // 2))
    dim = draw(st.integers(1, 8))
    normalize = draw(st.booleans()) or dtype == torch.float16
    query, key = tensor(draw, (bsz, dim), dtype, normalize), tensor(draw, (bsz, dim), dtype, normalize)
    tau, tau_value = tau_of(draw, dtype, skip=skip)
    name = f"{loss} bsz={bsz} D={dim} tau={tau_value:.4g}"
    if loss == "clip":
        # an fp32 logit scale with fp64 features too (1 / s must still be taken in fp64)
        scale_dtype = draw(st.sampled_from([torch.float64, torch.float32])) if dtype == torch.float64 else torch.float32
        scale = torch.tensor(1.0 / tau_value, dtype=scale_dtype)
        learnable = isinstance(tau, torch.Tensor)

        def package(i, t, *s, backend):
            return fc.clip_loss(i, t, s[0] if s else float(scale), backend=backend)

        def formula(i, t, *s):
            return formulas.clip(i, t, s[0] if s else float(scale))
        return dtype, package, formula, [query, key] + ([scale] if learnable else []), name, tau_value, 1.0
    queue = tensor(draw, (draw(st.integers(1, 6)), dim), dtype, normalize) if loss == "info_nce_queue" else None
    kw = dict(queue=queue, symmetric=loss == "info_nce_symmetric", in_batch_negatives=draw(st.booleans()))
    inputs = [query, key] + ([tau] if isinstance(tau, torch.Tensor) else [])

    def package(q, k, *t, backend):
        return fc.info_nce(q, k, temperature=t[0] if t else tau, backend=backend, **kw)

    def formula(q, k, *t):
        return formulas.info_nce(q, k, temperature=t[0] if t else tau_value, **kw)
    return dtype, package, formula, inputs, name + f" in_batch={kw['in_batch_negatives']}", tau_value, 1.0


@st.composite
def two_view_problems(draw, max_rows=24, skip=()):
    """DCL / DCLW, debiased (+ beta), BCL (+ class centers), spread: features [bsz, 2, D]."""
    dtype = draw(st.sampled_from(DTYPES))
    loss = draw(st.sampled_from([x for x in ("dcl", "dclw", "debiased", "bcl", "spread") if x not in skip]))
    bsz = draw(st.integers(2 if loss in ("dcl", "dclw", "debiased") else 1, max_rows // 2))
    # D = 1 unit rows are +-1: every cosine -1 puts debiased's max(., n e^{-1/tau}) on its kink (no gradient)
    dim = draw(st.integers(2 if loss == "debiased" else 1, 8))
    # debiased's clamp n e^{-1/tau} assumes cosines >= -1, i.e. unit rows
    normalize = loss == "debiased" or dtype == torch.float16 or draw(st.booleans())
    features = tensor(draw, (bsz, 2, dim), dtype, normalize)
    tau, tau_value = tau_of(draw, dtype, learnable=loss != "debiased", skip=skip)
    name = f"{loss} bsz={bsz} D={dim} tau={tau_value:.4g}"
    inputs = [features] + ([tau] if isinstance(tau, torch.Tensor) else [])

    def t_of(t, value):
        return t[0] if t else value
    if loss in ("dcl", "dclw"):
        def package(f, *t, backend):
            return fc.dcl_loss(f, temperature=t_of(t, tau), weighted=loss == "dclw", backend=backend)

        def formula(f, *t):
            return formulas.dcl(f, temperature=t_of(t, tau_value), weighted=loss == "dclw")
        return dtype, package, formula, inputs, name, tau_value, 1.0
    if loss == "debiased":
        tau_plus, beta = draw(st.sampled_from([0.0, 0.1, 0.5])), draw(st.sampled_from([0.0, 0.5, 1.0]))

        def package(f, backend):
            return fc.debiased_contrastive_loss(f, temperature=tau, tau_plus=tau_plus, beta=beta, backend=backend)

        def formula(f):
            return formulas.debiased(f, temperature=tau_value, tau_plus=tau_plus, beta=beta)
        return dtype, package, formula, inputs, name + f" tau_plus={tau_plus} beta={beta}", tau_value, 1.0
    kind = draw(st.sampled_from(LABEL_KINDS[:3]))
    labels = labels_of(draw, kind, bsz)
    name += f" labels={kind}"
    if loss == "spread":
        def package(f, *t, backend):
            return fc.spread_loss(f, labels, temperature=t_of(t, tau), backend=backend)

        def formula(f, *t):
            return formulas.spread(f, labels, temperature=t_of(t, tau_value))
        return dtype, package, formula, inputs, name, tau_value, 1.0
    centers = None
    if draw(st.booleans()):
        labels = labels - labels.min()  # class ids in [0, C)
        centers = tensor(draw, (int(labels.max()) + 1 + draw(st.integers(0, 2)), dim), dtype, normalize)
        inputs = inputs[:1] + [centers] + inputs[1:]

    def package(f, *rest, backend):
        c, t = (rest[0], rest[1:]) if centers is not None else (None, rest)
        return fc.bcl_loss(f, labels, temperature=t_of(t, tau), class_centers=c, backend=backend)

    def formula(f, *rest):
        c, t = (rest[0], rest[1:]) if centers is not None else (None, rest)
        return formulas.bcl(f, labels, temperature=t_of(t, tau_value), class_centers=c)
    return dtype, package, formula, inputs, name + f" centers={centers is not None}", tau_value, 1.0


PROBLEMS = {"supcon": supcon_problems, "pairs": pair_problems, "two_views": two_view_problems}
# examples per family for reference + chunked (each example runs both backends): 1050 in all
EXAMPLES = {"supcon": 450, "pairs": 300, "two_views": 300}
TRITON_EXAMPLES = 40  # per family: each interpreted kernel launch takes a fraction of a second to seconds


@pytest.mark.parametrize("family", list(PROBLEMS))
def test_fuzz_cpu_backends(family):
    @fuzz_settings(EXAMPLES[family])
    @given(PROBLEMS[family]())
    def run(problem):
        for backend in ("reference", "chunked"):
            check(backend, *problem)

    run()


TRITON_SKIP = ()


@pytest.mark.parametrize("family", list(PROBLEMS))
def test_fuzz_triton_interpreter(family):
    """The same problems at N <= 16 rows on the Triton kernels, under the interpreter (slow: few examples)."""
    pytest.importorskip("triton")
    import os

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton kernels run on CPU tensors only under TRITON_INTERPRET=1")

    @fuzz_settings(TRITON_EXAMPLES)
    @given(PROBLEMS[family](max_rows=16, skip=TRITON_SKIP))
    def run(problem):
        check("triton", *problem)

    run()
