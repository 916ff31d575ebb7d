"""Soft per-pair targets (SCE's teacher similarities, CoMatch's pseudo-label graph) for the reference and
chunked backends, one key shard at a time.

The loss of anchor i is a cross-entropy against a target distribution w_ij over its denominator keys:
``L_i = -sum_j w_ij log softmax_j(l_ij + b_ij) = LSE_i - sum_j w_ij (l_ij + b_ij)`` (sum_j w_ij = 1), and
its gradient in the logits is ``p_ij - w_ij``. The targets come from O(N) side inputs (teacher embeddings or
class probabilities, one row per anchor and per key): every tile rebuilds its own block of w from them, so
no [Na, M] target is passed or kept.

w needs a row normaliser over every key (the teacher's LSE over the candidate keys, the graph's row sum), so
the keys may come in shards (ring mode) and every statistic is one that merges across shards:
``soft_norm(spec)`` the normaliser over this spec's keys (teacher: merge by logaddexp; graph: by sum);
``soft_stats(spec, norm, pos_count)`` the denominator's LSE (logaddexp) and sum_j w_ij (l_ij + b_ij) (sum)
given the merged normaliser and positive count; ``soft_grads(spec, lse, norm, pos_count, coef)`` the shard's
dQ, dK of g_ij = coef_i (p_ij - w_ij). One process runs them on one shard holding every key (the normaliser
then comes from the same tile as the statistics). Chunked: tiles of whole anchor rows against the shard;
reference: dense, its gradient by autograd (an independent check of the hand-written p - w).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .spec import ContrastSpec, SoftTarget, inverse_pos_count, reduce_rows

NEG_INF = float("-inf")


def tile_masks(spec: ContrastSpec, rows: Tensor):
    """(in_den [R, M] bool, bias [R, M] (0 outside the denominator), a [R, M]) for anchor ``rows``: the keys in
    the denominator (not self, b_ij > -inf), the denominator log-weights, the positives (labels rule).
    in_den and bias are None when every key is in every denominator with b = 0 (the pair losses): the tile
    then skips those full-size mask passes."""
    acc = spec.accum_dtype
    in_den = bias = None
    a = spec.anchor_labels[rows][:, None] == spec.key_labels[None, :]
    if spec.self_offset is not None:
        cols = torch.arange(spec.num_keys, device=spec.device)
        in_den = cols[None, :] != spec.self_columns()[rows][:, None]
        a &= in_den
    if spec.den_bias is not None:
        b = spec.den_bias.tile(rows).to(acc)
        in_den = b > NEG_INF if in_den is None else in_den & (b > NEG_INF)
        bias = torch.where(in_den, b, 0.0)
    return in_den, bias, a.to(acc)


def _den_logits(S: Tensor, in_den, bias) -> Tensor:
    """l_ij + b_ij on the denominator, -inf elsewhere."""
    if bias is not None:
        S = S + bias
    return S if in_den is None else torch.where(in_den, S, NEG_INF)


def _lse(den_logits: Tensor, in_den) -> Tensor:
    """Row LSE over ``in_den`` (every column when None); -inf for a row without any (and no NaN)."""
    if in_den is None:
        return torch.logsumexp(den_logits, 1)
    has_den = in_den.any(1)
    return torch.where(has_den, torch.logsumexp(torch.where(has_den[:, None], den_logits, 0.0), 1), NEG_INF)


def _candidates(in_den, a: Tensor) -> Tensor:
    """The teacher's keys: in the denominator and not positives."""
    return a == 0 if in_den is None else in_den & (a == 0)


def _graph(target: SoftTarget, side: Tensor, in_den, a: Tensor) -> Tensor:
    """CoMatch's unnormalised graph u_ij: 1 on the positive (the self-loop), the probability product elsewhere
    where it reaches the threshold, 0 outside the denominator."""
    u = torch.where(a > 0, a, torch.where(side >= target.threshold, side, 0.0))
    return u if in_den is None else torch.where(in_den, u, 0.0)


def _norm_tile(target: SoftTarget, side: Tensor, in_den, a: Tensor) -> Tensor:
    """The row normaliser over this tile's keys: teacher log sum_j exp(t_ij / tau_t) over the candidates (-inf
    without any), graph sum_j u_ij."""
    if target.kind == "teacher":
        candidate = _candidates(in_den, a)
        return _lse(torch.where(candidate, side / target.tau_t, NEG_INF), candidate)
    return _graph(target, side, in_den, a).sum(1)


