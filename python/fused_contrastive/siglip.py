"""SigLIP's sigmoid loss (Zhai et al. 2023; open_clip's ``SigLipLoss``): three backends, one autograd.Function,
torch.compile ops, gather and ring modes across ranks, the functional API and the open_clip-style module.

    L = -(1/B) sum_i sum_j log sigmoid(z_ij (s x_i . y_j + b)),  z_ij = +1 on positives, -1 elsewhere,

for B images x_i and texts y_j, s = logit_scale (already exponentiated), b = logit_bias. A row's loss is
``L_i = sum_j softplus(-z_ij t_ij)``. SigLIP is not one of the softmax losses that ``ContrastSpec`` describes:
there is no normaliser, so no LSE, no online rescaling and no per-row statistic to merge. A tile's
contribution is a plain sum, and the backward needs nothing saved but the inputs: with
``h_ij = -z_ij sigmoid(-z_ij t_ij)`` (in [-1, 1]) and c_i = dLoss/dL_i,

    dX_i = s c_i sum_j h_ij y_j,  dY_j = s sum_i c_i h_ij x_i,  ds = sum_ij c_i h_ij x_i . y_j,  db = sum_ij c_i h_ij.

Backends (each: ``row_losses(spec) -> [Na]`` and ``grads(spec, c) -> (dX, dY, ds, db)``, accumulation dtype):
``reference`` the dense float64 oracle (autograd on the full matrix), ``chunked`` blocks of image rows against
all texts in plain PyTorch (O(block x M + N D) memory; with a known c it forms the gradients during the
forward, three products per block instead of four), ``triton`` the fused kernels of
``fused_contrastive.triton_kernels.siglip``. There is no CUDA kernel: the CUDA backend's kernels are built
around the online LSE and per-class positive sums, none of which this loss has.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import os
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from .compiled import compiling, deferred_errors, require
from . import dispatch
from .dispatch import BACKEND_CHOICES
from .distributed import agreed, check_group, gather_batch, ring_accumulate, ring_visit
from .family import _check_logit_bias, _check_logit_scale, _pair
from .losses import _check_choice, _check_data, _check_labels, _check_finite, dense_ids

REDUCTIONS = ("mean", "sum", "none")
DISTRIBUTED_MODES = ("gather", "ring")
POSITIVES = ("none", "diagonal", "labels", "mask")


# ----------------------------------------------------------------------------- the problem one backend runs

@dataclasses.dataclass
class SigLipSpec:
    """Image rows against text columns. ``positives``: "none" (negative_only), "diagonal" (text i + pos_offset
    is image i's positive), "labels" (row ids, column ids: positives where equal), "mask" ([Na, M], nonzero
    positive, uint8, contiguous). ``scale``, ``bias``: 0-dim tensors in the accumulation dtype, detached."""
    images: Tensor
    texts: Tensor
    scale: Tensor
    bias: Tensor
    positives: str = "diagonal"
    pos_offset: Optional[int] = 0
    labels: Optional[tuple] = None
    mask: Optional[Tensor] = None

    @property
    def accum_dtype(self) -> torch.dtype:
        return torch.float64 if self.images.dtype == torch.float64 else torch.float32

    def scale_tensor(self) -> Tensor:
        return self.scale.reshape(1)

    def bias_tensor(self) -> Tensor:
        return self.bias.reshape(1)

    def signs(self, start: int, stop: int, first: int = 0, last: Optional[int] = None) -> Optional[Tensor]:
        """Boolean [stop - start, last - first] positives of image rows [start, stop) among text columns
        [first, last) (default: all; None: no positive at all)."""
        device, last = self.images.device, self.texts.shape[0] if last is None else last
        if self.positives == "none":
            return None
        if self.positives == "diagonal":
            cols = torch.arange(start, stop, device=device) + self.pos_offset
            return cols[:, None] == torch.arange(first, last, device=device)[None, :]
        if self.positives == "labels":
            return self.labels[0][start:stop, None] == self.labels[1][None, first:last]
        return self.mask[start:stop, first:last] != 0


# ----------------------------------------------------------------------------- reference: the dense oracle

def _reference_dense(spec: SigLipSpec, images: Tensor, texts: Tensor, scale: Tensor, bias: Tensor) -> Tensor:
    """L_i in float64 from the whole [Na, M] matrix; -log sigmoid is torch's stable log-sigmoid."""
    t = scale.double() * (images.double() @ texts.double().T) + bias.double()
    pos = spec.signs(0, images.shape[0])
    z = -torch.ones_like(t) if pos is None else torch.where(pos, 1.0, -1.0).double()
    return -F.logsigmoid(z * t).sum(1)


