"""CACR (Zheng et al., "Contrastive Attraction and Contrastive Repulsion for Representation Learning").

The attraction (a sample's own views, O(n V^2) distances) is plain torch. The repulsion of a pair of views
(x, y) compares every anchor x_i with every other sample's y_j through squared distances, a softmax over them
per anchor: each backend supplies the per-row statistics of a d_ij over the keys (max, sum e^{a d - m},
sum d e^{a d - m}) and the gradient tiles; a row's repulsion is then O(1) from its statistics. The same two
operations serve one process, gather mode (this rank's anchors against the gathered views) and ring mode (the
view shards travel; distributed.ring_visit / ring_accumulate).

Per-anchor rows: with the Euclidean cost the loss is a mean over samples i of
``row_i = (1/V) sum_x A_xi + (1/P) sum_{x<y} R_xy,i`` (A: sample i's attraction as query view x; R: anchor
x_i's repulsion against view y; P = V (V - 1) / 2 pairs), so ``reduction`` and ``weight`` act on these rows.
The RBF cost's repulsion is the log of a batch mean, not a mean of rows: mean only.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import dispatch
from .compiled import deferred_errors
from .distributed import _gather_rows, agreed, check_group, gather_batch, ring_accumulate, ring_visit
from .family import _example, _number
from .losses import _accum_dtype, _check_choice, _check_data, _check_finite, _check_weight, _LossModule
from .renyicl import DISTRIBUTED_MODES, TileOps, _blocks, _no_cuda, kernel_rows, merge_exp_stats, not_traced
from .spec import REDUCTIONS, normalize_rows

COSTS = ("euclidean", "rbf")
CHOICES = ("full", "none", "without_w1", "without_w2")  # the authors' ablations: which conditional weights stay


# ----------------------------------------------------------------------------- torch tiles (chunked, reference)

def _sq_dist(X: Tensor, Y: Tensor) -> Tensor:
    """||x_i - y_j||^2 from the Gram product (what a tile computes): [len(X), len(Y)], clamped at 0."""
    return ((X * X).sum(1)[:, None] + (Y * Y).sum(1)[None, :] - 2 * X @ Y.T).clamp_(min=0)


def _diag(diag: Tensor, r0: int, r1: int):
    """(rows, columns) of the block's anchors whose own sample is among the keys."""
    col = diag[r0:r1]
    has = col >= 0
    return torch.arange(r1 - r0, device=diag.device)[has], col[has]


def torch_stats(X, Y, diag, a, acc, step: Optional[int] = None, XS=None, YS=None):
    """(m, s, ws) of a d_ij per row over the keys j != diag[i] (see triton_kernels/cacr.py)."""
    from .chunked import block_rows

    R = X.shape[0]
    step = step or block_rows(Y.shape[0])
    Xa, Ya = X.to(acc), Y.to(acc)
    m = torch.full((R,), float("-inf"), dtype=acc, device=X.device)
    s, ws = torch.zeros(R, dtype=acc, device=X.device), torch.zeros(R, dtype=acc, device=X.device)
    for r0, r1 in _blocks(R, step):  # two [rows, M] tiles at a time: the distances and e^{a d - m}
        d = _sq_dist(Xa[r0:r1], Ya)
        e = d * a
        e[_diag(diag, r0, r1)] = float("-inf")  # the anchor's own sample is out
        mm = e.amax(1) if Y.shape[0] else e.new_full((r1 - r0,), float("-inf"))
        e.sub_(torch.where(torch.isfinite(mm), mm, 0.0)[:, None]).exp_()
        m[r0:r1], s[r0:r1], ws[r0:r1] = mm, e.sum(1), torch.einsum("ij,ij->i", d, e)
    return m, s, ws


