"""Exact losses across ranks with torch.distributed: gather mode, around any backend and any loss.

Each rank passes its local batch; the global batch is the ranks' batches concatenated in
rank order. Every rank gathers the per-sample inputs of all ranks (features and labels,
or query/key, image/text: O(global N * D), differentiably: the gather's backward sums
each rank's key gradients back to their owner), builds the loss's spec for the global
batch exactly as one process would, and computes only its own anchor rows against all
keys (``local_rows``: a slice of the anchors, the self offset moved with it). Nothing of
size N x N is ever built, and any backend serves the per-rank part.

Ring mode (``distributed="ring"``, every loss): the same ``build`` runs on the global batch's O(N) metadata
(labels gathered, features replaced by a zero-stride placeholder of the global shape; per-sample values a
loss needs from the features, DCLW's view similarities or PaCo's and TSC's dot products with shared tensors,
computed on each rank and gathered, with their gradient), so class ids, denominator biases and counts are
gather mode's. Only the key features travel: each rank's shard goes around the ring while this rank's
anchors accumulate per-row statistics over it (LSEs merge by logaddexp, positive sums by sum;
epsilon-SupInfoNCE goes around a second time, since each positive's term needs the merged LSE_N). A rank
holds its own shard and one incoming at a time. The backward sends every shard around again with its
key-gradient accumulator. Extra keys, a queue and class centers stay home as one more shard (``append_keys``
hands them over while ``build`` runs). A loss of several specs (one per pair of views) runs one ring per
spec (``ring_blocks``), each spec saying which of a rank's rows are its anchors and its keys (a view, every
view, a universum); terms a loss adds to the rows come from the global metadata or the gathered values.

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
from typing import NamedTuple, Optional

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
              "universum", "teacher", "probs", "bias_labels", "sources", "targets")  # (teacher, probs: the
# soft-target losses; sources, targets: RényiCL)
# Compared by value in the loss's label dtype: where they live and whether they require grad do not matter.
LABEL_ARGS = ("labels", "extra_key_labels", "bias_labels")
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


@dataclasses.dataclass
class _RingPlan:
    """What the ring Function needs besides its tensor inputs (all O(N) metadata)."""
    ops: "dispatch.RingOps"
    group: object
    shard_spec: object  # (anchors, shard, owner rank or None for the extra keys) -> the shard's ContrastSpec
    shard_rows: list  # rows of each rank's key shard
    spec: ContrastSpec  # this rank's anchors against its own shard (reduction "sum"): the row formula's settings
    pos_count: Tensor  # Z_i of this rank's anchors over every key (global metadata)
    den_count: Optional[Tensor]  # the denominator's size over every key (debiased only)
    row_weight: Optional[Tensor]  # w_i of this rank's anchors (constants: no gradient of their own)


def ring_visit(group, shard_rows: list[int], shards: list[Tensor], visit) -> None:
    """``visit(tensors, owner)`` for every rank's shard, this rank's first. ``shards``: this rank's tensors that
    travel together (key features, and any per-key side input a loss needs), each with ``shard_rows[rank]``
    rows; the next rank's shard travels while the current one is computed, so at most two are held at once.
    The one rotation loop of every ring-mode loss (softmax losses, SigLIP, the batch-ratio losses)."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    owner = rank
    for step in range(world):
        pending = []
        if step < world - 1:
            rows = shard_rows[(owner - 1) % world]
            incoming, pending = _rotate(shards, group, [(rows, *t.shape[1:]) for t in shards])
        visit(shards, owner)
        for request in pending:
            request.wait()
        if step < world - 1:
            shards, owner = incoming, (owner - 1) % world