def reference_rows(spec: SigLipSpec) -> Tensor:
    return _reference_dense(spec, spec.images, spec.texts, spec.scale, spec.bias).to(spec.accum_dtype)


def reference_grads(spec: SigLipSpec, coef: Tensor):
    leaves = [t.detach().requires_grad_() for t in (spec.images, spec.texts, spec.scale, spec.bias)]
    with torch.enable_grad():
        rows = _reference_dense(spec, *leaves)
        grads = torch.autograd.grad((rows * coef.double()).sum(), leaves)
    return tuple(g.to(spec.accum_dtype) for g in grads)


# ----------------------------------------------------------------------------- chunked: row blocks in PyTorch

# Tiles of TILE_ROWS image rows x TILE_COLS text columns: 1 MiB in fp32, so that the few elementwise passes
# over a tile (softplus, sigmoid, row sums) run in cache; the products stay [512, D] x [D, 512], large enough
# for BLAS. Measured on one CPU thread at N = 4096, D = 512, fwd+bwd: 1.2 s with 512 x 512 tiles, 1.45 s with
# 256 x 1024 and 128 x 4096 (open_clip's SigLipLoss: 2.1 s).
TILE_ROWS = int(os.environ.get("FUSED_CONTRASTIVE_SIGLIP_TILE_ROWS", 512))
TILE_COLS = int(os.environ.get("FUSED_CONTRASTIVE_SIGLIP_TILE_COLS", 512))


def _flip_positives(tile: Tensor, spec: SigLipSpec, start: int, stop: int, first: int, last: int) -> Tensor:
    """``tile`` (rows [start, stop) x columns [first, last)) with the sign of its positive entries flipped (in
    place for the diagonal, touching only its entries)."""
    if spec.positives == "none":
        return tile
    if spec.positives == "diagonal":
        lo, hi = max(start, first - spec.pos_offset), min(stop, last - spec.pos_offset)
        if lo < hi:
            rows = torch.arange(lo, hi, device=tile.device)
            cols = rows + spec.pos_offset - first
            rows = rows - start
            tile[rows, cols] = -tile[rows, cols]
        return tile
    return torch.where(spec.signs(start, stop, first, last), -tile, tile)


def _chunked(spec: SigLipSpec, coef: Optional[Tensor], want_rows: bool):
    """(rows or None, dX, dY, ds, db or Nones) over tiles of image rows x text columns, each tile formed once;
    with ``coef`` its gradients are accumulated right there (three products per tile, no recompute). Per tile:
    t by one addmm, u = -z t by flipping the positives, softplus(u) summed by row, sigmoid(u) in place, two
    products; c_i scales the [rows, D] sides (x_i c_i once, dX per row block), never the tile."""
    acc = spec.accum_dtype
    X, Y = spec.images.to(acc), spec.texts.to(acc)
    na, m = X.shape[0], Y.shape[0]
    s, b = spec.scale.to(acc), spec.bias.to(acc)
    # softplus is exactly linear beyond the threshold where e^-u vanishes next to u in the accumulation dtype.
    threshold = 40.0 if acc == torch.float64 else 20.0
    rows = torch.zeros(na, dtype=acc, device=X.device) if want_rows else None
    dX = dY = db = Xc = None
    if coef is not None:
        coef = coef.to(acc)
        Xc = X * coef[:, None]  # sum_i c_i h_ij x_i = h^T (c x)
        dX = torch.zeros_like(X)
        dY = torch.zeros_like(Y)
        db = torch.zeros((), dtype=acc, device=X.device)
    for start in range(0, na, TILE_ROWS):
        stop = min(na, start + TILE_ROWS)
        x = X[start:stop]
        h_rows = torch.zeros(stop - start, dtype=acc, device=X.device) if coef is not None else None
        for first in range(0, m, TILE_COLS):
            last = min(m, first + TILE_COLS)
            y = Y[first:last]
            # u = -z t: t on negatives, -t on positives; the pair's loss is softplus(u), its dL/dt is -z sigmoid(u).
            u = _flip_positives((x @ y.T).mul_(s).add_(b), spec, start, stop, first, last)
            if want_rows:
                rows[start:stop] += F.softplus(u, threshold=threshold).sum(1)
            if coef is not None:
                h = _flip_positives(torch.sigmoid_(u), spec, start, stop, first, last)
                h_rows += h.sum(1)
                dX[start:stop].addmm_(h, y)
                dY[first:last].addmm_(h.T, Xc[start:stop])
        if coef is not None:
            dX[start:stop] *= coef[start:stop, None]
            db += (h_rows * coef[start:stop]).sum()
    if coef is None:
        return rows, None, None, None, None
    ds = (X * dX).sum()  # sum_ij c_i h_ij x_i . y_j, from dX before it is scaled by s
    return rows, dX.mul_(s), dY.mul_(s), ds, db


