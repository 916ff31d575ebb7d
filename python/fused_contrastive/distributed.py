"""Exact losses across ranks with torch.distributed: gather mode, around any backend and any loss.

Each rank passes its local batch; the global batch is the ranks' batches concatenated in
rank order. Every rank gathers the per-sample inputs of all ranks (features and labels,
or query/key, image/text: O(global N * D), differentiably: the gather's backward sums
each rank's key gradients back to their owner), builds the loss's spec for the global
batch exactly as one process would, and computes only its own anchor rows against all
keys (``local_rows``: a slice of the anchors, the self offset moved with it). Nothing of
size N x N is ever built, and any backend serves the per-rank part.

Tensors that are not per sample (a MoCo queue, labelled extra keys, BCL's class centers,
a learnable temperature or logit scale) are the same on every rank, as DDP keeps
parameters, and are not gathered.

Gradient contract (DDP-exact): the value returned on every rank is the global loss, and
every gradient (features, temperature, centers, ...) is ``world_size x`` this rank's share
of the global gradient, so that DDP's averaging of parameter gradients reproduces
single-process training on the global batch exactly.

Ranks agree or fail together: every public loss validates its local arguments first, and the
call's first collective is one exchange of a small record per rank (``all_gather_object``):
the loss, a description of every argument (dtype and trailing shape of per-sample tensors,
dtype and shape of shared ones, the value of every scalar and mode), the local batch size,
and the local validation error if there was one. Then every rank raises the same ValueError
naming the failing rank and its error, or the argument on which the ranks differ; only the
batch size may differ. A rank that never reaches the exchange (it crashed, it is not in the
group, torch.distributed is not initialised there, it does not call the loss) leaves the
others waiting in it until the process group's timeout (``init_process_group(timeout=...)``).
"""
from __future__ import annotations

import contextvars
import dataclasses
import functools
import inspect
import numbers
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import dispatch
from .spec import ContrastSpec, counted_weight, normalize_rows


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


@dataclasses.dataclass
class GlobalBatch:
    """The per-sample inputs of every rank, concatenated in rank order, and this rank's rows in them."""
    tensors: list  # global versions of the inputs (None stays None)
    offset: int  # this rank's first sample in the global batch
    size: int  # this rank's number of samples
    total: int  # samples in the global batch
    sizes: list  # every rank's number of samples


def check_group(group) -> None:
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("process_group was given but torch.distributed is not initialised "
                         "(call torch.distributed.init_process_group first)")
    try:
        rank = dist.get_rank(group)
    except (RuntimeError, ValueError, TypeError, AttributeError) as err:
        raise ValueError(f"process_group must be a torch.distributed process group, got {type(group).__name__} "
                         f"({err})") from None
    if rank < 0:
        raise ValueError(f"process_group does not include this process (global rank {dist.get_rank()}): call the "
                         "loss with a group only on that group's ranks")


# ----------------------------------------------------------------------------- agreement before any collective

# Arguments describing one sample per row: only their dtype and trailing shape must agree across ranks.
PER_SAMPLE = ("features", "labels", "mask", "query", "key", "image_features", "text_features", "weight",
              "universum", "teacher", "probs")  # (teacher, probs: the soft-target losses)
# Compared by value in the loss's label dtype: where they live and whether they require grad do not matter.
LABEL_ARGS = ("labels", "extra_key_labels")
_NOT_COMPARED = ("backend", "process_group")  # a backend does not change the result; the group is the group


