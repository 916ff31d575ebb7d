"""FairKL (Barbano et al., "Unbiased Supervised Contrastive Learning"): the bias regulariser, alone and added to
epsilon-SupInfoNCE, from per-row moments of the similarities accumulated tile by tile.

The authors' regulariser is a statistic of the whole batch, not of each anchor: with ``s_ij = z_i . z_j / tau``
over every ordered pair of rows (self pairs included), the pairs fall into four groups by whether the two rows
share the label (positive p / negative n) and the bias label (aligned a / conflicting c). Per group g: the mean
``mu_g`` of s over the group's pairs, and ``sigma_g``, the unbiased standard deviation of the N x N matrix that
holds s on the group's pairs and 0 elsewhere (all N^2 entries count, as in their code). Then

    R = (mu_pc - mu_pa)^2 + (mu_na - mu_nc)^2 + kld [(sigma_pa - sigma_pc)^2 + (sigma_na - sigma_nc)^2]
        - mu_pc + mu_na

(the authors' code: squared differences of the groups' Gaussian parameters standing in for the paper's KL
divergence between them) depends on the features only through eight sums, ``S1_g = sum_{(i,j) in g} s_ij`` and ``S2_g = sum s_ij^2``
(the group sizes come from the labels alone). Each is a sum over rows of a per-row moment, so the tiles of
anchor rows against key columns accumulate ``[N, 8]`` per-row moments (O(N) extra memory), summed over rows
and, across ranks, over processes. The gradient flows through the moments: ``dR/ds_ij = a_g + 2 b_g s_ij``
with ``a_g = dR/dS1_g`` and ``b_g = dR/dS2_g``, one number each per group. Because the groups are symmetric
(pair (i, j) is in the same group as (j, i)), a row's gradient is ``dz_i = (2 / tau) sum_j (a_g + 2 b_g s_ij)
z_j``: one more row-parallel pass over the tiles, no column reduction, and across ranks only the rows' own
side is needed (each rank computes its rows' gradient against every key; none travels back).

Backends (``moments(q, q_ids, k, k_ids) -> [Nq, 8]`` of the raw dot products ``d_ij = q_i . k_j``: columns
0-3 the sums of d over pa, pc, na, nc, 4-7 the sums of d^2; ``grads(q, q_ids, k, k_ids, coef [8]) -> [Nq, D]``
``sum_j (coef[g] + 2 coef[4 + g] d_ij) k_j``; ids ``[n, 2]``: label id, bias id): ``reference`` dense masks in
float64 (the oracle), ``chunked`` row blocks in PyTorch, ``triton`` the kernels of
``fused_contrastive.triton_kernels.fairkl``. The temperature enters only the scalar formula (``S1 = D1 / tau``,
``S2 = D2 / tau^2``), so its gradient comes from autograd on eight numbers.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import chunked, dispatch
from .compiled import deferred_errors
from .distributed import _exchanged_sizes, agreed, check_group, gather_batch, ring_visit
from .losses import (CONTRAST_MODES, _LossModule, _accum_dtype, _as_labels, _check_base_temperature, _check_choice,
                     _check_finite, _check_nan_labels, _flatten_views, dense_ids)
from .family import _number, _tau, eps_supinfonce_loss
from .spec import normalize_rows

GROUPS = ("pa", "pc", "na", "nc")  # group index g = 2 * (labels differ) + (bias labels differ)
DISTRIBUTED_MODES = ("gather", "ring")


def _columns(ids: Tensor) -> tuple[Tensor, Tensor]:
    return ids[:, 0].contiguous(), ids[:, 1].contiguous()


def _group_index(q_cols: tuple, k_cols: tuple, start: int = 0, stop: Optional[int] = None) -> Tensor:
    """[stop - start, M] group index (int64) of the pairs of rows [start, stop) (``_columns`` of their ids) and
    every key: built in uint8 and converted once (4x faster on CPU than int64 arithmetic on the tile)."""
    (qy, qb), (ky, kb) = q_cols, k_cols
    g = torch.ne(qy[start:stop, None], ky[None, :]).to(torch.uint8).mul_(2)
    return g.add_(torch.ne(qb[start:stop, None], kb[None, :])).long()


# ----------------------------------------------------------------------------- reference: dense, float64

def reference_moments(q: Tensor, q_ids: Tensor, k: Tensor, k_ids: Tensor) -> Tensor:
    d = q.double() @ k.double().T
    g = _group_index(_columns(q_ids), _columns(k_ids))
    first = [torch.where(g == i, d, 0.0).sum(1) for i in range(4)]
    second = [torch.where(g == i, d * d, 0.0).sum(1) for i in range(4)]
    return torch.stack(first + second, 1).to(_accum_dtype(q))


def reference_grads(q: Tensor, q_ids: Tensor, k: Tensor, k_ids: Tensor, coef: Tensor) -> Tensor:
    d = q.double() @ k.double().T
    g = _group_index(_columns(q_ids), _columns(k_ids))
    coef = coef.double()
    ds = torch.zeros_like(d)
    for i in range(4):
        ds = torch.where(g == i, coef[i] + 2 * coef[4 + i] * d, ds)
    return (ds @ k.double()).to(_accum_dtype(q))


# ----------------------------------------------------------------------------- chunked: row blocks in PyTorch

def chunked_moments(q: Tensor, q_ids: Tensor, k: Tensor, k_ids: Tensor) -> Tensor:
    """Blocks of rows against all keys ([block, M] tiles, chunked.block_rows' size): the block's dot products,
    scattered by group into 4 row sums, squared in place, scattered again."""
    acc = _accum_dtype(q)
    q, k = q.to(acc), k.to(acc)
    out = torch.zeros(q.shape[0], 8, dtype=acc, device=q.device)
    q_cols, k_cols = _columns(q_ids), _columns(k_ids)
    step = chunked.block_rows(k.shape[0])
    for start in range(0, q.shape[0], step):
        stop = min(q.shape[0], start + step)
        d = q[start:stop] @ k.T
        g = _group_index(q_cols, k_cols, start, stop)
        out[start:stop, :4].scatter_add_(1, g, d)
        out[start:stop, 4:].scatter_add_(1, g, d.square_())
    return out


def chunked_grads(q: Tensor, q_ids: Tensor, k: Tensor, k_ids: Tensor, coef: Tensor) -> Tensor:
    acc = _accum_dtype(q)
    q, k, coef = q.to(acc), k.to(acc), coef.to(acc)
    a, b2 = coef[:4], 2 * coef[4:]
    out = torch.empty(q.shape, dtype=acc, device=q.device)
    q_cols, k_cols = _columns(q_ids), _columns(k_ids)
    step = chunked.block_rows(k.shape[0])
    for start in range(0, q.shape[0], step):
        stop = min(q.shape[0], start + step)
        g = _group_index(q_cols, k_cols, start, stop)
        ds = (q[start:stop] @ k.T).mul_(b2[g]).add_(a[g])
        out[start:stop] = ds @ k
    return out


# ----------------------------------------------------------------------------- dispatch

@dataclasses.dataclass(frozen=True)
class FairKLBackend:
    name: str
    why_not: Callable[[Tensor], Optional[str]]
    moments: Optional[Callable]
    grads: Optional[Callable]
    auto_devices: tuple = ("cpu", "cuda")


def _triton_module():
    return dispatch.triton_kernels("fairkl")


def _triton_why_not(z: Tensor) -> Optional[str]:
    module, reason = _triton_module()
    return reason if module is None else module.why_not(z)


def _always(z: Tensor) -> Optional[str]:
    return None


def _no_cuda_kernel(z: Tensor) -> Optional[str]:
    return "no CUDA kernel for FairKL's moments (its tiles are plain sums, no softmax): use triton"


BACKENDS = {
    "cuda": FairKLBackend("cuda", _no_cuda_kernel, None, None, auto_devices=("cuda",)),
    "triton": FairKLBackend("triton", _triton_why_not, lambda *a: _triton_module()[0].moments(*a),
                            lambda *a: _triton_module()[0].grads(*a), auto_devices=("cuda",)),
    "chunked": FairKLBackend("chunked", _always, chunked_moments, chunked_grads),
    "reference": FairKLBackend("reference", _always, reference_moments, reference_grads),
}
AUTO_ORDER = ("triton", "chunked")  # reference is the oracle, never chosen by auto


def select(z: Tensor, backend: str = "auto") -> FairKLBackend:
    return dispatch.choose(z, backend, BACKENDS, AUTO_ORDER, z.device)


# ----------------------------------------------------------------------------- the moments, differentiable

@dataclasses.dataclass
class _Plan:
    """Where the keys are: ``mode`` None (one process: the rows are the keys), "gather" (``keys``, ``key_ids``:
    every rank's rows, gathered) or "ring" (``shard_rows``: every rank's row count; the rows travel)."""
    chosen: FairKLBackend
    mode: Optional[str] = None
    group: object = None
    keys: Optional[Tensor] = None
    key_ids: Optional[Tensor] = None
    shard_rows: Optional[list] = None


def _over_keys(plan: _Plan, rows: Tensor, ids: Tensor, op) -> Tensor:
    """sum over every key shard of ``op(keys, key_ids)`` for these rows."""
    if plan.mode is None:
        return op(rows, ids)
    if plan.mode == "gather":
        return op(plan.keys, plan.key_ids)
    total = None

    def visit(shards, owner):  # this rank's rows and ids travel together; every rank's shard visits once
        nonlocal total
        part = op(shards[0], shards[1])
        total = part if total is None else total + part

    ring_visit(plan.group, plan.shard_rows, [rows, ids], visit)
    return total


class _Moments(torch.autograd.Function):
    """The eight global sums ``[D1_pa, D1_pc, D1_na, D1_nc, D2_pa, ...]`` of ``d_ij = z_i . z_j`` (float64),
    from this process's rows ``z`` against every key. Backward: ``dz_i = 2 sum_j (a_g + 2 b_g d_ij) z_j`` (the
    pair matrix is symmetric: the key side's gradient equals the row side's), times world_size across ranks
    (every rank returns the global sums, so DDP's average of world_size x each rank's share is the gradient)."""

    @staticmethod
    def forward(ctx, z: Tensor, ids: Tensor, plan: _Plan):
        rows = z.detach().contiguous()
        per_row = _over_keys(plan, rows, ids, lambda k, k_ids: plan.chosen.moments(rows, ids, k, k_ids))
        sums = per_row.double().sum(0)
        if plan.mode is not None:
            dist.all_reduce(sums, group=plan.group)
        ctx.save_for_backward(z, ids)
        ctx.plan = plan
        return sums

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        z, ids = ctx.saved_tensors
        plan = ctx.plan
        rows = z.detach().contiguous()
        coef = grad.double()
        dz = _over_keys(plan, rows, ids, lambda k, k_ids: plan.chosen.grads(rows, ids, k, k_ids, coef))
        scale = 2.0 * (1 if plan.mode is None else dist.get_world_size(plan.group))
        return (dz * scale).to(z.dtype), None, None


def _pair_counts(ids: Tensor) -> Tensor:
    """[4] float64: the number of ordered pairs (self included) in each group, from the global rows' ids."""
    def square_sum(x):
        return (torch.bincount(x).double() ** 2).sum()

    n_bias = int(ids[:, 1].max()) + 1 if ids.numel() else 1
    rows = float(ids.shape[0])
    pa = square_sum(ids[:, 0] * n_bias + ids[:, 1])
    same_label, same_bias = square_sum(ids[:, 0]), square_sum(ids[:, 1])
    return torch.stack([pa, same_label - pa, same_bias - pa, rows * rows - same_label - same_bias + pa])