def chunked_rows(spec: SigLipSpec) -> Tensor:
    return _chunked(spec, None, True)[0]


def chunked_grads(spec: SigLipSpec, coef: Tensor):
    return _chunked(spec, coef, False)[1:]


def chunked_rows_and_grads(spec: SigLipSpec, coef: Tensor):
    return _chunked(spec, coef, True)


# ----------------------------------------------------------------------------- dispatch

@dataclasses.dataclass(frozen=True)
class SigLipBackend:
    """One backend's SigLIP operations (see the module docstring) and why it cannot run a spec."""
    name: str
    why_not: Callable[[SigLipSpec], Optional[str]]
    row_losses: Callable
    grads: Callable
    rows_and_grads: Optional[Callable] = None  # forward with the gradients of a known c (one pass)
    auto_devices: tuple = ("cpu", "cuda")


def _triton_module():
    return dispatch.triton_kernels("siglip")


def _triton_why_not(spec):
    module, reason = _triton_module()
    return reason if module is None else module.why_not(spec)


def _always(spec):
    return None


def _no_cuda_kernel(spec):
    return ("no CUDA kernel for SigLIP: the CUDA backend's kernels are built around the softmax losses' online LSE "
            "and per-class positive sums, which the sigmoid loss has none of; use triton")


BACKENDS = {
    "cuda": SigLipBackend("cuda", _no_cuda_kernel, None, None, auto_devices=("cuda",)),
    "triton": SigLipBackend("triton", _triton_why_not, lambda spec: _triton_module()[0].row_losses(spec),
                            lambda spec, c: _triton_module()[0].grads(spec, c), auto_devices=("cuda",)),
    "chunked": SigLipBackend("chunked", _always, chunked_rows, chunked_grads, chunked_rows_and_grads),
    "reference": SigLipBackend("reference", _always, reference_rows, reference_grads),
}
AUTO_ORDER = ("triton", "chunked")  # reference is the oracle, never chosen by auto


def explain(spec: SigLipSpec) -> dict:
    """Every backend with the reason it cannot run this spec (None: it can)."""
    return {name: b.why_not(spec) for name, b in BACKENDS.items()}


def select(spec: SigLipSpec, backend: str = "auto") -> SigLipBackend:
    """dispatch's rules over the SigLIP backends (an explicit backend that cannot run raises its reason)."""
    return dispatch.choose(spec, backend, BACKENDS, AUTO_ORDER, spec.images.device)


# ----------------------------------------------------------------------------- autograd

class _SigLip(torch.autograd.Function):
    """Rows L_i (``coef`` None) or sum_i coef_i L_i. With a known coef and a backend that can, the gradients
    are formed during the forward (backward scales them); otherwise backward recomputes every tile."""

    @staticmethod
    def forward(ctx, images, texts, scale, bias, coef, make_spec, chosen):
        spec = make_spec(images.detach(), texts.detach(), scale.detach(), bias.detach())
        ctx.chosen, ctx.spec, ctx.precomputed = chosen, spec, False
        need = any(ctx.needs_input_grad[:4])
        if coef is not None and need and chosen.rows_and_grads is not None:
            rows, dX, dY, ds, db = chosen.rows_and_grads(spec, coef)
            ctx.save_for_backward(dX, dY, ds, db)
            ctx.precomputed = True
        else:
            rows = chosen.row_losses(spec)
            ctx.save_for_backward(coef)
        ctx.dtypes = (images.dtype, texts.dtype, scale.dtype, bias.dtype)
        return rows if coef is None else (rows * coef.to(rows.dtype)).sum()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        if ctx.precomputed:
            grads = [g * grad.to(g.dtype) for g in ctx.saved_tensors]
        else:
            (coef,) = ctx.saved_tensors
            c = grad if coef is None else coef.to(grad.dtype) * grad
            grads = ctx.chosen.grads(ctx.spec, c)
        out = [g.to(dtype).reshape(shape) for g, dtype, shape in
               zip(grads, ctx.dtypes, (ctx.spec.images.shape, ctx.spec.texts.shape, (), ()))]
        return (*[o if need else None for o, need in zip(out, ctx.needs_input_grad[:4])], None, None, None)


