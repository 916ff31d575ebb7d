"""RényiCL (Lee et al., "RényiCL: Contrastive Representation Learning with Skew Rényi Divergence").

The loss of one target view is a batch-level ratio of exponentially weighted sums over all its positive and
negative logits. Each backend supplies two tile operations over (anchor rows, key rows): the per-row
statistics of the negatives (row max of gamma l, sum e^{gamma l - m}, sum l e^{gamma l - m}) and the positive
logit, and the gradient tiles given the batch's scalars. Everything between (the ratio, its derivative per
logit) is O(rows) torch. The same two operations serve one process, gather mode (this rank's anchors against
the gathered targets) and ring mode (the target shards travel; distributed.ring_visit / ring_accumulate); the
per-row statistics of every rank are all-gathered (O(rows) numbers) so every rank forms the same scalars.
"""
from __future__ import annotations

import dataclasses
from types import SimpleNamespace
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import dispatch
from .compiled import compiling, deferred_errors
from .distributed import (_gather_rows, agreed, check_group, gather_batch, ring_accumulate, ring_visit)
from .family import _example, _number
from .losses import _accum_dtype, _check_choice, _check_data, _check_finite, _check_inverse, _LossModule
from .spec import NORMALIZE_EPS, normalize_rows

DISTRIBUTED_MODES = ("gather", "ring")


def not_traced(loss: str) -> None:
    if compiling():
        raise ValueError(f"{loss} does not run under torch.compile in this version (its batch-level statistics have "
                         "no compiled op): call it outside the compiled region")


# ----------------------------------------------------------------------------- per-row statistics, merged

def merge_exp_stats(parts: list) -> tuple[Tensor, Tensor, Tensor]:
    """(m, s, ws) of several key shards merged: m = max, the sums rescaled to it (a shard without any term has
    m = -inf and sums 0)."""
    m_all = torch.stack([p[0] for p in parts])
    s_all = torch.stack([p[1] for p in parts])
    ws_all = torch.stack([p[2] for p in parts])
    m = m_all.amax(0)
    safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    scale = torch.exp(m_all - safe)  # -inf shards: 0
    return m, (s_all * scale).sum(0), (ws_all * scale).sum(0)


def kernel_rows(raw: Tensor, normalize: bool, dtype: torch.dtype, acc: torch.dtype):
    """What the fused kernels read for the input rows ``raw`` [..., D]: (rows in ``dtype``, per-row scales in
    ``acc`` or None). Unnormalised: the inputs themselves. Normalised: each row times a power of two (exact in any
    dtype: no rounding of 16-bit inputs) and the scale that makes it F.normalize's row, so the kernels' logits
    are those of the rounded inputs normalised in ``acc``, not of normalised rows rounded again."""
    if not normalize:
        return raw.detach().to(dtype).contiguous(), None
    x = raw.detach().to(acc)
    amax = x.abs().amax(-1)
    exponent = torch.where(amax > 0, torch.frexp(amax)[1], 0).to(acc)  # amax = f 2^e, f in [0.5, 1)
    rows = torch.ldexp(x, -exponent[..., None])
    floor = torch.ldexp(torch.full_like(amax, NORMALIZE_EPS), -exponent)  # |x| < eps: x / eps (F.normalize)
    return rows.to(dtype).contiguous(), 1.0 / torch.maximum(torch.linalg.vector_norm(rows, dim=-1), floor)


def scale_kwargs(QS, KS) -> dict:
    return {} if QS is None else {"QS": QS, "KS": KS}


# ----------------------------------------------------------------------------- torch tiles (chunked, reference)

def _blocks(rows: int, step: int):
    for r0 in range(0, rows, step):
        yield r0, min(rows, r0 + step)


