"""The CUDA backend on CPU, against the float64 reference (loss and every gradient), two ways:

- ``dense``: the extension replaced by a dense float64 model of what ``csrc/supcon_api.cpp`` promises,
  which tests everything above the kernels (argument plumbing, the shared autograd.Function, the fused
  normalisation, masks, self offsets, extra keys, a learnable temperature);
- ``emulated``: csrc/'s own sources (bindings with their checks, launchers, kernels) compiled for the CPU
  with tests/emulate/'s stand-ins for threads, barriers, shuffles and WMMA, which tests the kernels'
  indexing, tiling, masking, online statistics and synchronisation. Needs nvcc's headers and a C++20
  compiler; the first run compiles for about a minute (cached by torch afterwards).

On a GPU, tests/test_gpu.py runs the real kernels against the same oracle.
"""
import dataclasses
import functools
import os

import pytest
import torch

from fused_contrastive import cuda_supcon, reference
from fused_contrastive.distributed import local_rows
from fused_contrastive.losses import supcon_spec
from helpers import assert_close, make_features, make_labels, relative_error


class DenseExtension:
    """forward -> (lse, pos_sum); backward -> (dQ, dK) for g = coef (e^{l - lse} - a pos_scale), densely."""

    @staticmethod
    def _tile(q, k, inv_tau, anchor_labels, key_labels, mask, self_offset):
        assert q.stride(-1) == 1 and k.stride(-1) == 1 and inv_tau.dtype == torch.float32 and inv_tau.shape == (1,)
        # fp32 logits, as the kernels hold them: a row with one key then has lse == its logit exactly in both
        # passes (e^0 = 1), so a gradient that is 0 in float64 comes out 0, not 1e-9.
        logits = ((q.double() @ k.double().T) * inv_tau.double()).float().double()
        rows, cols = torch.arange(q.shape[0])[:, None], torch.arange(k.shape[0])[None, :]
        valid = torch.ones_like(logits, dtype=torch.bool) if self_offset is None else cols != rows + self_offset
        if mask is not None:  # bytes: a 0/1 mask (any nonzero byte is a positive); fp32: weights
            assert mask.dtype in (torch.uint8, torch.float32) and mask.stride(-1) == 1
            assert anchor_labels is None and key_labels is None
            a = (mask != 0 if mask.dtype == torch.uint8 else mask).double()[rows % mask.shape[0], cols % mask.shape[1]]
        else:
            assert anchor_labels.dtype == key_labels.dtype == torch.int64
            a = (anchor_labels[:, None] == key_labels[None, :]).double()
        return logits, valid, torch.where(valid, a, 0.0)

    def forward(self, q, k, inv_tau, *, anchor_labels, key_labels, mask, self_offset, wmma):
        logits, valid, a = self._tile(q, k, inv_tau, anchor_labels, key_labels, mask, self_offset)
        lse = torch.logsumexp(logits.masked_fill(~valid, float("-inf")), 1)
        return lse.float(), (a * logits).sum(1).float()

    def backward(self, q, k, inv_tau, *, anchor_labels, key_labels, mask, self_offset, lse, coef, pos_scale,
                 need_dq, need_dk, wmma):
        assert lse.dtype == coef.dtype == pos_scale.dtype == torch.float32
        logits, valid, a = self._tile(q, k, inv_tau, anchor_labels, key_labels, mask, self_offset)
        lse_safe = torch.where(lse == float("-inf"), 0.0, lse.double())
        g = coef.double()[:, None] * (torch.where(valid, torch.exp(logits - lse_safe[:, None]), 0.0)
                                      - a * pos_scale.double()[:, None])
        dq = (g @ k.double() * inv_tau.double()).to(q.dtype) if need_dq else None
        dk = (g.T @ q.double() * inv_tau.double()).to(k.dtype) if need_dk else None
        return dq, dk


EMULATE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "emulate")


@functools.lru_cache(maxsize=None)
def emulated_extension():
    """(module, None) or (None, why it cannot be built here)."""
    from torch.utils.cpp_extension import is_ninja_available, load

    includes = cuda_supcon.toolkit_include_dirs()
    if not includes:
        return None, "no CUDA toolkit headers (nvcc) to compile the kernels against"
    if not is_ninja_available():
        return None, "ninja is not installed (pip install ninja): torch builds extensions with it"

    sources = [os.path.join(cuda_supcon.CSRC, "supcon_api.cpp"), os.path.join(EMULATE, "emulated_supcon.cpp")]
    flags = ["-O2", "-std=c++20", "-DFUSED_CONTRASTIVE_EMULATION", "-include", "cuda_emulation.h"]
    return load(name="fused_contrastive_emulated", sources=sources, extra_cflags=flags,
                extra_include_paths=[EMULATE, cuda_supcon.CSRC, *includes]), None


