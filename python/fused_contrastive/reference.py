"""The naive, exact backend: the test oracle.

It materialises every ``[Na, M]`` matrix the math mentions and lets autograd
differentiate it, so it is slow and memory-hungry by design. It computes in the
spec's accumulation dtype (float64 stays float64), never adds an epsilon and never
produces NaN for anchors without positives or without any key in the denominator.

``dense_rows`` is the whole family's row math on dense logits, written directly from
the formulas (docs/design.md); the other backends derive their gradients by hand and are
tested against it and against tests/formulas.py.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import soft_targets
from .spec import ContrastSpec, debiased_row_losses, reduce_rows


def positive_weights(spec: ContrastSpec, rows: Tensor) -> Tensor:
    """Dense a_ij for anchor ``rows`` against every key, self excluded, in the accumulation dtype."""
    acc = spec.accum_dtype
    cols = torch.arange(spec.num_keys, device=spec.device)
    if spec.mask is None:
        a = (spec.anchor_labels[rows][:, None] == spec.key_labels[None, :]).to(acc)
    else:
        mask = spec.mask.to(acc)
        a = mask[rows % mask.shape[0]][:, cols % mask.shape[1]]
    return a * not_self(spec, rows).to(acc)


def not_self(spec: ContrastSpec, rows: Tensor) -> Tensor:
    """Dense bool [len(rows), M]: False only at each anchor's self."""
    cols = torch.arange(spec.num_keys, device=spec.device)
    return cols[None, :] != spec.self_columns()[rows][:, None]


def _masked_lse(x: Tensor, keep: Tensor) -> Tensor:
    """log sum exp over ``keep`` per row; -inf for a row with nothing kept, without NaN in autograd."""
    has_any = keep.any(1)
    x = torch.where(keep & has_any[:, None], x, torch.where(has_any[:, None], float("-inf"), 0.0))
    return torch.where(has_any, torch.logsumexp(x, dim=1), float("-inf"))


def dense_rows(spec: ContrastSpec, logits: Tensor, rows: Tensor, tau) -> tuple[Tensor, Tensor]:
    """(L_i, has_pos_i) for anchor ``rows`` from their logits ``[len(rows), M]`` (autograd-friendly)."""
    in_den = not_self(spec, rows)
    den_logits = logits
    if spec.den_bias is not None:
        bias = spec.den_bias.tile(rows).to(logits.dtype)
        in_den = in_den & (bias > float("-inf"))
        den_logits = logits + torch.where(in_den, bias, 0.0)
    lse = _masked_lse(den_logits, in_den)

    a = positive_weights(spec, rows)
    pos_count = a.sum(1)
    has_pos = pos_count > 0
    safe_count = torch.where(has_pos, pos_count, torch.ones_like(pos_count))
    c = 1.0 if spec.base_temperature is None else tau / spec.base_temperature
    if spec.variant == "in":  # log of the mean positive probability: LSE over positives of l + log a
        log_a = torch.log(torch.where(a > 0, a, torch.ones_like(a)))
        loss = lse - (_masked_lse(logits + log_a, a > 0) - torch.log(safe_count))
    elif spec.variant == "eps":  # each positive p over its own denominator exp(l_ip - eps) + sum_n exp(l_in)
        per_positive = logits - torch.logaddexp(logits - spec.epsilon, lse[:, None])
        loss = -(a * torch.where(a > 0, per_positive, 0.0)).sum(1) / safe_count
    elif spec.variant == "debiased":
        loss = _debiased_rows(spec, logits, in_den, lse, (a * logits).sum(1), tau)
    else:
        weight = 1.0 if spec.pos_row_weight is None else spec.pos_row_weight[rows].to(logits.dtype)
        loss = lse - weight * (a * logits).sum(1) / safe_count
    # c after the where: c * inf (a row without positives or keys) would send 0 * inf = NaN to a learnable tau.
    return c * torch.where(has_pos, loss, torch.zeros_like(loss)), has_pos


def _debiased_rows(spec: ContrastSpec, logits: Tensor, negative: Tensor, lse_n: Tensor, pos_logit: Tensor,
                   tau) -> Tensor:
    """The debiased row loss (spec.debiased_row_losses) with its negative statistics taken from dense logits."""
    n = negative.sum(1).to(logits.dtype)
    log_reweighted = None
    if spec.beta != 0:
        log_reweighted = (torch.log(n.clamp(min=1)) + _masked_lse((1 + spec.beta) * logits, negative)
                          - _masked_lse(spec.beta * logits, negative))
    return debiased_row_losses(spec, lse_n, pos_logit, n, tau, log_reweighted)