# ----------------------------------------------------------------------------- torch.compile: custom ops

def _op_spec(images, texts, scale, bias, row_labels, col_labels, mask, positives, pos_offset):
    return SigLipSpec(images.contiguous(), texts.contiguous(), scale.detach().reshape(()), bias.detach().reshape(()),
                      positives, pos_offset, None if row_labels is None else (row_labels, col_labels), mask)


def _check_scale_value(scale: Tensor) -> None:
    value = float(scale)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"logit_scale must be a finite number > 0 (the exponentiated scale), got {value}")


@torch.library.custom_op("fused_contrastive::siglip", mutates_args=())
def siglip_rows_op(images: Tensor, texts: Tensor, scale: Tensor, bias: Tensor, row_labels: Optional[Tensor],
                   col_labels: Optional[Tensor], mask: Optional[Tensor], positives: str, pos_offset: int,
                   backend: str) -> Tensor:
    """L_i per image row (accumulation dtype): the opaque op torch.compile sees. logit_scale's range is
    checked here, when the graph runs (reading it while tracing would break the graph)."""
    _check_scale_value(scale)
    spec = _op_spec(images, texts, scale, bias, row_labels, col_labels, mask, positives, pos_offset)
    with torch.autocast(images.device.type, enabled=False):
        return select(spec, backend).row_losses(spec).clone()


@siglip_rows_op.register_fake
def _(images, texts, scale, bias, row_labels, col_labels, mask, positives, pos_offset, backend):
    acc = torch.float64 if images.dtype == torch.float64 else torch.float32
    return images.new_empty((images.shape[0],), dtype=acc)


@torch.library.custom_op("fused_contrastive::siglip_backward", mutates_args=())
def siglip_grads_op(images: Tensor, texts: Tensor, scale: Tensor, bias: Tensor, row_labels: Optional[Tensor],
                    col_labels: Optional[Tensor], mask: Optional[Tensor], positives: str, pos_offset: int,
                    backend: str, coef: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dX, dY, ds, db) of sum_i coef_i L_i, in the inputs' dtypes (every tile recomputed)."""
    spec = _op_spec(images, texts, scale, bias, row_labels, col_labels, mask, positives, pos_offset)
    with torch.autocast(images.device.type, enabled=False):
        dX, dY, ds, db = select(spec, backend).grads(spec, coef)
    return (dX.to(images.dtype).contiguous(), dY.to(texts.dtype).contiguous(), ds.to(scale.dtype).reshape(scale.shape),
            db.to(bias.dtype).reshape(bias.shape))


@siglip_grads_op.register_fake
def _(images, texts, scale, bias, row_labels, col_labels, mask, positives, pos_offset, backend, coef):
    return (torch.empty_like(images), torch.empty_like(texts), torch.empty_like(scale), torch.empty_like(bias))


def _rows_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:7])
    ctx.config = inputs[7:]


def _rows_backward(ctx, grad_rows):
    images, texts, scale, bias, row_labels, col_labels, mask = ctx.saved_tensors
    dX, dY, ds, db = siglip_grads_op(images, texts, scale, bias, row_labels, col_labels, mask, *ctx.config,
                                     grad_rows)
    return dX, dY, ds, db, None, None, None, None, None, None


siglip_rows_op.register_autograd(_rows_backward, setup_context=_rows_setup)


# ----------------------------------------------------------------------------- ring mode