# "emulated" runs fp16/bf16 through the register-tile kernels (the default), fp32 through the WMMA ones;
# test_register_tile_and_wmma_kernels_agree ties the two families together for 16-bit inputs.
@pytest.fixture(params=["dense", "emulated"])
def extension(request, monkeypatch):
    if request.param == "dense":
        module = DenseExtension()
    else:
        module, reason = emulated_extension()
        if module is None:
            pytest.skip(reason)
        monkeypatch.delenv(cuda_supcon.KERNELS_ENV, raising=False)
    monkeypatch.setattr(cuda_supcon, "extension", lambda: (module, None))
    return request.param


CASES = {
    "labels_all": dict(kind="random"),
    "labels_one": dict(kind="random", contrast_mode="one"),
    "simclr": dict(kind="none"),
    "mask": dict(kind="mask"),
    # a transposed mask (not contiguous: copied once) and float weights (read as fp32, not bytes)
    "mask_transposed_weights": dict(kind="mask", transpose_mask=True, mask_weights=True),
    "no_positives_excluded": dict(kind="distinct", no_positive="exclude"),
    "normalize_learnable_tau": dict(kind="random", normalize=True, learnable=True, base_temperature=0.07),
    "extra_keys": dict(kind="random", extra=5),
    # What the distributed modes hand a backend: a rank's anchors with the global self offset (gather), and
    # one shard of the keys, which moves each anchor's self by minus the shard's start, below 0 too (ring).
    "rank_rows": dict(kind="random", shard="rows"),
    "key_shard": dict(kind="random", shard="keys"),
    # Per-row backward coefficients: reduction="none" (a random row gradient of either sign) with weights, and
    # a weighted mean that leaves anchors without positives out; the gather mode's rank rows with weights.
    "none_weighted": dict(kind="random", reduction="none", weighted=True, learnable=True, base_temperature=0.07),
    "mean_weighted_exclude": dict(kind="random", no_positive="exclude", weighted=True),
    "sum_weighted_rank_rows": dict(kind="random", reduction="sum", weighted=True, shard="rows"),
}