def _describe(name: str, value):
    """What must be the same on every rank about one argument (printable, comparable with ==)."""
    if value is None or isinstance(value, (bool, str)):
        return repr(value)  # the string "0.1" is not the number 0.1
    if isinstance(value, numbers.Real):
        return repr(float(value))  # 1 and 1.0 alike; NaN equals NaN here (the local checks refuse it)
    if not isinstance(value, Tensor) and name in PER_SAMPLE:
        try:
            value = torch.as_tensor(value)  # a list of labels describes as the tensor it becomes
        except Exception:
            return type(value).__name__
    if not isinstance(value, Tensor):
        return type(value).__name__
    per_sample = name in PER_SAMPLE
    shape = ["bsz", *value.shape[1:]] if per_sample and value.dim() > 0 else list(value.shape)
    text = f"{value.dtype} tensor of shape [{', '.join(map(str, shape))}]"
    if name not in LABEL_ARGS:
        text += f" on {value.device.type}" + (" requiring grad" if value.requires_grad else "")
    if not per_sample and value.numel() == 1 and value.device.type != "meta":
        text += f" = {float(value.detach())!r}"  # a temperature, logit scale or bias: its value must agree
    return text


@dataclasses.dataclass
class _Pending:
    """The exchange a distributed call owes its peers before its first collective."""
    group: object
    record: dict  # loss name and argument descriptions: must be equal on every rank
    device: Optional[torch.device]  # where all_gather_object stages its bytes (NCCL needs this rank's GPU)
    sizes: Optional[list] = None  # every rank's batch size, once exchanged

    def exchange(self, size: int, error: Optional[BaseException] = None) -> list:
        world, rank = dist.get_world_size(self.group), dist.get_rank(self.group)
        mine = {"record": self.record, "size": size,
                "error": None if error is None else (type(error).__name__, str(error))}
        records = [None] * world
        if self.device is not None and self.device.type == "cuda":
            with torch.cuda.device(self.device):
                dist.all_gather_object(records, mine, group=self.group)
        else:
            dist.all_gather_object(records, mine, group=self.group)
        self.sizes = [r["size"] for r in records]
        failed = [r for r, theirs in enumerate(records) if theirs["error"] is not None]
        if failed:
            first = failed[0]
            kind, message = records[first]["error"]
            text = f"rank {first} of the process group ({world} ranks): {message}"
            if kind == "ValueError":
                raise ValueError(text) from error
            if first == rank:
                raise error
            raise RuntimeError(f"{text} ({kind} on that rank)")
        first_record = records[0]["record"]  # every rank compares with rank 0, so all raise the same message
        for name, value in first_record.items():
            differ = [r for r, theirs in enumerate(records) if theirs["record"].get(name) != value]
            if differ:
                other = differ[0]
                raise ValueError(f"the ranks of process_group disagree on {name}: rank 0 passed {value}, rank "
                                 f"{other} passed {records[other]['record'].get(name)}; every argument but the batch "
                                 "size must be the same on every rank")
        return self.sizes


_PENDING: contextvars.ContextVar = contextvars.ContextVar("fused_contrastive_pending_exchange", default=None)


def agreed(fn):
    """Decorate a public loss so that, with ``process_group``, its ranks agree before computing: the local
    validation runs, then the first collective of the call (``gather_batch``) is the metadata exchange,
    which raises the same error on every rank when any rank failed or the ranks' arguments differ. A call
    that fails before reaching it exchanges its error instead, so no peer is left waiting."""
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def call(*args, **kwargs):
        group = kwargs.get("process_group")
        if group is None or torch.compiler.is_compiling():
            return fn(*args, **kwargs)
        check_group(group)
        bound = signature.bind_partial(*args, **kwargs)
        bound.apply_defaults()
        from .losses import CHECK_FINITE_ENV, finite_check_on  # (losses imports this module)

        # The finite check may run on the global batch: a rank that skips it must not wait for one that raises.
        record = {"loss": fn.__name__, CHECK_FINITE_ENV: finite_check_on()}
        for name, value in bound.arguments.items():
            if name not in _NOT_COMPARED:
                try:
                    record[name] = _describe(name, value)
                except Exception as err:  # a value that cannot even be described: the local check names it
                    record[name] = f"{type(value).__name__} ({type(err).__name__})"
        device = next((v.device for n, v in bound.arguments.items() if n in PER_SAMPLE
                       and isinstance(v, Tensor) and v.device.type != "meta"), None)
        pending = _Pending(group, record, device)
        token = _PENDING.set(pending)
        try:
            result = fn(*args, **kwargs)
        except Exception as err:
            if pending.sizes is None:  # failed before the exchange: tell the peers, raise together
                pending.exchange(0, err)
            raise  # after it: every rank has the same global inputs, so every rank fails alike
        finally:
            _PENDING.reset(token)
        if pending.sizes is None:
            pending.exchange(0)
        return result
    return call


