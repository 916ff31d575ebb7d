"""RényiCL and CACR on every CPU backend (the Triton kernels under the interpreter) against tests/formulas.py in
float64: the loss and every input's gradient; CACR's options (choice, debiased, RBF cost) and its per-sample
rows (reduction, weight); the Triton tiles at ragged sizes, odd D, extreme temperatures, fp32 and bf16; bad
input; gather and ring mode on 2 and 3 gloo ranks (one spawned group per world for both losses)."""
import pytest
import torch
import torch.distributed as dist

import fused_contrastive as fc

import formulas
from helpers import CPU_BACKENDS, assert_close

F64 = torch.float64


def check(fn, oracle, inputs: dict, grad_names, dtype=F64, **kw):
    """Loss and the gradient of every input in ``grad_names`` against the float64 formula on the same values."""
    a = {n: v.clone().requires_grad_(n in grad_names) for n, v in inputs.items()}
    b = {n: v.detach().to(F64).requires_grad_(n in grad_names) for n, v in inputs.items()}
    got, want = fn(**a, **kw), oracle(**b, **{k: v for k, v in kw.items() if k != "backend"})
    assert_close(got, want, dtype, "loss")
    scale = torch.linspace(0.5, 1.5, got.numel(), dtype=F64).reshape(got.shape)  # a non-uniform upstream
    (got.to(F64) * scale).sum().backward()
    (want * scale).sum().backward()
    for name in grad_names:
        assert_close(a[name].grad, b[name].grad, dtype, f"grad {name}")


def randn(*shape, seed=0, dtype=F64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64).to(dtype)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("n,views,tau,alpha,gamma,normalize", [(6, 2, 0.5, 1 / 65536, 2.0, True),
                                                               (5, 3, 0.1, 0.3, 1.0, True),
                                                               (4, 2, 1.0, 1.0, 0.5, False),
                                                               (7, 2, 0.01, 0.0, 3.0, True), (2, 4, 0.2, 0.5, 2.0, True)])
def test_renyicl(backend, n, views, tau, alpha, gamma, normalize):
    inputs = {"sources": randn(n, views, 8, seed=n), "targets": randn(n, 2, 8, seed=n + 100)}
    check(fc.renyicl_loss, formulas.renyicl, inputs, ("sources", "targets"), temperature=tau, alpha=alpha,
          gamma=gamma, normalize=normalize, backend=backend)


def test_renyicl_tiles_and_refusals(monkeypatch):
    import fused_contrastive.chunked as chunked

    src, tgt = randn(9, 3, 5), randn(9, 2, 5, seed=1)
    monkeypatch.setattr(chunked, "TILE_ELEMENTS", 8)
    monkeypatch.setattr(chunked, "MIN_BLOCK_ROWS", 1)
    check(fc.renyicl_loss, formulas.renyicl, {"sources": src, "targets": tgt}, ("sources", "targets"),
          temperature=0.2, backend="chunked")
    with pytest.raises(RuntimeError, match="no CUDA kernel for RényiCL"):
        fc.renyicl_loss(src, tgt, backend="cuda")
    for kw, match in [({"reduction": "sum"}, "reduction"), ({"weight": torch.ones(9)}, "weight"),
                      ({"alpha": 2.0}, "alpha"), ({"temperature": 0.0}, "temperature"), ({"gamma": float("nan")}, "gamma"),
                      ({"distributed": "tree"}, "distributed")]:
        with pytest.raises(ValueError, match=match):
            fc.renyicl_loss(src, tgt, **kw)
    for s, t, match in [(src[:1], tgt[:1], "n >= 2"), (src, tgt[:, :1], "targets"), (src[:, :1], tgt, "sources"),
                        (src, tgt[:8], "share")]:
        with pytest.raises(ValueError, match=match):
            fc.renyicl_loss(s, t)
    assert_close(fc.RenyiCLLoss(gamma=1.5)(src, tgt), fc.renyicl_loss(src, tgt, gamma=1.5), F64, "module")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("n,views,alpha,beta,tau_pos,tau_neg,normalize", [
    (6, 2, 1.0, 1.0, 1.0, 1.0, True), (5, 3, 0.5, 2.0, 0.5, 3.0, False), (2, 2, 1.0, 1.0, 1.0, 10.0, True),
    (4, 4, 1.0, 0.3, 2.0, 0.1, False)])
def test_cacr(backend, n, views, alpha, beta, tau_pos, tau_neg, normalize):
    check(fc.cacr_loss, formulas.cacr, {"features": randn(n, views, 8, seed=n + views)}, ("features",),
          alpha=alpha, beta=beta, tau_pos=tau_pos, tau_neg=tau_neg, normalize=normalize, backend=backend)