def per_row(spec: ContrastSpec) -> tuple[Tensor, Tensor]:
    """(L_i, has_pos_i) with autograd attached to anchors, keys and temperature."""
    acc = spec.accum_dtype
    tau = spec.temperature.to(acc) if isinstance(spec.temperature, Tensor) else spec.temperature
    anchors, keys = spec.normalized_inputs()
    logits = anchors.to(acc) @ keys.to(acc).T / tau
    rows = torch.arange(spec.num_anchors, device=spec.device)
    if spec.soft_target is not None:
        return soft_targets.dense_rows(spec, logits, rows)
    return dense_rows(spec, logits, rows, tau)


def loss(spec: ContrastSpec) -> Tensor:
    loss_rows, has_pos = per_row(spec)
    return reduce_rows(spec, loss_rows, has_pos)


def _shard(spec: ContrastSpec):
    """Ring mode, densely: (logits l, positives a, in_den, l + b on the denominator) of one key shard."""
    acc = spec.accum_dtype
    rows = torch.arange(spec.num_anchors, device=spec.device)
    logits = spec.anchors.to(acc) @ spec.keys.to(acc).T / spec.tau_value()
    in_den = not_self(spec, rows)
    bias = torch.zeros_like(logits)
    if spec.den_bias is not None:
        bias = spec.den_bias.tile(rows).to(acc)
        in_den = in_den & (bias > float("-inf"))
    return logits, positive_weights(spec, rows), in_den, logits + torch.where(in_den, bias, 0.0)


def row_stats(spec: ContrastSpec) -> tuple[Tensor, Tensor, Tensor]:
    """Ring mode: (LSE over this key shard's denominator, sum_j a_ij l_ij or LSE_P over it, and for hard
    negatives the [2, Na] LSEs of (1+beta) l and beta l over the denominator), densely."""
    logits, a, in_den, den = _shard(spec)
    lse = _masked_lse(den, in_den)
    aux = lse
    if spec.variant == "debiased" and spec.beta != 0:
        aux = torch.stack([_masked_lse((1 + spec.beta) * den, in_den), _masked_lse(spec.beta * den, in_den)])
    if spec.variant == "in":
        return lse, _masked_lse(logits + torch.log(a), a > 0), aux
    return lse, (a * logits).sum(1), aux


def eps_terms(spec: ContrastSpec, lse_n: Tensor) -> tuple[Tensor, Tensor]:
    """Ring mode, epsilon-SupInfoNCE: (sum_p [l_ip - logaddexp(l_ip - eps, LSE_N)], sum_p sigmoid(LSE_N + eps -
    l_ip)) over this shard's positives, given the merged LSE_N."""
    logits, a, _, _ = _shard(spec)
    per_positive = logits - torch.logaddexp(logits - spec.epsilon, lse_n[:, None])
    return (a * torch.where(a > 0, per_positive, 0.0)).sum(1), (a * torch.sigmoid(lse_n[:, None] + spec.epsilon
                                                                                  - logits)).sum(1)


def grads_from_stats(spec: ContrastSpec, lse: Tensor, coef: Tensor, pos_scale: Tensor,
                     den_scale: Tensor) -> tuple[Tensor, Tensor]:
    """Ring mode: dQ, dK of g_ij = coef_i (u_i softmax_ij - positive part) with the merged row factors
    (fused.row_factors: u_i is R_i for eps, dL/dLSE_N for debiased; hard negatives: the (1+beta) and beta
    softmaxes with [3, Na] lse and den_scale)."""
    tau = spec.tau_value()
    logits, a, in_den, den = _shard(spec)
    Q, K = spec.anchors.to(logits.dtype), spec.keys.to(logits.dtype)

    def softmax(scale, row_lse):
        return torch.where(in_den, torch.exp(scale * den - torch.where(torch.isfinite(row_lse), row_lse, 0.0)[:, None]),
                           0.0)

    if spec.variant == "debiased" and spec.beta != 0:
        p = den_scale[1][:, None] * softmax(1 + spec.beta, lse[1]) + den_scale[2][:, None] * softmax(spec.beta, lse[2])
    else:
        p = softmax(1.0, lse)
        if spec.variant in ("eps", "debiased"):
            p = den_scale[:, None] * p
    if spec.variant == "in":  # a_ij exp(l_ij - LSE_P): exp(-inf) = 0 off the positives, where exp(l) may be inf
        positive = torch.exp(logits + torch.log(a) - pos_scale[:, None])
    elif spec.variant == "eps":
        positive = a * torch.sigmoid(lse[:, None] + spec.epsilon - logits)
    else:
        positive = a * pos_scale[:, None]
    g = coef[:, None] * (p - positive)
    return g @ K / tau, g.T @ Q / tau


def why_not(spec: ContrastSpec) -> str | None:
    return None