def _exchanged_sizes(group, size: int) -> Optional[list]:
    """The ranks' batch sizes from the call's pending exchange (done here, before the first collective),
    or None outside a public loss's distributed call."""
    pending = _PENDING.get()
    if pending is None or pending.group is not group:
        return None
    return pending.sizes if pending.sizes is not None else pending.exchange(size)


def gather_batch(group, *tensors: Optional[Tensor], layout: tuple = ()) -> GlobalBatch:
    """Gather per-sample tensors (same first dim; those that require grad differentiably). Every rank must
    pass the same trailing shapes, the same pattern of None and the same ``layout`` numbers."""
    check_group(group)
    world = dist.get_world_size(group)
    first = next(t for t in tensors if t is not None)
    device = first.device
    sizes = _exchanged_sizes(group, first.shape[0])  # the arguments already agree (see agreed)
    if sizes is None:
        layout = [first.shape[0], *layout] + [
            x for t in tensors for x in ((-1,) * 4 if t is None else (t.dim(), *(list(t.shape[1:]) + [0] * 3)[:3]))]
        shapes = _gather_rows(torch.tensor([layout], device=device), [1] * world, group, differentiable=False)
        if not bool((shapes[:, 1:] == shapes[0, 1:]).all()):
            raise ValueError("every rank must pass inputs of the same trailing shape (views, feature size), and "
                             f"optional per-sample inputs (labels) on all ranks or none; got {shapes.tolist()} "
                             "(per rank: batch size, then each input's dims and trailing shape)")
        sizes = [int(n) for n in shapes[:, 0]]
    rank = dist.get_rank(group)
    gathered = [None if t is None else _gather_rows(t, sizes, group, differentiable=t.requires_grad)
                for t in tensors]
    return GlobalBatch(gathered, sum(sizes[:rank]), sizes[rank], sum(sizes), sizes)


def local_rows(spec: ContrastSpec, start: int, stop: int) -> ContrastSpec:
    """The spec restricted to anchors [start, stop) (their weights with them), summed (the caller divides by
    the global count), or its rows when the spec's reduction is "none"."""
    def rows(t):
        return None if t is None else t[start:stop]

    bias = spec.den_bias
    if bias is not None:
        bias = dataclasses.replace(bias, anchor_groups=bias.anchor_groups[start:stop])
    target = spec.soft_target  # soft targets: the anchors' side inputs go with their rows
    if target is not None:
        target = dataclasses.replace(target, anchor_side=target.anchor_side[start:stop])
    return dataclasses.replace(
        spec, anchors=spec.anchors[start:stop], anchor_labels=rows(spec.anchor_labels), den_bias=bias,
        soft_target=target,
        pos_row_weight=rows(spec.pos_row_weight), row_weight=rows(spec.row_weight),
        reduction="none" if spec.reduction == "none" else "sum",
        self_offset=None if spec.self_offset is None else spec.self_offset + start)


