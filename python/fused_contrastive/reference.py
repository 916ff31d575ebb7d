"""The naive, exact backend: the test oracle.

It materialises every ``[Na, M]`` matrix the math mentions and lets autograd
differentiate it, so it is slow and memory-hungry by design. It computes in the
spec's accumulation dtype (float64 stays float64), never adds an epsilon and never
produces NaN for anchors without positives or without any key in the denominator.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .spec import ContrastSpec, mean_divisor


def positive_weights(spec: ContrastSpec) -> Tensor:
    """Dense a_ij, self excluded: [Na, M] in the accumulation dtype."""
    acc = spec.accum_dtype
    rows = torch.arange(spec.num_anchors, device=spec.device)
    cols = torch.arange(spec.num_keys, device=spec.device)
    if spec.mask is None:
        a = (spec.anchor_labels[:, None] == spec.key_labels[None, :]).to(acc)
    else:
        mask = spec.mask.to(acc)
        a = mask[rows % mask.shape[0]][:, cols % mask.shape[1]]
    return a * not_self(spec).to(acc)


def not_self(spec: ContrastSpec) -> Tensor:
    """Dense bool [Na, M]: True for every key in anchor i's denominator."""
    cols = torch.arange(spec.num_keys, device=spec.device)
    return cols[None, :] != spec.self_columns()[:, None]


def per_row(spec: ContrastSpec) -> tuple[Tensor, Tensor, Tensor]:
    """(L_i, LSE_i, has_pos_i) with autograd attached to anchors, keys and temperature."""
    acc = spec.accum_dtype
    tau = spec.temperature.to(acc) if isinstance(spec.temperature, Tensor) else spec.temperature
    anchors, keys = spec.normalized_inputs()
    logits = anchors.to(acc) @ keys.to(acc).T / tau
    in_denominator = not_self(spec)
    # A row with no key at all (one sample, one view) gets a dummy finite row;
    # its loss is dropped below, and the dummy keeps NaN out of autograd.
    has_denominator = in_denominator.any(1, keepdim=True)
    denominator_logits = logits.masked_fill(~in_denominator, float("-inf"))
    denominator_logits = torch.where(has_denominator, denominator_logits, torch.zeros_like(logits))
    lse = torch.logsumexp(denominator_logits, dim=1)

    a = positive_weights(spec)
    pos_count = a.sum(1)
    has_pos = pos_count > 0
    safe_count = torch.where(has_pos, pos_count, torch.ones_like(pos_count))
    if spec.variant == "in":  # log of the mean positive probability: LSE over positives of l + log a
        positive_logits = torch.where(a > 0, logits + torch.log(torch.where(a > 0, a, torch.ones_like(a))),
                                      torch.full_like(logits, float("-inf")))
        positive_logits = torch.where(has_pos[:, None], positive_logits, torch.zeros_like(logits))
        positive_term = torch.logsumexp(positive_logits, dim=1) - torch.log(safe_count)
    else:
        positive_term = (a * logits).sum(1) / safe_count
    c = 1.0 if spec.base_temperature is None else tau / spec.base_temperature
    loss_rows = torch.where(has_pos, c * (lse - positive_term), torch.zeros_like(lse))
    return loss_rows, lse, has_pos


def loss(spec: ContrastSpec) -> Tensor:
    loss_rows, _, has_pos = per_row(spec)
    return loss_rows.sum() / mean_divisor(spec, has_pos)


def why_not(spec: ContrastSpec) -> str | None:
    return None