def _weights(target: SoftTarget, side: Tensor, in_den, a: Tensor, norm: Tensor, pos_count: Tensor) -> Tensor:
    """w_ij [R, M] given the rows' normaliser over every key: 0 outside the denominator; each row sums to 1 over
    all keys (to 0 on a row without positives, whose loss is 0 anyway). No gradient."""
    if target.kind == "teacher":
        # A row without any candidate key (one sample, no queue) puts its whole target on the positive, as the
        # authors' masked softmax does: lam = 1 there.
        has_candidate = torch.isfinite(norm)
        lam = torch.full_like(norm, target.lam).masked_fill_(~has_candidate, 1.0)[:, None]
        teacher = torch.exp(side / target.tau_t - torch.where(has_candidate, norm, 0.0)[:, None])
        teacher = torch.where(_candidates(in_den, a), teacher, 0.0)
        return lam * a * inverse_pos_count(pos_count)[:, None] + (1 - lam) * teacher
    return _graph(target, side, in_den, a) / torch.where(norm > 0, norm, 1.0)[:, None]


def _weighted_logits(w: Tensor, den_logits: Tensor, in_den) -> Tensor:
    """sum_j w_ij (l_ij + b_ij) with 0 where w is 0 (den_logits is -inf outside the denominator)."""
    if in_den is None:  # every logit finite
        return (w * den_logits).sum(1)
    return torch.where(w > 0, w * den_logits, 0.0).sum(1)


def _tile(spec: ContrastSpec, S: Tensor, rows: Tensor):
    """(den_logits, in_den, a, side) of anchor ``rows`` from their logits S against every key of the spec."""
    target = spec.soft_target
    in_den, bias, a = tile_masks(spec, rows)
    side = target.anchor_side[rows] @ target.key_side.T
    return _den_logits(S, in_den, bias), in_den, a, side


def _row_blocks(spec: ContrastSpec):
    from .chunked import block_rows

    step = block_rows(spec.num_keys)
    for r0 in range(0, spec.num_anchors, step):
        r1 = min(spec.num_anchors, r0 + step)
        yield r0, r1, torch.arange(r0, r1, device=spec.device)


def _inputs(spec: ContrastSpec) -> tuple[Tensor, Tensor, float]:
    acc = spec.accum_dtype
    return spec.anchors.to(acc), spec.keys.to(acc), spec.tau_value()


# ----------------------------------------------------------------------------- chunked: tiles of anchor rows

def soft_norm(spec: ContrastSpec) -> Tensor:
    """[Na] the target's row normaliser over this spec's keys (merge: logaddexp for "teacher", sum for
    "graph"). No logits needed: only the side inputs."""
    norm = torch.empty(spec.num_anchors, dtype=spec.accum_dtype, device=spec.device)
    for r0, r1, rows in _row_blocks(spec):
        in_den, _, a = tile_masks(spec, rows)
        side = spec.soft_target.anchor_side[rows] @ spec.soft_target.key_side.T
        norm[r0:r1] = _norm_tile(spec.soft_target, side, in_den, a)
    return norm