def torch_stats(Q: Tensor, K: Tensor, pos_col: Tensor, inv_tau: float, gamma: float, acc, step: Optional[int] = None,
                QS=None, KS=None):
    """(positive logit, m, s, ws) per row of Q against K (pos_col[r]: row r's positive column, -1 none), blocks
    of ``step`` rows (None: chunked's block size)."""
    from .chunked import block_rows

    R = Q.shape[0]
    step = step or block_rows(K.shape[0])
    Kt = K.to(acc).T
    pos, s, ws = (torch.zeros(R, dtype=acc, device=Q.device) for _ in range(3))
    m = torch.full((R,), float("-inf"), dtype=acc, device=Q.device)
    for r0, r1 in _blocks(R, step):  # two [rows, M] tiles at a time: the logits and e^{gamma l - m}
        S = (Q[r0:r1].to(acc) @ Kt).mul_(inv_tau)
        col = pos_col[r0:r1]
        has = col >= 0
        local, cols = torch.arange(r1 - r0, device=Q.device)[has], col[has]
        pos[r0:r1][has] = S[local, cols]
        e = S * gamma
        e[local, cols] = float("-inf")  # the positive is out of the negatives' sums
        mm = e.amax(1) if K.shape[0] else e.new_full((r1 - r0,), float("-inf"))
        e.sub_(torch.where(torch.isfinite(mm), mm, 0.0)[:, None]).exp_()
        m[r0:r1], s[r0:r1], ws[r0:r1] = mm, e.sum(1), torch.einsum("ij,ij->i", S, e)
    return pos, m, s, ws


def torch_grads(Q, K, pos_col, inv_tau: float, gamma: float, shift, factor, pos_weight, acc, need_dq=True,
                need_dk=True, step: Optional[int] = None, QS=None, KS=None):
    """(dQ, dK): logit gradients factor e^{gamma l - shift} on the negatives, pos_weight[r] on row r's positive."""
    from .chunked import block_rows

    R = Q.shape[0]
    step = step or block_rows(K.shape[0])
    Qa, Ka = Q.to(acc), K.to(acc)
    dQ = torch.zeros(Q.shape, dtype=acc, device=Q.device) if need_dq else None
    dK = torch.zeros(K.shape, dtype=acc, device=K.device) if need_dk else None
    for r0, r1 in _blocks(R, step):
        G = (Qa[r0:r1] @ Ka.T).mul_(gamma * inv_tau).sub_(shift).exp_().mul_(factor * inv_tau)  # dL/dl / tau
        col = pos_col[r0:r1]
        has = col >= 0
        G[torch.arange(r1 - r0, device=Q.device)[has], col[has]] = pos_weight[r0:r1][has].to(acc) * inv_tau
        if need_dq:
            dQ[r0:r1] = G @ Ka
        if need_dk:
            dK.addmm_(G.T, Qa[r0:r1])
    return dQ, dK


def _triton():
    return dispatch.triton_kernels("renyicl")[0]


def _triton_why_not(spec) -> Optional[str]:
    module, reason = dispatch.triton_kernels("renyicl")
    if module is None:
        return reason
    return _triton().why_not(spec.dtype, spec.device, spec.dim)


@dataclasses.dataclass(frozen=True)
class TileOps:
    """One backend's entry of a loss's backend table (dispatch.choose reads name, why_not, auto_devices)."""
    name: str
    why_not: Callable
    stats: Optional[Callable]
    grads: Optional[Callable]
    auto_devices: tuple = ("cpu", "cuda")
    dense: bool = False  # the reference: one process runs the dense autograd oracle instead of the tiles


def _no_cuda(loss: str):
    return lambda spec: f"no CUDA kernel for {loss}; use triton, chunked or reference"


BACKENDS = {
    "cuda": TileOps("cuda", _no_cuda("RényiCL"), None, None, ("cuda",)),
    "triton": TileOps("triton", _triton_why_not, lambda *a, **k: _triton().stats(*a, **k),
                      lambda *a, **k: _triton().grads(*a, **k), ("cuda",)),
    "chunked": TileOps("chunked", lambda spec: None, torch_stats, torch_grads),
    "reference": TileOps("reference", lambda spec: None,
                         lambda Q, K, *a, **k: torch_stats(Q, K, *a, **k, step=max(Q.shape[0], 1)),
                         lambda Q, K, *a, **k: torch_grads(Q, K, *a, **k, step=max(Q.shape[0], 1)), dense=True),
}
AUTO_ORDER = ("triton", "chunked")