class _RingSigLip(torch.autograd.Function):
    """This rank's image rows against every rank's texts, the texts travelling around the ring through the
    common rotation loop (distributed.ring_visit / ring_accumulate: at most two text shards held). Forward:
    rows L_i summed over shards (a sigmoid loss has no normaliser to merge, unlike the softmax ring).
    Backward: each shard travels again with its dY accumulator; dX, ds, db stay local."""

    @staticmethod
    def forward(ctx, images, texts, scale, bias, coef, ring):
        chosen, group, make_spec, sizes = ring
        images_d, scale_d, bias_d = images.detach(), scale.detach(), bias.detach()
        parts = []
        ring_visit(group, sizes, [texts.detach()],
                   lambda shards, owner: parts.append(chosen.row_losses(make_spec(images_d, shards[0], owner,
                                                                                  scale_d, bias_d))))
        rows = torch.stack(parts).sum(0)
        ctx.save_for_backward(images, texts, scale, bias, coef)
        ctx.ring, ctx.has_coef = ring, coef is not None
        return rows if coef is None else (rows * coef.to(rows.dtype)).sum()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        images, texts, scale, bias, coef = ctx.saved_tensors
        chosen, group, make_spec, sizes = ctx.ring
        c = coef.to(grad.dtype) * grad if ctx.has_coef else grad
        images_d, scale_d, bias_d = images.detach(), scale.detach(), bias.detach()
        local = []  # (dX, ds, db) of every shard

        def grad_of(shards, owner):
            gx, gy, gs, gb = chosen.grads(make_spec(images_d, shards[0], owner, scale_d, bias_d), c)
            local.append((gx, gs, gb))
            return gy

        acc = torch.float64 if texts.dtype == torch.float64 else torch.float32
        dY = ring_accumulate(group, sizes, [texts.detach()], grad_of, acc)
        dX, ds, db = (torch.stack(parts).sum(0) for parts in zip(*local))
        return (dX.to(images.dtype), dY.to(texts.dtype), ds.to(scale.dtype).reshape(scale.shape),
                db.to(bias.dtype).reshape(bias.shape), None, None)


# ----------------------------------------------------------------------------- validation

def _scalar(name: str, value, acc: torch.dtype, device) -> Tensor:
    """logit_scale / logit_bias as a 0-dim tensor in the accumulation dtype (differentiable when it requires
    grad: its gradient flows back through this conversion)."""
    if isinstance(value, Tensor):
        return value.reshape(()).to(device=device, dtype=acc)
    if not math.isfinite(float(value)):
        raise ValueError(f"{name} must be finite, got {value}")
    return torch.tensor(float(value), dtype=acc, device=device)


def _check_weight(weight, bsz: int, like: Tensor) -> Optional[Tensor]:
    if weight is None:
        return None
    if not isinstance(weight, Tensor) or not weight.is_floating_point() or weight.shape != (bsz,):
        shape = tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__
        dtype = f" {weight.dtype}" if isinstance(weight, Tensor) else ""
        raise ValueError(f"weight must be a floating tensor of shape [B] = [{bsz}] (one per image), got {shape}{dtype}")
    _check_data("weight", weight)
    if weight.device != like.device:
        raise ValueError(f"weight must be on the features' device {like.device}, got {weight.device}")
    return require(weight, ~torch.isfinite(weight) | (weight < 0), "weight must hold finite values >= 0")


def _check_mask(mask, bsz: int, device) -> Tensor:
    if not isinstance(mask, Tensor):
        mask = torch.as_tensor(mask)
    _check_data("mask", mask)
    if mask.shape != (bsz, bsz) or mask.is_complex():
        raise ValueError(f"mask must be a bool or 0/1 tensor of shape [B, B] = [{bsz}, {bsz}], got "
                         f"{tuple(mask.shape)} {mask.dtype}")
    mask = mask.to(device)
    bad = (mask != 0) & (mask != 1)
    return require(mask, bad, "mask must hold 0/1 (or bool) entries: z_ij is +1 on a positive, -1 elsewhere")\
        .to(torch.uint8).contiguous()


def _not_compiled(process_group) -> None:
    if process_group is not None and compiling():
        raise ValueError("process_group cannot be combined with torch.compile in this version (compile the model, "
                         "call the loss outside the compiled region)")


def _reduce_rows(rows: Tensor, weight: Optional[Tensor], reduction: str) -> Tensor:
    """"none": w_i L_i; "sum": sum_i w_i L_i; "mean": that over sum_i w_i (over B without weights), 0 when 0."""
    w = None if weight is None else weight.to(rows.dtype)
    if reduction == "none":
        return rows if w is None else w * rows
    total = rows.sum() if w is None else (w * rows).sum()
    if reduction == "sum":
        return total
    if w is None:
        return total / rows.shape[0]
    den = w.sum()
    return torch.where(den > 0, total / torch.where(den > 0, den, 1.0), 0.0)