def _stats(spec: ContrastSpec, norm: Optional[Tensor], pos_count: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(lse, wsum, norm) over this spec's keys; ``norm`` None: the spec holds every key, so each tile takes the
    normaliser from its own rows (one pass instead of two)."""
    Q, K, tau = _inputs(spec)
    lse, wsum = torch.empty(Q.shape[0], dtype=Q.dtype, device=Q.device), torch.empty(Q.shape[0], dtype=Q.dtype,
                                                                                      device=Q.device)
    own_norm = norm is None
    norm = torch.empty_like(lse) if own_norm else norm
    for r0, r1, rows in _row_blocks(spec):
        den_logits, in_den, a, side = _tile(spec, Q[r0:r1] @ K.T / tau, rows)
        if own_norm:
            norm[r0:r1] = _norm_tile(spec.soft_target, side, in_den, a)
        w = _weights(spec.soft_target, side, in_den, a, norm[r0:r1], pos_count[r0:r1])
        lse[r0:r1] = _lse(den_logits, in_den)
        wsum[r0:r1] = _weighted_logits(w, den_logits, in_den)
    return lse, wsum, norm


def soft_stats(spec: ContrastSpec, norm: Tensor, pos_count: Tensor) -> tuple[Tensor, Tensor]:
    """(lse [Na], wsum [Na]) over this spec's keys given the merged normaliser and the global positive count:
    the denominator's LSE (merge: logaddexp) and sum_j w_ij (l_ij + b_ij) (merge: sum); L_i = lse_i - wsum_i
    over the merged values (0 on rows without positives)."""
    lse, wsum, _ = _stats(spec, norm, pos_count)
    return lse, wsum


def soft_grads(spec: ContrastSpec, lse: Tensor, norm: Tensor, pos_count: Tensor, coef: Tensor
               ) -> tuple[Tensor, Tensor]:
    """(dQ, dK) of this spec's tiles, accumulation dtype: g_ij = coef_i (p_ij - w_ij) with p_ij = exp(l_ij + b_ij
    - lse_i) (the merged lse), dQ = sum_j g_ij k_j / tau, dK = sum_i g_ij q_i / tau. ``coef`` must be 0 on
    rows without positives (their loss is 0). dtau is the caller's: -(1/tau) sum_i q_i . dQ_i."""
    Q, K, tau = _inputs(spec)
    dQ, dK = torch.empty_like(Q), torch.zeros_like(K)
    safe = torch.where(torch.isfinite(lse), lse, 0.0)  # (a row without any key: p = 0)
    for r0, r1, rows in _row_blocks(spec):
        den_logits, in_den, a, side = _tile(spec, Q[r0:r1] @ K.T / tau, rows)
        w = _weights(spec.soft_target, side, in_den, a, norm[r0:r1], pos_count[r0:r1])
        G = den_logits.sub_(safe[r0:r1, None]).exp_().sub_(w).mul_(coef[r0:r1, None])
        torch.mm(G, K, out=dQ[r0:r1])
        dK.addmm_(G.T, Q[r0:r1])
    return dQ.div_(tau), dK.div_(tau)


# ----------------------------------------------------------------------------- reference: dense, autograd

def _dense(spec: ContrastSpec, logits: Tensor, norm: Optional[Tensor], pos_count: Tensor):
    """(lse, wsum, norm) from the dense logits [Na, M] (differentiable in them); ``norm`` None: from these keys."""
    den_logits, in_den, a, side = _tile(spec, logits, torch.arange(spec.num_anchors, device=spec.device))
    if norm is None:
        norm = _norm_tile(spec.soft_target, side, in_den, a)
    w = _weights(spec.soft_target, side, in_den, a, norm, pos_count)
    return _lse(den_logits, in_den), _weighted_logits(w, den_logits, in_den), norm


def dense_rows(spec: ContrastSpec, logits: Tensor, rows: Tensor) -> tuple[Tensor, Tensor]:
    """(L_i, has_pos_i) from dense logits [Na, M] of every anchor (the reference backend; autograd-friendly)."""
    assert rows.numel() == spec.num_anchors
    pos_count = spec.pos_count()
    has_pos = pos_count > 0
    lse, wsum, _ = _dense(spec, logits, None, pos_count)
    return torch.where(has_pos, lse - wsum, torch.zeros_like(lse)), has_pos


def dense_soft_norm(spec: ContrastSpec) -> Tensor:
    """soft_norm, densely."""
    target = spec.soft_target
    in_den, _, a = tile_masks(spec, torch.arange(spec.num_anchors, device=spec.device))
    return _norm_tile(target, target.anchor_side @ target.key_side.T, in_den, a)


def dense_soft_stats(spec: ContrastSpec, norm: Tensor, pos_count: Tensor) -> tuple[Tensor, Tensor]:
    """soft_stats, densely."""
    Q, K, tau = _inputs(spec)
    lse, wsum, _ = _dense(spec, Q @ K.T / tau, norm, pos_count)
    return lse, wsum