def choose(backend: str, dtype, device, dim: int) -> TileOps:
    spec = SimpleNamespace(dtype=dtype, device=device, dim=dim)
    return dispatch.choose(spec, backend, BACKENDS, AUTO_ORDER, device)


# ----------------------------------------------------------------------------- the loss from the statistics

def _renyi_terms(pos: Tensor, neg: tuple, alpha: float, gamma: float, n_pos: int, n_neg: int):
    """The authors' loss of one target view from the per-row statistics: ``pos`` [R] the positive logits,
    ``neg`` = (row max m_i of gamma l over the negatives, sum_j e^{gamma l_ij - m_i}, sum_j l_ij e^{gamma l_ij - m_i})
    [R] each. Returns (loss, c1 [R] (dL/dl_ii of the first term), the negatives' global shift M and factor f:
    dL/dl_ij = f e^{gamma l_ij - M}, and the positives' factor of the second term g: + g e^{gamma l_ii - M})."""
    neg_max, neg_sum, neg_wsum = neg
    if gamma == 1:
        loss_1 = -pos.sum() / n_pos
        c1 = torch.full_like(pos, -1.0 / n_pos)
    else:  # a self-normalised weighted mean of the positives, weights e^{(gamma - 1) l} (constants to autograd)
        e1 = torch.exp((gamma - 1) * pos - ((gamma - 1) * pos).max())
        loss_1 = -(pos * e1).sum() / e1.sum()
        c1 = -e1 / e1.sum()
    # Second term: the alpha-mixture of the positive and negative means, weights e^{gamma l}, one global shift M.
    shift = torch.maximum((gamma * pos).max(), neg_max.max())
    e_pos = torch.exp(gamma * pos - shift)
    row_scale = torch.exp(neg_max - shift)  # a row without negatives: -inf, 0
    den = alpha * e_pos.sum() / n_pos + (1 - alpha) * (neg_sum * row_scale).sum() / n_neg
    num = alpha * (pos * e_pos).sum() / n_pos + (1 - alpha) * (neg_wsum * row_scale).sum() / n_neg
    return loss_1 + num / den, c1, shift, (1 - alpha) / n_neg / den, alpha / n_pos / den


@dataclasses.dataclass
class _Plan:
    """What one target view's term needs besides its tensors (all O(rows) metadata)."""
    ops: TileOps
    inv_tau: float
    alpha: float
    gamma: float
    pos_col: Tensor  # [R] the positive's column among the keys this rank holds (ring: its own shard)
    samples: int  # N, the global batch
    views: int  # source views per target view (V - 1)
    acc: torch.dtype
    group: object = None
    mode: str = "gather"
    row_sizes: Optional[list] = None  # every rank's anchor rows (the statistics' all-gather)
    shard_rows: Optional[list] = None  # ring: every rank's target rows

    def rank_world(self):
        if self.group is None:
            return 0, 1
        return dist.get_rank(self.group), dist.get_world_size(self.group)


