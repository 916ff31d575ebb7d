"""Shared test helpers: the tolerance table, input builders and an independent oracle.

`supcontrast_float64` is a separate float64 re-derivation of SupContrast's published
algorithm (dense masks, explicit log-probabilities), written apart from the package's
reference backend so the two check each other.
"""
from __future__ import annotations

import os

import torch

# One table of tolerances, by the dtype of the features: the largest relative error allowed,
# ||actual - expected|| / ||expected|| (Frobenius norm), for the loss and for every gradient.
# There is no floor on the scale: a gradient of size 1e-4 is compared at its own size, so an
# all-zero or halved 16-bit gradient fails (tests/test_helpers.py shows it). Low-precision inputs
# are compared with the oracle evaluated on the same rounded inputs, so these bound accumulation
# and output rounding, not input rounding.
TOLERANCES = {
    torch.float64: 1e-10,
    torch.float32: 1e-4,
    torch.float16: 2e-3,
    torch.bfloat16: 1.6e-2,
}


# Backends that run CPU tensors here: Triton only under its interpreter, at small sizes (it runs
# each tile op in numpy); full sizes of every dtype run on a GPU in test_gpu.py.
CPU_BACKENDS = ["reference", "chunked"] + (["triton"] if os.environ.get("TRITON_INTERPRET") == "1" else [])
INTERPRETER_MAX_ROWS = 260


def runs_here(backend: str, rows: int) -> bool:
    return backend != "triton" or rows <= INTERPRETER_MAX_ROWS


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in float64. Where the expected value is exactly zero (a loss that
    is 0 by construction, the gradient of a batch without positives) no relative error exists: the absolute
    error ||actual|| is returned instead, so a rounding-level residue passes and a real value does not."""
    expected = expected.detach().to(torch.float64)
    actual = actual.detach().to(torch.float64)
    diff = float(torch.linalg.vector_norm(actual - expected))
    scale = float(torch.linalg.vector_norm(expected))
    return diff if scale == 0.0 else diff / scale


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str = "") -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual.detach().to(torch.float64)).all(), f"{what}: non-finite values"
    err, tol = relative_error(actual, expected), TOLERANCES[dtype]
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:g} ({dtype}); |expected| = " \
                       f"{float(torch.linalg.vector_norm(expected.detach().to(torch.float64))):.3g}"


def make_features(bsz: int, n_views: int, dim: int, dtype=torch.float64, seed: int = 0, normalize: bool = True):
    gen = torch.Generator().manual_seed(seed)
    f = torch.randn(bsz, n_views, dim, generator=gen, dtype=torch.float64)
    if normalize:
        f = torch.nn.functional.normalize(f, dim=-1)
    return f.to(dtype).requires_grad_()


def make_labels(kind: str, bsz: int, seed: int = 0):
    """(labels, mask) for a label kind: random / same / distinct / none / mask (asymmetric)."""
    gen = torch.Generator().manual_seed(seed + 1)
    if kind == "random":
        return torch.randint(0, max(1, bsz // 4), (bsz,), generator=gen), None
    if kind == "same":
        return torch.full((bsz,), 7), None
    if kind == "distinct":
        return torch.arange(bsz) * 3 - 5, None
    if kind == "none":
        return None, None
    if kind == "mask":
        mask = (torch.rand(bsz, bsz, generator=gen) < 0.3).float()
        return None, mask
    raise ValueError(kind)


def supcontrast_float64(features, labels=None, mask=None, *, temperature=0.07, base_temperature=None,
                        contrast_mode="all", no_positive="zero", variant="out"):
    """SupContrast's algorithm in float64, with rows that have no positive (or no key) set to 0.
    variant="in": the paper's L_in, minus the log of the mean positive probability (in log space)."""
    base_temperature = temperature if base_temperature is None else base_temperature
    f = features.to(torch.float64)
    if f.dim() == 2:
        f = f[:, None]
    bsz, n_views = f.shape[:2]
    f = f.reshape(bsz, n_views, -1)
    if labels is not None:
        labels = labels.reshape(-1, 1)
        pair = torch.eq(labels, labels.T).to(torch.float64)
    elif mask is not None:
        pair = mask.to(torch.float64)
    else:
        pair = torch.eye(bsz, dtype=torch.float64)
    contrast = torch.cat(torch.unbind(f, dim=1), dim=0)
    anchor, anchor_count = (f[:, 0], 1) if contrast_mode == "one" else (contrast, n_views)
    logits = anchor @ contrast.T / temperature
    pair = pair.repeat(anchor_count, n_views)
    logits_mask = torch.ones_like(pair)
    logits_mask[torch.arange(bsz * anchor_count), torch.arange(bsz * anchor_count)] = 0
    # SupContrast shifts by the row max including self; with large logits that leaves every
    # other exp at 0 (its NaN). Shifting by the max over the denominator keeps this exact.
    shift = logits.masked_fill(logits_mask == 0, float("-inf")).max(1, keepdim=True).values
    logits = logits - torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift)).detach()
    pair = pair * logits_mask
    denominator = torch.exp(logits.masked_fill(logits_mask == 0, float("-inf"))).sum(1, keepdim=True)
    has_key = denominator > 0
    log_prob = logits - torch.log(torch.where(has_key, denominator, torch.ones_like(denominator)))
    pos_pairs = pair.sum(1)
    has_pos = pos_pairs > 0
    safe_pairs = torch.where(has_pos, pos_pairs, torch.ones_like(pos_pairs))
    if variant == "in":
        weighted = log_prob + torch.log(torch.where(pair > 0, pair, torch.ones_like(pair)))
        weighted = weighted.masked_fill(pair == 0, float("-inf")).masked_fill(~has_pos[:, None], 0.0)
        # a row without positives has loss 0 (its all-zero row would otherwise give log M)
        mean_log_prob_pos = torch.where(has_pos, torch.logsumexp(weighted, dim=1) - torch.log(safe_pairs), 0.0)
    else:
        mean_log_prob_pos = (pair * log_prob).sum(1) / safe_pairs
    loss = -(temperature / base_temperature) * mean_log_prob_pos
    if no_positive == "exclude":
        return loss[has_pos].sum() / max(int(has_pos.sum()), 1)
    return loss.mean()