def torch_grads(X, Y, diag, terms, acc, need_dx=True, need_dy=True, step: Optional[int] = None, XS=None, YS=None):
    """(dX, dY) of the tile G_ij = e^{a0 d - m0_i} (c0_i + e0_i d) [+ e^{a1 d - m1_i} c1_i] (j != diag[i])."""
    from .chunked import block_rows

    R = X.shape[0]
    step = step or block_rows(Y.shape[0])
    Xa, Ya = X.to(acc), Y.to(acc)
    dX = torch.zeros(X.shape, dtype=acc, device=X.device) if need_dx else None
    dY = torch.zeros(Y.shape, dtype=acc, device=Y.device) if need_dy else None
    for r0, r1 in _blocks(R, step):
        d = _sq_dist(Xa[r0:r1], Ya)
        a0, m0, c0, e0 = terms[0]
        G = (d * a0).sub_(m0[r0:r1, None]).exp_().mul_((d * e0[r0:r1, None]).add_(c0[r0:r1, None]))
        if len(terms) > 1:
            a1, m1, c1 = terms[1]
            G.add_((d * a1).sub_(m1[r0:r1, None]).exp_().mul_(c1[r0:r1, None]))
        G[_diag(diag, r0, r1)] = 0.0
        if need_dx:  # d_ij = |x_i|^2 + |y_j|^2 - 2 x_i . y_j
            dX[r0:r1] = 2 * (Xa[r0:r1] * G.sum(1)[:, None] - G @ Ya)
        if need_dy:
            dY.add_(2 * (Ya * G.sum(0)[:, None] - G.T @ Xa[r0:r1]))
    return dX, dY


def _triton():
    return dispatch.triton_kernels("cacr")[0]


def _triton_why_not(spec) -> Optional[str]:
    module, reason = dispatch.triton_kernels("cacr")
    if module is None:
        return reason
    from .triton_kernels import renyicl as shared

    return shared.why_not(spec.dtype, spec.device, spec.dim, fp16_ok=False)


BACKENDS = {
    "cuda": TileOps("cuda", _no_cuda("CACR"), None, None, ("cuda",)),
    "triton": TileOps("triton", _triton_why_not, lambda *a, **k: _triton().stats(*a, **k),
                      lambda *a, **k: _triton().grads(*a, **k), ("cuda",)),
    "chunked": TileOps("chunked", lambda spec: None, torch_stats, torch_grads),
    "reference": TileOps("reference", lambda spec: None, lambda X, Y, *a, **k: torch_stats(X, Y, *a, **k, step=max(X.shape[0], 1)),
                         lambda X, Y, *a, **k: torch_grads(X, Y, *a, **k, step=max(X.shape[0], 1)), dense=True),
}
AUTO_ORDER = ("triton", "chunked")


def choose(backend: str, dtype, device, dim: int) -> TileOps:
    from types import SimpleNamespace

    return dispatch.choose(SimpleNamespace(dtype=dtype, device=device, dim=dim), backend, BACKENDS, AUTO_ORDER, device)


# ----------------------------------------------------------------------------- one pair of views' rows

@dataclasses.dataclass
class _Plan:
    ops: TileOps
    kind: str  # "mean_d": sum_j w_ij d_ij, w = softmax_j(a1 d); "lse": LSE_j(a1 d) [- LSE_j(a0 d)]
    a1: float
    a0: Optional[float]  # "lse" only: the second LSE's coefficient, subtracted (None: none)
    diag: Tensor  # [R] each anchor's own sample among the keys this rank holds (ring: its own shard), -1 none
    acc: torch.dtype
    group: object = None
    mode: str = "gather"
    shard_rows: Optional[list] = None


def _scales(XS, YS) -> dict:
    return {} if XS is None else {"XS": XS, "YS": YS}


def _pair_stats(plan: _Plan, X: Tensor, XS, Y: Tensor, YS, a: float) -> tuple[Tensor, Tensor, Tensor]:
    if plan.mode != "ring":
        return plan.ops.stats(X, Y, plan.diag, a, plan.acc, **_scales(XS, YS))
    rank = dist.get_rank(plan.group)
    none = torch.full_like(plan.diag, -1)
    parts = []

    def visit(shards, owner):
        parts.append(plan.ops.stats(X, shards[0], plan.diag if owner == rank else none, a, plan.acc,
                                    **_scales(XS, shards[1] if len(shards) > 1 else None)))

    ring_visit(plan.group, plan.shard_rows, [Y] + ([YS] if YS is not None else []), visit)
    return merge_exp_stats(parts)