def dense_soft_grads(spec: ContrastSpec, lse: Tensor, norm: Tensor, pos_count: Tensor, coef: Tensor
                     ) -> tuple[Tensor, Tensor]:
    """soft_grads by autograd of sum_i coef_i (LSE_i - sum_j w_ij (l_ij + b_ij)) over these keys, with w fixed by
    the merged normaliser and each row's shard softmax rescaled to the merged lse: d LSE_shard / d l_ij times
    exp(LSE_shard - lse) is p_ij over every key."""
    Q, K, tau = _inputs(spec)
    with torch.enable_grad():
        Q, K = Q.detach().requires_grad_(), K.detach().requires_grad_()
        shard_lse, wsum, _ = _dense(spec, Q @ K.T / tau, norm, pos_count)
        finite = torch.isfinite(shard_lse.detach())  # (a row without any key in this shard: nothing to add)
        scale = torch.where(finite, torch.exp(shard_lse.detach() - torch.where(torch.isfinite(lse), lse, 0.0)), 0.0)
        rows = scale * torch.where(finite, shard_lse, 0.0) - wsum
        dQ, dK = torch.autograd.grad((coef * rows).sum(), (Q, K))
    return dQ, dK


# ----------------------------------------------------------------------------- one process

class SoftRows(torch.autograd.Function):
    """The unweighted rows L_i (0 on rows without positives) of a soft-target spec: the per-shard operations
    over one shard holding every key; the reduction is applied outside by torch ops. Backward runs the tiles
    again with g_ij = G_i (p_ij - w_ij), G_i being the gradient reaching row i, so any reduction and weight is
    exact."""

    @staticmethod
    def forward(ctx, anchors: Tensor, keys: Tensor, tau_tensor, spec: ContrastSpec):
        acc = spec.accum_dtype
        Q = anchors.to(acc)
        K = Q if anchors is keys else keys.to(acc)
        shard = dataclasses.replace(spec, anchors=Q, keys=K, normalize=False)
        pos_count = spec.pos_count()
        lse, wsum, norm = _stats(shard, None, pos_count)
        out = torch.where(pos_count > 0, lse - wsum, 0.0)
        ctx.save_for_backward(anchors, keys, lse, norm, pos_count)
        ctx.spec, ctx.same = spec, anchors is keys
        ctx.dtypes = (anchors.dtype, keys.dtype, tau_tensor.dtype if tau_tensor is not None else None)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_rows):
        anchors, keys, lse, norm, pos_count = ctx.saved_tensors
        spec, need = ctx.spec, ctx.needs_input_grad
        acc = spec.accum_dtype
        Q = anchors.to(acc)
        K = Q if ctx.same else keys.to(acc)
        coef = torch.where(pos_count > 0, grad_rows.to(acc), 0.0)
        shard = dataclasses.replace(spec, anchors=Q, keys=K, normalize=False)
        dQ, dK = soft_grads(shard, lse, norm, pos_count, coef)
        grad_q = grad_k = None
        if ctx.same:
            total = dQ + dK
            grad_q = total.to(ctx.dtypes[0]) if need[0] else None
            grad_k = torch.zeros_like(total).to(ctx.dtypes[1]) if need[1] else None
        else:
            grad_q = dQ.to(ctx.dtypes[0]) if need[0] else None
            grad_k = dK.to(ctx.dtypes[1]) if need[1] else None
        grad_tau = None
        if need[2]:  # l = q.k / tau: sum_ij g_ij dl_ij/dtau = -(1/tau) sum_ij g_ij l_ij = -(1/tau) sum_i q_i . dQ_i
            grad_tau = (-(Q * dQ).sum() / spec.tau_value()).to(ctx.dtypes[2])
        return grad_q, grad_k, grad_tau, None


def chunked_loss(spec: ContrastSpec) -> Tensor:
    tau = spec.temperature if isinstance(spec.temperature, Tensor) else None
    anchors, keys = spec.normalized_inputs()
    rows = SoftRows.apply(anchors, keys, tau, spec)
    return reduce_rows(spec, rows, spec.pos_count() > 0)


def why_not_fused(spec: ContrastSpec) -> str | None:
    """The CUDA kernels' answer for a soft-target spec (Triton has its own: triton_kernels/soft.py)."""
    if spec.soft_target is not None:
        return (f"no CUDA kernel for soft per-pair targets ({spec.soft_target.kind!r}: SCE / CoMatch); "
                "use triton, chunked (tiled, O(N) extra memory) or reference")
    return None


# ----------------------------------------------------------------------------- ring mode