def run_rows(spec: ContrastSpec, ranges: list[tuple[int, int]], group, backend: str) -> Tensor:
    """The global result of ``spec`` (built on the global batch) from this rank's anchor ``ranges``, with
    DDP-exact gradients: "mean" / "sum" over the global batch (the mean divided by the global sum of counted
    weights), or "none": this rank's rows. The weights are constants here (no gradient of their own)."""
    if spec.mask is not None:
        raise ValueError("mask cannot be combined with process_group (a [bsz, bsz] mask is local); pass labels")
    world = dist.get_world_size(group)
    if spec.row_weight is not None:
        spec = dataclasses.replace(spec, row_weight=spec.row_weight.detach())
    pieces = [local_rows(spec, start, stop) for start, stop in ranges]
    if spec.reduction == "none":
        rows = torch.cat([dispatch.run(local, backend) for local in pieces])
        return world * rows - ((world - 1) * rows).detach()  # the rows; gradient world_size x this rank's
    local_sum = torch.zeros((), dtype=spec.accum_dtype, device=spec.device)
    local_weight = torch.zeros((), dtype=spec.accum_dtype, device=spec.device)
    for local in pieces:
        local_sum = local_sum + dispatch.run(local, backend)
        local_weight = local_weight + counted_weight(local, local.pos_count() > 0).sum()
    totals = torch.stack([local_sum.detach(), local_weight])
    dist.all_reduce(totals, group=group)
    global_sum, global_weight = totals[0], totals[1]
    divisor = torch.where(global_weight > 0, global_weight, torch.ones_like(global_weight))
    if spec.reduction == "sum":
        divisor = torch.ones_like(divisor)
    scaled_share = world * local_sum / divisor
    # Value: the global loss. Gradient: world_size x this rank's share (the gather's backward adds the
    # other ranks' key gradients), which DDP's average turns into the single-process gradient.
    return scaled_share + (global_sum / divisor - scaled_share).detach()


def view_ranges(batch: GlobalBatch, anchor_views: int) -> list[tuple[int, int]]:
    """This rank's anchor rows when the anchors are views stacked view-major (row v * total + sample)."""
    return [(v * batch.total + batch.offset, v * batch.total + batch.offset + batch.size) for v in range(anchor_views)]


# ----------------------------------------------------------------------------- ring mode