def ring_accumulate(group, shard_rows: list[int], shards: list[Tensor], grad_of, dtype: torch.dtype) -> Tensor:
    """The backward's rotation: ``grad_of(tensors, owner) -> [rows, ...]``, this rank's contribution to the
    gradient of that shard's first tensor, for every rank's shard; the accumulated gradient travels with its
    shard and arrives home after world_size steps. Returns the gradient of this rank's own first tensor
    (every rank's contribution summed) in ``dtype``."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    owner = rank
    carried = torch.zeros(shards[0].shape, dtype=dtype, device=shards[0].device)
    for step in range(world):
        rows = shard_rows[(owner - 1) % world]
        pending = []
        if step < world - 1:  # the shards do not change: they travel while this step computes
            incoming, pending = _rotate(shards, group, [(rows, *t.shape[1:]) for t in shards])
        carried += grad_of(shards, owner).to(dtype)
        if world > 1:  # the accumulated gradient follows its shard; after world steps it is home
            (carried,), more = _rotate([carried], group, [(rows, *shards[0].shape[1:])])
            for request in pending + more:
                request.wait()
            if step < world - 1:
                shards = incoming
            owner = (owner - 1) % world
    return carried


def _ring_pass(plan: _RingPlan, anchors: Tensor, keys: Tensor, extra: Optional[Tensor], visit) -> None:
    """``visit(spec)`` for every rank's key shard (and first for the extra keys, which stay home)."""
    if extra is not None:
        visit(plan.shard_spec(anchors, extra, None))
    ring_visit(plan.group, plan.shard_rows, [keys], lambda shards, owner: visit(plan.shard_spec(anchors, shards[0],
                                                                                                  owner)))


def ring_reduce(plan: _RingPlan, rows: Tensor, has_pos: Tensor) -> tuple[Tensor, Tensor]:
    """(result, grad_unit) of this rank's rows L_i: result = sum_i G_i L_i over every rank ("mean" divided by the
    global sum of counted weights, "sum"), or this rank's rows w_i L_i ("none"); grad_unit = G_i, with every
    gradient world_size x this rank's share: world w_i / divisor (times the upstream scalar) for "mean" /
    "sum", world w_i (times each row's upstream gradient) for "none"."""
    spec, world = plan.spec, dist.get_world_size(plan.group)
    weight = torch.ones_like(rows) if plan.row_weight is None else plan.row_weight.to(rows.dtype)
    if spec.reduction == "none":
        return weight * rows, world * weight
    counted = has_pos if spec.no_positive == "exclude" else torch.ones_like(has_pos)
    totals = torch.stack([(weight * rows).sum(), (weight * counted.to(rows.dtype)).sum()])
    dist.all_reduce(totals, group=plan.group)
    divisor = torch.where(totals[1] > 0, totals[1], torch.ones_like(totals[1]))
    if spec.reduction == "sum":
        divisor = torch.ones_like(divisor)
    return totals[0] / divisor, world * weight / divisor


