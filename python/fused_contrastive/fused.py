"""What every fused-kernel backend (Triton, CUDA) shares above its kernels: the per-row factors the
backward tile needs, the autograd.Function, the chain through the fused normalisation and the ring
mode's per-shard operations. A backend supplies two launchers (``Kernels``):

- ``forward_stats(spec, Q, K, inv_tau) -> (lse, pos_sum, pos_aux)`` per anchor;
- ``backward_grads(spec, Q, K, inv_tau, rows, need_dq, need_dk) -> (dQ, dK)`` for ``RowFactors`` rows
  (where ``Kernels.logit_sums``, ``logit_sums=True`` adds a third output: sum_j g_ij l_ij per anchor),

so a loss written once here runs on every backend that can launch those two.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch.autograd.function import once_differentiable

from .spec import (debiased_row_losses, inverse_pos_count, normalize_backward, normalize_rows, positive_scale,
                   reduce_rows, reduction_coef, row_losses, temperature_grad)


class Kernels(NamedTuple):
    name: str
    forward_stats: Callable
    backward_grads: Callable
    # backward_grads takes logit_sums=True: the temperature's gradient then comes from sum_ij g_ij l_ij summed
    # over the fp32 tiles. That sum cancels (g has positive and negative parts), so sum_i q_i . dQ_i from a dQ
    # rounded to bf16, or from g rounded before the product, loses most of it.
    logit_sums: bool = False


def row_factors(spec, lse, pos_sum, pos_aux, tau, pos_count=None, den_count=None):
    """From the forward's per-row statistics: (rows, has_pos, lse, coef, pos_scale, den_scale, tau_direct) with
    rows the L_i and, for dResult/dL_i = 1 on every row, the backward tile g_ij = coef_i (den_scale_i
    e^{l_ij + b_ij - LSE_i} - positive part with pos_scale_i); tau_direct_i is dL_i/dtau through the row
    formula itself (not through the logits). The reduction and the weights (or reduction="none"'s incoming
    gradient) then only scale coef_i and tau_direct_i row by row. ``pos_count`` / ``den_count``: Z_i and the
    denominator's size when the spec's keys are only a part of the keys (ring mode: one shard; the counts are
    those over every key), else the spec's own."""
    acc = lse.dtype
    pos_count = spec.pos_count() if pos_count is None else pos_count
    has_pos = pos_count > 0
    c = 1.0 if spec.base_temperature is None else tau / spec.base_temperature
    coef = has_pos.to(acc) * c  # dL_i/d(bracket) = c (a float64 product: torch.where(.., c, 0.0) is float32)
    den_scale = lse  # read by variants 2 and 3 only
    tau_direct = torch.zeros_like(coef)
    if spec.variant == "eps":  # L_i = -(c / Z_i) sum_p (eps - softplus(LSE_N + eps - l_ip))
        inv_count = inverse_pos_count(pos_count)
        loss_rows = torch.where(has_pos, -c * inv_count * pos_sum, 0.0)
        coef, pos_scale, den_scale = coef * inv_count, pos_count, pos_aux
    elif spec.variant == "debiased":  # L_i = F(LSE_N, l_p, tau): its derivatives by autograd on O(N) values
        hard = spec.beta != 0
        with torch.enable_grad():
            stats = [t.detach().requires_grad_() for t in (lse, pos_sum, *(pos_aux if hard else ()))]
            # one temperature leaf per row: each row's own dL_i/dtau, which its gradient G_i then weighs
            tau_leaf = torch.full_like(lse, tau).requires_grad_()
            n = spec.den_count() if den_count is None else den_count
            log_reweighted = torch.log(n.clamp(min=1)) + stats[2] - stats[3] if hard else None
            rows = debiased_row_losses(spec, stats[0], stats[1], n, tau_leaf, log_reweighted)
            derivs = torch.autograd.grad(rows.sum(), (*stats, tau_leaf), allow_unused=True)
            derivs = [torch.zeros_like(x) if d is None else d for d, x in zip(derivs, (*stats, tau_leaf))]
        loss_rows = rows.detach()
        coef = torch.ones_like(lse)
        pos_scale, den_scale, tau_direct = -derivs[1], derivs[0], derivs[-1]
        if hard:  # [3, Na]: the LSEs and scales the backward reads (variant 4), each scale times its beta factor
            lse = torch.stack([lse, *pos_aux])
            den_scale = torch.stack([den_scale, derivs[2] * (1 + spec.beta), derivs[3] * spec.beta])
    else:
        loss_rows = row_losses(spec, lse, pos_sum, pos_count, c)
        # The backward takes LSE_P (L_in) where L_out takes w/Z.
        pos_scale = torch.where(has_pos, pos_sum, 0.0) if spec.variant == "in" else positive_scale(spec, pos_count)
    return loss_rows, has_pos, lse, coef, pos_scale, den_scale, tau_direct


