"""Row blocks of anchors against all keys in plain PyTorch: any device, O(N*block + N*D) memory.

Each block ``S = Q_blk K^T / tau`` is ``[block, M]``, so a row's ``LSE`` is complete
within its block and no online rescaling is needed. When gradients are wanted, the
block's ``g`` (DESIGN.md's backward formula) is formed right there and ``dQ_blk``,
``dK`` are accumulated during the forward pass: three matrix products per block
instead of four with a recompute. Backward only scales the stored gradients.

Positives never appear as an ``[block, M]`` tensor when they come from labels:
``sum_j a_ij l_ij = q_i . (sum of keys of class y_i, minus self) / tau``, and the
positive part of ``g`` reduces to per-class sums the same way. Only a user's dense
mask is expanded, one block at a time.

The two losses outside the general form (epsilon-SupInfoNCE, debiased) take a generic
path: the oracle's row math (``reference.dense_rows``) on one row block at a time,
differentiated by autograd within the block. Rows are complete in a block, so this is
exact; smaller blocks keep autograd's few ``[block, M]`` intermediates small.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .reference import dense_rows
from .spec import ContrastSpec, mean_divisor, normalize_backward, positive_scale, row_losses, temperature_grad

# Elements of one [block, M] fp32 tile (32 MiB): large enough for efficient matmuls,
# small enough that the few live tiles stay far below the inputs at large N.
TILE_ELEMENTS = int(os.environ.get("FUSED_CONTRASTIVE_CHUNK_ELEMENTS", 1 << 23))


def block_rows(num_keys: int) -> int:
    return max(1, min(4096, TILE_ELEMENTS // max(num_keys, 1)))


@dataclass
class _Stats:
    loss_rows: Tensor  # L_i
    lse: Tensor  # LSE over the denominator, -inf for a row without keys
    has_pos: Tensor
    dQ: Tensor | None  # gradients of sum_i L_i over the counted rows, before the reduction's scale
    dK: Tensor | None
    dtau: Tensor | None = None  # set by the generic path only (the others use temperature_grad)


def _forward(spec: ContrastSpec, Q: Tensor, K: Tensor, tau: float, want_grad: bool) -> _Stats:
    acc = spec.accum_dtype
    Na, M = Q.shape[0], K.shape[0]
    c = 1.0 if spec.base_temperature is None else tau / spec.base_temperature
    self_cols = spec.self_columns()
    has_self = self_cols >= 0
    safe_self = self_cols.clamp(min=0)

    pos_count = spec.pos_count()
    has_pos = pos_count > 0
    # w_i a_ij / Z_i folded into one per-row factor; rows without positives contribute nothing.
    pos_scale = positive_scale(spec, pos_count)

    variant_in = spec.variant == "in"
    # L_out with labels never needs a positive tile (class sums below); a mask or L_in does, per block.
    class_sums = spec.mask is None and not variant_in
    if class_sums:
        # Class sums of keys (and of weighted anchors for dK) replace the [Na, M] positive mask.
        class_key_sum = torch.zeros(spec.num_classes, K.shape[1], dtype=acc, device=K.device)
        class_key_sum.index_add_(0, spec.key_labels, K)
        self_positive = has_self & (spec.key_labels[safe_self] == spec.anchor_labels)
        pos_keys = class_key_sum[spec.anchor_labels] - K[safe_self] * self_positive[:, None].to(acc)
        pos_sum = (Q * pos_keys).sum(1) / tau
    else:
        mask = spec.mask.to(acc) if spec.mask is not None else None
        key_cols = torch.arange(M, device=K.device) % mask.shape[1] if mask is not None else None
        pos_sum = torch.empty(Na, dtype=acc, device=K.device)  # sum a*l (L_out) or LSE_P (L_in)

    lse = torch.empty(Na, dtype=acc, device=K.device)
    dQ = torch.empty_like(Q) if want_grad else None
    dK = torch.zeros_like(K) if want_grad else None
    Q_scaled = Q / tau
    step = block_rows(M)
    for r0 in range(0, Na, step):
        r1 = min(Na, r0 + step)
        rows = torch.arange(r0, r1, device=K.device)
        S = Q_scaled[r0:r1] @ K.T
        local = torch.arange(r1 - r0, device=K.device)
        blk_self = has_self[r0:r1]
        if not class_sums:
            if mask is not None:
                W = mask[rows % mask.shape[0]][:, key_cols]
            else:
                W = (spec.anchor_labels[r0:r1, None] == spec.key_labels[None, :]).to(acc)
            W[local[blk_self], self_cols[r0:r1][blk_self]] = 0
            if variant_in:  # LSE_P = log sum_j a_ij exp(l_ij), with its own max (positives may sit far below)
                T = S.masked_fill(W == 0, float("-inf"))
                pos_max = T.amax(1)
                pos_max = torch.where(torch.isfinite(pos_max), pos_max, torch.zeros_like(pos_max))
                T = T.sub_(pos_max[:, None]).exp_().mul_(W)
                pos_exp = T.sum(1)
                pos_sum[r0:r1] = pos_max + pos_exp.log()
            else:
                pos_sum[r0:r1] = (W * S).sum(1)
        if spec.den_bias is not None:  # after the positive statistics: they use the plain logits
            S.add_(spec.den_bias.tile(rows).to(acc))
        S[local[blk_self], self_cols[r0:r1][blk_self]] = float("-inf")
        row_max = S.amax(1)
        row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
        E = S.sub_(row_max[:, None]).exp_()  # in place: S is not needed again
        sum_exp = E.sum(1)
        lse[r0:r1] = row_max + sum_exp.log()
        if want_grad:
            # g_ij = softmax_ij - a_ij / Z_i (L_out) or - a_ij exp(l_ij - LSE_P) (L_in), on rows with
            # positives (c and 1/tau applied at the end)
            keep = has_pos[r0:r1]
            E.mul_(torch.where(keep, 1.0 / torch.where(sum_exp > 0, sum_exp, torch.ones_like(sum_exp)), 0.0)[:, None])
            if variant_in:
                E.sub_(T.mul_(torch.where(keep, 1.0 / torch.where(pos_exp > 0, pos_exp, torch.ones_like(pos_exp)),
                                          0.0)[:, None]))
            elif not class_sums:
                E.sub_(W.mul_(pos_scale[r0:r1, None]))
            torch.mm(E, K, out=dQ[r0:r1])
            dK.addmm_(E.T, Q[r0:r1])

    loss_rows = row_losses(spec, lse, pos_sum, pos_count, c)
    if want_grad:
        if class_sums:
            dQ.sub_(pos_keys * pos_scale[:, None])
            weighted_anchors = Q * pos_scale[:, None]
            class_anchor_sum = torch.zeros(spec.num_classes, Q.shape[1], dtype=acc, device=Q.device)
            class_anchor_sum.index_add_(0, spec.anchor_labels, weighted_anchors)
            dK.sub_(class_anchor_sum[spec.key_labels])
            # The self pair was counted in the class sum but is no positive: give it back.
            dK.index_add_(0, safe_self[self_positive], weighted_anchors[self_positive])
        dQ.mul_(c / tau)
        dK.mul_(c / tau)
    return _Stats(loss_rows, lse, has_pos, dQ, dK)


def _forward_autograd(spec: ContrastSpec, Q: Tensor, K: Tensor, tau_tensor, want_grad: bool) -> _Stats:
    """The generic path: ``dense_rows`` per row block, its gradients by autograd within the block."""
    acc = spec.accum_dtype
    Na = Q.shape[0]
    K = K.detach().requires_grad_(want_grad)
    tau = tau_tensor.detach().to(acc).requires_grad_(want_grad) if tau_tensor is not None else spec.tau_value()
    loss_rows = torch.empty(Na, dtype=acc, device=K.device)
    has_pos = torch.empty(Na, dtype=torch.bool, device=K.device)
    dQ = torch.empty_like(Q) if want_grad else None
    dK = torch.zeros_like(K) if want_grad else None
    dtau = torch.zeros((), dtype=acc, device=K.device) if want_grad and tau_tensor is not None else None
    step = max(1, block_rows(K.shape[0]) // 8)  # autograd keeps several [block, M] tensors alive
    for r0 in range(0, Na, step):
        r1 = min(Na, r0 + step)
        rows = torch.arange(r0, r1, device=K.device)
        with torch.enable_grad():
            Q_blk = Q[r0:r1].detach().requires_grad_(want_grad)
            blk_loss, blk_pos = dense_rows(spec, Q_blk @ K.T / tau, rows, tau)
            if want_grad:
                wrt = (Q_blk, K) + ((tau,) if dtau is not None else ())
                grads = torch.autograd.grad(blk_loss.sum(), wrt)
                dQ[r0:r1] = grads[0]
                dK += grads[1]
                if dtau is not None:
                    dtau += grads[2]
        loss_rows[r0:r1] = blk_loss.detach()
        has_pos[r0:r1] = blk_pos
    return _Stats(loss_rows, None, has_pos, dQ, dK, dtau)


class ChunkedLoss(torch.autograd.Function):
    """Mean loss over anchors. Outputs (loss, dQ, dK, dtau): the gradients are computed in the
    forward pass when ``want_grad`` and are only scaled in backward. Written with setup_context
    so that torch.func transforms (used under torch.compile) can differentiate it."""

    @staticmethod
    def forward(anchors: Tensor, keys: Tensor, tau_tensor, spec: ContrastSpec, want_grad: bool):
        acc = spec.accum_dtype
        tau = spec.tau_value()
        Q = anchors.to(acc)
        K = Q if anchors is keys else keys.to(acc)
        if spec.variant in ("eps", "debiased"):
            stats = _forward_autograd(spec, Q, K, tau_tensor, want_grad)
        else:
            stats = _forward(spec, Q, K, tau, want_grad)
        count = mean_divisor(spec, stats.has_pos)
        loss = stats.loss_rows.sum() / count
        none = loss.new_zeros(0)
        if not want_grad:
            return loss, none, none, none
        dQ, dK = stats.dQ / count, stats.dK / count
        if tau_tensor is None:
            dtau = none
        elif stats.dtau is not None:
            dtau = stats.dtau / count
        else:
            dtau = temperature_grad(spec, Q, dQ, loss, tau)
        return loss, dQ, dK, dtau

    @staticmethod
    def setup_context(ctx, inputs, output):
        anchors, keys, tau_tensor, _, _ = inputs
        ctx.mark_non_differentiable(*output[1:])
        ctx.save_for_backward(*output[1:])
        ctx.dtypes = (anchors.dtype, keys.dtype, tau_tensor.dtype if tau_tensor is not None else None)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, *_):
        dQ, dK, dtau = ctx.saved_tensors
        need = ctx.needs_input_grad
        grad_q = (dQ * grad_loss).to(ctx.dtypes[0]) if need[0] else None
        grad_k = (dK * grad_loss).to(ctx.dtypes[1]) if need[1] else None
        grad_tau = (dtau * grad_loss).to(ctx.dtypes[2]) if need[2] else None
        return grad_q, grad_k, grad_tau, None, None


def loss(spec: ContrastSpec) -> Tensor:
    tau = spec.temperature if isinstance(spec.temperature, Tensor) else None
    anchors, keys = spec.normalized_inputs()
    want_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (anchors, keys, tau))
    return ChunkedLoss.apply(anchors, keys, tau, spec, want_grad)[0]


def loss_and_grads(spec: ContrastSpec):
    """(loss, dQ, dK, dtau) without autograd (torch.compile's custom op calls this)."""
    tau = spec.temperature if isinstance(spec.temperature, Tensor) else None
    anchors, keys = spec.normalized_inputs()
    loss, dQ, dK, dtau = ChunkedLoss.forward(anchors, keys, tau, spec, True)
    if spec.normalize:
        dQ = normalize_backward(spec.anchors, dQ)
        dK = normalize_backward(spec.keys, dK)
    return loss, dQ.to(spec.anchors.dtype), dK.to(spec.keys.dtype), dtau.to(tau.dtype) if tau is not None else None


def why_not(spec: ContrastSpec) -> str | None:
    return None