class _Ring(torch.autograd.Function):
    """One loss of this rank's anchors against every rank's keys, the keys travelling around the ring. Any row
    formula: the forward merges each shard's per-row statistics (LSEs by logaddexp, sum_j a_ij l_ij by sum;
    epsilon-SupInfoNCE goes around a second time for its positive terms, which need the merged LSE_N first),
    turns them into the row formula's factors over every key (fused.row_factors with the global counts), and
    the backward rotates each shard with its key-gradient accumulator, which arrives back at its owner after
    world_size steps. Extra keys (the same on every rank, never anchors) are one more shard that stays home.
    Returns the global "mean" / "sum" (sum_i w_i L_i over every rank's anchors, the mean divided by the global
    sum of counted weights), or this rank's rows w_i L_i for "none"; every gradient is world_size x this
    rank's share."""

    @staticmethod
    def forward(ctx, anchors: Tensor, keys: Tensor, tau_tensor, extra_keys, plan: _RingPlan):
        from .fused import row_factors

        ops, spec = plan.ops, plan.spec
        hard = spec.variant == "debiased" and spec.beta != 0
        Q, K = anchors.detach(), keys.detach()
        extra = None if extra_keys is None else extra_keys.detach()
        merged = []  # lse, positive statistic, hard negatives' LSEs

        def first_pass(shard_spec):
            stats = ops.row_stats(shard_spec)
            if not merged:
                merged.extend(stats)
                return
            merged[0] = torch.logaddexp(merged[0], stats[0])
            merged[1] = torch.logaddexp(merged[1], stats[1]) if spec.variant == "in" else merged[1] + stats[1]
            if hard:
                merged[2] = torch.logaddexp(merged[2], stats[2])

        _ring_pass(plan, Q, K, extra, first_pass)
        lse, pos_stat, pos_aux = merged
        if spec.variant == "eps":  # sum_p [eps - softplus(LSE_N + eps - l_ip)] needs the whole LSE_N
            sums = []

            def second_pass(shard_spec):
                terms = ops.eps_terms(shard_spec, lse)
                sums[:] = terms if not sums else [a + b for a, b in zip(sums, terms)]

            _ring_pass(plan, Q, K, extra, second_pass)
            pos_stat, pos_aux = sums
        tau = spec.tau_value()
        rows, has_pos, lse, coef, pos_scale, den_scale, tau_direct = row_factors(
            spec, lse, pos_stat, pos_aux, tau, pos_count=plan.pos_count, den_count=plan.den_count)
        result, grad_unit = ring_reduce(plan, rows, has_pos)
        ctx.save_for_backward(anchors, keys, extra_keys, lse, coef, pos_scale, den_scale, tau_direct, rows, grad_unit)
        ctx.plan, ctx.tau = plan, tau
        ctx.tau_dtype = None if tau_tensor is None else tau_tensor.dtype
        return result

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        anchors, keys, extra, lse, coef, pos_scale, den_scale, tau_direct, rows, grad_unit = ctx.saved_tensors
        plan = ctx.plan
        grads_from_stats, group = plan.ops.grads_from_stats, plan.group
        grad_rows = grad_unit * grad_loss.to(grad_unit.dtype)  # G_i: dResult/dL_i times the upstream gradient
        coef = coef * grad_rows
        acc = lse.dtype
        Q = anchors.detach()
        dQ = torch.zeros(Q.shape, dtype=acc, device=Q.device)
        grad_extra = None
        if extra is not None:
            extra_dQ, grad_extra = grads_from_stats(plan.shard_spec(Q, extra.detach(), None), lse, coef, pos_scale,
                                                    den_scale)
            dQ += extra_dQ.to(acc)
            grad_extra = grad_extra.to(extra.dtype) if ctx.needs_input_grad[3] else None

        def grad_of(shards, owner):
            nonlocal dQ
            shard_dQ, shard_dK = grads_from_stats(plan.shard_spec(Q, shards[0], owner), lse, coef, pos_scale,
                                                  den_scale)
            dQ += shard_dQ.to(acc)
            return shard_dK

        carried = ring_accumulate(group, plan.shard_rows, [keys.detach()], grad_of, acc)
        grad_tau = None
        if ctx.tau_dtype is not None:  # l is linear in 1/tau: -(1/tau) sum_i q_i . dQ_i, + loss / tau for c
            grad_tau = -(Q.to(acc) * dQ).sum() / ctx.tau + (tau_direct * grad_rows).sum()
            if plan.spec.base_temperature is not None:
                grad_tau = grad_tau + (rows * grad_rows).sum() / ctx.tau
            grad_tau = grad_tau.to(ctx.tau_dtype)
        return dQ.to(anchors.dtype), carried.to(keys.dtype), grad_tau, grad_extra, None


# Set while ring mode builds a spec on placeholder features: append_keys then records the extra keys here
# instead of writing the placeholder rows out next to them.
_RING_EXTRA: contextvars.ContextVar = contextvars.ContextVar("fused_contrastive_ring_extra", default=None)