def _formula(moments: Tensor, counts: Tensor, tau, kld: float) -> Tensor:
    """R (module docstring) in float64 from the eight sums of raw dot products and the group sizes. A group
    without pairs has mean 0; sigma is 0 (with no gradient) where the variance is 0 or rounds below it."""
    tau = tau.double() if isinstance(tau, Tensor) else float(tau)
    pairs = float(counts.sum())
    first, second = moments[:4] / tau, moments[4:] / (tau * tau)
    mu = first / torch.clamp(counts, min=1)
    variance = torch.clamp(second - first * first / pairs, min=0) / max(pairs - 1, 1)
    has = variance > 0
    sigma = torch.where(has, torch.sqrt(torch.where(has, variance, torch.ones_like(variance))), 0.0)
    pa, pc, na, nc = range(4)
    return ((mu[pc] - mu[pa]) ** 2 + (mu[na] - mu[nc]) ** 2
            + kld * ((sigma[pa] - sigma[pc]) ** 2 + (sigma[na] - sigma[nc]) ** 2) - mu[pc] + mu[na])


# ----------------------------------------------------------------------------- the functional API

def _labels(name: str, labels, bsz: int, device) -> Tensor:
    labels = _as_labels(name, labels)
    if labels.dim() > 2 or (labels.dim() == 2 and labels.shape[1] != 1) or labels.numel() != bsz:
        raise ValueError(f"{name} must be a real tensor of shape [bsz] (or [bsz, 1]) with bsz = {bsz}, got shape "
                         f"{tuple(labels.shape)}")
    return _check_nan_labels(name, labels.reshape(-1)).to(device)