# ----------------------------------------------------------------------------- the functional API

@agreed
@deferred_errors
def siglip_loss(image_features, text_features, logit_scale, logit_bias=None, labels=None, mask=None, *,
                negative_only=False, reduction="mean", weight=None, backend="auto", process_group=None,
                distributed="gather") -> Tensor:
    """SigLIP's sigmoid loss, ``-(1/B) sum_i sum_j log sigmoid(z_ij (logit_scale x_i . y_j + logit_bias))``.

    ``image_features``, ``text_features``: ``[B, D]``, the same dtype (float16, bfloat16, float32, float64) and
    device; used as given (SigLIP models normalise them before the loss). ``logit_scale``: the exponentiated
    multiplier as open_clip passes it, a number > 0 or a one-element tensor; ``logit_bias``: a number or a
    one-element tensor (None: 0). Both get exact gradients when they require grad.
    z_ij = +1 on positives, -1 elsewhere. Positives: pair (i, i) by default; ``labels [B]``: every pair with equal
    labels (a caption or class shared by several images is then not pushed apart); ``mask [B, B]`` of 0/1;
    ``negative_only=True``: none at all (open_clip's term for other ranks' texts).
    ``reduction``: "mean" (open_clip's 1/B; with ``weight``, sum_i w_i L_i / sum_i w_i, 0 when that sum is 0),
    "sum" (sum_i w_i L_i) or "none" (w_i L_i per image, [B]). ``weight [B]``: one finite weight >= 0 per image
    row (it gets a gradient when it requires one, except with a process group).
    Computed in fp32 (float64 for float64 inputs) without ever forming the B x B matrix (chunked, triton);
    returned in that accumulation dtype.

    ``process_group``: each rank passes its local batch; the loss is that of the global batch (the ranks' batches
    concatenated in rank order), every gradient world_size x this rank's share so that DDP's averaging matches one
    process (fused_contrastive.distributed); "none" returns this rank's rows (gradients scaled alike). ``distributed="gather"`` gathers
    the texts (O(N D) per rank); ``"ring"`` passes them around the ring, never holding more than two text shards.
    open_clip's ``SigLipLoss`` returns each rank's own term instead, normalised by the local batch b_r:
    with equal batches the mean over ranks of its losses is this loss, and its gradients equal these; in general
    ``sum_r b_r L_r(open_clip) / sum_r b_r`` is this loss. ``mask`` is local and cannot be combined with a group.
    """
    _pair("image_features", image_features, "text_features", text_features)
    _check_choice("reduction", reduction, REDUCTIONS)
    _check_choice("backend", backend, BACKEND_CHOICES)
    _check_choice("distributed", distributed, DISTRIBUTED_MODES)
    _check_choice("negative_only", negative_only, (False, True))
    _not_compiled(process_group)
    _check_logit_scale(logit_scale)  # NaN while tracing: the op checks the value when the graph runs
    _check_logit_bias(logit_bias)
    bsz, device = image_features.shape[0], image_features.device
    acc = torch.float64 if image_features.dtype == torch.float64 else torch.float32
    if labels is not None and mask is not None:
        raise ValueError("labels and mask cannot both be given: pass one description of the positives")
    if negative_only and (labels is not None or mask is not None):
        raise ValueError("negative_only=True has no positives: it cannot be combined with labels or mask")
    if mask is not None and process_group is not None:
        raise ValueError("mask cannot be combined with process_group (a [B, B] mask is local); pass labels")
    if labels is not None:
        labels = _check_labels(labels, bsz, device)
    if mask is not None:
        mask = _check_mask(mask, bsz, device)
    weight = _check_weight(weight, bsz, image_features)
    _check_finite(logit_scale=logit_scale if isinstance(logit_scale, Tensor) else None)
    scale = _scalar("logit_scale", logit_scale, acc, device)
    bias = _scalar("logit_bias", 0.0 if logit_bias is None else logit_bias, acc, device)
    images, texts = image_features.contiguous(), text_features.contiguous()
    positives = "none" if negative_only else "labels" if labels is not None else "mask" if mask is not None \
        else "diagonal"
    with torch.autocast(device.type, enabled=False):
        if process_group is not None:
            return _distributed(images, texts, scale, bias, labels, positives, weight, reduction, backend,
                                process_group, distributed)
        ids = None if labels is None else dense_ids(labels)[0]
        if compiling():
            rows = siglip_rows_op(images, texts, scale, bias, ids, ids, mask, positives, 0, backend)
            return _reduce_rows(rows, weight, reduction)
        def make_spec(x, y, s, b):
            return SigLipSpec(x, y, s.reshape(()), b.reshape(()), positives, 0,
                              None if ids is None else (ids, ids), mask)

        chosen = select(make_spec(images, texts, scale, bias), backend)
        return _local_loss(images, texts, scale, bias, weight, reduction, make_spec, chosen)


