"""Soft per-pair targets (SCE's teacher similarities, CoMatch's pseudo-label graph) for the reference and
chunked backends.

The loss of anchor i is a cross-entropy against a target distribution w_ij over its denominator keys:
``L_i = -sum_j w_ij log softmax_j(l_ij + b_ij) = LSE_i - sum_j w_ij (l_ij + b_ij)`` (sum_j w_ij = 1), and
its gradient in the logits is ``p_ij - w_ij``. The targets come from O(N) side inputs (teacher embeddings or
class probabilities, one row per anchor and per key): every tile rebuilds its own block of w from them, so
no [Na, M] target is passed or kept. A tile here spans whole rows (a block of anchors against every key),
so the target's row normaliser (the teacher's LSE, the graph's row sum) is taken within the tile.
"""
from __future__ import annotations

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
    """Row LSE of the denominator; -inf for a row without any key (and no NaN)."""
    if in_den is None:
        return torch.logsumexp(den_logits, 1)
    has_den = in_den.any(1)
    return torch.where(has_den, torch.logsumexp(torch.where(has_den[:, None], den_logits, 0.0), 1), NEG_INF)


def target_tile(target: SoftTarget, rows: Tensor, in_den: Tensor, a: Tensor, pos_count: Tensor) -> Tensor:
    """w_ij for anchor ``rows`` against every key: [R, M], 0 outside the denominator, each row summing to 1
    (to 0 on a row without positives, whose loss is 0 anyway). No gradient."""
    side = target.anchor_side[rows] @ target.key_side.T
    if target.kind == "teacher":
        # The teacher's softmax runs over the denominator's non-positive keys. A row without any (one sample,
        # no queue) puts its whole target on the positive, as the authors' masked softmax does.
        candidate = a == 0 if in_den is None else in_den & (a == 0)
        has_candidate = candidate.any(1)
        t = torch.where(candidate, side / target.tau_t, NEG_INF)
        t_max = torch.where(has_candidate, t.amax(1), 0.0)
        e = torch.exp(t - t_max[:, None])
        teacher = e / torch.where(has_candidate, e.sum(1), 1.0)[:, None]
        # (a tensor in the tile's dtype: torch.where of two Python floats would round lam to float32)
        lam = torch.full_like(t_max, target.lam).masked_fill_(~has_candidate, 1.0)[:, None]
        return lam * a * inverse_pos_count(pos_count)[:, None] + (1 - lam) * teacher
    # "graph": the positive is a self-loop of weight 1; other keys their probability product if >= threshold.
    u = torch.where(a > 0, a, torch.where(side >= target.threshold, side, 0.0))
    if in_den is not None:
        u = torch.where(in_den, u, 0.0)
    total = u.sum(1)
    return u / torch.where(total > 0, total, 1.0)[:, None]


def _weighted_logits(w: Tensor, den_logits: Tensor, in_den) -> Tensor:
    """sum_j w_ij (l_ij + b_ij) with 0 where w is 0 (den_logits is -inf outside the denominator)."""
    if in_den is None:  # every logit finite
        return (w * den_logits).sum(1)
    return torch.where(w > 0, w * den_logits, 0.0).sum(1)


def dense_rows(spec: ContrastSpec, logits: Tensor, rows: Tensor) -> tuple[Tensor, Tensor]:
    """(L_i, has_pos_i) from dense logits [len(rows), M] (the reference backend; autograd-friendly)."""
    in_den, bias, a = tile_masks(spec, rows)
    pos_count = a.sum(1)
    has_pos = pos_count > 0
    den_logits = _den_logits(logits, in_den, bias)
    lse = _lse(den_logits, in_den)
    w = target_tile(spec.soft_target, rows, in_den, a, pos_count)
    loss = lse - _weighted_logits(w, den_logits, in_den)
    return torch.where(has_pos, loss, torch.zeros_like(loss)), has_pos


def _block_rows(num_keys: int) -> int:
    from .chunked import block_rows

    return block_rows(num_keys)


def _tile(spec: ContrastSpec, Q: Tensor, K: Tensor, tau: float, r0: int, r1: int, pos_count: Tensor):
    """(S, den_logits, w, in_den) of anchors [r0, r1) against every key."""
    rows = torch.arange(r0, r1, device=K.device)
    in_den, bias, a = tile_masks(spec, rows)
    S = Q[r0:r1] @ K.T / tau
    den_logits = _den_logits(S, in_den, bias)
    w = target_tile(spec.soft_target, rows, in_den, a, pos_count[r0:r1])
    return S, den_logits, w, in_den