def append_keys(keys: Tensor, extra: Tensor) -> Tensor:
    """``torch.cat([keys, extra])``: the keys a spec holds, extra keys (never anchors) after the batch's. In ring
    mode's build (keys are a placeholder there) a placeholder of the combined shape, the extra keys going to
    the ring driver, which keeps them home as one more shard."""
    if torch.compiler.is_compiling():  # never ring mode (no process group under compile)
        return torch.cat([keys, extra])
    recorded = _RING_EXTRA.get()
    if recorded is None:
        return torch.cat([keys, extra])
    recorded.append(extra)
    return _placeholder(keys, keys.shape[0] + extra.shape[0])


def _build_on_placeholders(build, *args) -> tuple[ContrastSpec, Optional[Tensor]]:
    """(build(*args), the extra keys it appended or None)."""
    recorded = []
    token = _RING_EXTRA.set(recorded)
    try:
        spec = build(*args)
    finally:
        _RING_EXTRA.reset(token)
    assert len(recorded) <= 1
    return spec, (recorded[0] if recorded else None)


def _placeholder(x: Tensor, rows: int) -> Tensor:
    """Zeros of shape [rows, *x.shape[1:]] that take no memory (every stride 0): in ring mode ``build`` sees the
    global batch's shape, dtype and device through it, and its metadata (labels, counts, biases) is real."""
    return x.new_zeros(()).expand(rows, *x.shape[1:])


def _run_ring(spec: ContrastSpec, extra: Optional[Tensor], anchors: Tensor, keys: Tensor, views: int,
              anchor_views: int, batch: GlobalBatch, group, backend: str, sides: Optional[tuple] = None) -> Tensor:
    """The ring mode of a loss whose ``spec`` was built on the global batch (keys: ``views`` view-major blocks of
    the global samples, then the ``extra`` keys; anchors: the first ``anchor_views`` blocks) with placeholder
    features: this rank's ``anchors`` and ``keys`` (its own samples, the same layout) replace them, and only the
    keys travel. Every shard's spec is the global spec's metadata at that shard's rows. ``sides``: a soft
    target's side rows (this rank's anchors', its keys', the extra keys' or None), the keys' travelling with
    them (soft_targets.SoftRing runs those specs)."""
    if spec.mask is not None:
        raise ValueError("mask cannot be combined with process_group (a [bsz, bsz] mask is local); pass labels")
    assert spec.self_offset in (None, 0), "ring mode: an anchor's self is its own key row or none"
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    total, sizes, device = batch.total, batch.sizes, keys.device
    assert spec.num_keys == views * total + (0 if extra is None else extra.shape[0])
    if extra is not None:  # a copy: a memory bank may overwrite its rows in place before the backward
        extra = normalize_rows(extra, spec.accum_dtype).to(extra.dtype) if spec.normalize else extra.clone()
    offsets = [sum(sizes[:r]) for r in range(world)]
    key_rows = [(torch.arange(views, device=device)[:, None] * total + offsets[r]
                 + torch.arange(sizes[r], device=device)[None, :]).reshape(-1) for r in range(world)]
    extra_rows = torch.arange(views * total, spec.num_keys, device=device)
    ranges = view_ranges(batch, anchor_views)
    anchor_rows = torch.cat([torch.arange(start, stop, device=device) for start, stop in ranges])
    # Z_i and the denominator's size over every key, from the global metadata as gather mode counts them.
    parts = [local_rows(spec, start, stop) for start, stop in ranges]
    pos_count = torch.cat([part.pos_count() for part in parts])
    den_count = torch.cat([part.den_count() for part in parts]) if spec.variant == "debiased" else None
    bias, anchor_labels = spec.den_bias, spec.anchor_labels[anchor_rows]
    anchor_groups = None if bias is None else bias.anchor_groups[anchor_rows]
    row_weight = None if spec.pos_row_weight is None else spec.pos_row_weight[anchor_rows]
    weight = None if spec.row_weight is None else spec.row_weight.detach()[anchor_rows]

    def shard_spec(shard_anchors, shard, owner, side=None):
        rows = extra_rows if owner is None else key_rows[owner]
        den_bias = None if bias is None else dataclasses.replace(bias, anchor_groups=anchor_groups,
                                                                 key_groups=bias.key_groups[rows])
        target = spec.soft_target if side is None else dataclasses.replace(spec.soft_target, anchor_side=sides[0],
                                                                           key_side=side)
        # An anchor's self (its own key row: local row i of anchors is key row i) only in its own shard.
        return dataclasses.replace(spec, anchors=shard_anchors, keys=shard, anchor_labels=anchor_labels,
                                   key_labels=spec.key_labels[rows], den_bias=den_bias, pos_row_weight=row_weight,
                                   self_offset=spec.self_offset if owner == rank else None, row_weight=None,
                                   normalize=False, soft_target=target)

    own = shard_spec(anchors, keys, rank, None if sides is None else sides[1])
    chosen = dispatch.select(own, backend)
    if chosen.ring is None or (spec.soft_target is not None and chosen.ring.soft_norm is None):
        what = "" if spec.soft_target is None else " for soft per-pair targets"
        raise ValueError(f"backend {chosen.name!r} has no ring mode{what}; use distributed='gather'")
    plan = _RingPlan(chosen.ring, group, shard_spec, [views * n for n in sizes], own, pos_count, den_count, weight)
    tau_tensor = spec.temperature if isinstance(spec.temperature, Tensor) else None
    with torch.autocast(device.type, enabled=False):
        if spec.soft_target is not None:
            from .soft_targets import SoftRing

            return SoftRing.apply(anchors, keys, tau_tensor, extra, plan, sides)
        return _Ring.apply(anchors, keys, tau_tensor, extra, plan)


