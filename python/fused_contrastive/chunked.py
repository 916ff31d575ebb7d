"""Row blocks of anchors against all keys in plain PyTorch: any device, O(N*block + N*D) memory.

Each block ``S = Q_blk K^T / tau`` is ``[block, M]``, so a row's ``LSE`` is complete
within its block and no online rescaling is needed. When gradients are wanted, the
block's ``g`` (docs/design.md, "Backward") is formed right there and ``dQ_blk``,
``dK`` are accumulated during the forward pass: three matrix products per block
instead of four with a recompute. Backward only scales the stored gradients.

Positives never appear as an ``[block, M]`` tensor when they come from labels and enter
linearly (L_out, debiased): ``sum_j a_ij l_ij = q_i . (sum of keys of class y_i, minus
self) / tau``, and the positive part of ``g`` reduces to per-class sums the same way.
A user's dense mask, L_in and epsilon-SupInfoNCE form the positive tile per block.

Row formulas beyond the general form get their per-row derivatives from the block's
statistics: epsilon-SupInfoNCE in closed form (docs/design.md, "Exceptions and row formulas"), the
debiased loss by autograd on the block's O(block) statistics (``spec.debiased_row_losses``),
never on a tile.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

import dataclasses

from . import soft_targets

from .spec import (ContrastSpec, debiased_row_losses, inverse_pos_count, normalize_backward, positive_scale,
                   reduce_rows, reduction_coef, row_losses, temperature_grad, weight_grad)

# Elements of one [block, M] fp32 tile (8 MiB): a few live tiles stay small next to the inputs, and
# [block, D] x [D, M] products stay efficient; measured on 2 CPU cores at N = 8192, D = 128, a 4x larger
# tile was slower and took 1.5x the memory. Blocks keep at least MIN_BLOCK_ROWS rows for the matmuls.
TILE_ELEMENTS = int(os.environ.get("FUSED_CONTRASTIVE_CHUNK_ELEMENTS", 1 << 20))
MIN_BLOCK_ROWS = 128


def block_rows(num_keys: int) -> int:
    return max(1, min(4096, max(MIN_BLOCK_ROWS, TILE_ELEMENTS // max(num_keys, 1))))


@dataclass
class _Stats:
    loss_rows: Tensor  # L_i
    has_pos: Tensor
    # Gradients of the spec's result sum_i coef_i L_i (coef: spec.reduction_coef, the reduction and weights)
    dQ: Tensor | None
    dK: Tensor | None
    dtau_direct: Tensor | None  # d sum_i coef_i L_i / dtau through the row formula itself, not the logits
    lse: Tensor  # LSE over the denominator, -inf for a row without keys
    pos_stat: Tensor  # sum_j a_ij l_ij (L_out), LSE_P (L_in)


def _row_lse(x: Tensor) -> tuple[Tensor, Tensor]:
    """(log sum exp, the finite shift used) of each row of x, which may hold -inf; -inf for an all -inf row."""
    shift = x.amax(1)
    shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
    total = torch.exp(x - shift[:, None]).sum(1)
    return torch.where(total > 0, shift + torch.log(total), float("-inf")), shift


def _softmax_rows(x: Tensor, lse: Tensor) -> Tensor:
    """exp(x - lse) row-wise in place, 0 on a row without any finite entry."""
    return x.sub_(torch.where(torch.isfinite(lse), lse, 0.0)[:, None]).exp_()


def lone_rows(spec: ContrastSpec, rows: Tensor, grad_rows: Tensor, lone_loss: Tensor) -> None:
    """Of anchor ``rows`` with one positive and one key in the denominator, those whose key is the positive:
    clears them in ``grad_rows`` and sets ``lone_loss`` to that key's bias b (0 without a bias)."""
    acc = spec.accum_dtype
    positive = (spec.anchor_labels[rows][:, None] == spec.key_labels[None, :])
    positive[torch.arange(len(rows), device=rows.device), spec.self_columns()[rows].clamp(min=0)] &= \
        spec.self_columns()[rows] < 0
    bias = spec.den_bias.tile(rows).to(acc) if spec.den_bias is not None else torch.zeros(positive.shape, dtype=acc,
                                                                                          device=rows.device)
    b = torch.where(positive, bias, 0.0).sum(1)  # -inf: the positive is not in the denominator
    lone = torch.isfinite(b)
    grad_rows[rows[lone]] = False
    lone_loss[rows[lone]] = b[lone]