class _PairRows(torch.autograd.Function):
    """Per anchor row of X [R, D] against the keys Y (one process or gather: all of view y; ring: this rank's
    shard, the others visiting), the row quantity of ``plan.kind``; differentiable through the weights.
    ``side`` = (rows, scales) of X and Y that the tiles read (kernel_rows; None: X and Y themselves)."""

    @staticmethod
    def forward(ctx, X: Tensor, Y: Tensor, side, plan: _Plan):
        Xk, XS, Yk, YS = side if side is not None else (X, None, Y, None)
        m1, s1, ws1 = _pair_stats(plan, Xk, XS, Yk, YS, plan.a1)
        if plan.kind == "mean_d":
            rows = ws1 / s1
            saved = (m1, s1, rows)
        else:
            rows = m1 + torch.log(s1)
            saved = (m1, s1)
            if plan.a0 is not None:
                m0, s0, _ = _pair_stats(plan, Xk, XS, Yk, YS, plan.a0)
                rows = rows - (m0 + torch.log(s0))
                saved += (m0, s0)
        ctx.save_for_backward(Xk, XS, Yk, YS, *saved)
        ctx.plan = plan
        return rows

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        X, XS, Y, YS, *saved = ctx.saved_tensors
        plan = ctx.plan
        g = grad.to(plan.acc)
        a1 = plan.a1
        if plan.kind == "mean_d":  # d/dd_ij of sum_j w_ij d_ij = w_ij (1 + a (d_ij - row_i))
            m1, s1, rows = saved
            terms = ((a1, m1, g * (1 - a1 * rows) / s1, g * a1 / s1),)
        else:  # d/dd_ij LSE_j(a d) = a softmax_j(a d)
            m1, s1 = saved[:2]
            terms = ((a1, m1, g * a1 / s1, torch.zeros_like(g)),)
            if plan.a0 is not None:
                m0, s0 = saved[2:]
                terms = ((plan.a0, m0, -g * plan.a0 / s0, torch.zeros_like(g)), (a1, m1, g * a1 / s1))
        need_dx, need_dy = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if plan.mode != "ring":
            dX, dY = plan.ops.grads(X, Y, plan.diag, terms, plan.acc, need_dx=need_dx, need_dy=need_dy,
                                    **_scales(XS, YS))
            return dX, dY, None, None
        rank = dist.get_rank(plan.group)
        none = torch.full_like(plan.diag, -1)
        dX = torch.zeros(X.shape, dtype=plan.acc, device=X.device) if need_dx else None

        def grad_of(shards, owner):
            dx, dy = plan.ops.grads(X, shards[0], plan.diag if owner == rank else none, terms, plan.acc,
                                    need_dx=need_dx, need_dy=need_dy, **_scales(XS, shards[1] if len(shards) > 1 else None))
            if need_dx:
                dX.add_(dx)
            return dy

        shards = [Y] + ([YS] if YS is not None else [])
        dY = None
        if need_dy:
            dY = ring_accumulate(plan.group, plan.shard_rows, shards, grad_of, plan.acc)
        elif need_dx:
            ring_visit(plan.group, plan.shard_rows, shards, grad_of)
        return dX, dY, None, None


def _dense_rows(X: Tensor, Y: Tensor, kind: str, a1: float, a0: Optional[float]) -> Tensor:
    """The reference: every distance of the pair (an [n, n] matrix), the softmax / LSE over each row's other
    samples, autograd."""
    n = X.shape[0]
    d = _sq_dist(X, Y)
    off = ~torch.eye(n, dtype=torch.bool, device=X.device)
    d = d[off].reshape(n, n - 1)
    if kind == "mean_d":
        return (torch.softmax(a1 * d, 1) * d).sum(1)
    rows = torch.logsumexp(a1 * d, 1)
    return rows if a0 is None else rows - torch.logsumexp(a0 * d, 1)


# ----------------------------------------------------------------------------- the loss