def _rotate(tensors: list[Tensor], group, recv_shapes: list[tuple]) -> tuple[list[Tensor], list]:
    """Start sending ``tensors`` to the next rank and receiving the previous rank's (shapes given);
    returns (buffers, pending requests): wait on the requests before reading the buffers."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    nxt, prv = dist.get_global_rank(group, (rank + 1) % world), dist.get_global_rank(group, (rank - 1) % world)
    buffers = [torch.empty(shape, dtype=t.dtype, device=t.device) for t, shape in zip(tensors, recv_shapes)]
    ops = [dist.P2POp(dist.isend, t.contiguous(), nxt, group) for t in tensors]
    ops += [dist.P2POp(dist.irecv, buf, prv, group) for buf in buffers]
    return buffers, dist.batch_isend_irecv(ops)


class _RingSupCon(torch.autograd.Function):
    """SupCon (L_out / L_in) of this rank's anchors against every rank's keys, the keys travelling around the
    ring: forward merges each shard's per-row statistics (LSE by logaddexp, the positive statistic by sum or
    logaddexp, Z by sum); backward rotates each shard with its key-gradient accumulator, which arrives back
    at its owner after world_size steps. Labelled extra keys (the same on every rank, never anchors) are one
    more shard that stays home. Returns the global loss; gradients world_size x this rank's share."""

    @staticmethod
    def forward(ctx, keys: Tensor, tau_tensor, extra_keys, ring):
        ops, group, make_spec, shard_rows, num_anchors = ring
        row_stats = ops[0]
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        anchors = keys.detach()[:num_anchors]
        stats = []  # (lse, positive statistic, Z) of each shard, merged below

        def add(spec):
            stats.append((*row_stats(spec), spec.pos_count()))
            return spec

        shard, owner = keys.detach(), rank
        for step in range(world):
            pending = []
            if step < world - 1:  # the next shard travels while this one is computed
                (incoming,), pending = _rotate([shard], group, [(shard_rows[(owner - 1) % world], shard.shape[1])])
            if step == 0 and extra_keys is not None:  # they stay home: computed while the first shard travels
                add(make_spec(anchors, extra_keys.detach(), None))
            spec = add(make_spec(anchors, shard, owner))
            for request in pending:
                request.wait()
            if step < world - 1:
                shard, owner = incoming, (owner - 1) % world
        lse, pos_stat, pos_count = stats[0]
        for shard_lse, shard_pos, shard_count in stats[1:]:
            lse = torch.logaddexp(lse, shard_lse)
            pos_stat = torch.logaddexp(pos_stat, shard_pos) if spec.variant == "in" else pos_stat + shard_pos
            pos_count = pos_count + shard_count
        from .spec import positive_scale, row_losses

        tau = spec.tau_value()
        c = 1.0 if spec.base_temperature is None else tau / spec.base_temperature
        has_pos = pos_count > 0
        loss_rows = row_losses(spec, lse, pos_stat, pos_count, c)
        local_count = has_pos.sum() if spec.no_positive == "exclude" else torch.tensor(num_anchors)
        totals = torch.stack([loss_rows.sum(), local_count.to(loss_rows.dtype).to(loss_rows.device)])
        dist.all_reduce(totals, group=group)
        global_count = totals[1].clamp(min=1)
        ctx.save_for_backward(keys, extra_keys, lse, torch.where(has_pos, pos_stat, 0.0) if spec.variant == "in"
                              else positive_scale(spec, pos_count),
                              torch.where(has_pos, c * world / global_count, 0.0), world * loss_rows.sum() / global_count)
        ctx.ring = ring
        ctx.tau = tau
        ctx.tau_dtype = None if tau_tensor is None else tau_tensor.dtype
        ctx.base_temperature = spec.base_temperature
        return totals[0] / global_count

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        keys, extra_keys, lse, pos_scale, coef_unit, loss_share = ctx.saved_tensors
        ops, group, make_spec, shard_rows, num_anchors = ctx.ring
        grads_from_stats = ops[1]
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        coef = coef_unit * grad_loss
        shard, owner = keys.detach(), rank
        anchors = shard[:num_anchors]
        acc = lse.dtype
        dQ = torch.zeros(anchors.shape, dtype=acc, device=keys.device)
        grad_extra = None
        if extra_keys is not None:
            extra_dQ, grad_extra = grads_from_stats(make_spec(anchors, extra_keys, None), lse, coef, pos_scale)
            dQ += extra_dQ.to(acc)
            grad_extra = grad_extra.to(extra_keys.dtype) if ctx.needs_input_grad[2] else None
        carried = torch.zeros(shard.shape, dtype=acc, device=keys.device)
        for step in range(world):
            prev_rows = shard_rows[(owner - 1) % world]
            pending = []
            if world > 1 and step < world - 1:  # keys do not change: they travel while this step computes
                (incoming,), pending = _rotate([shard], group, [(prev_rows, shard.shape[1])])
            shard_dQ, shard_dK = grads_from_stats(make_spec(anchors, shard, owner), lse, coef, pos_scale)
            dQ += shard_dQ.to(acc)
            carried += shard_dK.to(acc)
            if world > 1:  # the accumulated key gradient follows its shard; after world steps it is home
                (carried,), more = _rotate([carried], group, [(prev_rows, shard.shape[1])])
                for request in pending + more:
                    request.wait()
                if step < world - 1:
                    shard = incoming
                owner = (owner - 1) % world
        grad_keys = carried
        grad_keys[:num_anchors] += dQ
        grad_tau = None
        if ctx.tau_dtype is not None:  # l is linear in 1/tau: dtau = -(1/tau) sum_i q_i . dQ_i (+ loss / tau for c)
            grad_tau = -(anchors.to(acc) * dQ).sum() / ctx.tau
            if ctx.base_temperature is not None:
                grad_tau = grad_tau + loss_share * grad_loss / ctx.tau
            grad_tau = grad_tau.to(ctx.tau_dtype)
        return grad_keys.to(keys.dtype), grad_tau, grad_extra, None