CACR_OPTIONS = [dict(choice="none"), dict(choice="without_w1"), dict(choice="without_w2", tau_neg=4.0),
                dict(debiased=True, tau_plus=0.3), dict(debiased=True, tau_plus=0.0, choice="without_w1"),
                dict(cost="rbf"), dict(cost="rbf", rbf_t=0.5, tau_neg=3.0, choice="without_w2"),
                dict(cost="rbf", choice="none"), dict(cost="rbf", choice="without_w1", normalize=True),
                dict(reduction="none"), dict(reduction="sum", weight=torch.tensor([0.0, 1.0, 2.5, 0.5, 1.0, 0.0, 3.0])),
                dict(reduction="mean", weight=torch.tensor([1.0, 0.0, 2.0, 0.5, 1.0, 1.0, 0.2]), debiased=True),
                dict(reduction="mean", weight=torch.zeros(7))]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("options", CACR_OPTIONS, ids=lambda o: "-".join(f"{k}={v if not torch.is_tensor(v) else 'w'}"
                                                                           for k, v in o.items()))
def test_cacr_options(backend, options):
    options = {k: v.to(F64) if torch.is_tensor(v) else v for k, v in options.items()}
    check(fc.cacr_loss, formulas.cacr, {"features": randn(7, 3, 5, seed=3)}, ("features",), backend=backend, **options)


def test_cacr_tiles_and_refusals(monkeypatch):
    import fused_contrastive.chunked as chunked

    f = randn(9, 3, 5)
    monkeypatch.setattr(chunked, "TILE_ELEMENTS", 8)
    monkeypatch.setattr(chunked, "MIN_BLOCK_ROWS", 1)
    for options in (dict(tau_neg=2.0), dict(cost="rbf", tau_neg=2.0), dict(debiased=True, reduction="none")):
        check(fc.cacr_loss, formulas.cacr, {"features": f}, ("features",), backend="chunked", **options)
    with pytest.raises(RuntimeError, match="no CUDA kernel for CACR"):
        fc.cacr_loss(f, backend="cuda")
    with pytest.raises(RuntimeError, match="float16"):
        fc.cacr_loss(f.half(), backend="triton")
    for kw, match in [({"reduction": "nope"}, "reduction"), ({"tau_neg": float("inf")}, "tau_neg"),
                      ({"cost": "rbf", "reduction": "none"}, "reduction"), ({"cost": "rbf", "weight": torch.ones(9)}, "weight"),
                      ({"cost": "rbf", "debiased": True}, "debiased"), ({"debiased": True, "choice": "none"}, "debiased"),
                      ({"tau_plus": 1.0}, "tau_plus"), ({"rbf_t": 0.0, "cost": "rbf"}, "rbf_t"), ({"cost": "cosine"}, "cost"),
                      ({"choice": "w1"}, "choice"), ({"weight": torch.ones(8, dtype=F64)}, "weight"),
                      ({"distributed": "ring"}, None)]:
        if match is None:  # without a group the mode is unused
            fc.cacr_loss(f, **kw)
            continue
        with pytest.raises(ValueError, match=match):
            fc.cacr_loss(f, **kw)
    for bad in (f[:1], f[:, :1], f[0]):
        with pytest.raises(ValueError, match="features"):
            fc.cacr_loss(bad)
    assert_close(fc.CACRLoss(beta=0.5, choice="without_w1")(f), fc.cacr_loss(f, beta=0.5, choice="without_w1"), F64,
                 "module")
    w = torch.rand(9, dtype=F64)
    assert_close(fc.CACRLoss(reduction="sum")(f, weight=w), fc.cacr_loss(f, reduction="sum", weight=w), F64, "module")


# The Triton tiles at ragged sizes (1 and 2 tiles of the interpreter's 32, plus one row), odd D, the extreme
# temperatures of the tests above, fp32, bf16 (and fp16 for RényiCL) inputs, against float64 on the same values.
# bf16 RényiCL at tau = 0.02 with unnormalised rows would put logits of 50 on bf16's 3 digits: its inputs are
# normalised (as the authors'); the kernels read them exactly (a power of two and a scale per row).
# (127 and 129 rows: ~10-20 s each under the interpreter, slow in make test-quick by their "triton-127]" ids.)
@pytest.mark.skipif("triton" not in CPU_BACKENDS, reason="the Triton interpreter is off")
@pytest.mark.filterwarnings("error::RuntimeWarning")  # an overflow inside a tile, even in a padded row
# Every dtype at 2 and 3 rows and at one size past a block (127 in fp32 and fp16, 129 in bf16: ~4 s each).
@pytest.mark.parametrize("dtype, n", [(dtype, n) for dtype in (torch.float32, torch.bfloat16, torch.float16)
                                      for n in (2, 3, 129 if dtype == torch.bfloat16 else 127)],
                         ids=lambda v: f"triton-{v}" if isinstance(v, int) else str(v))