def _attraction(z: Tensor, alpha: float, tau_pos: float, weighted: bool) -> Tensor:
    """Per sample, sum over query views x of sum_p w_p alpha ||z_x - z_p||^2 over the sample's other views p,
    w = softmax_p(tau_pos ||z_x - z_p||^2) (differentiated through), or the plain mean over p (unweighted)."""
    views = z.shape[1]
    sq = ((z[:, :, None] - z[:, None, :]) ** 2).sum(-1)  # [n, V, V]
    off = ~torch.eye(views, dtype=torch.bool, device=z.device)
    sq = sq[:, off].reshape(z.shape[0], views, views - 1)
    w = torch.softmax(tau_pos * sq, dim=-1) if weighted else torch.full_like(sq, 1.0 / (views - 1))
    return (alpha * sq * w).sum(-1).sum(1)


@agreed
@deferred_errors
def cacr_loss(features, *, alpha=1.0, beta=1.0, tau_pos=1.0, tau_neg=1.0, normalize=False, backend="auto",
              reduction="mean", weight=None, cost="euclidean", choice="full", debiased=False, tau_plus=0.1, rbf_t=2.0,
              process_group=None, distributed="gather") -> Tensor:
    """CACR (Zheng et al., "Contrastive Attraction and Contrastive Repulsion for Representation Learning"), the
    authors' loss with their options.

    ``features [n, V, D]`` (V >= 2 views of n >= 2 samples). Attraction: for each query view x and sample i,
    ``sum_p w_p alpha ||z_xi - z_pi||^2`` over the sample's other views p, ``w = softmax_p(tau_pos ||.||^2)`` (the
    farther positives weigh more), averaged over samples and over x. Repulsion: for each pair of views x < y,
    ``mean_i -beta sum_{j != i} w_ij ||z_xi - z_yj||^2``, ``w_ij = softmax_j(-tau_neg ||.||^2)`` (the closer
    negatives weigh more), averaged over the pairs. The loss is their sum; the softmax weights are
    differentiated through, as in the authors' code.

    Options (the authors'): ``choice`` "full" (both weightings), "without_w1" (uniform attraction weights),
    "without_w2" (uniform repulsion weights), "none" (both uniform). ``debiased=True`` (Euclidean cost, weighted
    repulsion): each anchor's repulsion becomes ``(-tau_plus ||z_xi - z_yi||^2 - beta sum_j w_ij ||.||^2) /
    (1 - tau_plus)``, ``tau_plus`` in [0, 1). ``cost="rbf"``: the repulsion of a pair is
    ``beta log mean_i sum_{j != i} w_ij e^{-rbf_t ||.||^2}`` (same weights w; unweighted: ``beta log`` of the mean of
    ``e^{-rbf_t ||.||^2}`` over all pairs i != j), ``rbf_t > 0`` (the authors use 2); the attraction stays Euclidean.

    ``reduction`` / ``weight [n]``: with the Euclidean cost the loss is the mean over samples of the rows
    ``(1/V) sum_x A_xi + (1/P) sum_{x<y} R_xy,i`` (A: sample i's attraction as query view x, R: the repulsion of
    anchor z_xi against view y, P pairs); "sum" and "none" ([n]) act on them, ``weight`` weighs them (the mean
    then divides by sum w). The RBF repulsion is the log of a batch mean, not a mean of rows: mean only.
    Features are used as given (the authors' encoder L2-normalises its output), or normalised first with
    ``normalize=True``. Backends: triton (fused distance tiles; bf16 / fp32), chunked (torch tiles, O(n) saved),
    reference (dense). ``process_group``: each rank passes its local batch and gets the global loss, every
    gradient world_size x this rank's share; ``distributed="gather"`` all-gathers the features, ``"ring"`` passes
    each view's shards around the ring.
    """
    not_traced("cacr_loss")
    _check_choice("backend", backend, dispatch.BACKEND_CHOICES)
    _check_choice("reduction", reduction, REDUCTIONS)
    _check_choice("distributed", distributed, DISTRIBUTED_MODES)
    _check_choice("normalize", normalize, (False, True))
    _check_choice("cost", cost, COSTS)
    _check_choice("choice", choice, CHOICES)
    _check_choice("debiased", debiased, (False, True))
    if (not isinstance(features, Tensor) or features.dim() != 3 or not features.is_floating_point()
            or features.shape[0] < (2 if process_group is None else 1) or features.shape[1] < 2):
        shape = tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__
        raise ValueError(f"features must be a floating tensor of shape [n, V, D] with n >= 2 and V >= 2, got {shape}")
    _check_data("features", features)
    _check_finite(features=features)
    alpha, beta = _number("alpha", alpha), _number("beta", beta)
    tau_pos, tau_neg = _number("tau_pos", tau_pos), _number("tau_neg", tau_neg)
    tau_plus = _number("tau_plus", tau_plus, 0.0, 1.0, closed_high=False)
    rbf_t = _number("rbf_t", rbf_t)
    weighted_pull, weighted_push = choice in ("full", "without_w2"), choice in ("full", "without_w1")
    if cost == "rbf":
        if not rbf_t > 0:
            raise ValueError(f"rbf_t must be > 0 (the RBF cost e^(-rbf_t d)), got {rbf_t}")
        if debiased:
            raise ValueError("debiased: the authors' debiasing is defined for the Euclidean cost only (cost='euclidean')")
        if reduction != "mean" or weight is not None:
            raise ValueError("reduction and weight: with cost='rbf' the repulsion is the log of a batch mean, not a "
                             "mean of per-sample rows; only reduction='mean' without weight is defined")
    if debiased and not weighted_push:
        raise ValueError(f"debiased: the authors' debiasing applies to the weighted repulsion only, not choice={choice!r}")
    n, views = features.shape[0], features.shape[1]
    weight = _check_weight(weight, [(n,)], features.device, "one per sample")
    ops = choose(backend, features.dtype, features.device, features.shape[2])
    acc = _accum_dtype(features)
    z = features.to(acc)
    if normalize:
        z = normalize_rows(z.reshape(-1, z.shape[-1]), acc).reshape(z.shape)
    device = z.device
    fused = ops.name == "triton"
    z_k, z_s = kernel_rows(features, normalize, features.dtype, acc) if fused else (None, None)
    group, mode, sizes, offset, world = process_group, "gather", None, 0, 1
    all_z, all_k, all_s, total = z, z_k, z_s, n
    if group is not None:
        check_group(group)
        mode, world = distributed, dist.get_world_size(group)
        if mode == "gather":
            batch = gather_batch(group, z, z_k, z_s)
            all_z, all_k, all_s = batch.tensors
        else:
            batch = gather_batch(group, torch.zeros(n, 1, device=device))
        sizes, offset, total = batch.sizes, batch.offset, batch.total
        if total < 2:
            raise ValueError(f"features need n >= 2 samples over all ranks, got n = {total}")
    diag = torch.arange(n, device=device) + (offset if mode == "gather" else 0)
    if cost == "euclidean":
        plan = _Plan(ops, "mean_d", -tau_neg if weighted_push else 0.0, None, diag, acc, group, mode, sizes)
    elif weighted_push:
        plan = _Plan(ops, "lse", -(tau_neg + rbf_t), -tau_neg, diag, acc, group, mode, sizes)
    else:
        plan = _Plan(ops, "lse", -rbf_t, None, diag, acc, group, mode, sizes)
    pairs = [(x, y) for x in range(views) for y in range(x + 1, views)]
    push = z.new_zeros(n if cost == "euclidean" else ())
    for x, y in pairs:
        X, Y = z[:, x], all_z[:, y]
        if group is None and ops.dense:
            rows = _dense_rows(X, Y, plan.kind, plan.a1, plan.a0)
        else:
            side = None
            if fused:
                side = (z_k[:, x].contiguous(), None if z_s is None else z_s[:, x].contiguous(), all_k[:, y].contiguous(),
                        None if all_s is None else all_s[:, y].contiguous())
            rows = _PairRows.apply(X, Y, side, plan)
        if cost == "euclidean":
            rows = -beta * rows
            if debiased:
                rows = (rows - tau_plus * ((z[:, x] - z[:, y]) ** 2).sum(1)) / (1 - tau_plus)
            push = push + rows / len(pairs)
        else:
            count = total * (1 if weighted_push else total - 1)  # the mean over anchors, or over all pairs i != j
            push = push + _log_mean_exp(rows, count, group, world, sizes) * (beta / len(pairs))
    pull = _attraction(z, alpha, tau_pos, weighted_pull) / views
    out = acc if features.dtype == torch.float64 else torch.float32
    if cost == "rbf":
        return _reduce(pull, None, "mean", group, world).to(out) + push.to(out)
    return _reduce(pull + push, weight, reduction, group, world).to(out)