def supcon_loss_ring(features: Tensor, labels: Optional[Tensor], *, group, temperature, tau_float: float,
                     base_temperature, contrast_mode: str, no_positive: str, normalize: bool, variant: str,
                     backend: str, extra_keys: Optional[Tensor] = None,
                     extra_key_labels: Optional[Tensor] = None) -> Tensor:
    """SupCon in ring mode: features [b, V, D] and labels [b] (or None: SimCLR) of this rank, and validated
    extra keys [E, D] with their labels (the same on every rank); only label ids (O(N) integers) are
    gathered, never the keys. Same value and gradients as the gather mode."""
    check_group(group)
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    b, n_views, dim = features.shape
    if normalize:  # differentiably here, so that every shard is already unit-norm; in fp32 for 16-bit inputs
        acc = torch.float64 if features.dtype == torch.float64 else torch.float32
        features = normalize_rows(features.reshape(-1, dim), acc).to(features.dtype).reshape(b, n_views, dim)
        if extra_keys is not None:
            extra_keys = normalize_rows(extra_keys, acc).to(extra_keys.dtype)
    ids = torch.zeros(b, dtype=torch.long, device=features.device) if labels is None else labels
    batch = gather_batch(group, ids if labels is None else labels, layout=(n_views, dim, labels is None))
    sizes = batch.sizes
    if labels is None:  # SimCLR: a sample's views are its only positives; unlabelled extra keys: one more class
        class_ids, num_classes = torch.arange(batch.total, device=features.device), batch.total + 1
        if extra_keys is not None:
            extra_ids = torch.full((extra_keys.shape[0],), batch.total, device=features.device)
    else:  # one id per distinct label of the global batch and of the extra keys alike
        every = batch.tensors[0] if extra_keys is None else torch.cat([batch.tensors[0], extra_key_labels])
        _, every_ids = torch.unique(every, return_inverse=True)
        class_ids, extra_ids = every_ids[:batch.total], every_ids[batch.total:]
        num_classes = int(every_ids.max()) + 1
    offsets = [sum(sizes[:r]) for r in range(world)]
    shard_labels = [class_ids[offsets[r]: offsets[r] + sizes[r]].repeat(n_views) for r in range(world)]
    num_anchors = b * (n_views if contrast_mode == "all" else 1)
    keys = features.transpose(0, 1).reshape(n_views * b, dim)  # this rank's views, view-major
    probe = ContrastSpec(anchors=keys[:num_anchors], keys=keys, self_offset=0, anchor_labels=None, key_labels=None,
                         num_classes=num_classes, mask=None, temperature=tau_float, base_temperature=base_temperature,
                         no_positive=no_positive, tau_float=tau_float, reduction="sum", variant=variant)
    chosen = dispatch.select(dataclasses.replace(probe, anchor_labels=shard_labels[rank][:num_anchors],
                                                 key_labels=shard_labels[rank]), backend)
    if chosen.ring is None:
        raise ValueError(f"backend {chosen.name!r} has no ring mode; use distributed='gather'")

    def make_spec(anchors, shard, owner):
        # Self (same global row) only among this rank's own keys: local row i of anchors is key row i.
        # owner None: the extra keys.
        return dataclasses.replace(probe, anchors=anchors, keys=shard, self_offset=0 if owner == rank else None,
                                   anchor_labels=shard_labels[rank][:num_anchors],
                                   key_labels=extra_ids if owner is None else shard_labels[owner])

    tau_tensor = temperature if isinstance(temperature, Tensor) else None
    ring = (chosen.ring, group, make_spec, [n_views * n for n in sizes], num_anchors)
    with torch.autocast(features.device.type, enabled=False):
        return _RingSupCon.apply(keys, tau_tensor, extra_keys, ring)