def _row_coef(weight: Optional[Tensor], reduction: str, bsz: int, acc, device) -> Optional[Tensor]:
    """c_i of the reduction per unit upstream gradient, when it is known before the backward (None: "none", or
    a weight that itself requires grad)."""
    if reduction == "none" or (weight is not None and weight.requires_grad):
        return None
    w = torch.ones(bsz, dtype=acc, device=device) if weight is None else weight.detach().to(acc)
    if reduction == "sum":
        return w
    den = w.sum()
    return w / torch.where(den > 0, den, 1.0)


def _local_loss(images, texts, scale, bias, weight, reduction, make_spec, chosen):
    acc = torch.float64 if images.dtype == torch.float64 else torch.float32
    coef = _row_coef(weight, reduction, images.shape[0], acc, images.device)
    if coef is None:
        return _reduce_rows(_SigLip.apply(images, texts, scale, bias, None, make_spec, chosen), weight, reduction)
    return _SigLip.apply(images, texts, scale, bias, coef, make_spec, chosen)


def _distributed(images, texts, scale, bias, labels, positives, weight, reduction, backend, group, mode):
    """Gather or ring mode (see siglip_loss): this rank's image rows against the global texts."""
    check_group(group)
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    acc = torch.float64 if images.dtype == torch.float64 else torch.float32
    if mode == "gather":
        batch = gather_batch(group, texts, labels)
        all_texts, all_labels = batch.tensors
    else:  # only the labels (O(N) numbers) are gathered; the texts travel around the ring
        batch = gather_batch(group, labels if labels is not None else torch.zeros(images.shape[0], device=images.device),
                             layout=(images.shape[1], labels is None))
        all_labels = batch.tensors[0] if labels is not None else None
    ids = None if all_labels is None else dense_ids(all_labels)[0]
    offset, sizes = batch.offset, batch.sizes
    row_ids = None if ids is None else ids[offset:offset + images.shape[0]]

    if mode == "gather":
        def make_spec(x, y, s, b):
            return SigLipSpec(x, y, s.reshape(()), b.reshape(()), positives, offset,
                              None if ids is None else (row_ids, ids))

        chosen = select(make_spec(images, all_texts, scale, bias), backend)
    else:
        starts = [sum(sizes[:r]) for r in range(world)]

        def make_spec(x, y, owner, s, b):  # the diagonal lies only in this rank's own shard
            pos = positives if positives != "diagonal" or owner == rank else "none"
            col_ids = None if ids is None else ids[starts[owner]:starts[owner] + sizes[owner]]
            return SigLipSpec(x, y, s.reshape(()), b.reshape(()), pos, 0, None if ids is None else (row_ids, col_ids))

        chosen = select(make_spec(images, texts, rank, scale, bias), backend)
        ring = (chosen, group, make_spec, sizes)

    def local(coef):
        if mode == "gather":
            return _SigLip.apply(images, all_texts, scale, bias, coef, make_spec, chosen)
        return _RingSigLip.apply(images, texts, scale, bias, coef, ring)

    # The weights are constants across ranks (no gradient of their own), as in the other losses' gather mode.
    w = torch.ones(images.shape[0], dtype=acc, device=images.device) if weight is None else weight.detach().to(acc)
    if reduction == "none":  # this rank's rows w_i L_i; gradients world_size x this rank's share, as for the mean
        rows = w * local(None)
        return world * rows + (rows - world * rows).detach()
    local_sum = local(w)
    totals = torch.stack([local_sum.detach(), w.detach().sum()])
    dist.all_reduce(totals, group=group)
    global_sum, global_w = totals[0], totals[1]
    if reduction == "sum":
        scaled = world * local_sum
        return scaled + (global_sum - scaled).detach()
    safe = torch.where(global_w > 0, global_w, 1.0)
    scaled = world * local_sum / safe
    # Value: the global loss. Gradient: world_size x this rank's share (the gather's backward, or the ring's
    # travelling accumulator, adds the other ranks' text gradients), which DDP's average turns into the
    # single-process gradient.
    return torch.where(global_w > 0, scaled + (global_sum / safe - scaled).detach(), 0.0 * scaled)