def _ring_merged(plan, Q: Tensor, K: Tensor, extra: Optional[Tensor], sides: tuple, op, merges) -> list:
    """``op(shard spec)`` over the extra keys (they stay home, with their side rows) and every rank's key shard
    (travelling with its side rows), each output merged on arrival by ``merges`` (one per output)."""
    from .distributed import ring_visit

    merged = []

    def visit(spec):
        out = op(spec)
        out = out if isinstance(out, tuple) else (out,)
        merged[:] = out if not merged else [merge(a, b) for merge, a, b in zip(merges, merged, out)]

    if extra is not None:
        visit(plan.shard_spec(Q, extra, None, sides[2]))
    ring_visit(plan.group, plan.shard_rows, [K, sides[1]], lambda t, owner: visit(plan.shard_spec(Q, t[0], owner,
                                                                                                    t[1])))
    return merged


class SoftRing(torch.autograd.Function):
    """Ring mode of a soft-target loss (distributed._run_ring hands it the plan): this rank's anchors against
    every rank's key shard, each travelling with its side rows through distributed.ring_visit, the extra keys
    (a queue, a bank) and their side rows staying home as one more shard. Pass 1 merges the target's
    normaliser, pass 2 the LSE and sum_j w_ij (l_ij + b_ij) given it; the backward sends the shards around
    again with their key-gradient accumulators (distributed.ring_accumulate). Two key + side shards are held
    at a time, O(N) statistics. Result and gradients as the driver's other ring losses (ring_reduce)."""

    @staticmethod
    def forward(ctx, anchors: Tensor, keys: Tensor, tau_tensor, extra_keys, plan, sides: tuple):
        from .distributed import ring_reduce

        ops, pos_count = plan.ops, plan.pos_count
        Q, K = anchors.detach(), keys.detach()
        extra = None if extra_keys is None else extra_keys.detach()
        teacher = plan.spec.soft_target.kind == "teacher"
        (norm,) = _ring_merged(plan, Q, K, extra, sides, ops.soft_norm, [torch.logaddexp if teacher else torch.add])
        lse, wsum = _ring_merged(plan, Q, K, extra, sides, lambda spec: ops.soft_stats(spec, norm, pos_count),
                                 [torch.logaddexp, torch.add])
        has_pos = pos_count > 0
        result, grad_unit = ring_reduce(plan, torch.where(has_pos, lse - wsum, 0.0), has_pos)
        ctx.save_for_backward(anchors, keys, extra_keys, lse, norm, grad_unit)
        ctx.plan, ctx.sides = plan, sides
        ctx.tau_dtype = None if tau_tensor is None else tau_tensor.dtype
        return result

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        from .distributed import ring_accumulate

        anchors, keys, extra, lse, norm, grad_unit = ctx.saved_tensors
        plan, sides, acc = ctx.plan, ctx.sides, lse.dtype
        soft_grads, pos_count = plan.ops.soft_grads, plan.pos_count
        coef = torch.where(pos_count > 0, grad_unit * grad_loss.to(acc), 0.0)  # dResult/dL_i times the upstream
        Q = anchors.detach()
        dQ = torch.zeros(Q.shape, dtype=acc, device=Q.device)
        grad_extra = None
        if extra is not None:
            extra_dQ, extra_dK = soft_grads(plan.shard_spec(Q, extra.detach(), None, sides[2]), lse, norm, pos_count,
                                            coef)
            dQ += extra_dQ.to(acc)
            grad_extra = extra_dK.to(extra.dtype) if ctx.needs_input_grad[3] else None

        def grad_of(shards, owner):
            shard_dQ, shard_dK = soft_grads(plan.shard_spec(Q, shards[0], owner, shards[1]), lse, norm, pos_count,
                                            coef)
            dQ.add_(shard_dQ.to(acc))
            return shard_dK

        carried = ring_accumulate(plan.group, plan.shard_rows, [keys.detach(), sides[1]], grad_of, acc)
        grad_tau = None
        if ctx.tau_dtype is not None:  # l is linear in 1/tau: dtau = -(1/tau) sum_i q_i . dQ_i
            grad_tau = (-(Q.to(acc) * dQ).sum() / plan.spec.tau_value()).to(ctx.tau_dtype)
        return dQ.to(anchors.dtype), carried.to(keys.dtype), grad_tau, grad_extra, None, None