class SoftRows(torch.autograd.Function):
    """The unweighted rows L_i (0 on rows without positives) of a soft-target spec, block of anchors by block
    of anchors; the reduction is applied outside by torch ops. Backward runs the tiles again with
    g_ij = G_i (p_ij - w_ij), G_i being the gradient reaching row i, so any reduction and weight is exact."""

    @staticmethod
    def forward(ctx, anchors: Tensor, keys: Tensor, tau_tensor, spec: ContrastSpec):
        acc, tau = spec.accum_dtype, spec.tau_value()
        Q = anchors.to(acc)
        K = Q if anchors is keys else keys.to(acc)
        pos_count = spec.pos_count()
        lse = torch.empty(Q.shape[0], dtype=acc, device=Q.device)
        out = torch.empty_like(lse)
        step = _block_rows(K.shape[0])
        for r0 in range(0, Q.shape[0], step):
            r1 = min(Q.shape[0], r0 + step)
            _, den_logits, w, in_den = _tile(spec, Q, K, tau, r0, r1, pos_count)
            block_lse = _lse(den_logits, in_den)
            lse[r0:r1] = block_lse
            out[r0:r1] = block_lse - _weighted_logits(w, den_logits, in_den)
        out = torch.where(pos_count > 0, out, 0.0)
        ctx.save_for_backward(anchors, keys, lse, pos_count)
        ctx.spec, ctx.same = spec, anchors is keys
        ctx.dtypes = (anchors.dtype, keys.dtype, tau_tensor.dtype if tau_tensor is not None else None)
        ctx.mark_non_differentiable(lse)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_rows):
        anchors, keys, lse, pos_count = ctx.saved_tensors
        spec, need = ctx.spec, ctx.needs_input_grad
        acc, tau = spec.accum_dtype, spec.tau_value()
        Q = anchors.to(acc)
        K = Q if ctx.same else keys.to(acc)
        coef = torch.where(pos_count > 0, grad_rows.to(acc), 0.0)
        lse_safe = torch.where(torch.isfinite(lse), lse, 0.0)
        dQ, dK = torch.empty_like(Q), torch.zeros_like(K)
        dtau = torch.zeros((), dtype=acc, device=Q.device)
        step = _block_rows(K.shape[0])
        for r0 in range(0, Q.shape[0], step):
            r1 = min(Q.shape[0], r0 + step)
            S, den_logits, w, _ = _tile(spec, Q, K, tau, r0, r1, pos_count)
            G = torch.exp(den_logits - lse_safe[r0:r1, None]).sub_(w).mul_(coef[r0:r1, None])
            torch.mm(G, K, out=dQ[r0:r1])
            dK.addmm_(G.T, Q[r0:r1])
            if need[2]:  # l = q.k / tau: dl/dtau = -l / tau
                dtau -= (G * S).sum() / tau
        dQ.div_(tau)
        dK.div_(tau)
        grad_q = grad_k = None
        if ctx.same:
            total = dQ + dK
            grad_q = total.to(ctx.dtypes[0]) if need[0] else None
            grad_k = torch.zeros_like(total).to(ctx.dtypes[1]) if need[1] else None
        else:
            grad_q = dQ.to(ctx.dtypes[0]) if need[0] else None
            grad_k = dK.to(ctx.dtypes[1]) if need[1] else None
        grad_tau = dtau.to(ctx.dtypes[2]) if need[2] else None
        return grad_q, grad_k, grad_tau, None


def chunked_loss(spec: ContrastSpec) -> Tensor:
    tau = spec.temperature if isinstance(spec.temperature, Tensor) else None
    anchors, keys = spec.normalized_inputs()
    rows = SoftRows.apply(anchors, keys, tau, spec)
    return reduce_rows(spec, rows, spec.pos_count() > 0)


def refuse_ring(spec: ContrastSpec) -> None:
    """Ring mode's per-shard statistics do not carry a soft target's row normaliser: refuse, never a wrong
    number (gather mode runs these losses)."""
    if spec.soft_target is not None:
        raise ValueError("soft per-pair targets (SCE, CoMatch) run in gather mode only, not in ring mode")


def why_not_fused(spec: ContrastSpec) -> str | None:
    """The fused kernels' answer for a soft-target spec."""
    if spec.soft_target is not None:
        return (f"no fused kernel for soft per-pair targets ({spec.soft_target.kind!r}: SCE / CoMatch); "
                "use chunked (tiled, O(N) extra memory) or reference")
    return None