# ----------------------------------------------------------------------------- the module

OPEN_CLIP_DIST_IMPLS = {None: "ring", "bidir": "ring", "shift": "ring", "gather": "gather", "reduce": "gather"}


class SigLipLoss(nn.Module):
    """open_clip's ``SigLipLoss``: the same constructor ``(cache_labels=False, rank=0, world_size=1,
    dist_impl=None)`` and call ``forward(image_features, text_features, logit_scale, logit_bias,
    output_dict=False)`` (``{"contrastive_loss": loss}`` when ``output_dict``), computed by ``siglip_loss``.

    ``world_size > 1`` means the default process group (torch.distributed initialised, with this rank and world
    size, else a ValueError). open_clip's exchange strategies map onto the two exact modes: "bidir" (its default,
    also for None) and "shift" onto ring mode, "gather" and "reduce" onto gather mode; any other value is refused.
    Unlike open_clip, every rank returns the loss of the global batch (open_clip returns the rank's own term:
    with equal local batches, the mean of those terms over ranks is this loss and the gradients are identical),
    and texts of other ranks with an equal label are positives when ``labels`` are given.
    ``cache_labels`` is accepted and has no effect (no B x B label matrix is built). Keyword-only extras:
    ``reduction``, ``backend``, ``distributed`` (overrides the mode dist_impl selects), and per call ``labels``,
    ``mask``, ``weight``, ``negative_only``.

    Example:
        >>> import torch, fused_contrastive as fc
        >>> criterion = fc.SigLipLoss()
        >>> image, text = torch.nn.functional.normalize(torch.randn(2, 8, 16), dim=-1)
        >>> scale, bias = torch.tensor(10.0, requires_grad=True), torch.tensor(-10.0, requires_grad=True)
        >>> criterion(image, text, scale, bias).backward()
    """

    def __init__(self, cache_labels: bool = False, rank: int = 0, world_size: int = 1, dist_impl: Optional[str] = None,
                 *, reduction: str = "mean", backend: str = "auto", distributed: Optional[str] = None):
        super().__init__()
        if dist_impl not in OPEN_CLIP_DIST_IMPLS:
            raise ValueError(f"dist_impl must be one of {tuple(OPEN_CLIP_DIST_IMPLS)} (open_clip's strategies), got "
                             f"{dist_impl!r}")
        for name, value in (("rank", rank), ("world_size", world_size)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise ValueError(f"{name} must be an integer, got {value!r}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank and world_size must satisfy 0 <= rank < world_size, got rank={rank}, "
                             f"world_size={world_size}")
        _check_choice("reduction", reduction, REDUCTIONS)
        _check_choice("backend", backend, BACKEND_CHOICES)
        if distributed is not None:
            _check_choice("distributed", distributed, DISTRIBUTED_MODES)
        self.cache_labels, self.rank, self.world_size, self.dist_impl = cache_labels, int(rank), int(world_size), dist_impl
        self.reduction, self.backend = reduction, backend
        self.distributed = distributed or OPEN_CLIP_DIST_IMPLS[dist_impl]

    def _group(self):
        if self.world_size == 1:
            return None
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError(f"world_size={self.world_size} needs torch.distributed initialised (the loss uses the "
                             "default process group)")
        if dist.get_world_size() != self.world_size or dist.get_rank() != self.rank:
            raise ValueError(f"rank={self.rank}, world_size={self.world_size} disagree with the default process group "
                             f"(rank {dist.get_rank()} of {dist.get_world_size()})")
        return dist.group.WORLD

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale, logit_bias=None,
                output_dict: bool = False, *, labels=None, mask=None, weight=None, negative_only: bool = False):
        loss = siglip_loss(image_features, text_features, logit_scale, logit_bias, labels, mask,
                           negative_only=negative_only, reduction=self.reduction, weight=weight, backend=self.backend,
                           process_group=self._group(), distributed=self.distributed)
        return {"contrastive_loss": loss} if output_dict else loss

    def extra_repr(self) -> str:
        return (f"rank={self.rank}, world_size={self.world_size}, dist_impl={self.dist_impl!r}, "
                f"distributed={self.distributed!r}, reduction={self.reduction!r}, backend={self.backend!r}")