def _log_mean_exp(rows: Tensor, count: int, group, world: int, sizes) -> Tensor:
    """log(sum_i e^{rows_i} / count) over every rank's rows (``sizes``): the global value; with a group, the
    gradient world_size x this rank's share."""
    if group is None:
        return torch.logsumexp(rows, 0) - math.log(count)
    everyone = _gather_rows(rows.detach(), sizes, group, differentiable=False)
    total = torch.logsumexp(everyone, 0)
    share = world * (torch.exp(rows.detach() - total) * rows).sum()
    return share + (total - math.log(count) - share).detach()


def _reduce(rows: Tensor, weight: Optional[Tensor], reduction: str, group, world: int) -> Tensor:
    """The reduction of per-sample rows over the global batch (a group: the value global, the gradient world_size
    x this rank's share; "none": this rank's rows w_i row_i)."""
    w = torch.ones_like(rows) if weight is None else weight.to(rows.dtype)
    if group is None:
        if reduction == "none":
            return w * rows
        total = (w * rows).sum()
        if reduction == "sum":
            return total
        den = w.sum()
        return total / den if float(den) > 0 else total * 0
    w = w.detach()
    if reduction == "none":
        weighted = w * rows
        return world * weighted + (weighted - world * weighted).detach()
    local_sum = (w * rows).sum()
    totals = torch.stack([local_sum.detach(), w.sum()])
    dist.all_reduce(totals, group=group)
    global_sum, global_w = totals[0], totals[1]
    if reduction == "sum":
        scaled = world * local_sum
        return scaled + (global_sum - scaled).detach()
    safe = torch.where(global_w > 0, global_w, torch.ones_like(global_w))
    scaled = world * local_sum / safe
    return torch.where(global_w > 0, scaled + (global_sum / safe - scaled).detach(), 0.0 * scaled)