def _forward(spec: ContrastSpec, Q: Tensor, K: Tensor, tau: float, want_grad: bool) -> _Stats:
    acc = spec.accum_dtype
    Na, M = Q.shape[0], K.shape[0]
    variant = spec.variant
    c = 1.0 if spec.base_temperature is None else tau / spec.base_temperature
    self_cols = spec.self_columns()
    has_self = self_cols >= 0
    safe_self = self_cols.clamp(min=0)

    pos_count = spec.pos_count()
    has_pos = pos_count > 0
    # w_i a_ij / Z_i folded into one per-row factor; rows without positives contribute nothing. The debiased
    # rows overwrite it with their own -dL/dl_p.
    pos_scale = positive_scale(spec, pos_count)
    inv_count = inverse_pos_count(pos_count)
    # dResult/dL_i: every gradient tile's row i is scaled by it (the reduction, the weights, or in the
    # backward of reduction="none" the incoming per-row gradient).
    coef = reduction_coef(spec, has_pos) if want_grad else None

    class_sums = spec.mask is None and variant in ("out", "debiased")
    # Rows whose denominator is a single key, their only positive (a batch of one sample, InfoNCE without
    # negatives): L_i = (l + b) - l = b for every logit, a constant without gradient. The class sums below
    # would leave a rounding residue of q . k there (two dot products summed in different orders), so those
    # rows are found in the block loop (lone_rows) and given exactly b and no gradient.
    grad_rows = has_pos.clone()
    lone_loss = torch.zeros(Na, dtype=acc, device=K.device)
    lone_candidates = None
    if class_sums and variant == "out" and spec.pos_row_weight is None:
        lone_candidates = has_pos & (pos_count == 1) & (spec.den_count() == 1)
    if class_sums:
        # Class sums of keys (and of weighted anchors for dK) replace the [Na, M] positive mask.
        class_key_sum = torch.zeros(spec.num_classes, K.shape[1], dtype=acc, device=K.device)
        class_key_sum.index_add_(0, spec.key_labels, K)
        self_positive = has_self & (spec.key_labels[safe_self] == spec.anchor_labels)
        pos_keys = class_key_sum[spec.anchor_labels]
        pos_keys.index_add_(0, self_positive.nonzero()[:, 0], K[safe_self[self_positive]], alpha=-1)
        del class_key_sum  # [Na, D] buffers are what dominates memory at moderate N: keep few alive
        pos_sum = torch.einsum("id,id->i", Q, pos_keys) / tau
    else:
        mask = spec.mask.to(acc) if spec.mask is not None else None
        key_cols = torch.arange(M, device=K.device) % mask.shape[1] if mask is not None else None
        pos_sum = torch.empty(Na, dtype=acc, device=K.device)  # sum a*l (L_out), LSE_P (L_in), eps terms
    lse = torch.empty(Na, dtype=acc, device=K.device)
    loss_rows = torch.empty(Na, dtype=acc, device=K.device) if variant in ("eps", "debiased") else None
    den_count = spec.den_count() if variant == "debiased" else None
    dtau_direct = torch.zeros((), dtype=acc, device=K.device)
    dQ = torch.empty_like(Q) if want_grad else None
    dK = torch.zeros_like(K) if want_grad else None
    step = block_rows(M)
    for r0 in range(0, Na, step):
        r1 = min(Na, r0 + step)
        rows = torch.arange(r0, r1, device=K.device)
        if lone_candidates is not None and bool(lone_candidates[r0:r1].any()):
            lone_rows(spec, rows[lone_candidates[r0:r1]], grad_rows, lone_loss)
        keep = grad_rows[r0:r1]
        S = torch.mm(Q[r0:r1], K.T).div_(tau)
        local = torch.arange(r1 - r0, device=K.device)
        blk_self = has_self[r0:r1]
        if not class_sums:
            if mask is not None:
                W = mask[rows % mask.shape[0]][:, key_cols]
            else:
                W = (spec.anchor_labels[r0:r1, None] == spec.key_labels[None, :]).to(acc)
            W[local[blk_self], self_cols[r0:r1][blk_self]] = 0
            if variant == "in":  # LSE_P = log sum_j a_ij exp(l_ij), with its own shift; T: a_ij exp(l_ij - LSE_P)
                T = S + torch.log(W)  # -inf off the positives
                pos_sum[r0:r1], _ = _row_lse(T)
                T = _softmax_rows(T, pos_sum[r0:r1])
            elif variant == "out":
                pos_sum[r0:r1] = (W * S).sum(1)
        # The denominator: bias (after the positive statistics, which use the plain logits), self out.
        den = S.clone() if variant in ("eps", "debiased") else S  # those need the plain logits again
        if spec.den_bias is not None:
            den.add_(spec.den_bias.tile(rows).to(acc))
        den[local[blk_self], self_cols[r0:r1][blk_self]] = float("-inf")
        hard = []  # Robinson et al.: LSE_N of (1+beta)*l and of beta*l, with their softmax tiles
        if variant == "debiased" and spec.beta != 0:
            for scale in (1 + spec.beta, spec.beta):
                scaled = den * scale
                scaled_lse, _ = _row_lse(scaled)
                hard.append((scale, scaled_lse, _softmax_rows(scaled, scaled_lse)))
        lse[r0:r1], _ = _row_lse(den)
        E = _softmax_rows(den, lse[r0:r1])  # in place: den is not needed again
        if variant == "eps":
            # Each positive over exp(l - eps) + exp(LSE_N): l - logaddexp(l - eps, LSE_N) = eps - softplus(gap),
            # gap = LSE_N + eps - l (-inf without negatives); d/dl = sigmoid(gap), d/dLSE_N = -sigmoid(gap).
            gap = S.neg_().add_((lse[r0:r1] + spec.epsilon)[:, None])
            # softplus as logaddexp(gap, 0): F.softplus returns gap itself past 20, off by up to 2e-9
            pos_sum[r0:r1] = (W * (spec.epsilon - torch.logaddexp(gap, gap.new_zeros(())))).sum(1)
            loss_rows[r0:r1] = torch.where(keep, -c * inv_count[r0:r1] * pos_sum[r0:r1], 0.0)
            if want_grad:  # g = (1/Z) (R_i softmax_N - a sigmoid(gap)), R_i = sum_p sigmoid(gap)
                sig = gap.sigmoid_().mul_(W)
                E.mul_(sig.sum(1)[:, None]).sub_(sig).mul_((inv_count[r0:r1] * coef[r0:r1])[:, None])
        elif variant == "debiased":
            with torch.enable_grad():
                stats = [t.detach().requires_grad_() for t in (lse[r0:r1], pos_sum[r0:r1], *(h[1] for h in hard))]
                tau_leaf = torch.tensor(tau, dtype=acc, device=K.device, requires_grad=True)
                n = den_count[r0:r1]
                log_reweighted = torch.log(n.clamp(min=1)) + stats[2] - stats[3] if hard else None
                rows_loss = torch.where(keep, debiased_row_losses(spec, stats[0], stats[1], n, tau_leaf,
                                                                  log_reweighted), 0.0)
                weighted = rows_loss if coef is None else rows_loss * coef[r0:r1]
                derivs = torch.autograd.grad(weighted.sum(), (*stats, tau_leaf), allow_unused=True)
                derivs = [torch.zeros_like(x) if d is None else d for d, x in zip(derivs, (*stats, tau_leaf))]
            loss_rows[r0:r1] = rows_loss.detach()
            dtau_direct += derivs[-1]
            if want_grad:  # g = dL/dLSE_N softmax_N + the hard LSEs' terms + dL/dl_p a (class sums, below)
                E.mul_(derivs[0][:, None])
                for (scale, _, tile), d in zip(hard, derivs[2:]):
                    E.add_(tile.mul_((d * scale)[:, None]))
                pos_scale[r0:r1] = -derivs[1]
        elif want_grad:
            # g_ij = softmax_ij - a_ij w_i / Z_i (L_out) or - a_ij exp(l_ij - LSE_P) (L_in), on rows with
            # positives (c and 1/tau applied at the end)
            row_scale = (keep.to(acc) * coef[r0:r1])[:, None]
            E.mul_(row_scale)
            if variant == "in":
                E.sub_(T.mul_(row_scale))
            elif not class_sums:
                E.sub_(W.mul_((pos_scale[r0:r1] * coef[r0:r1])[:, None]))
        if want_grad:
            torch.mm(E, K, out=dQ[r0:r1])
            dK.addmm_(E.T, Q[r0:r1])

    if loss_rows is None:
        loss_rows = torch.where(grad_rows, row_losses(spec, lse, pos_sum, pos_count, c), c * lone_loss)
    if want_grad:
        if class_sums:
            # (the debiased rows' -dL/dl_p came from the coef-weighted sum already)
            pos_scale = torch.where(grad_rows, pos_scale * coef if variant == "out" else pos_scale, 0.0)
            dQ.addcmul_(pos_keys, pos_scale[:, None], value=-1)
            del pos_keys
            weighted_anchors = Q * pos_scale[:, None]
            class_anchor_sum = torch.zeros(spec.num_classes, Q.shape[1], dtype=acc, device=Q.device)
            class_anchor_sum.index_add_(0, spec.anchor_labels, weighted_anchors)
            dK.sub_(class_anchor_sum[spec.key_labels])
            # The self pair was counted in the class sum but is no positive: give it back.
            dK.index_add_(0, safe_self[self_positive], weighted_anchors[self_positive])
        dQ.mul_(c / tau)
        dK.mul_(c / tau)
    return _Stats(loss_rows, has_pos, dQ, dK, dtau_direct, lse, pos_sum)