class _RenyiTerm(torch.autograd.Function):
    """One target view's term of this rank's anchor rows Q [R, D] against the keys K (one process or gather:
    all N targets; ring: this rank's shard, the others visiting). ``side`` = (rows, scales) of Q and K that
    the tiles read (kernel_rows; None: Q and K themselves). Returns the global loss; the backward gives
    world_size x this rank's share (DDP-exact, see fused_contrastive.distributed)."""

    @staticmethod
    def forward(ctx, Q: Tensor, K: Tensor, side, plan: _Plan):
        ops, acc = plan.ops, plan.acc
        Qk, QS, Kk, KS = side if side is not None else (Q, None, K, None)
        rank, world = plan.rank_world()
        none = torch.full_like(plan.pos_col, -1)
        if plan.mode == "ring":
            parts, pos = [], torch.zeros(Q.shape[0], dtype=acc, device=Q.device)

            def visit(shards, owner):
                p, *neg = ops.stats(Qk, shards[0], plan.pos_col if owner == rank else none, plan.inv_tau, plan.gamma,
                                    acc, **scale_kwargs(QS, shards[1] if len(shards) > 1 else None))
                pos.add_(p)
                parts.append(neg)

            ring_visit(plan.group, plan.shard_rows, [Kk] + ([KS] if KS is not None else []), visit)
            m, s, ws = merge_exp_stats(parts)
        else:
            pos, m, s, ws = ops.stats(Qk, Kk, plan.pos_col, plan.inv_tau, plan.gamma, acc, **scale_kwargs(QS, KS))
        local = torch.stack([pos, m, s, ws], 1)
        start = 0
        if plan.group is not None:  # every rank's rows: O(rows) numbers, the same scalars everywhere
            start = sum(plan.row_sizes[:rank])
            local = _gather_rows(local, plan.row_sizes, plan.group, differentiable=False)
        n, v = plan.samples, plan.views
        loss, c1, shift, f_neg, g_pos = _renyi_terms(local[:, 0], (local[:, 1], local[:, 2], local[:, 3]), plan.alpha,
                                                     plan.gamma, v * n, v * n * (n - 1))
        ctx.save_for_backward(Qk, QS, Kk, KS, pos, c1[start:start + Q.shape[0]], shift, f_neg, g_pos)
        ctx.plan = plan
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        Qk, QS, Kk, KS, pos, c1, shift, f_neg, g_pos = ctx.saved_tensors
        plan = ctx.plan
        ops, acc = plan.ops, plan.acc
        rank, world = plan.rank_world()
        scale = grad.to(acc) * world
        pos_weight = (c1 + g_pos * torch.exp(plan.gamma * pos - shift)) * scale
        factor = f_neg * scale
        need_dq, need_dk = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if plan.mode != "ring":
            dQ, dK = ops.grads(Qk, Kk, plan.pos_col, plan.inv_tau, plan.gamma, shift, factor, pos_weight, acc,
                               need_dq=need_dq, need_dk=need_dk, **scale_kwargs(QS, KS))
            return dQ, dK, None, None
        none = torch.full_like(plan.pos_col, -1)
        dQ = torch.zeros(Qk.shape, dtype=acc, device=Qk.device) if need_dq else None

        def grad_of(shards, owner):
            dq, dk = ops.grads(Qk, shards[0], plan.pos_col if owner == rank else none, plan.inv_tau, plan.gamma,
                               shift, factor, pos_weight, acc, need_dq=need_dq, need_dk=need_dk,
                               **scale_kwargs(QS, shards[1] if len(shards) > 1 else None))
            if need_dq:
                dQ.add_(dq)
            return dk

        shards = [Kk] + ([KS] if KS is not None else [])
        dK = None
        if need_dk:
            dK = ring_accumulate(plan.group, plan.shard_rows, shards, grad_of, acc)
        elif need_dq:
            ring_visit(plan.group, plan.shard_rows, shards, grad_of)
        return dQ, dK, None, None


def _renyi_reference(Q: Tensor, K: Tensor, tau: float, alpha: float, gamma: float) -> Tensor:
    """Dense: every [n, n] logit matrix of the term, the weights detached (the oracle)."""
    n = Q.shape[1]
    logits = Q @ K.T / tau  # [S, n, n]
    eye = torch.eye(n, dtype=torch.bool, device=Q.device).expand_as(logits)
    pos, neg = logits[eye], logits[~eye]
    if gamma == 1:
        loss_1 = -pos.mean()
    else:
        w1 = torch.exp((gamma - 1) * (pos - pos.max())).detach()
        loss_1 = -(pos * w1).sum() / w1.sum()
    if neg.numel() == 0:
        neg = pos.new_zeros(1)[:0]
    shift = (gamma * torch.cat([pos, neg])).max().detach()
    w_pos, w_neg = torch.exp(gamma * pos - shift).detach(), torch.exp(gamma * neg - shift).detach()
    neg_mean = lambda x: x.sum() / max(neg.numel(), 1)  # noqa: E731 (an empty mean is 0: alpha = 1 or n = 1)
    den = alpha * w_pos.mean() + (1 - alpha) * neg_mean(w_neg)
    return loss_1 + (alpha * (pos * w_pos).mean() + (1 - alpha) * neg_mean(neg * w_neg)) / den