def loss_and_grad(fn, features):
    loss = fn(features)
    (grad,) = torch.autograd.grad(loss, features)
    return loss, grad


def naive_supcon(features, labels, temperature, base_temperature=None, normalize=True):
    """SupCon L_out written the obvious way, every op in the features' dtype (what a user's own code would get
    in that dtype): the yardstick for a fused backend's low-precision error."""
    f = torch.nn.functional.normalize(features, dim=-1) if normalize else features
    x = torch.cat(torch.unbind(f, dim=1))
    n = x.shape[0]
    is_self = torch.eye(n, dtype=torch.bool, device=x.device)
    views = labels.repeat(f.shape[1])
    positive = (views[:, None] == views[None, :]) & ~is_self
    logits = (x @ x.T / temperature).masked_fill(is_self, float("-inf"))
    log_prob = (logits - torch.logsumexp(logits, dim=1, keepdim=True)).masked_fill(~positive, 0.0)
    rows = -log_prob.sum(1) / positive.sum(1).clamp(min=1)
    scale = 1.0 if base_temperature is None else temperature / base_temperature
    return (scale * rows).mean()


def rounding_allowance(inputs, tau: float, c: float, dtype, normalized: bool) -> tuple[float, float]:
    """(for the loss, for a gradient per unit of its row count) the error that rounding the logits in the
    accumulation dtype alone causes: each logit l = x . y / tau is off by about D eps |l|, and L and g are
    2c-Lipschitz in the logits (a row's softmax and positive weights each sum to at most 1). Where the
    expected value is far above it (almost always), this adds nothing to the table's relative tolerance;
    it matters only where the value is a cancellation of logit-sized terms: L = LSE - l_p ~ 0 with one
    dominant positive at tau = 0.005, or g = softmax - 1 ~ 0, where no floating-point order is exact.
    ``normalized``: the loss sees x / max(|x|, 1e-12), whose gradient is 1 / max(|x|, 1e-12) times larger."""
    eps = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps
    rows = torch.cat([x.detach().double().reshape(-1, x.shape[-1]) for x in inputs if x.dim() >= 2])
    grad_factor = 1.0
    if normalized:
        grad_factor = 1.0 / max(float(rows.norm(dim=1).min()), 1e-12)
        rows = torch.nn.functional.normalize(rows, dim=1)
    dim = rows.shape[1]
    logit_max = float((rows @ rows.T).abs().max()) / tau
    row_max = float(rows.norm(dim=1).max())
    per_logit = (dim + 4) * eps * (logit_max + 1)  # + 1: exp and log of O(1) values
    return 2 * c * per_logit, 2 * c * per_logit * row_max / tau * grad_factor


def assert_close_rounded(actual, expected, dtype, allowance: float, what: str):
    """helpers.assert_close, or an absolute error within the logits' rounding allowance (see above)."""
    err = float((actual.detach().double() - expected.detach().double()).norm())
    if err <= allowance:
        assert torch.isfinite(actual.detach().double()).all(), f"{what}: non-finite values"
        return
    assert_close(actual, expected, dtype, what + f" (rounding allowance {allowance:.3g})")


COMPAT_LIBS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".compat_libs")


def open_clip_loss_module():
    """open_clip's ``open_clip/loss.py`` as a module, or None. open_clip_torch itself would pull another torch
    into this environment, so ``make setup`` installs its wheel without dependencies into .compat_libs/ and
    only this module (it imports torch alone) is loaded, by file path."""
    import importlib.util

    path = os.path.join(COMPAT_LIBS, "open_clip", "loss.py")
    if not os.path.exists(path):
        return None
    spec = importlib.util.spec_from_file_location("open_clip_loss_module", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