class ChunkedLoss(torch.autograd.Function):
    """The spec's "mean" or "sum" result sum_i coef_i L_i. Outputs (loss, rows, dQ, dK, dtau): the gradients
    are computed in the forward pass when ``want_grad`` (the coefficients are known then: the reduction and
    the weights) and are only scaled in backward. Written with setup_context so that torch.func transforms
    (used under torch.compile) can differentiate it."""

    @staticmethod
    def forward(anchors: Tensor, keys: Tensor, tau_tensor, row_weight, spec: ContrastSpec, want_grad: bool):
        acc = spec.accum_dtype
        tau = spec.tau_value()
        Q = anchors.to(acc)
        K = Q if anchors is keys else keys.to(acc)
        stats = _forward(spec, Q, K, tau, want_grad)
        loss = reduce_rows(spec, stats.loss_rows, stats.has_pos)
        none = loss.new_zeros(0)
        if not want_grad:
            return loss, stats.loss_rows, stats.has_pos, none, none, none
        dtau = none
        if tau_tensor is not None:
            dtau = temperature_grad(spec, Q, stats.dQ, loss, tau) + stats.dtau_direct
        return loss, stats.loss_rows, stats.has_pos, stats.dQ, stats.dK, dtau

    @staticmethod
    def setup_context(ctx, inputs, output):
        anchors, keys, tau_tensor, row_weight, spec, _ = inputs
        ctx.mark_non_differentiable(*output[1:])
        ctx.save_for_backward(*output)
        ctx.spec = spec
        ctx.dtypes = (anchors.dtype, keys.dtype, tau_tensor.dtype if tau_tensor is not None else None)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, *_):
        loss, rows, has_pos, dQ, dK, dtau = ctx.saved_tensors
        need = ctx.needs_input_grad
        grad_q = (dQ * grad_loss).to(ctx.dtypes[0]) if need[0] else None
        grad_k = (dK * grad_loss).to(ctx.dtypes[1]) if need[1] else None
        grad_tau = (dtau * grad_loss).to(ctx.dtypes[2]) if need[2] else None
        grad_w = None
        if need[3]:
            grad_w = (weight_grad(ctx.spec, rows, has_pos, loss) * grad_loss).to(ctx.spec.row_weight.dtype)
        return grad_q, grad_k, grad_tau, grad_w, None, None