class CACRLoss(_LossModule):
    __doc__ = """Module form of ``cacr_loss`` (CACR, Zheng et al.). ``forward(features [n, V, D], *, weight=None)``.
    """ + _example("criterion = fc.CACRLoss(tau_pos=1.0, tau_neg=1.0)",
                   "loss = criterion(torch.nn.functional.normalize(torch.randn(8, 2, 16), dim=-1).requires_grad_())")

    fn = staticmethod(cacr_loss)

    def __init__(self, *, alpha=1.0, beta=1.0, tau_pos=1.0, tau_neg=1.0, normalize=False, backend="auto",
                 reduction="mean", cost="euclidean", choice="full", debiased=False, tau_plus=0.1, rbf_t=2.0,
                 process_group=None, distributed="gather"):
        for name, value in (("alpha", alpha), ("beta", beta), ("tau_pos", tau_pos), ("tau_neg", tau_neg),
                            ("rbf_t", rbf_t)):
            _number(name, value)
        _number("tau_plus", tau_plus, 0.0, 1.0, closed_high=False)
        _check_choice("cost", cost, COSTS)
        _check_choice("choice", choice, CHOICES)
        _check_choice("debiased", debiased, (False, True))
        _check_choice("distributed", distributed, DISTRIBUTED_MODES)
        super().__init__(alpha=alpha, beta=beta, tau_pos=tau_pos, tau_neg=tau_neg, normalize=normalize,
                         backend=backend, reduction=reduction, cost=cost, choice=choice, debiased=debiased,
                         tau_plus=tau_plus, rbf_t=rbf_t, process_group=process_group, distributed=distributed)

    def forward(self, features: Tensor, *, weight: Optional[Tensor] = None) -> Tensor:
        return cacr_loss(features, weight=weight, **self.kwargs)