def _view_ids(labels: Tensor, bias_labels: Tensor, n_views: int) -> Tensor:
    """[bsz * n_views, 2] (label id, bias id) of the view rows, view-major as the features are stacked."""
    return torch.stack([dense_ids(labels)[0], dense_ids(bias_labels)[0]], 1).repeat(n_views, 1).contiguous()


def _rows(features: Tensor, normalize: bool, acc: torch.dtype) -> Tensor:
    """The view rows [n_views * bsz, D] (view-major), L2-normalised when asked (differentiably)."""
    z = features.transpose(0, 1).reshape(-1, features.shape[2])
    return normalize_rows(z, acc) if normalize else z


@agreed
@deferred_errors
def fairkl_regularizer(features, labels, bias_labels, *, temperature=1.0, kld=1.0, normalize=False, backend="auto",
                       process_group=None, distributed="gather") -> Tensor:
    """FairKL (Barbano et al., "Unbiased Supervised Contrastive Learning"), the batch statistic their code computes:
    with s_ij = z_i . z_j / temperature over every pair of rows (self included; the rows are the views of
    ``features [bsz, n_views, D]``, labels and ``bias_labels [bsz]`` repeated per view), mu_g and sigma_g are
    the mean of s over the pairs of group g and the standard deviation (unbiased) of s masked to g over all N^2
    pairs (zeros off g), for g in positive / negative (same label or not) x aligned / conflicting (same bias
    label or not): ``(mu_pc - mu_pa)^2 + (mu_na - mu_nc)^2 + kld [(sigma_pa - sigma_pc)^2 + (sigma_na -
    sigma_nc)^2] - mu_pc + mu_na``. The means and deviations are over the whole batch (all anchors' pairs
    pooled, as in the authors' code), not per anchor row: the tiles accumulate per-row sums of s and s^2 per
    group (O(N) memory, no N x N), which are then pooled. A group without pairs has mean 0; a deviation of 0
    has no gradient. A scalar in the accumulation dtype (fp32, float64 for float64 features), differentiable
    in the features and the temperature. The authors pass L2-normalised features and temperature 1.

    ``backend``: "auto" (triton on CUDA, else chunked), "triton", "chunked", "reference" (dense, the oracle);
    "cuda" has no kernel for this and says so. ``process_group``: the regulariser of the global batch (the
    ranks' batches concatenated), every rank returning it, the features' gradient world_size x this rank's
    share (DDP-exact, as every loss here; a tensor temperature gets the whole regulariser's gradient on every
    rank, which DDP's average keeps); ``distributed="gather"`` gathers the features (O(N D) per rank),
    ``"ring"`` passes each rank's rows around the ring instead (only the O(N) labels are gathered).
    """
    features = _flatten_views(features)
    _check_finite(features=features)
    bsz, n_views, _ = features.shape
    device = features.device
    labels = _labels("labels", labels, bsz, device)
    bias_labels = _labels("bias_labels", bias_labels, bsz, device)
    _check_choice("normalize", normalize, (False, True))
    _check_choice("backend", backend, dispatch.BACKEND_CHOICES)
    _check_choice("distributed", distributed, DISTRIBUTED_MODES)
    kld = _number("kld", kld, 0.0)
    acc = _accum_dtype(features)
    temperature, _ = _tau(temperature, acc)
    with torch.autocast(device.type, enabled=False):
        z = _rows(features, normalize, acc)
        if process_group is None:
            ids = _view_ids(labels, bias_labels, n_views)
            plan = _Plan(select(z, backend))
            counts = _pair_counts(ids)
        else:
            z, ids, plan, counts = _distributed_plan(features, z, labels, bias_labels, normalize, acc, backend,
                                                     process_group, distributed)
        moments = _Moments.apply(z, ids, plan)
        return _formula(moments, counts, temperature, kld).to(acc)