class ChunkedRows(torch.autograd.Function):
    """reduction="none": the rows w_i L_i. The per-row gradient G_i is known only in backward, which runs the
    forward again with coef_i = G_i w_i (one more [block, M] product per block than the mean's path)."""

    @staticmethod
    def forward(ctx, anchors: Tensor, keys: Tensor, tau_tensor, row_weight, spec: ContrastSpec):
        acc = spec.accum_dtype
        Q = anchors.to(acc)
        K = Q if anchors is keys else keys.to(acc)
        stats = _forward(spec, Q, K, spec.tau_value(), False)
        ctx.save_for_backward(anchors, keys, stats.loss_rows)
        ctx.spec, ctx.same = spec, anchors is keys
        ctx.dtypes = (anchors.dtype, keys.dtype, tau_tensor.dtype if tau_tensor is not None else None)
        return reduce_rows(spec, stats.loss_rows, stats.has_pos)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_rows):
        anchors, keys, rows = ctx.saved_tensors
        spec, need = ctx.spec, ctx.needs_input_grad
        acc, tau = spec.accum_dtype, spec.tau_value()
        coef = grad_rows.to(acc) if spec.row_weight is None else grad_rows.to(acc) * spec.row_weight.to(acc)
        summed = dataclasses.replace(spec, reduction="sum", row_weight=coef)
        Q = anchors.to(acc)
        K = Q if ctx.same else keys.to(acc)
        stats = _forward(summed, Q, K, tau, True)
        grad_tau = None
        if need[2]:
            loss = (coef * stats.loss_rows).sum()
            grad_tau = (temperature_grad(summed, Q, stats.dQ, loss, tau) + stats.dtau_direct).to(ctx.dtypes[2])
        grad_w = (grad_rows * rows).to(spec.row_weight.dtype) if need[3] else None
        return (stats.dQ.to(ctx.dtypes[0]) if need[0] else None, stats.dK.to(ctx.dtypes[1]) if need[1] else None,
                grad_tau, grad_w, None)