def _travels(t) -> bool:
    """A per-sample input of feature rows (floating, [b, ..., D]): ring mode never gathers it (it stays home as
    anchors or goes around as keys); the others (labels) are O(N) metadata and are gathered."""
    return isinstance(t, Tensor) and t.is_floating_point() and t.dim() >= 2


def _view_major(x: Tensor) -> Tensor:
    """[b, views, D] as [views * b, D], row v * b + i being view v of sample i (the specs' key order)."""
    return x.transpose(0, 1).reshape(-1, x.shape[-1])


class RingRun(NamedTuple):
    results: list  # per build: the global "mean" / "sum", or this rank's rows for "none"
    specs: list  # per build: the global spec (placeholder features, real metadata; reduced)
    inputs: list  # what every build was called with: placeholders, gathered labels, the gathered sample stat
    batch: GlobalBatch


def ring_blocks(builds, tensors: tuple, places=None, *, group, backend: str, sample_stat=None, reduce=None,
                weight: Optional[Tensor] = None) -> RingRun:
    """Ring mode of losses over per-sample inputs, one ring per spec. ``tensors``: this rank's per-sample inputs
    (one row per sample); the feature tensors (floating, two or more dims: views, a universum, query and key)
    become zero-stride placeholders of the global batch, the others (labels; None stays None) are gathered.
    ``sample_stat(*tensors) -> [b, ...]`` (optional): per-sample values computed from this rank's features (a
    view cosine, an anchor's dot products with shared tensors), gathered (differentiably when they require
    grad) and passed to every build as its last argument. Each ``build(*inputs)`` is gather mode's, on
    ``inputs`` (``RingRun.inputs``); ``reduce(spec, global weight) -> spec`` sets its reduction and weights.
    ``places[k](*tensors) -> (anchors, keys)``: this rank's rows of build k's anchors and keys (the keys before
    any extra keys), each made of blocks of one row per local sample in the spec's block order; anchors None:
    the leading rows of the keys (the spec's anchors are its leading keys, self included). A missing place:
    the views of ``tensors[0]``, view-major, as keys. Normalised here when the spec asks for it. Returns every
    build's result with the global specs and inputs, for terms the caller adds to the rows (constants of the
    global metadata, or functions of the gathered sample stat)."""
    b, device = tensors[0].shape[0], tensors[0].device
    stat = None if sample_stat is None else sample_stat(*tensors)
    shapes = tuple(x for t in tensors if _travels(t) for x in (t.dim(), *t.shape[1:]))
    kept = [None if _travels(t) else t for t in tensors]
    batch = gather_batch(group, torch.zeros(b, dtype=torch.long, device=device), *kept, stat, weight, layout=shapes)
    gathered = batch.tensors[1:1 + len(tensors)]
    inputs = [_placeholder(t, batch.total) if _travels(t) else g for t, g in zip(tensors, gathered)]
    if sample_stat is not None:
        inputs.append(batch.tensors[1 + len(tensors)])
    results, specs = [], []
    for k, build in enumerate(builds):
        spec, extra = _build_on_placeholders(build, *inputs)
        if reduce is not None:
            spec = reduce(spec, batch.tensors[-1])
        place = None if places is None else places[k]
        anchors, keys = (None, _view_major(tensors[0])) if place is None else place(*tensors)
        if spec.normalize:  # differentiably here, so that every shard is already unit-norm; fp32 for 16-bit inputs
            keys = normalize_rows(keys, spec.accum_dtype).to(keys.dtype)
            anchors = None if anchors is None else normalize_rows(anchors, spec.accum_dtype).to(anchors.dtype)
        key_blocks = (spec.num_keys - (0 if extra is None else extra.shape[0])) // batch.total
        anchor_blocks = spec.num_anchors // batch.total
        anchors = keys[:anchor_blocks * b] if anchors is None else anchors
        assert keys.shape[0] == key_blocks * b and anchors.shape[0] == anchor_blocks * b, "a place's rows do not " \
            "match its spec's blocks"
        results.append(_run_ring(spec, extra, anchors, keys, key_blocks, anchor_blocks, batch, group, backend))
        specs.append(spec)
    return RingRun(results, specs, inputs, batch)