@pytest.mark.parametrize("loss", ["renyicl", "cacr", "cacr_rbf"])
def test_triton_sizes_and_dtypes(loss, dtype, n):
    if loss != "renyicl" and dtype == torch.float16:  # CACR's tiles carry the 1 / N coefficients: fp16 refused
        with pytest.raises(RuntimeError, match="float16"):
            fc.cacr_loss(randn(n, 2, 13, dtype=dtype), backend="triton")
        return
    settings = ((0.02, 2.0, 10.0, True), (1.0, 0.5, 0.1, False))  # (temperature, gamma, tau_neg, normalize)
    for tau, gamma, tau_neg, normalize in settings if n <= 3 else settings[(n // 2) % 2:][:1]:  # 129: the first
        if loss == "renyicl":
            inputs = {"sources": randn(n, 2, 13, seed=n, dtype=dtype),
                      "targets": randn(n, 2, 13, seed=n + 1, dtype=dtype)}
            check(fc.renyicl_loss, formulas.renyicl, inputs, ("sources", "targets"), dtype, temperature=tau,
                  gamma=gamma, backend="triton")
            continue
        options = dict(cost="rbf") if loss == "cacr_rbf" else dict(debiased=True, reduction="none")
        check(fc.cacr_loss, formulas.cacr, {"features": randn(n, 2, 13, seed=n, dtype=dtype)}, ("features",), dtype,
              tau_neg=tau_neg, normalize=normalize, backend="triton", **options)


# ----------------------------------------------------------------------------- gather and ring modes

def check_modes(rank, world, lo, hi, features, labels, backends):
    """RényiCL and CACR (several options) in gather and ring mode on every backend: every rank's loss is the
    global loss, its per-sample gradients world_size x their slice of the global gradient."""
    from test_distributed import assert_rel

    third = features[:, :1].flip(0)
    sources = torch.cat([features, third], dim=1)
    targets = torch.nn.functional.normalize(features + 0.3 * features.roll(1, 0), dim=-1)
    weight = torch.rand(len(labels), dtype=F64, generator=torch.Generator().manual_seed(5))
    weight[::3] = 0
    cases = [("renyicl", fc.renyicl_loss, (sources, targets), dict(temperature=0.3)),
             ("renyicl momentum targets", lambda s, t, **kw: fc.renyicl_loss(s, t.detach(), **kw), (sources, targets),
              dict(temperature=0.3)),
             ("renyicl gamma=1", fc.renyicl_loss, (sources[:, :2], targets), dict(gamma=1.0, alpha=0.2, normalize=False)),
             ("cacr", fc.cacr_loss, (sources,), dict(tau_neg=2.0)),
             ("cacr debiased none", fc.cacr_loss, (features,), dict(debiased=True, reduction="none", weight=weight)),
             ("cacr rbf", fc.cacr_loss, (sources,), dict(cost="rbf", normalize=True)),
             ("cacr rbf uniform", fc.cacr_loss, (features,), dict(cost="rbf", choice="none")),
             ("cacr sum", fc.cacr_loss, (features,), dict(reduction="sum", weight=weight, choice="without_w1"))]
    for name, fn, tensors, options in cases:
        full = [t.clone().requires_grad_() for t in tensors]
        ref = fn(*full, backend="reference", **options)
        upstream = torch.randn(ref.shape, dtype=F64, generator=torch.Generator().manual_seed(6))
        ref_grads = torch.autograd.grad((ref * upstream).sum(), full, allow_unused=True, materialize_grads=True)
        if options.get("reduction") == "none":
            ref, upstream = ref[lo:hi], upstream[lo:hi]
        local_options = {k: v[lo:hi] if k == "weight" else v for k, v in options.items()}
        for backend in backends:
            for mode in ("gather", "ring"):
                local = [t[lo:hi].clone().requires_grad_() for t in tensors]
                loss = fn(*local, backend=backend, process_group=dist.group.WORLD, distributed=mode, **local_options)
                grads = torch.autograd.grad((loss * upstream).sum(), local, allow_unused=True, materialize_grads=True)
                what = f"rank {rank}/{world} {name} {backend} {mode}"
                assert_rel(loss.detach(), ref.detach(), what + " loss")
                for i, (g, e) in enumerate(zip(grads, ref_grads)):
                    assert_rel(g, world * e[lo:hi], f"{what} grad {i}", scale=world * e.norm())


@pytest.mark.parametrize("world", [2, 3])
def test_gather_and_ring_modes_are_exact(world):
    from test_distributed import spawn

    spawn(check_modes, world)


@pytest.mark.parametrize("module", ["renyicl", "cacr"])
@pytest.mark.parametrize("arch", [80, 90])
def test_aot_compile_without_spills(module, arch):
    """Every shipped config of the module's three kernels compiles for sm_<arch> (no GPU needed) without register
    spills and on tensor cores, as the JIT would specialise it (a subprocess: this session interprets Triton)."""
    pytest.importorskip("triton")
    from test_aot_compile import _run

    from fused_contrastive.triton_kernels.renyicl import AOT_CASES

    # Each D bucket on one architecture here (the full table, both architectures, is in bench/results): sm_80
    # takes the narrow buckets and fp32, sm_90 the wide ones; CACR's dX spilled at 128 on sm_80 and 256 on sm_90.
    buckets = {80: (":64", ":128", "float32"), 90: (":128", ":256", ":512")}[arch]
    cases = [c for c in AOT_CASES if c.startswith(str(arch)) and any(b in c for b in buckets)]
    out = _run(["-m", f"fused_contrastive.triton_kernels.{module}", *cases])
    rows = [line for line in out.stdout.splitlines() if "regs" in line]
    assert rows, out.stdout + out.stderr[-3000:]
    assert out.returncode == 0, "\n".join(rows) + out.stderr[-3000:]