def loss(spec: ContrastSpec) -> Tensor:
    if spec.soft_target is not None:
        return soft_targets.chunked_loss(spec)
    tau = spec.temperature if isinstance(spec.temperature, Tensor) else None
    anchors, keys = spec.normalized_inputs()
    if spec.reduction == "none":
        return ChunkedRows.apply(anchors, keys, tau, spec.row_weight, spec)
    want_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                                for t in (anchors, keys, tau, spec.row_weight))
    return ChunkedLoss.apply(anchors, keys, tau, spec.row_weight, spec, want_grad)[0]


def loss_and_grads(spec: ContrastSpec):
    """(loss, dQ, dK, dtau, rows) of a "mean" or "sum" spec without autograd (torch.compile's op calls this);
    rows: the unweighted L_i (for the weights' gradient)."""
    if spec.soft_target is not None:
        raise ValueError("soft per-pair targets (SCE, CoMatch) do not run under torch.compile in this version")
    tau = spec.temperature if isinstance(spec.temperature, Tensor) else None
    anchors, keys = spec.normalized_inputs()
    loss, rows, _, dQ, dK, dtau = ChunkedLoss.forward(anchors, keys, tau, spec.row_weight, spec, True)
    if spec.normalize:
        dQ = normalize_backward(spec.anchors, dQ)
        dK = normalize_backward(spec.keys, dK)
    return (loss, dQ.to(spec.anchors.dtype), dK.to(spec.keys.dtype), dtau.to(tau.dtype) if tau is not None else None,
            rows)


# ----------------------------------------------------------------------------- ring mode (distributed)
# One shard of the keys at a time (fused_contrastive.distributed's ring driver): per-row statistics over the
# shard, which the driver merges over all shards, then the gradients of the shard's tiles from the merged
# statistics. Every row formula; positives from labels (ring mode has no dense mask).

def _shard_tiles(spec: ContrastSpec):
    """(rows, S, W, den) per row block of the shard: logits l, positives a (self 0), l + b with self at -inf."""
    acc, tau = spec.accum_dtype, spec.tau_value()
    Q, K = spec.anchors.to(acc), spec.keys.to(acc)
    self_cols = spec.self_columns()
    step = block_rows(K.shape[0])
    for r0 in range(0, Q.shape[0], step):
        r1 = min(Q.shape[0], r0 + step)
        rows = torch.arange(r0, r1, device=K.device)
        local, blk_self = rows - r0, self_cols[r0:r1] >= 0
        S = Q[r0:r1] @ K.T / tau
        W = (spec.anchor_labels[r0:r1, None] == spec.key_labels[None, :]).to(acc)
        W[local[blk_self], self_cols[r0:r1][blk_self]] = 0
        den = S + spec.den_bias.tile(rows).to(acc) if spec.den_bias is not None else S.clone()
        den[local[blk_self], self_cols[r0:r1][blk_self]] = float("-inf")
        yield r0, r1, S, W, den


def _hard(spec: ContrastSpec) -> bool:
    return spec.variant == "debiased" and spec.beta != 0