class RowFactors:
    """The per-row tensors the backward kernels read, coef scaled by each row's dResult/dL_i.
    ``mixed_signs``: the coefs may differ in sign (per-row gradients of reduction="none"); otherwise they
    share one (the reduction's non-negative coefficients times one upstream scalar)."""

    def __init__(self, lse, coef, pos_scale, den_scale, mixed_signs=False):
        self.lse, self.coef, self.pos_scale, self.den_scale = lse, coef, pos_scale, den_scale
        self.mixed_signs = mixed_signs

    def scaled(self, grad, mixed_signs=False):
        # Variants 2 and 3 apply coef to both terms; den_scale stays a ratio, so only coef carries grad.
        return RowFactors(self.lse, self.coef * grad, self.pos_scale, self.den_scale, mixed_signs)


class FusedSupConLoss(torch.autograd.Function):
    """The per-anchor losses L_i; inputs (anchors, keys, temperature tensor or None, spec, kernels).
    Outputs (rows, has_pos, lse, coef, pos_scale, den_scale, tau_direct, inv_tau): the rows and the per-row
    statistics the backward needs. Backward scales each row's coef (and tau_direct) by that row's incoming
    gradient, so any reduction, weights or reduction="none" is ordinary torch ops on the rows.
    Written with setup_context so that torch.func transforms can differentiate it."""

    @staticmethod
    def forward(anchors, keys, tau_tensor, spec, kernels):
        acc = spec.accum_dtype
        tau = spec.tau_value()
        # 1/tau travels as a one-element tensor so a learnable temperature needs no host round trip.
        if tau_tensor is not None:
            inv_tau = (1.0 / tau_tensor.detach().to(device=keys.device, dtype=acc)).reshape(1)
        else:
            inv_tau = torch.full((1,), 1.0 / tau, dtype=acc, device=keys.device)
        lse, pos_sum, pos_aux = kernels.forward_stats(spec, anchors, keys, inv_tau)
        return (*row_factors(spec, lse, pos_sum, pos_aux, tau), inv_tau)

    @staticmethod
    def setup_context(ctx, inputs, output):
        anchors, keys, tau_tensor, spec, kernels = inputs
        ctx.mark_non_differentiable(*output[1:])
        ctx.save_for_backward(anchors, keys, *output)
        ctx.spec, ctx.kernels = spec, kernels

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_rows, *_):
        anchors, keys, rows, _, lse, coef, pos_scale, den_scale, tau_direct, inv_tau = ctx.saved_tensors
        grad_rows = grad_rows.to(coef.dtype)
        factors = RowFactors(lse, coef, pos_scale, den_scale).scaled(grad_rows, ctx.spec.reduction == "none")
        return (*_grads(ctx.kernels, ctx.spec, anchors, keys, inv_tau, factors, (rows * grad_rows).sum(),
                        (tau_direct * grad_rows).sum(), *ctx.needs_input_grad[:3]), None, None)