def ring_views(build, features: Tensor, labels: Optional[Tensor], *, contrast_mode: str, group, backend: str,
               sample_stat=None, reduce=None, weight: Optional[Tensor] = None) -> Tensor:
    """Ring mode of a view-stacked loss: ``build(features, labels)`` is gather mode's, applied to the global
    labels (O(N), gathered) and placeholder features; ``sample_stat(features) -> [b]``: a per-sample scalar
    that ``build`` needs from the features, detached, gathered and passed as its third argument;
    ``reduce(spec, global weight) -> spec`` sets the reduction and the per-sample ``weight`` (gathered).
    The anchors are the spec's (every view, or the first with contrast_mode="one"): the leading keys."""
    del contrast_mode  # the spec's number of anchors says it
    stat = None if sample_stat is None else (lambda f, _: sample_stat(f.detach()))
    return ring_blocks([build], (features, labels), group=group, backend=backend, sample_stat=stat,
                       reduce=reduce, weight=weight).results[0]


def ring_pairs(builds, first: Tensor, second: Tensor, *, group, backend: str, reduce=None,
               weight: Optional[Tensor] = None, sides: Optional[tuple] = None) -> list[Tensor]:
    """Ring mode of row-paired losses (query/key, image/text): each ``build(first, second)`` (gather mode's,
    on placeholders of the global batch) takes its anchors from one input; the other one travels. ``reduce``
    and ``weight``: as in ring_views; ``sides``: as in _run_ring."""
    batch = gather_batch(group, torch.zeros(first.shape[0], dtype=torch.long, device=first.device), weight,
                         layout=(first.shape[1],))
    place_first, place_second = _placeholder(first, batch.total), _placeholder(second, batch.total)
    losses = []
    for build in builds:
        spec, extra = _build_on_placeholders(build, place_first, place_second)
        if reduce is not None:
            spec = reduce(spec, batch.tensors[1])
        anchors, keys = (first, second) if spec.anchors is place_first else (second, first)
        if spec.normalize:  # as ring_views: unit rows before the ring (the shard specs do not normalise)
            anchors, keys = (normalize_rows(x, spec.accum_dtype).to(x.dtype) for x in (anchors, keys))
        losses.append(_run_ring(spec, extra, anchors, keys, 1, 1, batch, group, backend, sides))
    return losses
