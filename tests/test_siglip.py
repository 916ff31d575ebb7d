"""SigLIP (fused_contrastive.siglip): every backend against the float64 formula (tests/formulas.py) and open_clip's
SigLipLoss (its loss.py loaded by file path, see helpers.open_clip_loss_module), loss and the gradients of images,
texts, logit_scale and logit_bias; reductions and weights; bad input; torch.compile; gather and ring modes on 2 and
3 gloo ranks with uneven batches, and the relation to open_clip's per-rank neighbour-exchange loss."""
import pytest
import torch
import torch.distributed as dist

import fused_contrastive as fc
import formulas
from helpers import CPU_BACKENDS, TOLERANCES, assert_close, open_clip_loss_module, runs_here

KINDS = ("diagonal", "labels", "mask", "negative_only")


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch):
    """The chunked backend in many ragged 7 x 5 tiles (its default 512 x 512 would hold every test's batch in one);
    the environment variables reach the spawned ranks."""
    from fused_contrastive import siglip

    for name, value in (("TILE_ROWS", 7), ("TILE_COLS", 5)):
        monkeypatch.setattr(siglip, name, value)
        monkeypatch.setenv(f"FUSED_CONTRASTIVE_SIGLIP_{name}", str(value))


def problem(n, dim=19, dtype=torch.float64, kind="diagonal", seed=0, scale=10.0, bias=-10.0, scale_dtype=None):
    """Normalised image/text rows (rounded to ``dtype``), learnable scale and bias, and the positives' kwargs.
    Labels repeat (duplicates of a caption), the mask is random 0/1."""
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.nn.functional.normalize(torch.randn(2, n, dim, generator=gen, dtype=torch.float64), dim=-1)
    x, y = x.to(dtype).requires_grad_(), y.to(dtype).requires_grad_()
    sd = scale_dtype or (torch.float64 if dtype == torch.float64 else torch.float32)
    s = torch.tensor(scale, dtype=sd, requires_grad=True)
    b = torch.tensor(bias, dtype=sd, requires_grad=True)
    kw = {"diagonal": {}, "negative_only": {"negative_only": True},
          "labels": {"labels": torch.randint(0, max(1, n // 3), (n,), generator=gen)},
          "mask": {"mask": torch.rand(n, n, generator=gen) < 0.2}}[kind]
    return x, y, s, b, kw


def grads(loss, *inputs):
    return torch.autograd.grad(loss, inputs, retain_graph=True)


def check_against_formula(x, y, s, b, kw, backend, dtype, **call):
    loss = fc.siglip_loss(x, y, s, b, backend=backend, **kw, **call)
    expected = formulas.siglip(x, y, s, b, **kw)
    what = f"{backend} {dtype} n={x.shape[0]} {sorted(kw)}"
    assert_close(loss, expected, dtype, what + " loss")
    for g, e, name in zip(grads(loss, x, y, s, b), grads(expected, x, y, s, b), ("images", "texts", "scale", "bias")):
        assert_close(g, e, dtype, f"{what} d{name}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", [1, 2, 3, 127, 129])
def test_float64_matches_formula(backend, kind, n):
    if not runs_here(backend, n):
        pytest.skip("size beyond the interpreter's")
    x, y, s, b, kw = problem(n, kind=kind)
    check_against_formula(x, y, s, b, kw, backend, torch.float64)


@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b != "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["diagonal", "labels"])
def test_low_precision_matches_formula_on_rounded_inputs(backend, dtype, kind):
    x, y, s, b, kw = problem(67, dim=33, dtype=dtype, kind=kind)
    check_against_formula(x, y, s, b, kw, backend, dtype)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_extreme_logits_stay_finite_and_exact(backend, dtype):
    """|t| up to 1e4 both ways (wrong and right by a huge margin), and a batch right by a margin of 30, whose
    terms (e^-30) vanish next to 1: exact inputs (one-hot rows), so the error is the kernels' alone."""
    x, y, s, b, _ = problem(40, dtype=dtype, scale=5000.0, bias=3000.0)
    check_against_formula(x, y, s, b, {}, backend, dtype)
    eye = torch.eye(24, 24, dtype=dtype)
    x, y = eye.clone().requires_grad_(), eye.clone().requires_grad_()
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    s, b = torch.tensor(60.0, dtype=acc, requires_grad=True), torch.tensor(-30.0, dtype=acc, requires_grad=True)
    check_against_formula(x, y, s, b, {}, backend, dtype)


@pytest.mark.parametrize("n", [1, 5, 33])
@pytest.mark.parametrize("negative_only", [False, True])
def test_open_clip_parity(n, negative_only):
    """open_clip's SigLipLoss (its own code) in float64: loss and the gradients of all four inputs."""
    oc = open_clip_loss_module()
    if oc is None:
        pytest.skip("open_clip's loss.py is not available here (make setup installs it into .compat_libs/)")
    x, y, s, b, _ = problem(n, seed=3, scale=7.0, bias=-4.0)
    expected = oc.SigLipLoss()._loss(x, y, s, b, negative_only=negative_only)
    if not negative_only:
        assert torch.equal(expected, oc.SigLipLoss()(x, y, s, b))
    expected_grads = grads(expected, x, y, s, b)
    for backend in ("reference", "chunked"):
        loss = fc.SigLipLoss(backend=backend)(x, y, s, b, negative_only=negative_only)
        assert_close(loss, expected, torch.float64, f"{backend} loss")
        for g, e in zip(grads(loss, x, y, s, b), expected_grads):
            assert_close(g, e, torch.float64, f"{backend} gradient")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_reductions_and_weights(backend):
    x, y, s, b, kw = problem(50, kind="labels")
    rows = formulas.siglip(x, y, s, b, per_row=True, **kw)
    assert_close(fc.siglip_loss(x, y, s, b, reduction="none", backend=backend, **kw), rows, torch.float64, "none")
    w = torch.rand(50, dtype=torch.float64, generator=torch.Generator().manual_seed(5)).requires_grad_()
    weighted_rows = fc.siglip_loss(x, y, s, b, reduction="none", weight=w, backend=backend, **kw)
    assert_close(weighted_rows, w * rows, torch.float64, "none, weighted")
    g = torch.randn(50, dtype=torch.float64, generator=torch.Generator().manual_seed(6))  # any row gradient
    for got, e in zip(grads((weighted_rows * g).sum(), x, y, s, b, w), grads((w * rows * g).sum(), x, y, s, b, w)):
        assert_close(got, e, torch.float64, "none, weighted, a random row gradient")
    for reduction, expected in (("sum", (w * rows).sum()), ("mean", (w * rows).sum() / w.sum())):
        loss = fc.siglip_loss(x, y, s, b, reduction=reduction, weight=w, backend=backend, **kw)
        assert_close(loss, expected, torch.float64, reduction)
        for g, e in zip(grads(loss, x, y, s, b, w), grads(expected, x, y, s, b, w)):
            assert_close(g, e, torch.float64, f"{reduction} weighted gradient")
        detached = fc.siglip_loss(x, y, s, b, reduction=reduction, weight=w.detach(), backend=backend, **kw)
        assert_close(grads(detached, x)[0], grads(expected, x)[0], torch.float64, "weight without grad")
    zero = fc.siglip_loss(x, y, s, b, weight=torch.zeros(50, dtype=torch.float64), backend=backend)
    assert zero.item() == 0.0 and all(torch.isfinite(g).all() for g in grads(zero, x, s))
    assert_close(fc.siglip_loss(x, y, 10.0, -10.0, backend=backend), formulas.siglip(x, y, 10.0, -10.0),
                 torch.float64, "number scale and bias")


BAD = [
    (dict(image_features=torch.randn(4)), "image_features"),
    (dict(text_features=torch.randn(5, 8)), "text_features"),
    (dict(text_features=torch.randn(4, 8, dtype=torch.float64)), "text_features"),
    (dict(logit_scale=0.0), "logit_scale"),
    (dict(logit_scale=torch.tensor([-1.0])), "logit_scale"),
    (dict(logit_scale=torch.ones(2)), "logit_scale"),
    (dict(logit_bias=torch.ones(2)), "logit_bias"),
    (dict(logit_bias=float("nan")), "logit_bias"),
    (dict(labels=torch.arange(3)), "labels"),
    (dict(mask=torch.ones(4, 3)), "mask"),
    (dict(mask=torch.full((4, 4), 0.5)), "mask"),
    (dict(labels=torch.arange(4), mask=torch.eye(4)), "labels and mask"),
    (dict(labels=torch.arange(4), negative_only=True), "negative_only"),
    (dict(reduction="avg"), "reduction"),
    (dict(weight=torch.ones(3)), "weight"),
    (dict(weight=-torch.ones(4)), "weight"),
    (dict(backend="fast"), "backend"),
    (dict(distributed="tree"), "distributed"),
]


@pytest.mark.parametrize("bad, word", BAD)
def test_bad_input_names_the_argument(bad, word):
    args = dict(image_features=torch.randn(4, 8), text_features=torch.randn(4, 8), logit_scale=10.0, logit_bias=-10.0)
    args.update(bad)
    with pytest.raises(ValueError, match=word):
        fc.siglip_loss(**args)


def test_backend_reasons():
    from fused_contrastive import siglip

    spec = siglip.SigLipSpec(torch.randn(4, 8), torch.randn(4, 8), torch.tensor(1.0), torch.tensor(0.0))
    reasons = siglip.explain(spec)
    assert reasons["chunked"] is None and "no CUDA kernel" in reasons["cuda"]
    with pytest.raises(RuntimeError, match="cuda"):
        fc.siglip_loss(torch.randn(4, 8), torch.randn(4, 8), 10.0, backend="cuda")


def test_module_is_open_clip_shaped():
    import doctest

    runner = doctest.DocTestRunner()
    for test in doctest.DocTestFinder(recurse=False).find(fc.SigLipLoss, "SigLipLoss", globs={}):
        runner.run(test)
    assert runner.failures == 0 and runner.tries > 0
    x, y, s, b, _ = problem(6)
    out = fc.SigLipLoss(cache_labels=True)(x, y, s, b, output_dict=True)
    assert set(out) == {"contrastive_loss"}
    assert_close(out["contrastive_loss"], formulas.siglip(x, y, s, b), torch.float64, "module")
    with pytest.raises(ValueError, match="dist_impl"):
        fc.SigLipLoss(dist_impl="allgather")
    with pytest.raises(ValueError, match="rank"):
        fc.SigLipLoss(rank=2, world_size=2)
    with pytest.raises(ValueError, match="torch.distributed"):
        fc.SigLipLoss(rank=0, world_size=2)(x, y, s, b)


def test_compile_fullgraph_and_opcheck():
    from fused_contrastive import siglip

    x, y, s, b, kw = problem(20, dtype=torch.float32, kind="labels")
    compiled = torch.compile(lambda *a: fc.siglip_loss(*a, backend="chunked", **kw), fullgraph=True,
                             backend="aot_eager")
    loss = compiled(x, y, s, b)
    expected = formulas.siglip(x, y, s, b, **kw)
    assert_close(loss, expected, torch.float32, "compiled loss")
    for g, e in zip(grads(loss, x, y, s, b), grads(expected, x, y, s, b)):
        assert_close(g, e, torch.float32, "compiled gradient")
    explanation = torch._dynamo.explain(lambda *a: fc.siglip_loss(*a, backend="chunked"))(x, y, s, b)
    assert explanation.graph_break_count == 0
    ids = torch.tensor([0, 1, 1, 2])
    args = (torch.randn(4, 5, dtype=torch.float64, requires_grad=True),
            torch.randn(4, 5, dtype=torch.float64, requires_grad=True),
            torch.tensor(3.0, dtype=torch.float64, requires_grad=True),
            torch.tensor(-1.0, dtype=torch.float64, requires_grad=True), ids, ids, None, "labels", 0, "chunked")
    torch.library.opcheck(siglip.siglip_rows_op, args)
    detached = tuple(a.detach() for a in args[:4])  # the backward op has no derivative of its own (no double backward)
    torch.library.opcheck(siglip.siglip_grads_op, detached + args[4:] + (torch.rand(4, dtype=torch.float64),))


# ----------------------------------------------------------------------------- across ranks

def check_ranks(rank, world, lo, hi, features, labels, backends):
    """Gather and ring modes against the global single-process loss; open_clip's per-rank terms against ours."""
    from test_distributed import assert_rel

    group = dist.group.WORLD
    images, texts = features[:, 0], features[:, 1]
    for backend in backends:
        for mode in ("gather", "ring"):
            for kind, kw in (("diagonal", {}), ("labels", {"labels": labels}), ("negative_only", {"negative_only": True})):
                for reduction, weighted in (("mean", False), ("mean", True), ("sum", True), ("none", True)):
                    if backend != "chunked" and (reduction != "mean" or weighted):
                        continue
                    w = torch.linspace(0.5, 2.0, images.shape[0], dtype=torch.float64) if weighted else None
                    s = torch.tensor(5.0, dtype=torch.float64, requires_grad=True)
                    b = torch.tensor(-2.0, dtype=torch.float64, requires_grad=True)
                    x, y = images.clone().requires_grad_(), texts.clone().requires_grad_()
                    ref = fc.siglip_loss(x, y, s, b, reduction=reduction, weight=w, backend="reference", **kw)
                    local_kw = {k: (v[lo:hi] if k == "labels" else v) for k, v in kw.items()}
                    xl, yl = images[lo:hi].clone().requires_grad_(), texts[lo:hi].clone().requires_grad_()
                    sl, bl = s.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
                    loss = fc.siglip_loss(xl, yl, sl, bl, reduction=reduction, weight=None if w is None else w[lo:hi],
                                          backend=backend, process_group=group, distributed=mode, **local_kw)
                    what = f"rank {rank}/{world} {backend} {mode} {kind} {reduction} weighted={weighted}"
                    if reduction == "none":  # rows of this rank; a row gradient g: the objective sum_i g_i L_i
                        assert_rel(loss.detach(), ref.detach()[lo:hi], what + " rows")
                        g = torch.linspace(-1.0, 2.0, images.shape[0], dtype=torch.float64)
                        ref, loss = (ref * g).sum(), (loss * g[lo:hi]).sum()
                    else:
                        assert_rel(loss.detach(), ref.detach(), what + " loss")
                    ref_grads = grads(ref, x, y, s, b)
                    got = grads(loss, xl, yl, sl, bl)
                    assert_rel(got[0], world * ref_grads[0][lo:hi], what + " dimages", scale=world * ref_grads[0].norm())
                    assert_rel(got[1], world * ref_grads[1][lo:hi], what + " dtexts", scale=world * ref_grads[1].norm())
                    for g, e, name in ((got[2], ref_grads[2], "scale"), (got[3], ref_grads[3], "bias")):
                        dist.all_reduce(g)
                        assert_rel(g / world, e, f"{what} d{name} (DDP average)")

    oc = open_clip_loss_module()
    if oc is None:
        return
    # Uneven batches: open_clip's term of rank r (its images against its own texts, then every other rank's texts
    # negative_only, over its b_r images) weighted by b_r / B, summed over ranks, is the global loss. Its _loss
    # builds a square [b_r, b_r] ground truth, so it cannot take another rank's b_q != b_r texts: that term is its
    # formula, -logsigmoid(-logits).sum() / b_r, on its get_logits.
    sizes = [torch.zeros(1) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([float(hi - lo)]))
    starts = [0] + torch.cumsum(torch.cat(sizes), 0).long().tolist()
    term = oc.SigLipLoss()._loss(images[lo:hi], texts[lo:hi], 5.0, -2.0)
    for r in range(world):
        if r != rank:
            logits = oc.SigLipLoss().get_logits(images[lo:hi], texts[starts[r]:starts[r + 1]], 5.0, -2.0)
            term = term - torch.nn.functional.logsigmoid(-logits).sum() / (hi - lo)
    total = (hi - lo) * term.reshape(1)
    dist.all_reduce(total)
    assert_rel(total[0] / images.shape[0], fc.siglip_loss(images, texts, 5.0, -2.0), "open_clip terms, uneven")
    # Equal batches (open_clip's exchange needs them), its own distributed code: the ranks' mean loss is ours, and
    # every gradient is the same (its per-rank loss backpropagates through the exchange like our world x share).
    gen = torch.Generator().manual_seed(21)
    even = torch.nn.functional.normalize(torch.randn(2, 3 * world, 6, dtype=torch.float64, generator=gen), dim=-1)
    part = slice(3 * rank, 3 * rank + 3)
    for dist_impl in ("shift", "bidir", "gather", "reduce"):
        inputs = [even[0, part].clone().requires_grad_(), even[1, part].clone().requires_grad_(),
                  torch.tensor(5.0, dtype=torch.float64, requires_grad=True),
                  torch.tensor(-2.0, dtype=torch.float64, requires_grad=True)]
        theirs = oc.SigLipLoss(rank=rank, world_size=world, dist_impl=dist_impl)(*inputs)
        their_grads = grads(theirs, *inputs)
        mine_inputs = [t.detach().clone().requires_grad_() for t in inputs]
        mine = fc.SigLipLoss(rank=rank, world_size=world, dist_impl=dist_impl, backend=backends[-1])(*mine_inputs)
        my_grads = grads(mine, *mine_inputs)
        mean = theirs.detach().reshape(1).clone()
        dist.all_reduce(mean)
        assert_rel(mean[0] / world, mine.detach(), f"open_clip {dist_impl}: mean of the ranks' losses")
        for g, e, name in zip(my_grads, their_grads, ("images", "texts", "scale", "bias")):
            assert_rel(g, e, f"open_clip {dist_impl}: d{name}")


@pytest.mark.parametrize("world", [2, pytest.param(3, marks=pytest.mark.slow)])
def test_gather_and_ring_modes_are_exact(world):
    """One spawned group per world size runs every case (about 20 s for 2 ranks, 35 s for 3 on 2 loaded cores)."""
    from test_distributed import spawn

    spawn(check_ranks, world)


@pytest.mark.slow
def test_triton_kernels_compile_for_sm90_without_spills():
    """Every shipped config of the three kernels, compiled ahead of time as a launch would (no GPU), in a subprocess
    (this session decorates the kernels for the interpreter); bench/results/triton_aot_siglip_sm80_sm90.txt has
    the full table."""
    import os
    import subprocess
    import sys

    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    out = subprocess.run([sys.executable, "-m", "fused_contrastive.triton_kernels.siglip", "90:bfloat16:128:labels"],
                         capture_output=True, text=True, env=env)
    assert out.returncode == 0 and "0 flawed configs" in out.stdout, out.stdout + out.stderr[-3000:]
