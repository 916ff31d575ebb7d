"""Exact SupCon across ranks with torch.distributed: gather mode, around any backend.

Each rank passes its local batch; the global batch is the ranks' batches concatenated in
rank order. Every rank gathers the keys of all ranks (O(global N * D), differentiably:
the gather's backward sums each rank's key gradients back to their owner) and computes
only its own anchors against them, one spec per anchor view so that each view's self
index is one offset (``v * B + this rank's offset``). Nothing of size N x N is ever
built, and any backend (reference, chunked, triton) serves the per-rank part.

Gradient contract (DDP-exact): the value returned on every rank is the global loss, and
every gradient (features, a learnable temperature) is ``world_size x`` this rank's share
of the global gradient, so that DDP's averaging of parameter gradients reproduces
single-process training on the global batch exactly.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from . import dispatch
from .spec import ContrastSpec


class _AllGather(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient of the gathered tensor back to its owner."""

    @staticmethod
    def forward(ctx, x: Tensor, group):
        ctx.group = group
        pieces = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(pieces, x.contiguous(), group=group)
        return torch.stack(pieces)

    @staticmethod
    def backward(ctx, grad: Tensor):
        group = ctx.group
        grad = grad.contiguous()
        if dist.get_backend(group) == dist.Backend.NCCL:
            out = torch.empty_like(grad[0])
            dist.reduce_scatter_tensor(out, grad, group=group)
            return out, None
        grad = grad.clone()  # gloo has no reduce-scatter: sum everything, keep this rank's part
        dist.all_reduce(grad, group=group)
        return grad[dist.get_rank(group)], None


def _gather_rows(x: Tensor, sizes: list[int], group, differentiable: bool) -> Tensor:
    """Concatenate every rank's x (first dims ``sizes``) in rank order; pads to the largest."""
    pad = max(sizes) - x.shape[0]
    padded = torch.cat([x, x.new_zeros((pad, *x.shape[1:]))]) if pad else x.contiguous()
    if differentiable:
        pieces = _AllGather.apply(padded, group)
    else:
        pieces = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(pieces, padded, group=group)
    return torch.cat([p[:n] for p, n in zip(pieces, sizes)])


def supcon_loss_gather(features: Tensor, labels, *, group, temperature, tau_float: float, base_temperature,
                       contrast_mode: str, no_positive: str, normalize: bool, backend: str,
                       variant: str = "out") -> Tensor:
    """features [b, V, D] (validated), labels [b] or None (SimCLR): the global loss, DDP-exact gradients."""
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    b, n_views, dim = features.shape
    device = features.device
    shapes = _gather_rows(torch.tensor([[b, n_views, dim, labels is None]], device=device), [1] * world,
                          group, differentiable=False)
    if not bool((shapes[:, 1:] == shapes[0, 1:]).all()):
        raise ValueError("features must have the same n_views and feature size on every rank, and labels "
                         f"must be given on all ranks or none; got [b, n_views, D, no labels] = {shapes.tolist()}")
    sizes = [int(n) for n in shapes[:, 0]]
    offset, total = sum(sizes[:rank]), sum(sizes)

    global_features = _gather_rows(features, sizes, group, differentiable=True)
    keys = global_features.transpose(0, 1).reshape(n_views * total, dim)
    if labels is None:
        class_ids, num_classes = torch.arange(total, device=device), total
    else:
        global_labels = _gather_rows(labels, sizes, group, differentiable=False)
        _, class_ids = torch.unique(global_labels, return_inverse=True)
        num_classes = int(class_ids.max()) + 1
    key_labels = class_ids.repeat(n_views)
    anchor_labels = class_ids[offset: offset + b]

    local_sum = torch.zeros((), dtype=torch.float64 if features.dtype == torch.float64 else torch.float32,
                            device=device)
    local_count = torch.zeros((), dtype=torch.long, device=device)
    for view in range(n_views if contrast_mode == "all" else 1):
        spec = ContrastSpec(
            anchors=features[:, view], keys=keys, self_offset=view * total + offset,
            anchor_labels=anchor_labels, key_labels=key_labels, num_classes=num_classes, mask=None,
            temperature=temperature, base_temperature=base_temperature, no_positive=no_positive,
            normalize=normalize, tau_float=tau_float, reduction="sum", variant=variant,
        )
        local_sum = local_sum + dispatch.run(spec, backend)
        local_count = local_count + ((spec.pos_count() > 0).sum() if no_positive == "exclude" else b)

    totals = torch.stack([local_sum.detach(), local_count.to(local_sum.dtype)])
    dist.all_reduce(totals, group=group)
    global_sum, global_count = totals[0], totals[1].clamp(min=1)
    scaled_share = world * local_sum / global_count
    # Value: the global loss. Gradient: world_size x this rank's share (the gather's backward adds the
    # other ranks' key gradients), which DDP's average turns into the single-process gradient.
    return scaled_share + (global_sum / global_count - scaled_share).detach()