def _distributed_plan(features, z, labels, bias_labels, normalize, acc, backend, group, mode):
    """(rows, their ids, the plan, the global pair counts) of this rank in gather or ring mode."""
    check_group(group)
    n_views = features.shape[1]
    if mode == "gather":
        batch = gather_batch(group, features.detach(), labels, bias_labels)
        all_features, all_labels, all_bias = batch.tensors
    else:
        batch = gather_batch(group, labels, bias_labels, layout=tuple(features.shape[1:]))
        all_labels, all_bias = batch.tensors
    ids_global = torch.stack([dense_ids(all_labels)[0], dense_ids(all_bias)[0]], 1)
    ids = ids_global[batch.offset:batch.offset + batch.size].repeat(n_views, 1).contiguous()
    chosen = select(z, backend)
    if mode == "gather":
        keys = _rows(all_features, normalize, acc).detach().contiguous()
        plan = _Plan(chosen, "gather", group, keys, ids_global.repeat(n_views, 1).contiguous())
    else:
        plan = _Plan(chosen, "ring", group, shard_rows=[n * n_views for n in batch.sizes])
    return z, ids, plan, _pair_counts(ids_global.repeat(n_views, 1))


@agreed
@deferred_errors
def fairkl_loss(features, labels, bias_labels, *, epsilon=0.1, temperature=0.1, base_temperature=None,
                fairkl_weight=1.0, kld=1.0, contrast_mode="all", normalize=False, backend="auto",
                process_group=None, reduction="mean", weight=None, distributed="gather") -> Tensor:
    """eps-SupInfoNCE plus ``fairkl_weight`` x the FairKL regulariser (Barbano et al.): ``eps_supinfonce_loss``
    on ``features [bsz, n_views, D]`` and ``labels`` (with ``epsilon``, ``base_temperature``, ``contrast_mode``,
    ``reduction``, ``weight``), and ``fairkl_regularizer`` on the same view rows with ``bias_labels [bsz]`` (the
    same temperature and ``normalize``; ``kld``). The regulariser is one number per batch, not a sum over
    anchors: ``reduction`` is "mean" or "sum" (the regulariser is added once, unweighted) and ``weight`` weighs
    the eps-SupInfoNCE anchors only. ``backend`` serves both terms ("cuda" runs eps-SupInfoNCE; the regulariser
    has no CUDA kernel and takes "auto"'s choice). ``process_group`` / ``distributed`` ("gather" or "ring"):
    both terms over the global batch, as the two functions do."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum' for fairkl_loss (the regulariser is one number per "
                         f"batch), got {reduction!r}")
    fairkl_weight = _number("fairkl_weight", fairkl_weight, 0.0)
    _check_choice("distributed", distributed, DISTRIBUTED_MODES)
    flat = _flatten_views(features)
    _labels("bias_labels", bias_labels, flat.shape[0], flat.device)  # refused before any work (and collective)
    if process_group is not None:  # this call's agreement first: the two terms then exchange their own
        check_group(process_group)
        _exchanged_sizes(process_group, flat.shape[0])
    loss = eps_supinfonce_loss(features, labels, epsilon=epsilon, temperature=temperature,
                               base_temperature=base_temperature, contrast_mode=contrast_mode, normalize=normalize,
                               backend=backend, reduction=reduction, weight=weight, process_group=process_group,
                               distributed=distributed)
    if fairkl_weight == 0:
        return loss
    regulariser = fairkl_regularizer(features, labels, bias_labels, temperature=temperature, kld=kld,
                                     normalize=normalize, backend="auto" if backend == "cuda" else backend,
                                     process_group=process_group, distributed=distributed)
    return loss + fairkl_weight * regulariser.to(loss.dtype)


class FairKLLoss(_LossModule):
    __doc__ = """Module form of ``fairkl_loss``: eps-SupInfoNCE plus ``fairkl_weight`` x FairKL (Barbano et al.).

    ``forward(features [bsz, n_views, D], labels [bsz], bias_labels [bsz], *, weight=None)``; ``reduction``
    "mean" or "sum" (the regulariser is one number per batch); ``process_group`` and ``distributed`` as in
    ``fairkl_loss``.

    Example:
        >>> import torch, fused_contrastive as fc
        >>> criterion = fc.FairKLLoss(epsilon=0.1, temperature=0.1, fairkl_weight=1.0, kld=1.0)
        >>> features = torch.nn.functional.normalize(torch.randn(8, 2, 16), dim=-1).requires_grad_()
        >>> loss = criterion(features, torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]), torch.tensor([0, 0, 1, 1, 0, 1, 0, 1]))
    """

    fn = staticmethod(fairkl_loss)

    def __init__(self, *, epsilon=0.1, temperature=0.1, base_temperature=None, fairkl_weight=1.0, kld=1.0,
                 contrast_mode="all", normalize=False, backend="auto", reduction="mean", process_group=None,
                 distributed="gather"):
        _number("epsilon", epsilon, 0.0)
        _number("fairkl_weight", fairkl_weight, 0.0)
        _number("kld", kld, 0.0)
        _check_base_temperature(base_temperature)
        _check_choice("contrast_mode", contrast_mode, CONTRAST_MODES)
        _check_choice("reduction", reduction, ("mean", "sum"))
        _check_choice("distributed", distributed, DISTRIBUTED_MODES)
        super().__init__(epsilon=epsilon, temperature=temperature, base_temperature=base_temperature,
                         fairkl_weight=fairkl_weight, kld=kld, contrast_mode=contrast_mode, normalize=normalize,
                         backend=backend, reduction=reduction, process_group=process_group, distributed=distributed)

    def forward(self, features: Tensor, labels: Tensor, bias_labels: Tensor, *,
                weight: Optional[Tensor] = None) -> Tensor:
        return fairkl_loss(features, labels, bias_labels, weight=weight, **self.kwargs)