def _check_views(sources, targets) -> None:
    for name, x, views in (("sources", sources, None), ("targets", targets, 2)):
        if (not isinstance(x, Tensor) or x.dim() != 3 or not x.is_floating_point() or x.shape[0] < 1
                or (views is not None and x.shape[1] != views) or (views is None and x.shape[1] < 2)):
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"{name} must be a floating tensor of shape [n, {views or 'V >= 2'}, D], got {shape}")
        _check_data(name, x)
    if sources.shape[0] != targets.shape[0] or sources.shape[2] != targets.shape[2] or sources.dtype != targets.dtype \
            or sources.device != targets.device:
        raise ValueError(f"sources and targets must share n, D, dtype and device, got {tuple(sources.shape)} "
                         f"{sources.dtype} {sources.device} and {tuple(targets.shape)} {targets.dtype} {targets.device}")


@agreed
@deferred_errors
def renyicl_loss(sources, targets, *, temperature=0.5, alpha=1.0 / 65536, gamma=2.0, normalize=True, backend="auto",
                 reduction="mean", weight=None, process_group=None, distributed="gather") -> Tensor:
    """RényiCL (Lee et al., "RényiCL: Contrastive Representation Learning with Skew Rényi Divergence"), the
    authors' objective.

    ``sources [n, V, D]``: the online (predictor) outputs of V >= 2 views; ``targets [n, 2, D]``: the
    momentum outputs of views 0 and 1. For each target view t and every source view s != t,
    ``l_ij = src_s,i . tgt_t,j / temperature`` (rows L2-normalised first, as the authors do; ``normalize=False``
    uses them as given); positives l_ii, negatives l_ij (j != i). Per target view, over all its positives P and
    negatives N: ``-sum_P l e^{(gamma-1) l} / sum_P e^{(gamma-1) l}`` (``-mean_P l`` when gamma = 1) plus
    ``(alpha mean_P l e^{gamma l} + (1-alpha) mean_N l e^{gamma l}) / (alpha mean_P e^{gamma l} + (1-alpha)
    mean_N e^{gamma l})``, the exponential weights being constants to autograd (the authors' stop-gradients);
    the loss is the sum over t = 0, 1. Defaults are the authors' (temperature 0.5, alpha 1/65536, gamma 2).
    A batch-level ratio of sums, not a mean of per-anchor losses (the authors' code forms the same global
    ratio, its denominators all-gathered): only ``reduction="mean"`` without ``weight``.
    Backends: triton (per-row statistics and gradient tiles fused, O(rows) memory), chunked (the same in torch
    tiles), reference (dense). ``process_group``: each rank passes its local batch and gets the global batch's
    loss, every gradient world_size x this rank's share (fused_contrastive.distributed);
    ``distributed="gather"`` all-gathers the targets, ``"ring"`` passes their shards around the ring.
    """
    not_traced("renyicl_loss")
    _check_choice("backend", backend, dispatch.BACKEND_CHOICES)
    _check_choice("distributed", distributed, DISTRIBUTED_MODES)
    if reduction != "mean" or weight is not None:
        raise ValueError("reduction and weight: renyicl_loss is a batch-level ratio of sums, not a mean of "
                         "per-anchor losses; only reduction='mean' without weight is defined")
    _check_choice("normalize", normalize, (False, True))
    _check_views(sources, targets)
    if sources.shape[0] < 2 and process_group is None:
        raise ValueError(f"sources and targets need n >= 2 samples (the negatives of a row are the other samples), "
                         f"got n = {sources.shape[0]}")
    _check_finite(sources=sources, targets=targets)
    if isinstance(temperature, Tensor) and temperature.requires_grad:
        raise ValueError("temperature must be a number (or a tensor without grad) for renyicl_loss: its weights "
                         "are stop-gradient constants, the temperature gets no gradient here")
    tau = _number("temperature", float(temperature) if isinstance(temperature, Tensor) else temperature, 0.0)
    acc = _accum_dtype(sources)
    _check_inverse("temperature", tau, acc)
    if not tau > 0:
        raise ValueError(f"temperature must be > 0, got {tau}")
    alpha = _number("alpha", alpha, 0.0, 1.0)
    gamma = _number("gamma", gamma)
    ops = choose(backend, sources.dtype, sources.device, sources.shape[2])
    src = sources.to(acc)
    tgt = targets.to(acc)
    if normalize:
        src = normalize_rows(src.reshape(-1, src.shape[-1]), acc).reshape(src.shape)
        tgt = normalize_rows(tgt.reshape(-1, tgt.shape[-1]), acc).reshape(tgt.shape)
    n, views = src.shape[0], src.shape[1]
    device = src.device
    fused = ops.name == "triton"
    if fused:  # the rows the kernels read (the inputs' dtype), and their normalising scales
        src_k, src_s = kernel_rows(sources, normalize, sources.dtype, acc)
        tgt_k, tgt_s = kernel_rows(targets, normalize, sources.dtype, acc)
    group, mode, sizes, offset = process_group, "gather", None, 0
    if group is not None:
        check_group(group)
        mode = distributed
        if mode == "gather":
            batch = gather_batch(group, tgt, tgt_k if fused else None, tgt_s if fused else None)
            all_tgt, all_tgt_k, all_tgt_s = batch.tensors
        else:
            batch = gather_batch(group, torch.zeros(n, 1, device=device))
            all_tgt = tgt
            if fused:
                all_tgt_k, all_tgt_s = tgt_k, tgt_s
        sizes, offset, total = batch.sizes, batch.offset, batch.total
        if total < 2:
            raise ValueError(f"sources and targets need n >= 2 samples over all ranks, got n = {total}")
    else:
        all_tgt, total = tgt, n
        if fused:
            all_tgt_k, all_tgt_s = tgt_k, tgt_s
    local = torch.arange(n, device=device)
    loss = src.new_zeros(())
    for t in range(2):
        rows = [src[:, s] for s in range(views) if s != t]
        if group is None and ops.dense:
            loss = loss + _renyi_reference(torch.stack(rows), tgt[:, t], tau, alpha, gamma)
            continue
        Q = torch.cat(rows)  # rows s' * n + i
        pos_col = (local + (offset if mode == "gather" else 0)).repeat(views - 1)
        plan = _Plan(ops, 1.0 / tau, alpha, gamma, pos_col, total, views - 1, acc, group, mode,
                     None if sizes is None else [(views - 1) * b for b in sizes], sizes)
        side = None
        if fused:
            others = [s for s in range(views) if s != t]
            side = (torch.cat([src_k[:, s] for s in others]), None if src_s is None else torch.cat([src_s[:, s] for s in others]),
                    all_tgt_k[:, t].contiguous(), None if all_tgt_s is None else all_tgt_s[:, t].contiguous())
        loss = loss + _RenyiTerm.apply(Q, all_tgt[:, t], side, plan)
    return loss.to(torch.promote_types(sources.dtype, torch.float32)) if sources.dtype != torch.float64 else loss


class RenyiCLLoss(_LossModule):
    __doc__ = """Module form of ``renyicl_loss`` (RényiCL, Lee et al.). ``forward(sources [n, V, D],
    targets [n, 2, D])``.
    """ + _example("criterion = fc.RenyiCLLoss(temperature=0.5, gamma=2.0)",
                   "loss = criterion(torch.randn(8, 2, 16, requires_grad=True), torch.randn(8, 2, 16))")

    fn = staticmethod(renyicl_loss)

    def __init__(self, *, temperature=0.5, alpha=1.0 / 65536, gamma=2.0, normalize=True, backend="auto",
                 process_group=None, distributed="gather"):
        _number("temperature", temperature, 0.0)
        _number("alpha", alpha, 0.0, 1.0)
        _number("gamma", gamma)
        _check_choice("distributed", distributed, DISTRIBUTED_MODES)
        super().__init__(temperature=temperature, alpha=alpha, gamma=gamma, normalize=normalize, backend=backend,
                         process_group=process_group, distributed=distributed)

    def forward(self, sources: Tensor, targets: Tensor) -> Tensor:
        return renyicl_loss(sources, targets, **self.kwargs)