def _grads(kernels, spec, anchors, keys, inv_tau, rows, loss, tau_direct, need_q, need_k, need_tau):
    """(dQ, dK, dtau) for the backward factors ``rows``, chained through the fused normalisation; ``loss`` is
    sum_i G_i L_i and ``tau_direct`` sum_i G_i dL_i/dtau (row formula) for the per-row gradients G_i."""
    sums = need_tau and kernels.logit_sums
    grads = kernels.backward_grads(spec, anchors, keys, inv_tau, rows, need_dq=need_q or (need_tau and not sums),
                                   need_dk=need_k, **({"logit_sums": True} if sums else {}))
    dq, dk = grads[:2]
    dtau = None
    if need_tau:
        tau = spec.tau_value()
        if sums:  # dLoss/dtau through the logits l = q.k / tau: -(1/tau) sum_ij g_ij l_ij
            dtau = -grads[2].sum() / tau + (loss / tau if spec.base_temperature is not None else 0.0)
        else:
            q_used = normalize_rows(anchors, spec.accum_dtype) if spec.normalize else anchors
            dtau = temperature_grad(spec, q_used, dq, loss, tau)
        dtau = (dtau + tau_direct).to(spec.temperature.dtype)
    if spec.normalize:  # the kernels differentiated w.r.t. the normalised rows: chain through x / |x|
        dq = normalize_backward(anchors, dq) if need_q else None
        dk = normalize_backward(keys, dk) if need_k else None
    return (dq.to(anchors.dtype) if need_q else None, dk.to(keys.dtype) if need_k else None, dtau)


def loss_and_grads(spec, kernels: Kernels):
    """(loss, dQ, dK, dtau, rows) of a "mean" or "sum" spec without autograd (torch.compile's custom op calls
    this): the gradients of sum_i coef_i L_i, coef_i from the reduction and the weights; rows: L_i."""
    tau = spec.temperature if isinstance(spec.temperature, torch.Tensor) else None
    rows, has_pos, lse, coef, pos_scale, den_scale, tau_direct, inv_tau = FusedSupConLoss.forward(
        spec.anchors, spec.keys, tau, spec, kernels)
    loss = reduce_rows(spec, rows, has_pos)
    grad_rows = reduction_coef(spec, has_pos)
    # torch.compile's backward of reduction="none" comes here with coef_i = G_i w_i as weights: any sign.
    factors = RowFactors(lse, coef, pos_scale, den_scale).scaled(grad_rows, spec.row_weight is not None)
    return (loss, *_grads(kernels, spec, spec.anchors, spec.keys, inv_tau, factors, loss,
                          (tau_direct * grad_rows).sum(), True, True, tau is not None), rows)


def loss(spec, kernels: Kernels):
    tau = spec.temperature if isinstance(spec.temperature, torch.Tensor) else None
    rows, has_pos = FusedSupConLoss.apply(spec.anchors, spec.keys, tau, spec, kernels)[:2]
    return reduce_rows(spec, rows, has_pos)


# ----------------------------------------------------------------------------- ring mode (distributed)

def _inv_tau(spec):
    return torch.full((1,), 1.0 / spec.tau_value(), dtype=spec.accum_dtype, device=spec.device)


def row_stats(spec, kernels: Kernels):
    """Ring mode: (lse, pos_sum, pos_aux) over this key shard (see chunked.row_stats; the kernels' eps terms,
    taken with this shard's LSE_N, are not used: the driver asks ``eps_terms`` with the merged one)."""
    return kernels.forward_stats(spec, spec.anchors, spec.keys, _inv_tau(spec))


def grads_from_stats(spec, lse, coef, pos_scale, den_scale, kernels: Kernels):
    """Ring mode: dQ, dK (input dtype) of this shard's tiles with the merged row factors (row_factors)."""
    acc = spec.accum_dtype
    # reduction="none": each row's coef carries its own incoming gradient, of any sign
    rows = RowFactors(lse.to(acc), coef.to(acc), pos_scale.to(acc), den_scale.to(acc), spec.reduction == "none")
    return kernels.backward_grads(spec, spec.anchors, spec.keys, _inv_tau(spec), rows)