def shard(spec, how):
    if how == "rows":
        return local_rows(spec, spec.num_anchors // 3, spec.num_anchors)
    start = spec.num_keys // 2
    return dataclasses.replace(spec, keys=spec.keys[start:], key_labels=spec.key_labels[start:],
                               self_offset=-start)


def check_against_reference(case, bsz, dim=33, dtype=torch.float32, temperature=0.3, **more):
    opts = {**CASES[case], **more}
    kind, learnable, extra = opts.pop("kind"), opts.pop("learnable", False), opts.pop("extra", 0)
    how = opts.pop("shard", None)
    reduction, weighted = opts.pop("reduction", "mean"), opts.pop("weighted", False)
    labels, mask = make_labels(kind, bsz, seed=bsz)
    if opts.pop("mask_weights", False):
        mask = mask * (0.5 + torch.rand(bsz, bsz, generator=torch.Generator().manual_seed(bsz)))
    if opts.pop("transpose_mask", False):
        mask = mask.T
    features = make_features(bsz, 2, dim, seed=bsz, normalize=not opts.get("normalize", False)).detach()
    features = features.to(dtype).double()  # the oracle sees the same rounded inputs
    extra_keys = torch.randn(extra, dim, dtype=torch.float64).to(dtype).double() if extra else None
    if extra:
        opts.update(extra_key_labels=torch.arange(extra) % 3)
    results = []
    for run_dtype, run in ((torch.float64, reference.loss), (dtype, cuda_supcon.loss)):
        f = features.to(run_dtype).requires_grad_()
        tau = torch.tensor(temperature, dtype=run_dtype, requires_grad=True) if learnable else temperature
        if extra:
            opts["extra_keys"] = extra_keys.to(run_dtype)
        spec = supcon_spec(f, labels, mask, temperature=tau, **opts)
        if weighted or reduction != "mean":
            gen = torch.Generator().manual_seed(bsz)
            weight = torch.rand(spec.num_anchors, generator=gen, dtype=torch.float64).to(run_dtype)
            weight[::3] = 0
            spec = dataclasses.replace(spec, reduction=reduction, row_weight=weight if weighted else None)
        loss = run(spec if how is None else shard(spec, how))
        inputs = (f, tau) if learnable else (f,)
        upstream = torch.randn(loss.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
        results.append((loss, *torch.autograd.grad((loss * upstream.to(loss.dtype)).sum(), inputs)))
    for expected, actual, what in zip(results[0], results[1], ("loss", "features grad", "tau grad")):
        assert actual.dtype == (torch.float32 if what == "loss" else dtype)
        assert_close(actual, expected, dtype, f"{case} {what}")


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("bsz", [1, 3, 70])
def test_cuda_backend_matches_the_reference(extension, case, bsz):
    check_against_reference(case, bsz)


# The sizes and label kinds every backend is held to (1000 rows and beyond run on a GPU: tests/test_gpu.py).
@pytest.mark.parametrize("bsz", [2, 127, 129])
@pytest.mark.parametrize("kind", ["random", "same", "distinct", "none", "mask"])
def test_cuda_backend_sizes_and_label_kinds(extension, bsz, kind):
    check_against_reference("labels_all", bsz, kind=kind)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [0.005, 0.05, 1.0])
def test_cuda_backend_extreme_temperatures(extension, dtype, temperature):
    check_against_reference("labels_all", 90, 64, dtype, temperature)


# Several 64-row tiles each way, every padded width (DF = 4, 8, 16) and input dtype.
# D = 136: 16-byte cp.async copies with whole zero-filled chunks past D; 255: element-by-element loads.
@pytest.mark.parametrize("dtype,dim", [(torch.float32, 100), (torch.float16, 136), (torch.bfloat16, 64),
                                       (torch.bfloat16, 255)])
@pytest.mark.parametrize("case", ["labels_all", "mask", "labels_one", "key_shard"])
def test_cuda_backend_across_tiles_dtypes_and_widths(extension, case, dtype, dim):
    check_against_reference(case, 97, dim, dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("dim", [64, 120, 255])  # padded widths 64, 128, 256; 16-byte and scalar loads
@pytest.mark.parametrize("positives", ["labels", "mask", "mask_bytes"])
def test_register_tile_and_wmma_kernels_agree(dtype, dim, positives):
    """The two 16-bit kernel families round at the same points (fp32 logits and statistics, g rounded to the
    input dtype, fp32 accumulation) and differ only in summation order, so they agree far more closely than
    either agrees with the float64 oracle: a fragment-layout slip shows here even where the bf16 tolerance
    of the loss-level tests would hide it. Anchors and keys differ, the self offset is 20, and the backward
    factors are O(1), so every g matters."""
    module, reason = emulated_extension()
    if module is None:
        pytest.skip(reason)
    gen = torch.Generator().manual_seed(dim)
    q, k = torch.randn(150, dim, generator=gen).to(dtype), torch.randn(130, dim, generator=gen).to(dtype)
    rule = dict(anchor_labels=torch.randint(0, 6, (150,), generator=gen), key_labels=torch.randint(0, 6, (130,), generator=gen),
                mask=None)
    if positives != "labels":
        mask = torch.rand(7, 9, generator=gen)
        mask = (mask < 0.4).to(torch.uint8) if positives == "mask_bytes" else mask
        rule = dict(anchor_labels=None, key_labels=None, mask=mask)
    args = dict(inv_tau=torch.tensor([1.5]), self_offset=20, **rule)
    lse, _ = module.forward(q, k, wmma=True, **args)
    factors = dict(lse=lse, coef=torch.rand(150, generator=gen) + 0.5, pos_scale=torch.rand(150, generator=gen),
                   need_dq=True, need_dk=True)
    results = [(*module.forward(q, k, wmma=wmma, **args), *module.backward(q, k, wmma=wmma, **args, **factors))
               for wmma in (False, True)]
    for mma, wmma, what in zip(*results, ("lse", "pos_sum", "dQ", "dK")):
        mma, wmma = mma.float(), wmma.float()
        assert torch.isfinite(mma).all(), what
        # dQ and dK are rounded to 16 bits at the end: one unit in the last place apart at most.
        rtol = 2.0 ** -7 if what in ("dQ", "dK") else 1e-5
        torch.testing.assert_close(mma, wmma, rtol=rtol, atol=1e-4 * float(wmma.abs().max()), msg=lambda m: f"{what}: {m}")


def _call(module, **change):
    q = torch.randn(5, 8)
    args = dict(anchors=q, keys=q, inv_tau=torch.ones(1), anchor_labels=torch.zeros(5, dtype=torch.long),
                key_labels=torch.zeros(5, dtype=torch.long), mask=None, self_offset=0)
    args.update(change)
    return module.forward(**args)


@pytest.mark.parametrize("change,message", [
    (dict(keys=torch.randn(5, 8).double(), anchors=torch.randn(5, 8).double()), "keys must be float32, float16 or bfloat16"),
    (dict(anchors=torch.randn(5, 9)), "the same D"),
    (dict(anchors=torch.randn(5, 8).half()), "share a dtype"),
    (dict(anchors=torch.randn(8, 5).T), "unit stride along D"),
    (dict(keys=torch.randn(5, 300).bfloat16(), anchors=torch.randn(5, 300).bfloat16()), r"D must be in \[1, 256\]"),
    (dict(keys=torch.randn(5, 200), anchors=torch.randn(5, 200)), r"D must be in \[1, 128\]"),
    (dict(anchor_labels=torch.zeros(4, dtype=torch.long)), "anchor_labels must be a contiguous vector of length 5"),
    (dict(key_labels=torch.zeros(5, dtype=torch.int32)), "key_labels must be Long"),
    (dict(anchor_labels=None, key_labels=None), "either a mask or both anchor_labels and key_labels"),
    (dict(anchor_labels=None, key_labels=None, mask=torch.ones(3, 3, dtype=torch.int32)), "mask must be a non-empty 2-D uint8"),
    (dict(anchor_labels=None, key_labels=None, mask=torch.ones(3, 3).T), "unit column stride"),
    (dict(inv_tau=torch.ones(1).double()), "inv_tau must be Float"),
    (dict(inv_tau=torch.ones(2)), "inv_tau must be a contiguous vector of length 1"),
])
def test_bindings_name_the_bad_argument(change, message):
    module, reason = emulated_extension()
    if module is None:
        pytest.skip(reason)
    with pytest.raises(RuntimeError, match=message):
        _call(module, **change)


def use_emulated(monkeypatch):
    module, reason = emulated_extension()
    if module is None:
        pytest.skip(reason)
    monkeypatch.delenv(cuda_supcon.KERNELS_ENV, raising=False)
    monkeypatch.setattr(cuda_supcon, "extension", lambda: (module, None))


# fp16 backward: g_ij ~ coef_i e^(l - lse) ~ 1 / (Na M) falls below fp16's subnormals from N of a few thousand,
# and g enters the tensor-core product in fp16. The bar: the gradient's error against float64 (same fp16
# inputs) at most twice that of the reference backend on the same fp16 inputs (dense fp32 math, rounded to
# fp16 once). `weight` scales the loss and so g, as a larger N would: 2^-6 at N = 256 gives the g of
# N = 2048 for a sixteenth of the emulation's time. Both register-tile and WMMA kernels.
@pytest.mark.parametrize("family", ["mma", "wmma"])
@pytest.mark.parametrize("bsz,weight", [(128, 2.0 ** -6), pytest.param(512, 1.0, marks=pytest.mark.slow)])
def test_fp16_gradient_does_not_vanish(monkeypatch, family, bsz, weight):
    use_emulated(monkeypatch)
    monkeypatch.setenv(cuda_supcon.KERNELS_ENV, family)
    labels, _ = make_labels("random", bsz, seed=bsz)
    features = make_features(bsz, 2, 32, seed=bsz).detach().half()
    grads = []
    for dtype, run in ((torch.float64, reference.loss), (torch.float16, reference.loss), (torch.float16, cuda_supcon.loss)):
        f = features.to(dtype).requires_grad_()
        (grad,) = torch.autograd.grad(weight * run(supcon_spec(f, labels, temperature=0.1)), f)
        grads.append(grad)
    exact, naive, fused = grads
    assert relative_error(fused, exact) <= 2 * relative_error(naive, exact), \
        f"fused {relative_error(fused, exact):.3g} vs reference on fp16 {relative_error(naive, exact):.3g}"


def test_mask_is_converted_once_and_transposed_right(monkeypatch):
    """A transposed 0/1 mask: made contiguous once per loss call (forward and backward get the same bytes),
    kept as bytes, and giving the reference's loss and gradient."""
    seen = []

    class Recording(DenseExtension):
        def forward(self, *args, mask, **kw):
            seen.append(mask)
            return super().forward(*args, mask=mask, **kw)

        def backward(self, *args, mask, **kw):
            seen.append(mask)
            return super().backward(*args, mask=mask, **kw)

    monkeypatch.setattr(cuda_supcon, "extension", lambda: (Recording(), None))
    check_against_reference("mask", 40, transpose_mask=True)
    assert len(seen) == 2 and seen[0] is seen[1]
    assert seen[0].dtype == torch.uint8 and seen[0].is_contiguous()


def test_unit_feature_dimension_with_any_last_stride(extension):
    """D = 1 rows whose last stride is not 1 (.contiguous() leaves them so): the launcher restates it."""
    base = torch.randn(6, dtype=torch.float64)
    labels = torch.tensor([0, 1, 0, 1])
    results = []
    for dtype, run in ((torch.float64, reference.loss), (torch.float32, cuda_supcon.loss)):
        f = base.to(dtype).as_strided((4, 1), (1, 5)).requires_grad_()
        spec = supcon_spec(f, labels, temperature=0.5)
        assert spec.keys.stride(-1) != 1  # what the kernels must not be handed
        loss = run(spec)
        results.append((loss, *torch.autograd.grad(loss, f)))
    for expected, actual, what in zip(*results, ("loss", "grad")):
        assert_close(actual, expected, torch.float32, what)