def row_stats(spec: ContrastSpec) -> tuple[Tensor, Tensor, Tensor]:
    """(lse, pos_stat, pos_aux) over this shard, no gradient: the denominator's LSE; sum_j a_ij l_ij (L_out,
    debiased) or LSE_P (L_in); with hard negatives pos_aux [2, Na] holds the LSEs of (1+beta) l and beta l
    over the denominator (else it is lse). Epsilon-SupInfoNCE's positive terms need the merged LSE first:
    ``eps_terms``."""
    acc = spec.accum_dtype
    Na = spec.num_anchors
    lse = torch.empty(Na, dtype=acc, device=spec.device)
    pos = torch.zeros(Na, dtype=acc, device=spec.device)
    aux = torch.empty(2, Na, dtype=acc, device=spec.device) if _hard(spec) else lse
    for r0, r1, S, W, den in _shard_tiles(spec):
        if spec.variant == "in":
            pos[r0:r1], _ = _row_lse(S + torch.log(W))
        elif spec.variant in ("out", "debiased"):
            pos[r0:r1] = (W * S).sum(1)
        if aux is not lse:
            aux[0, r0:r1], _ = _row_lse(den * (1 + spec.beta))
            aux[1, r0:r1], _ = _row_lse(den * spec.beta)
        lse[r0:r1], _ = _row_lse(den)
    return lse, pos, aux


def eps_terms(spec: ContrastSpec, lse_n: Tensor) -> tuple[Tensor, Tensor]:
    """Epsilon-SupInfoNCE over this shard's positives given the merged LSE_N: (sum_p [eps - softplus(gap)],
    R = sum_p sigmoid(gap)) with gap = LSE_N + eps - l_ip; both merge by sum."""
    acc = spec.accum_dtype
    pos = torch.zeros(spec.num_anchors, dtype=acc, device=spec.device)
    r_sum = torch.zeros_like(pos)
    for r0, r1, S, W, _ in _shard_tiles(spec):
        gap = (lse_n[r0:r1] + spec.epsilon)[:, None] - S
        pos[r0:r1] = (W * (spec.epsilon - torch.logaddexp(gap, gap.new_zeros(())))).sum(1)
        r_sum[r0:r1] = (W * gap.sigmoid()).sum(1)
    return pos, r_sum


def grads_from_stats(spec: ContrastSpec, lse: Tensor, coef: Tensor, pos_scale: Tensor,
                     den_scale: Tensor) -> tuple[Tensor, Tensor]:
    """dQ, dK (accumulation dtype) of this shard's tiles g_ij = coef_i (u_i e^{l + b - LSE_i} - positive part)
    from the merged per-row factors (fused.row_factors): u_i = 1 (L_out, L_in), R_i (eps), dL/dLSE_N
    (debiased); hard negatives replace the e^{l + b - LSE} term by the (1+beta) and beta softmaxes ([3, Na]
    lse and den_scale). Positive part: a_ij pos_scale_i (L_out, debiased), a_ij e^{l - LSE_P} (L_in),
    a_ij sigmoid(LSE_N + eps - l) (eps)."""
    tau, acc = spec.tau_value(), spec.accum_dtype
    Q, K = spec.anchors.to(acc), spec.keys.to(acc)
    dQ, dK = torch.empty_like(Q), torch.zeros_like(K)
    safe = torch.where(torch.isfinite(lse), lse, 0.0)
    for r0, r1, S, W, den in _shard_tiles(spec):
        if _hard(spec):
            G = (den * (1 + spec.beta) - safe[1, r0:r1, None]).exp_().mul_(den_scale[1, r0:r1, None])
            G.add_((den * spec.beta - safe[2, r0:r1, None]).exp_().mul_(den_scale[2, r0:r1, None]))
        else:
            G = den.sub_(safe[r0:r1, None]).exp_()
            if spec.variant in ("eps", "debiased"):
                G.mul_(den_scale[r0:r1, None])
        if spec.variant == "in":  # exp(l + log a - LSE_P): 0 off the positives even where exp(l) overflows
            G.sub_(W.log_().add_(S).sub_(pos_scale[r0:r1, None]).exp_())
        elif spec.variant == "eps":
            G.sub_(W.mul_(((lse[r0:r1] + spec.epsilon)[:, None] - S).sigmoid_()))
        else:
            G.sub_(W.mul_(pos_scale[r0:r1, None]))
        G.mul_(coef[r0:r1, None])
        torch.mm(G, K, out=dQ[r0:r1])
        dK.addmm_(G.T, Q[r0:r1])
    return dQ / tau, dK / tau


def why_not(spec: ContrastSpec) -> str | None:
    return None
